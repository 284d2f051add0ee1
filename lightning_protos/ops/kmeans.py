"""k-means initialisations (scikit-learn) and the CM's pseudo-inverse encoder."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from torch import Tensor


def kmeans_pp_centres(x: Tensor, k: int, seed: int, lloyd_steps: int = 0) -> Tensor:
    """``(K, d)`` k-means++ seeds of ``x`` ``(N, d)``, optionally refined by Lloyd steps."""
    xn = x.detach().cpu().double().numpy()
    if lloyd_steps > 0:
        km = KMeans(k, init="k-means++", n_init=1, max_iter=lloyd_steps, random_state=seed).fit(xn)
        centres = km.cluster_centers_
    else:
        centres, _ = kmeans_plusplus(xn, k, random_state=seed)
    return torch.as_tensor(centres, dtype=x.dtype)


def kmeans_centres(x: Tensor, k: int, seed: int, n_init: int = 20) -> Tensor:
    """``(K, d)`` centres of scikit-learn's k-means (k-means++ seeding, ``n_init`` restarts)."""
    km = KMeans(k, n_init=n_init, random_state=seed).fit(x.detach().cpu().double().numpy())
    return torch.as_tensor(km.cluster_centers_, dtype=x.dtype)


def pinv_encoder(centres: Tensor) -> Tensor:
    """``(d, K)`` pseudo-inverse of the ``(K, d)`` centres: the CM encoder that maps each
    centre to its own basis vector (paper Sec. 4.1). Computed in float64."""
    return torch.as_tensor(np.linalg.pinv(centres.detach().cpu().double().numpy()), dtype=centres.dtype)
