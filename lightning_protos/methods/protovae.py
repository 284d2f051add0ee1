"""ProtoVAE (Prototypical VAE, ICLR 2022 submission, Alg. 1) and its reconstruction baselines
AE, VAE-KL and InfoVAE (METHODS 1.2, 2, 3.2), all on the same networks (nets/protovae.py).

ProtoVAE, per batch x of epoch i (Alg. 1):
  1. if i > warm-up (``warmup_epochs`` = 10 epochs of reconstruction only):
     a. Z = enc(x); S = Z V; codes Q = Sinkhorn(S)                    (Eq. 11-12, ops.sinkhorn)
        L_prot = -mean_i sum_k q_ik log p_ik, P = softmax(S / tau)    (Eq. 10)
        -> Adam step on the encoder and V
     b. Z = enc(x) again; k_i = argmax_k Q_ik (optimal transport) or argmax_k P_ik (``reg_assign``)
        L_reg = sum_k MMD({z_i : k_i = k}, N(v_k, I)), v_k fixed      (Eq. 4-5, ops.mmd)
        clusters with fewer than 2 samples in the batch are skipped
        -> Adam step on the encoder only
  2. always: x^ = dec(enc(x)); L_rec = BCE(x, x^), mean over scalars (Eq. 2)
        -> Adam step on the encoder and the decoder
Three Adam optimisers (lr 1e-3), one per step, each with its own moments. The training MSE is
logged beside the BCE (Fig. 6). Contract: embed = z (the linear 256-d projection head),
cluster_probs = softmax(z V / tau), prototypes = V^T, decode = dec. The inspection's samples
of cluster k decode v_k plus Gaussian noise scaled to the codes' spread (``InspectionImages``,
ops.around), not N(v_k, I), the distribution L_reg pulls the cluster towards.

Choices where the paper is silent (METHODS 3.2): 3x3 convs and widths 32-64(-128); a 256-unit
bottleneck; a linear projection head (ReLU as an option); no L2 normalisation of z and V
(an option); tau 0.1, eps 0.05, 3 Sinkhorn iterations, kernel bandwidth 2 sigma^2 = 256; the
codes for step 1b are recomputed on the new Z; V has Keras' default (Glorot uniform) init.
K = 1 is allowed (the paper's K = 1 run): its codes are all 1 and L_prot is 0.

Baselines (METHODS 2), one Adam optimiser each:
  AE:      L = L_rec.
  VAE-KL:  z = mu + sigma * eps; L = L_rec + KL(q(z|x) || N(0, I)) / D after the warm-up, with D
           the number of scalars of x: the ELBO divided by D, since L_rec is a mean over them.
  InfoVAE: z as VAE-KL; L = L_rec + lambda MMD(z, draws of N(0, I)) after the warm-up
           (a = 1, lambda = 1: the MMD-VAE; same kernel as ProtoVAE).
They have no clusters: each is a one-cluster model (K = 1, ``cluster_probs`` all ones, no
prototypes) evaluated by reconstruction MSE (eval.reconstruction.ReconstructionEvaluator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtosError, check_choices, check_non_negative, check_positive, check_widths
from ..nets.protovae import ProtoDecoder, ProtoEncoder
from ..ops.mixture import gaussian_kl
from ..ops.mmd import grouped_mmd, mmd
from ..ops.sinkhorn import sinkhorn
from ..ops.vaesim import similarity
from .base import ClusteringMethod, adam
from .vae import VAEMethod


class ReconstructionMethod(ClusteringMethod):
    """The networks, L_rec (Eq. 2) and the contract's ``embed`` / ``decode`` shared by ProtoVAE
    and its baselines.

    Args:
        n_clusters: K.
        input_shape: ``(C, H, H)`` with H divisible by 2^len(channels) (MNIST 28, CIFAR 32).
        latent_dim: size of z (the paper: 256).
        channels: conv block widths; ``None`` for 32-64 on 28x28 images, 32-64-128 otherwise.
        bottleneck_dim: units of the encoder's bottleneck Dense layer (ours: 256).
        lr: Adam learning rate (1e-3).
    """

    min_clusters = 1

    def __init__(
        self,
        n_clusters: int,
        input_shape: tuple[int, ...],
        latent_dim: int,
        channels: Sequence[int] | None,
        bottleneck_dim: int,
        lr: float,
    ) -> None:
        super().__init__(n_clusters, input_shape)
        check_positive(latent_dim=latent_dim, bottleneck_dim=bottleneck_dim, lr=lr)
        shape = self.input_shape
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ProtosError(f"the conv network takes square images (C, H, H), got input shape {shape}")
        side = shape[1]
        channels = tuple(channels) if channels is not None else (32, 64) if side == 28 else (32, 64, 128)
        if not channels:
            raise ProtosError("channels must name at least one conv block, e.g. [32, 64]")
        check_widths("channels", channels)
        self.encoder = ProtoEncoder(shape[0], side, channels, bottleneck_dim)
        self.head = nn.Sequential(nn.Linear(bottleneck_dim, latent_dim))  # z, or mu for the VAEs
        self.decoder = ProtoDecoder(latent_dim, shape[0], side, channels)

    # -- contract ---------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """z (ProtoVAE, AE) or the posterior mean mu (VAE-KL, InfoVAE), ``(B, latent_dim)``."""
        return self.head(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def cluster_probs(self, x: Tensor) -> Tensor:
        """One cluster holding everything, ``(B, 1)`` (the baselines have no clusters)."""
        return torch.ones(len(x), 1, device=x.device)

    # -- losses -----------------------------------------------------------------------
    def reconstruction_terms(self, x: Tensor, x_rec: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({L_rec: BCE, Eq. 2}, {MSE: the Fig. 6 metric}), both means over all scalars, float32."""
        with self.full_precision():
            x, x_rec = x.float(), x_rec.float()
            mse = F.mse_loss(x_rec.detach(), x)
            # binary_cross_entropy raises on a NaN input (its range check; on a GPU, a device-side
            # assert); a NaN reconstruction must reach check_and_log as a NaN L_rec instead, which
            # stops the run naming it: the MSE, computed anyway, carries the NaN into it
            bce = F.binary_cross_entropy(x_rec.nan_to_num(0.5), x) + 0 * mse
            return {"L_rec": bce}, {"MSE": mse}

    def bernoulli_inputs(self) -> bool:
        return True  # L_rec is BCE (Eq. 2)

    def clustering_start(self) -> int:
        """Epochs i <= warm-up (Alg. 1, epochs counted from 1) train the reconstruction only."""
        return getattr(self.hparams, "warmup_epochs", 0)

    def configure_optimizers(self):
        return adam(self.parameters(), self.hparams.lr)


class AE(ReconstructionMethod):
    """The plain autoencoder baseline: L = L_rec. Arguments as :class:`ReconstructionMethod`
    (K is 1)."""

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 256,
        channels: Sequence[int] | None = None,
        bottleneck_dim: int = 256,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(1, input_shape, latent_dim, channels, bottleneck_dim, lr)
        self.save_hyperparameters()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["x"]
        terms, metrics = self.reconstruction_terms(x, self.decoder(self.embed(x)))
        self.optimize(self.check_and_log(terms, metrics=metrics), self.optimizers())


class _VariationalBaseline(ReconstructionMethod):
    """VAE-KL and InfoVAE: a mu head (``head``) and a log-variance head, z reparameterised, and a
    regulariser switched on after ``warmup_epochs``."""

    reparameterise = staticmethod(VAEMethod.reparameterise)

    def __init__(self, input_shape, latent_dim, channels, bottleneck_dim, lr, warmup_epochs) -> None:
        super().__init__(1, input_shape, latent_dim, channels, bottleneck_dim, lr)
        check_non_negative(warmup_epochs=warmup_epochs)
        self.logvar = nn.Linear(bottleneck_dim, latent_dim)

    def regulariser(self, mu: Tensor, logvar: Tensor, z: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["x"]
        h = self.encoder(x)
        mu, logvar = self.head(h), self.logvar(h)
        z = self.reparameterise(mu, logvar)
        terms, metrics = self.reconstruction_terms(x, self.decoder(z))
        if not self.before_clustering():
            terms.update(self.in_float32(self.regulariser, mu, logvar, z))
        self.optimize(self.check_and_log(terms, metrics=metrics), self.optimizers())


class VAEKL(_VariationalBaseline):
    """VAE-KL: L = L_rec + KL(q(z|x) || N(0, I)) / D after the warm-up (see the module docstring).

    Args:
        input_shape, latent_dim, channels, bottleneck_dim, lr: see :class:`ReconstructionMethod`.
        warmup_epochs: epochs of reconstruction only (ProtoVAE's: 10).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 256,
        channels: Sequence[int] | None = None,
        bottleneck_dim: int = 256,
        lr: float = 1e-3,
        warmup_epochs: int = 10,
    ) -> None:
        super().__init__(input_shape, latent_dim, channels, bottleneck_dim, lr, warmup_epochs)
        self.save_hyperparameters()

    def regulariser(self, mu: Tensor, logvar: Tensor, z: Tensor) -> dict[str, Tensor]:
        return {"KL": gaussian_kl(mu, logvar).sum(dim=1).mean() / self.input_dim}


class InfoVAE(_VariationalBaseline):
    """InfoVAE, MMD form with a = 1: L = L_rec + lambda MMD(z, N(0, I) draws) after the warm-up.

    Args:
        input_shape, latent_dim, channels, bottleneck_dim, lr: see :class:`ReconstructionMethod`.
        warmup_epochs: epochs of reconstruction only (ProtoVAE's: 10).
        lam: lambda, the MMD weight (ours: 1).
        mmd_bandwidth: 2 sigma^2 of the Gaussian kernel; ``None`` for latent_dim.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 256,
        channels: Sequence[int] | None = None,
        bottleneck_dim: int = 256,
        lr: float = 1e-3,
        warmup_epochs: int = 10,
        lam: float = 1.0,
        mmd_bandwidth: float | None = None,
    ) -> None:
        super().__init__(input_shape, latent_dim, channels, bottleneck_dim, lr, warmup_epochs)
        check_positive(lam=lam)
        check_positive(mmd_bandwidth=mmd_bandwidth)
        self.save_hyperparameters()

    def regulariser(self, mu: Tensor, logvar: Tensor, z: Tensor) -> dict[str, Tensor]:
        if len(z) < 2:  # an epoch's last batch of one sample: the unbiased MMD needs two
            return {"MMD": z.sum() * 0.0}
        return {"MMD": self.hparams.lam * mmd(z, torch.randn_like(z), self.hparams.mmd_bandwidth)}


class ProtoVAE(ReconstructionMethod):
    """ProtoVAE (Alg. 1; see the module docstring).

    Args:
        n_clusters: K, the number of prototypes (>= 1; the paper sweeps 1..50).
        input_shape, latent_dim, channels, bottleneck_dim, lr: see :class:`ReconstructionMethod`.
        tau: softmax temperature of P (Eq. 10; ours, SwAV's 0.1).
        eps: entropic regularisation of the Sinkhorn codes (Eq. 11; ours, SwAV's 0.05).
        sinkhorn_iters: Sinkhorn-Knopp iterations (ours: 3).
        mmd_bandwidth: 2 sigma^2 of the MMD kernel (Eq. 4); ``None`` for latent_dim.
        warmup_epochs: epochs of reconstruction only (§3.1: 10).
        reg_assign: the assignment feeding L_reg: ``argmax`` of the Sinkhorn codes (the paper's
            "optimal transport") or of the ``softmax`` P.
        normalize: L2-normalise z and the prototypes in the scores, as SwAV (the paper does not).
        head_activation: ``linear`` (ours) or ``relu`` (§3.1 read literally) on the projection head.
    """

    ddp_unused_parameters = True  # each of the three optimisers' steps uses a part of the network

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 256,
        channels: Sequence[int] | None = None,
        bottleneck_dim: int = 256,
        lr: float = 1e-3,
        tau: float = 0.1,
        eps: float = 0.05,
        sinkhorn_iters: int = 3,
        mmd_bandwidth: float | None = None,
        warmup_epochs: int = 10,
        reg_assign: Literal["argmax", "softmax"] = "argmax",
        normalize: bool = False,
        head_activation: Literal["linear", "relu"] = "linear",
    ) -> None:
        super().__init__(n_clusters, input_shape, latent_dim, channels, bottleneck_dim, lr)
        check_positive(tau=tau, eps=eps, mmd_bandwidth=mmd_bandwidth)
        if sinkhorn_iters < 1:
            raise ProtosError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        check_non_negative(warmup_epochs=warmup_epochs)
        check_choices(
            reg_assign=(reg_assign, ("argmax", "softmax")),
            head_activation=(head_activation, ("linear", "relu")),
        )
        self.save_hyperparameters()
        if head_activation == "relu":
            self.head.append(nn.ReLU())
        self.V = nn.Parameter(nn.init.xavier_uniform_(torch.empty(latent_dim, n_clusters)))  # prototype layer

    # -- contract ---------------------------------------------------------------------
    def scores(self, z: Tensor) -> Tensor:
        """``(B, K)`` S = z^T v_k (cosines with ``normalize``), in float32: the codes and P scale
        S by 1 / eps and 1 / tau, which would magnify a bf16 product's rounding."""
        return self.in_float32(similarity, z, self.V.T, kind="cos" if self.hparams.normalize else "dot")

    def cluster_probs(self, x: Tensor) -> Tensor:
        """P = softmax(z V / tau), ``(B, K)``."""
        return torch.softmax(self.scores(self.embed(x)) / self.hparams.tau, dim=1)

    def prototypes(self) -> Tensor:
        """V^T, ``(K, latent_dim)``."""
        return self.V.detach().T.clone()

    # -- losses -----------------------------------------------------------------------
    def codes(self, s: Tensor) -> Tensor:
        """Sinkhorn codes Q of the scores, ``(B, K)`` (Eq. 11-12)."""
        return sinkhorn(s, self.hparams.eps, self.hparams.sinkhorn_iters)

    def prototype_loss(self, s: Tensor, q: Tensor) -> Tensor:
        """Eq. 10: L_prot = -mean_i sum_k q_ik log softmax(s_i / tau)_k."""
        with self.full_precision():
            return -(q * F.log_softmax(s.float() / self.hparams.tau, dim=1)).sum(dim=1).mean()

    def regularisation_loss(self, z: Tensor, assign: Tensor) -> Tensor:
        """Eq. 5: sum over clusters with n_k >= 2 of MMD({z_i : k_i = k}, n_k draws of N(v_k, I)),
        v_k detached. 0 (still a function of z) when no cluster has 2 samples."""
        with self.full_precision():
            z, v = z.float(), self.V.detach().float()  # v: (latent_dim, K)
            # all the draws in one call, y_i ~ N(v_{k_i}, I): the estimator of one MMD per cluster
            y = v[:, assign].T + torch.randn_like(z)
            return grouped_mmd(z, y, assign, self.n_clusters, self.hparams.mmd_bandwidth)

    # -- training (Alg. 1) ------------------------------------------------------------
    def configure_optimizers(self):
        lr = self.hparams.lr
        encoder = [*self.encoder.parameters(), *self.head.parameters()]
        return [
            adam([*encoder, self.V], lr),  # step 1a: L_prot
            adam(encoder, lr),  # step 1b: L_reg
            adam([*encoder, *self.decoder.parameters()], lr),  # step 2: L_rec
        ]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["x"]
        opt_prot, opt_reg, opt_rec = self.optimizers()
        terms: dict[str, Tensor] = {}
        if not self.before_clustering():
            # 1a. codes by Sinkhorn, L_prot on the encoder and V
            s = self.scores(self.embed(x))
            terms["L_prot"] = self.prototype_loss(s, self.codes(s))
            self.optimize(terms["L_prot"], opt_prot)
            # 1b. recomputed Z, hard assignments, L_reg on the encoder only
            z = self.embed(x)
            with torch.no_grad():
                s = self.scores(z)
                assign = (self.codes(s) if self.hparams.reg_assign == "argmax" else s).argmax(dim=1)
            terms["L_reg"] = self.regularisation_loss(z, assign)
            self.optimize(terms["L_reg"], opt_reg)
        # 2. L_rec on the encoder and the decoder
        rec, metrics = self.reconstruction_terms(x, self.decoder(self.embed(x)))
        terms.update(rec)
        self.optimize(terms["L_rec"], opt_rec)
        self.check_and_log({k: v.detach() for k, v in terms.items()}, metrics=metrics)
