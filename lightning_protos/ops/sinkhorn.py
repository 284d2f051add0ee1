"""Equipartitioned soft codes by Sinkhorn-Knopp (Cuturi 2013; SwAV; ProtoVAE Eq. 11-12)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def _logsumexp(x: Tensor, dim: int | tuple[int, ...], over_ranks: bool) -> Tensor:
    """log sum exp of ``x`` over ``dim`` (kept), and over the ranks' copies when ``over_ranks``
    and a process group is up: the maxima, then the shifted sums are all-reduced."""
    top = x.amax(dim=dim, keepdim=True)
    distributed = over_ranks and dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = (x - top).exp().sum(dim=dim, keepdim=True)
    if distributed:
        dist.all_reduce(total)
    return top + total.log()


@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float = 0.05, n_iters: int = 3) -> Tensor:
    """Equipartitioned codes by Sinkhorn-Knopp (Cuturi 2013; ProtoVAE Eq. 11-12).

    Approximately solves max_Q Tr(Q^T S) + eps H(Q) over the transport polytope whose K
    cluster marginals are 1/K and whose B sample marginals are 1/B (the paper prints "min",
    a sign slip): Q = exp(S / eps) normalised to total 1, then rescaled alternately over
    clusters and samples, ``n_iters`` times, ending on the samples. The same iterates are
    computed on log Q (each sum a log-sum-exp shifted by its maximum), in float32 and without
    gradient (also under autocast), so no sample's column underflows to 0/0 when the scores
    spread far beyond eps. Under ``torch.distributed`` the batch is the union of the ranks'
    batches: the total, the cluster sums and the batch size are all-reduced (world size read
    at call time).

    Args:
        scores: ``(B, K)`` similarity S of B samples to K prototypes (z^T v_k).
        eps: entropic regularisation epsilon > 0.
        n_iters: Sinkhorn iterations, >= 1.

    Returns:
        ``(B, K)`` codes: each row sums to 1 and, after the last iteration, each column
        (summed over all ranks) is close to B/K.

    >>> sinkhorn(torch.zeros(2, 2))
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    with torch.autocast(scores.device.type, enabled=False):
        log_q = scores.detach().float().T / eps  # (K, B)
        n_clusters = log_q.shape[0]
        batch = torch.tensor(float(log_q.shape[1]), device=log_q.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch)
        log_k, log_b = math.log(n_clusters), batch.log()
        log_q = log_q - _logsumexp(log_q, (0, 1), over_ranks=True)
        for _ in range(n_iters):
            log_q = log_q - _logsumexp(log_q, 1, over_ranks=True) - log_k  # each cluster's mass -> 1/K
            log_q = log_q - _logsumexp(log_q, 0, over_ranks=False) - log_b  # each sample's mass -> 1/B
        return (log_q + log_b).exp().T
