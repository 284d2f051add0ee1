"""Deep k-means (Fard, Thonet, Gaussier; Pattern Recognition Letters 2020): the soft k-means
loss with a softmax of inverse temperature alpha, and its annealing schedule."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kmeans import squared_distances

ALPHA_1 = 0.1  # first value of the annealing schedule (DKM Sec. 4)


def dkm_weights(d2: Tensor, alpha: float | Tensor) -> Tensor:
    """``(B, K)`` G_k(z_i) = softmax_k(-alpha ||z_i - r_k||^2) from squared distances ``d2`` ``(B, K)``."""
    return torch.softmax(-alpha * d2, dim=-1)


def dkm_clustering_loss(z: Tensor, r: Tensor, alpha: float | Tensor) -> Tensor:
    """sum_i sum_k ||z_i - r_k||^2 G_k(z_i): the differentiable k-means term, summed over the batch.

    As alpha grows, G_k tends to the one-hot of the nearest centroid and the term to the
    k-means loss sum_i min_k ||z_i - r_k||^2.

    Args:
        z: ``(B, p)`` codes.
        r: ``(K, p)`` centroids (cluster representatives).
        alpha: inverse temperature of the softmax (> 0).
    """
    d2 = squared_distances(z, r)
    return (d2 * dkm_weights(d2, alpha)).sum()


def annealed_alpha(step: int, alpha_1: float = ALPHA_1) -> float:
    """alpha after ``step`` annealing steps: alpha(0) = alpha_1 and
    alpha(n) = 2^(1 / ln(n + 1)^2) alpha(n - 1), the index shifted by one as in the DKM authors'
    code so that ln 1 = 0 never divides.

    >>> [round(annealed_alpha(n), 4) for n in range(3)]
    [0.1, 0.4232, 0.7516]
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    alpha = alpha_1
    for n in range(1, step + 1):
        alpha *= 2.0 ** (1.0 / math.log(n + 1) ** 2)
    return alpha
