"""k-means initialisations (scikit-learn), the CM's pseudo-inverse encoder, and the cluster
arithmetic of the centroid methods: squared distances, per-cluster sums (all-reduced across
ranks on request) and DCN's running-mean centroid update."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
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


def squared_distances(x: Tensor, c: Tensor) -> Tensor:
    """``(N, K)`` squared Euclidean distances ||x_i - c_k||^2 of ``x`` ``(N, d)`` to ``c`` ``(K, d)``,
    from the differences (exact near zero, unlike the ``||x||^2 - 2 x.c + ||c||^2`` expansion)."""
    return (x.unsqueeze(1) - c.unsqueeze(0)).pow(2).sum(dim=-1)


def nearest_one_hot(x: Tensor, c: Tensor, n_columns: int | None = None) -> Tensor:
    """``(N, n_columns)`` one-hot of the nearest of the centres ``c`` ``(K, d)`` to each row of
    ``x`` ``(N, d)`` (columns past K stay 0; ``None``: K), in ``x``'s dtype: a hard assignment
    as ``cluster_probs`` returns it. By ``torch.cdist``, which forms no ``(N, K, d)`` difference
    tensor (17x faster than :func:`squared_distances` on a 2048 x 784 batch and 10 centres)."""
    nearest = torch.cdist(x, c).argmin(dim=1)
    return torch.nn.functional.one_hot(nearest, len(c) if n_columns is None else n_columns).to(x.dtype)


def cluster_sums(z: Tensor, assign: Tensor, k: int, over_ranks: bool = False) -> tuple[Tensor, Tensor]:
    """Per-cluster sums ``(K, p)`` and sizes ``(K,)`` (long) of codes ``z`` ``(B, p)`` under hard
    assignments ``assign`` ``(B,)``: the sufficient statistics of :func:`running_mean_update`.
    With ``over_ranks``, under ``torch.distributed``, both are all-reduced: the statistics of the
    union of every rank's batch."""
    sums = z.new_zeros(k, z.shape[1]).index_add_(0, assign, z)
    sizes = torch.zeros(k, dtype=torch.long, device=z.device).index_add_(0, assign, torch.ones_like(assign))
    if over_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(sizes)
    return sums, sizes  # index_add_, not bincount: no device-to-host sync on a GPU


def running_mean_update(centroids: Tensor, counts: Tensor, sums: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """DCN's centroid step (Yang et al., ICML 2017, Eq. 12) for a whole batch at once.

    Per sample i assigned to k, DCN does c_k <- c_k + 1, then m_k <- m_k - (1 / c_k)(m_k - z_i).
    Over the n_k samples of cluster k in a batch this telescopes ((c + j) m_j = (c + j - 1) m_{j-1} + z_j)
    into a closed form that does not depend on the order of the samples:

        m_k' = (c_k m_k + sum_{i -> k} z_i) / (c_k + n_k) = m_k + (S_k - n_k m_k) / (c_k + n_k),
        c_k' = c_k + n_k.

    Args:
        centroids: ``(K, p)`` m_k.
        counts: ``(K,)`` c_k, samples assigned so far (persistent across batches).
        sums: ``(K, p)`` S_k, per-cluster sums of the batch's codes (:func:`cluster_sums`).
        sizes: ``(K,)`` n_k, per-cluster batch counts.

    Returns:
        The new centroids and counts; clusters with no sample in the batch keep theirs.
    """
    new_counts = counts + sizes
    denom = new_counts.clamp_min(1).to(centroids.dtype).unsqueeze(1)
    moved = centroids + (sums - sizes.to(centroids.dtype).unsqueeze(1) * centroids) / denom
    return torch.where((sizes > 0).unsqueeze(1), moved, centroids), new_counts
