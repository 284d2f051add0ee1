"""The elbow method for the number of k-means clusters, with the knee found by Kneedle
(Satopää, Albrecht, Irwin, Raghavan; ICDCS workshops 2011), as yellowbrick's ``KElbowVisualizer``
(k-means distortion over a range of K; the VAE+KMeans baseline of VAESim, METHODS 2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from torch import Tensor


def kneedle_elbow(k_values: Sequence[float], inertias: Sequence[float], sensitivity: float = 1.0) -> int:
    """Index of the elbow of a decreasing, convex curve ``inertias`` over ``k_values`` (Kneedle).

    1. Normalise both axes to [0, 1] and flip y (y' = 1 - y), so that the elbow becomes the knee
       of an increasing concave curve.
    2. Difference curve D = y' - x: the distance above the chord from the first to the last point.
    3. Each local maximum of D is a candidate with threshold T = D_max - S * mean(diff(x)); the
       first candidate after which D falls below its threshold (before a later maximum takes
       over; after a local minimum the threshold is 0) is the elbow.
    4. If no candidate is confirmed (e.g. a straight line), the global maximum of D (ours).

    Args:
        k_values: increasing K values, ``(n,)`` with n >= 3.
        inertias: the k-means distortion at each K.
        sensitivity: S; larger waits for a more pronounced drop.

    Returns:
        The index into ``k_values`` of the elbow.

    >>> kneedle_elbow([1, 2, 3, 4, 5, 6], [100, 40, 10, 8, 6, 4])
    2
    """
    x = np.asarray(k_values, dtype=float)
    y = np.asarray(inertias, dtype=float)
    if len(x) < 3 or len(x) != len(y):
        raise ValueError(f"the elbow needs >= 3 points of (K, inertia), got {len(x)} and {len(y)}")
    x_n = (x - x.min()) / (x.max() - x.min())
    span = y.max() - y.min()
    y_n = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    diff = (1.0 - y_n) - x_n
    step = np.abs(np.diff(x_n)).mean()
    candidate, threshold = None, None
    for i in range(len(diff)):
        left, right = diff[max(i - 1, 0)], diff[min(i + 1, len(diff) - 1)]
        if candidate is not None and threshold is not None and diff[i] < threshold:
            return candidate
        if diff[i] >= left and diff[i] >= right and 0 < i < len(diff) - 1:  # a local maximum
            candidate, threshold = i, diff[i] - sensitivity * step
        elif diff[i] <= left and diff[i] <= right and candidate is not None:  # a local minimum
            threshold = 0.0
    return int(np.argmax(diff))


def elbow_kmeans(
    z: Tensor, k_values: Sequence[int], seed: int, n_init: int = 1, sensitivity: float = 1.0
) -> tuple[int, np.ndarray, np.ndarray]:
    """k-means (scikit-learn, k-means++ seeding) on ``z`` ``(N, p)`` for every K of ``k_values``,
    and the K at the elbow of the inertia curve (:func:`kneedle_elbow`).

    Returns:
        (K, its centres ``(K, p)``, the inertia at every K of ``k_values``).
    """
    data = z.detach().cpu().double().numpy()
    fits = [KMeans(k, n_init=n_init, random_state=seed).fit(data) for k in k_values]
    inertias = np.array([f.inertia_ for f in fits])
    best = kneedle_elbow(list(k_values), inertias, sensitivity)
    return int(k_values[best]), fits[best].cluster_centers_, inertias
