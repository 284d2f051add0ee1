"""GMVAE: the Gaussian-mixture VAE (Dilokthanakul, Mediano, Garnelo, Lee, Salimbeni, Arulkumaran,
Shanahan, arXiv:1611.02648, 2016; METHODS 2), on the VAE family's conv network (methods/vae.py;
VAESim Table 1 baseline).

Names: the paper's data y, Gaussian latent x and categorical z are our x, z and c (so z is, as
in the rest of the family, the decoder's input). Generative model (§3):
    w ~ N(0, I),  c ~ Cat(1/K),  z | w, c ~ N(mu_c(w), diag sigma_c^2(w)),  x | z from the decoder,
with mu_c(w), sigma_c^2(w) the K heads of a prior network (one hidden layer). Inference: the
encoder gives q(z|x) and q(w|x) (two Gaussians on one conv trunk), and the posterior over the
categorical is computed in closed form, p(c | z, w) ∝ N(z; mu_c(w), sigma_c^2(w)) (uniform
p(c)), so the expectations over c are exact sums over the K components, as in the paper: no
Gumbel-softmax, no sampling of c. Each batch, one draw z ~ q(z|x) and one w ~ q(w|x) (M = 1):
     x~ = d(z);  gamma = p(c | z, w)                                   (ops.mixture_responsibilities)
     minimise -ELBO = L_recon + beta / q * (KL_cond + KL_w + max(lambda, KL_c)), batch means, with
       KL_cond = sum_c gamma_c KL(q(z|x) || N(mu_c(w), sigma_c^2(w)))  (conditional prior term)
       KL_w    = KL(q(w|x) || N(0, I))                                  (w-prior term)
       KL_c    = KL(gamma || Cat(1/K)), floored at lambda (the z-prior term with the paper's
                 information-theoretic regularisation: below lambda nats it has no gradient)
Prediction: gamma at z = z_mu, w = w_mu. Prototypes: mu_c(w = 0), the component means at the
mode of p(w). Samples of cluster c: d(mu_c(w) + sigma_c(w) * eps) with w ~ N(0, I).

Scaled as the family's ELBO (``VAEMethod.elbo_terms``): L_recon is a mean over pixels, the
KL terms (nats) are weighted by beta per latent dimension q. The component variances are
floored smoothly at 1e-6 (ops.floored_logvar), so they are positive for every output of the
prior network. Ours where the paper's MNIST settings are not in our notes (METHODS 3: the
VAESim authors ran the original code with "default parameters", absent): the conv network and
MSE reconstruction, q = 32, dim w = 16, a ReLU hidden layer of 256 units in the prior network,
lambda = 0.5 nats, Adam 1e-3 (``network: mlp`` and ``reconstruction: bce`` swap in VaDE's fully
connected network and a Bernoulli likelihood, see methods/vae.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ProtosError, check_positive
from ..nets.mlp import mlp
from ..ops import (
    floored_logvar,
    gaussian_kl,
    mixture_responsibilities,
    vade_kl_terms,
)
from .vae import VADE_HIDDEN, Network, Reconstruction, VAEMethod


class GMVAE(VAEMethod):
    """The Gaussian-mixture VAE with exact marginalisation over the K components.

    Args:
        n_clusters: K, the mixture components (MNIST 10, PneumoniaMNIST 2: the classes).
        input_shape: ``(C, 28, 28)`` or ``(C, 32, 32)`` (any with ``network: mlp``; linked from
            the data by the CLI).
        latent_dim: q, the dimension of z (ours: 32, METHODS 3).
        w_dim: the dimension of w (ours: 16).
        prior_hidden: the hidden units of the prior network w -> (mu_c(w), sigma_c^2(w)) (ours: 256).
        beta: weight of the KL terms per latent dimension (ours: the family's 5e-3).
        kl_c_floor: lambda, the floor of the z-prior term in nats, in [0, log K) (ours: 0.5).
        encoder: ``bn_relu`` or ``linear`` (see :class:`VAEMethod`).
        channels: encoder widths (ours: 64-128-256); the decoder mirrors them.
        lr: Adam learning rate (ours: 1e-3).
        lr_step_epochs: see :class:`VAEMethod` (``None``: constant).
        lr_step_gamma: see :class:`VAEMethod`.
        network, hidden, reconstruction: see :class:`VAEMethod` (ours: conv, MSE); q(w|x)
            shares the encoder's trunk either way.
    """

    compile_modules = ("encoder.features", "decoder", "prior_net")  # see encode_zw: not encoder()

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 32,
        w_dim: int = 16,
        prior_hidden: int = 256,
        beta: float = 5e-3,
        kl_c_floor: float = 0.5,
        encoder: Literal["bn_relu", "linear"] = "bn_relu",
        channels: Sequence[int] = (64, 128, 256),
        lr: float = 1e-3,
        lr_step_epochs: int | None = None,
        lr_step_gamma: float = 0.2,
        network: Network = "conv",
        hidden: Sequence[int] = VADE_HIDDEN,
        reconstruction: Reconstruction = "mse",
    ) -> None:
        super().__init__(
            n_clusters=n_clusters, input_shape=input_shape, latent_dim=latent_dim, condition_dim=0, beta=beta,
            prior_std=1.0, encoder=encoder, channels=channels, lr=lr, lr_step_epochs=lr_step_epochs,
            lr_step_gamma=lr_step_gamma, network=network, hidden=hidden, reconstruction=reconstruction,
        )  # fmt: skip
        check_positive(w_dim=w_dim, prior_hidden=prior_hidden)
        if not 0 <= kl_c_floor < math.log(n_clusters):
            raise ProtosError(
                f"kl_c_floor (lambda) must be in [0, log K = {math.log(n_clusters):.3f}) nats, got {kl_c_floor}"
            )
        self.save_hyperparameters()
        trunk = self.encoder.mu.in_features  # q(w|x) shares the encoder's trunk with q(z|x)
        self.w_mu = nn.Linear(trunk, w_dim)
        self.w_logvar = nn.Linear(trunk, w_dim)
        self.prior_net = mlp([w_dim, prior_hidden, 2 * n_clusters * latent_dim], slope=0.0)

    # -- the model ----------------------------------------------------------------------
    def encode_zw(self, x_net: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The network's input (:meth:`to_net`) -> (z_mu, z_logvar) ``(B, q)`` and (w_mu, w_logvar) ``(B, dim w)``."""
        h = self.encoder.features(x_net)
        return self.encoder.mu(h), self.encoder.logvar(h), self.w_mu(h), self.w_logvar(h)

    def components(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The prior network: w ``(B, dim w)`` -> mu_c(w), log sigma_c^2(w), each ``(B, K, q)``, in float32."""
        with self.full_precision():
            out = self.prior_net(w.float()).reshape(len(w), 2, self.n_clusters, self.hparams.latent_dim)
            return out[:, 0], floored_logvar(out[:, 1])

    @property
    def log_prior_c(self) -> Tensor:
        """``(K,)`` log p(c) = log 1/K."""
        return torch.full((self.n_clusters,), -math.log(self.n_clusters), device=self.device)

    def posterior_c(self, z: Tensor, w: Tensor) -> Tensor:
        """p(c | z, w), ``(B, K)``, for z ``(B, q)`` and w ``(B, dim w)``."""
        mu_c, logvar_c = self.components(w)
        with self.full_precision():
            return mixture_responsibilities(z.float(), self.log_prior_c, mu_c, logvar_c)

    # -- contract -----------------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        """p(c | z_mu, w_mu), ``(B, K)``."""
        z_mu, _, w_mu, _ = self.encode_zw(self.to_net(x))
        return self.posterior_c(z_mu, w_mu)

    def prototypes(self) -> Tensor:
        """mu_c(w = 0), the component means at the mode of p(w), ``(K, q)``."""
        with torch.no_grad():
            return self.components(torch.zeros(1, self.hparams.w_dim, device=self.device))[0][0]

    # -- training -----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        h = self.hparams
        x = self.to_net(batch["x"])
        z_mu, z_logvar, w_mu, w_logvar = self.encode_zw(x)
        z, w = self.reparameterise(z_mu, z_logvar), self.reparameterise(w_mu, w_logvar)
        out = self.reconstruct(z)
        mu_c, logvar_c = self.components(w)
        with self.full_precision():
            z_mu, z_logvar, z = z_mu.float(), z_logvar.float(), z.float()
            # VaDE's two KL terms, with a prior per sample (from w)
            kl_cond, kl_c, _ = vade_kl_terms(z_mu, z_logvar, z, self.log_prior_c, mu_c, logvar_c)
            weight = h.beta / h.latent_dim
            kl_c = kl_c.mean()  # the floor lambda is on this mean
            terms = {
                "L_recon": self.reconstruction_loss(x, out),
                "KL_cond": weight * kl_cond.mean(),
                "KL_w": weight * gaussian_kl(w_mu.float(), w_logvar.float()).sum(-1).mean(),
                "KL_c": weight * kl_c.clamp_min(h.kl_c_floor),
            }
        # the floored term hides a collapse of the cluster posterior onto its prior: log it unfloored too
        self.optimize(self.check_and_log(terms, metrics={"KL_c_unfloored": weight * kl_c}), self.optimizers())
