"""Maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012; ProtoVAE Eq. 4-5)."""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_kernel(a: Tensor, b: Tensor, bandwidth: float) -> Tensor:
    """``(n, m)`` w(a_i, b_j) = exp(-||a_i - b_j||^2 / bandwidth), bandwidth = 2 sigma^2."""
    sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2 * a @ b.T).clamp_min(0)
    return (-sq / bandwidth).exp()


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None) -> Tensor:
    """Unbiased estimate of MMD^2(p, q) from samples x ~ p and y ~ q (Eq. 4):

    MMD^2 = E_{p,p} w(z, z') + E_{q,q} w(z, z') - 2 E_{p,q} w(z, z'),

    the first two means over pairs of distinct samples, the last over all n x m pairs. It can
    be slightly negative when p = q.

    Args:
        x: ``(n, d)`` samples of p, n >= 2.
        y: ``(m, d)`` samples of q, m >= 2.
        bandwidth: 2 sigma^2 of the Gaussian kernel; ``None`` for d (METHODS 1.2).

    Returns:
        A scalar.

    >>> import torch
    >>> float(mmd(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0]]), bandwidth=1.0)) < 0
    True
    """
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs >= 2 samples on each side, got {n} and {m}")
    if x.shape[1:] != y.shape[1:] or x.ndim != 2:
        raise ValueError(f"x and y must be (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    bandwidth = float(x.shape[1]) if bandwidth is None else bandwidth
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    kxx = gaussian_kernel(x, x, bandwidth)
    kyy = gaussian_kernel(y, y, bandwidth)
    # Off-diagonal means: the diagonal of a Gaussian kernel is exactly 1.
    e_xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    e_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return e_xx + e_yy - 2 * gaussian_kernel(x, y, bandwidth).mean()


def grouped_mmd(x: Tensor, y: Tensor, groups: Tensor, n_groups: int, bandwidth: float | None = None) -> Tensor:
    """Sum over groups k with n_k >= 2 members of the unbiased MMD^2 of ``mmd`` (Eq. 5):

    sum_k [ sum_{i != j in k} w(x_i, x_j) / (n_k (n_k - 1)) + sum_{i != j in k} w(y_i, y_j) / (n_k (n_k - 1))
            - 2 sum_{i, j in k} w(x_i, y_j) / n_k^2 ],

    i.e. ``sum_k mmd(x[groups == k], y[groups == k], bandwidth)``, in one pass: the three
    ``(n, n)`` kernel matrices are masked to same-group pairs, and each row is weighted by the
    normaliser of its group. Groups with fewer than 2 members contribute 0. No Python loop over
    groups and no host synchronisation, so it suits a GPU training step.

    Args:
        x: ``(n, d)`` samples.
        y: ``(n, d)`` samples paired with x: y_i is a draw for the group of x_i.
        groups: ``(n,)`` int64 group of each pair, in [0, n_groups).
        n_groups: the number of groups K, >= 1.
        bandwidth: 2 sigma^2 of the Gaussian kernel; ``None`` for d (METHODS 1.2).

    Returns:
        A scalar, 0 (still a function of x and y) when no group has 2 members.

    >>> import torch
    >>> x = torch.tensor([[0.0], [1.0], [5.0]])
    >>> abs(float(grouped_mmd(x, x, torch.tensor([0, 0, 1]), 2, 1.0) - mmd(x[:2], x[:2], 1.0))) < 1e-6
    True
    >>> float(grouped_mmd(x, x, torch.tensor([0, 1, 2]), 3))  # no group of 2
    0.0
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be (n, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    if groups.shape != (len(x),) or groups.dtype != torch.int64:
        raise ValueError(f"groups must be ({len(x)},) int64, got {tuple(groups.shape)} {groups.dtype}")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    bandwidth = float(x.shape[1]) if bandwidth is None else bandwidth
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    # Group sizes n_k, as bincount(groups, minlength=n_groups) but without the host read of
    # max(groups) that torch.bincount does on CUDA; then n_{k_i} for each row i.
    n_i = groups.new_zeros(n_groups).scatter_add_(0, groups, torch.ones_like(groups))[groups]
    valid = n_i >= 2
    # Per-row weights 1 / (n_k (n_k - 1)) and 1 / n_k^2 (integer products, exact), 0 for groups of < 2.
    w_pairs = torch.where(valid, (n_i * (n_i - 1)).clamp_min(1).to(x.dtype).reciprocal(), 0)
    w_cross = torch.where(valid, n_i.pow(2).to(x.dtype).reciprocal(), 0)
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    distinct = same & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    row_xx = gaussian_kernel(x, x, bandwidth).masked_fill(~distinct, 0).sum(1)
    row_yy = gaussian_kernel(y, y, bandwidth).masked_fill(~distinct, 0).sum(1)
    row_xy = gaussian_kernel(x, y, bandwidth).masked_fill(~same, 0).sum(1)
    return (w_pairs * (row_xx + row_yy) - 2 * w_cross * row_xy).sum()
