"""DEC and IDEC (Xie et al., ICML 2016; Guo et al., IJCAI 2017): the Student's t soft assignment,
the sharpened target distribution and the KL clustering loss."""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans import squared_distances


def student_t_logits(z: Tensor, mu: Tensor, dof: float = 1.0) -> Tensor:
    """``(B, K)`` log of the unnormalised Student's t kernel, -(a+1)/2 log(1 + ||z_i - mu_j||^2 / a).

    Args:
        z: ``(B, p)`` codes.
        mu: ``(K, p)`` centroids.
        dof: degrees of freedom a (DEC: 1).
    """
    return -(dof + 1.0) / 2.0 * torch.log1p(squared_distances(z, mu) / dof)


def student_t_assign(z: Tensor, mu: Tensor, dof: float = 1.0) -> Tensor:
    """DEC Eq. (1): ``(B, K)`` soft assignments

        q_ij = (1 + ||z_i - mu_j||^2 / a)^(-(a+1)/2) / sum_j' (1 + ||z_i - mu_j'||^2 / a)^(-(a+1)/2),

    computed as a softmax of :func:`student_t_logits` (no underflow for distant codes).

    >>> student_t_assign(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    tensor([[0.6667, 0.3333]])
    """
    return torch.softmax(student_t_logits(z, mu, dof), dim=-1)


def target_distribution(q: Tensor) -> Tensor:
    """DEC Eq. (3): ``(N, K)`` target p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), with the soft
    cluster frequencies f_j = sum_i q_ij taken over all N rows of ``q`` (the whole training set).

    >>> target_distribution(torch.tensor([[0.6, 0.4], [0.5, 0.5]]))
    tensor([[0.6480, 0.3520],
            [0.4500, 0.5500]])
    """
    weight = q.pow(2) / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)


def kl_clustering_loss(p: Tensor, log_q: Tensor) -> Tensor:
    """DEC Eq. (2): KL(P || Q) = sum_i sum_j p_ij log(p_ij / q_ij), summed over the batch.

    Args:
        p: ``(B, K)`` targets (rows sum to 1; zeros allowed).
        log_q: ``(B, K)`` log soft assignments (``log_softmax`` of :func:`student_t_logits`).
    """
    return torch.nn.functional.kl_div(log_q, p, reduction="sum")
