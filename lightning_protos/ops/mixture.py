"""Gaussian-mixture priors in latent space: the component log-densities, the posterior over
components (VaDE's gamma; GMVAE's p(c | z, w)), and the closed-form KL terms of their ELBOs.

Shapes: B samples, K components, q latent dimensions. Component parameters are ``(K, q)``,
shared by the batch (VaDE), or ``(B, K, q)``, one set per sample (GMVAE, where they are a
function of w). Variances are carried as log-variances, so they are positive by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The smallest variance a mixture component can have: 1e-6, scikit-learn's ``reg_covar``, so
# that the variances of a fitted GaussianMixture are representable exactly.
VAR_FLOOR = 1e-6


def floored_logvar(raw: Tensor, floor: float = VAR_FLOOR) -> Tensor:
    """log(exp(raw) + floor): a log-variance whose variance is > ``floor`` for every real
    ``raw``, smooth (its gradient is never cut off), and ~``raw`` wherever exp(raw) >> floor.

    >>> bool(floored_logvar(torch.tensor(-1e4)).exp() > 0)
    True
    """
    return torch.logaddexp(raw, torch.full_like(raw, math.log(floor)))


def raw_logvar(var: Tensor, floor: float = VAR_FLOOR) -> Tensor:
    """The inverse of :func:`floored_logvar`: the ``raw`` whose floored variance is ``var``
    (variances at or under the floor map to the floor plus a relative 1e-6)."""
    return torch.log((var - floor).clamp_min(floor * 1e-6))


def diag_gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Element-wise KL( N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p)) ), broadcast:
    1/2 [logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1].

    >>> float(diag_gaussian_kl(torch.ones(1), torch.zeros(1), torch.ones(1), torch.zeros(1)))
    0.0
    """
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0)


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_std: float = 1.0) -> Tensor:
    """Element-wise KL( N(mu, exp(logvar)) || N(0, prior_std^2) ), the VAE's KL term: for
    ``prior_std`` 1 the usual -1/2 (1 + log sigma^2 - mu^2 - sigma^2).

    >>> float(gaussian_kl(torch.zeros(1, 1), torch.zeros(1, 1)))
    0.0
    """
    return diag_gaussian_kl(mu, logvar, 0.0, logvar.new_tensor(2 * math.log(prior_std)))


def component_log_densities(z: Tensor, mu_c: Tensor, logvar_c: Tensor) -> Tensor:
    """log N(z_i; mu_c, diag exp(logvar_c)) for every sample i and component c, ``(B, K)``.

    Args:
        z: ``(B, q)`` latents.
        mu_c, logvar_c: ``(K, q)`` or ``(B, K, q)`` component means and log-variances.
    """
    sq = (z.unsqueeze(-2) - mu_c).pow(2) / logvar_c.exp()
    return -0.5 * (math.log(2 * math.pi) + logvar_c + sq).sum(-1)


def mixture_log_responsibilities(z: Tensor, log_pi: Tensor, mu_c: Tensor, logvar_c: Tensor) -> Tensor:
    """log p(c | z), the log posterior over components, ``(B, K)``: log pi_c + log N(z; mu_c,
    sigma_c^2) normalised by a log-sum-exp, so far-away components get large negative (finite)
    values, never -inf or NaN. See :func:`mixture_responsibilities`."""
    return torch.log_softmax(log_pi + component_log_densities(z, mu_c, logvar_c), dim=-1)


def mixture_responsibilities(z: Tensor, log_pi: Tensor, mu_c: Tensor, logvar_c: Tensor) -> Tensor:
    """The posterior over components p(c | z) = pi_c N(z; mu_c, sigma_c^2) / sum_c' (same), ``(B, K)``:
    VaDE's gamma (Jiang et al. 2017, §3.2), GMVAE's p(c | z, w) (Dilokthanakul et al. 2016, §3).

    Args:
        z: ``(B, q)``; log_pi: ``(K,)`` log mixture weights (summing to 1 in probability);
        mu_c, logvar_c: ``(K, q)`` or ``(B, K, q)``.
    """
    return mixture_log_responsibilities(z, log_pi, mu_c, logvar_c).exp()


def expected_gaussian_kl(mu: Tensor, logvar: Tensor, gamma: Tensor, mu_c: Tensor, logvar_c: Tensor) -> Tensor:
    """sum_c gamma_c KL( N(mu, diag exp(logvar)) || N(mu_c, diag exp(logvar_c)) ), summed over the
    q dimensions, ``(B,)``: VaDE's E_{q(c|x)} KL(q(z|x) || p(z|c)); GMVAE's conditional prior term.

    Args:
        mu, logvar: ``(B, q)`` the Gaussian posterior q(z|x).
        gamma: ``(B, K)`` the weights of the components (rows sum to 1).
        mu_c, logvar_c: ``(K, q)`` or ``(B, K, q)``.
    """
    kl = diag_gaussian_kl(mu.unsqueeze(-2), logvar.unsqueeze(-2), mu_c, logvar_c).sum(-1)  # (B, K)
    return (gamma * kl).sum(-1)


def categorical_kl(log_gamma: Tensor, log_pi: Tensor) -> Tensor:
    """KL( Cat(gamma) || Cat(pi) ) = sum_c gamma_c (log gamma_c - log pi_c), ``(B,)``, from log
    probabilities (a gamma_c that underflows to 0 adds 0, with a finite gradient: 0 log 0 done
    from probabilities would give a NaN gradient). ``log_gamma`` ``(B, K)``; ``log_pi`` ``(K,)``
    or ``(B, K)``.

    >>> half = torch.log(torch.tensor([0.5, 0.5]))
    >>> round(float(categorical_kl(torch.tensor([[0.0, -1e4]]), half)[0]), 4)  # gamma = (1, 0): log 2
    0.6931
    """
    return (log_gamma.exp() * (log_gamma - log_pi)).sum(-1)


def vade_kl_terms(
    mu: Tensor, logvar: Tensor, z: Tensor, log_pi: Tensor, mu_c: Tensor, logvar_c: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The KL part of VaDE's negative ELBO for one draw z ~ q(z|x) (Jiang et al. 2017, §3.2):
    -ELBO = -E_q log p(x|z) + E_{q(c|x)} KL(q(z|x) || p(z|c)) + KL(q(c|x) || p(c)), with q(c|x)
    = gamma = p(c|z) in closed form. Constants cancel, so this equals the paper's closed form
    1/2 sum_c gamma_c sum_j [log sigma_cj^2 + sigma~_j^2 / sigma_cj^2 + (mu~_j - mu_cj)^2 /
    sigma_cj^2] - sum_c gamma_c log(pi_c / gamma_c) - 1/2 sum_j (1 + log sigma~_j^2).

    Args:
        mu, logvar: ``(B, q)`` q(z|x); z: ``(B, q)`` the draw gamma is computed at.
        log_pi: ``(K,)``; mu_c, logvar_c: ``(K, q)`` the mixture prior, or ``(B, K, q)`` one per
            sample (GMVAE's, from w).

    Returns:
        KL_z ``(B,)``, KL_c ``(B,)`` (both >= 0, in nats) and gamma ``(B, K)``.
    """
    log_gamma = mixture_log_responsibilities(z, log_pi, mu_c, logvar_c)
    gamma = log_gamma.exp()
    return expected_gaussian_kl(mu, logvar, gamma, mu_c, logvar_c), categorical_kl(log_gamma, log_pi), gamma
