"""Clustering metrics: ACC by Hungarian matching, and scikit-learn's NMI, ARI, homogeneity.

All take integer label vectors; scores are fractions in [0, 1] (ARI can be negative).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.metrics.cluster import contingency_matrix

LABEL_SCORES = ("acc", "nmi", "ari", "homogeneity")  # the keys of clustering_scores


def cluster_acc(y_true, y_pred) -> float:
    """Accuracy under the best one-to-one map from clusters to classes (Hungarian matching).

    Works for any number of clusters K and classes C: the contingency matrix is padded to
    square, so with K > C the unmatched clusters count as errors.

    >>> cluster_acc([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
    >>> cluster_acc([0, 0, 1, 1], [0, 1, 2, 3])
    0.5
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = contingency_matrix(y_true, y_pred)  # (C, K) over the labels present
    size = max(counts.shape)
    padded = np.zeros((size, size), dtype=counts.dtype)
    padded[: counts.shape[0], : counts.shape[1]] = counts
    rows, cols = linear_sum_assignment(-padded)
    return float(padded[rows, cols].sum() / len(y_true))


def clustering_scores(y_true, y_pred) -> dict[str, float]:
    """ACC, NMI (arithmetic normalisation), ARI and homogeneity of a partition."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {
        "acc": cluster_acc(y_true, y_pred),
        "nmi": float(skm.normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(skm.adjusted_rand_score(y_true, y_pred)),
        "homogeneity": float(skm.homogeneity_score(y_true, y_pred)),
    }
