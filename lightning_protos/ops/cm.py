"""Loss terms of the clustering module (Boubekki et al., Machine Learning 2021).

Sums run over the batch (no 1/B): the paper's alpha and batch sizes were tuned so.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_EPS = 1e-10  # inside log(gamma_tilde), as in the authors' code


def cm_terms(x: Tensor, gamma: Tensor, mu: Tensor, alpha: float | Tensor) -> dict[str, Tensor]:
    """E1..E4 of the CM loss (Eq. 3 / Eq. 7).

    Args:
        x: ``(B, d)`` inputs.
        gamma: ``(B, K)`` responsibilities (rows sum to 1).
        mu: ``(K, d)`` centroids.
        alpha: Dirichlet concentration, a scalar or ``(K,)``.

    Returns:
        ``E1`` reconstruction sum_i ||x_i - gamma_i mu||^2; ``E2`` sparsity
        sum_i sum_k gamma_ik (1 - gamma_ik) ||mu_k||^2; ``E3`` merging
        -sum_i sum_{k != l} gamma_ik gamma_il mu_k.mu_l (k != l, METHODS 3.3); ``E4`` Dirichlet
        sum_k (1 - alpha_k) log(mean_i gamma_ik). E1 + E2 + E3 = sum_i sum_k gamma_ik ||x_i - mu_k||^2.
    """
    e2, e3 = sparsity_terms(gamma, mu)
    return {"E1": (x - gamma @ mu).pow(2).sum(), "E2": e2, "E3": e3, "E4": dirichlet_term(gamma, alpha)}


def sparsity_terms(gamma: Tensor, mu: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """E2 and E3 of the CM loss (see :func:`cm_terms`), whose sum is the model-selection
    criterion L_sp; without ``mu`` their forms under orthonormal centroids (Eq. 8-9: every
    ||mu_k||^2 = 1 and E3 = 0), as in AE-CM's loss (:func:`aecm_terms`)."""
    if mu is None:
        return (gamma * (1 - gamma)).sum(), gamma.new_zeros(())
    gram = mu @ mu.T  # (K, K)
    sq_norms = torch.diagonal(gram)
    off_diag = gram - torch.diag_embed(sq_norms)
    return (gamma * (1 - gamma) * sq_norms).sum(), -((gamma.T @ gamma) * off_diag).sum()


def dirichlet_term(gamma: Tensor, alpha: float | Tensor) -> Tensor:
    """E4 = sum_k (1 - alpha_k) log(gamma_tilde_k), gamma_tilde = batch mean of gamma (Eq. 3).

    For a non-uniform prior both alpha and log(gamma_tilde) are sorted before pairing (App. 2).
    """
    log_gt = torch.log(gamma.mean(0) + LOG_EPS)
    alpha = torch.as_tensor(alpha, dtype=gamma.dtype, device=gamma.device)
    if alpha.ndim == 1:
        alpha, log_gt = alpha.sort().values, log_gt.sort().values
    return ((1 - alpha) * log_gt).sum()


def aecm_terms(
    x: Tensor, x_rec: Tensor, z: Tensor, gamma: Tensor, mu: Tensor, alpha: float | Tensor, beta: float, lam: float
) -> dict[str, Tensor]:
    """The terms of the AE-CM loss (Eq. 10) under orthonormal centroids (Eq. 8-9).

    Args:
        x: ``(B, d)`` inputs; x_rec: ``(B, d)`` = dec(z); z: ``(B, p)`` codes;
        gamma: ``(B, K)``; mu: ``(K, p)`` centroids; alpha, beta, lam: Eq. 10 weights.

    Returns:
        ``L_rec`` beta sum ||x - dec(z)||^2; ``E1`` sum ||z - gamma mu||^2; ``E2`` sum gamma(1 - gamma)
        (the ||mu_k||^2 = 1 factor dropped; E3 = 0 under orthonormality); ``E4`` Dirichlet;
        ``L_orth`` lam ||mu mu^T - I_K||_1 (element-wise L1, METHODS 3.4).
    """
    return {
        "L_rec": beta * (x - x_rec).pow(2).sum(),
        "E1": (z - gamma @ mu).pow(2).sum(),
        "E2": sparsity_terms(gamma)[0],
        "E4": dirichlet_term(gamma, alpha),
        "L_orth": orthonormality_penalty(mu, lam),
    }


def orthonormality_penalty(mu: Tensor, lam: float) -> Tensor:
    """AE-CM's L_orth = lam ||mu mu^T - I_K||_1 (Eq. 10; element-wise L1, METHODS 3.4)."""
    eye = torch.eye(mu.shape[0], dtype=mu.dtype, device=mu.device)
    return lam * (mu @ mu.T - eye).abs().sum()
