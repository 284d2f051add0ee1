"""VAESim: a VAE conditioned on prototype similarity (Ferrante, Boccato, Spasov, Duggento,
Toschi; J = vaesim_journal, Alg. 1-2; P = the preprint).

1. at the first training step, Q (K x q) <- K random codes z of the first batch            (§3.2)
2. each batch:                                                                            (Alg. 1)
     (z_mu, z_logvar) = e(x),  z = z_mu + exp(z_logvar / 2) * eps
     c  = softmax(s(z, Q) / tau),  s = cosine similarity                                  (Eq. 1)
     x~ = d([z, c])                        (Alg. 1 prints d(x, c), a typo)
     minimise L_ELBO = L_recon + beta * KL(q(z|x) || N(0, I))                             (Eq. 2)
3. after the optimiser step, Update(Q, z, c) outside autograd:                            (Alg. 2)
     k_i ~ Categorical(c_i);  Q_j <- eta * mean{z_i : k_i = j} + (1 - eta) * Q_j  (eta = 0.95,
     rows without a sample unchanged; per-cluster sums and counts all-reduced across ranks)
4. tau: 1 -> 0.01 linearly over the first half of the training steps, then 0.01          (Alg. 1)
Prediction: c of z_mu at the current tau (argmax: the most similar prototype). Decoding a
latent (a prototype) conditions on c = softmax(s(z, Q) / tau_final) (METHODS 1.1).

L_ortho = ||Q Q^T - I||^2 (Eq. 3) is logged each epoch (``train/L_ortho``), not optimised:
Q is outside autograd and the term does not involve the network, so lambda * L_ortho in Eq. 4
has no gradient path (METHODS 3.1 V4); making Q a parameter for it (V4's experimental
``ortho_grad``) is not implemented.

Where the paper is silent or the authors' code differs (METHODS 1.1 and 3.1; REFERENCE_CODE 1):
each code choice is an option, and ``configs/vaesim_*_reference.yaml`` set them all:
``similarity: dot`` (V1), ``tau_schedule: code`` (V2, tau = 1), ``init: noise_images`` (V3),
``assign: argmax`` (V5), ``prior_std: 0.8`` (V6), ``encoder: linear`` (V7), batch 2000; the
PneumoniaMNIST one also the code's StepLR (``lr_step_epochs: 20``; in MNIST's 20 epochs it
never fires). The code's own decoders (condition fed as an extra
channel) are not reproduced: both profiles use the decoder below. ``augment: true`` is
VAEsim (aug) (J Table 1): random equalisation and affine moves of each batch, on its device.
Network, beta = 5e-3, K = 40, Adam 1e-4, batch 2048: ours (METHODS 1.1), see nets/conv.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..errors import ProtosError, check_choices, check_positive
from ..ops import (
    draw_assignments,
    ema_prototype_update,
    ortho_loss,
    random_affine,
    random_equalize,
    similarity,
    soft_assign,
    temperature,
)
from ..ops.vaesim import Schedule, Similarity
from .distributed import broadcast_from_rank0
from .vae import VADE_HIDDEN, Network, Reconstruction, VAEMethod


class VAESim(VAEMethod):
    """The conditional VAE with EMA prototypes.

    Args:
        n_clusters: K, the number of prototypes (ours, = the authors' code: 40).
        input_shape: ``(C, 28, 28)`` or ``(C, 32, 32)`` (any with ``network: mlp``; linked from
            the data by the CLI).
        latent_dim: q (J: 32).
        beta: weight of the KL term (ours, = code: 5e-3).
        prior_std: s of the prior N(0, s^2 I) (paper: 1; code: 0.8).
        similarity: ``cos`` (J §3 text) or ``dot`` (Eq. 1 as printed; the code).
        tau_schedule: ``paper`` (Alg. 1), ``quarter_hot`` (§3.2) or ``code`` (tau = tau_start
            throughout); see :func:`lightning_protos.ops.vaesim.temperature`.
        tau_start: temperature at the start of the ramp (Alg. 1: 1).
        tau_end: final temperature (Alg. 1: 0.01).
        tau_hot: temperature of the first quarter with ``quarter_hot`` (ours: the code's 5).
        eta: EMA weight of the new batch mean, in [0, 1) (Alg. 2: 0.95).
        assign: the cluster labels of the update, ``sample`` drawn from c (Alg. 2) or its ``argmax``.
        init: Q from the codes of the ``first_batch`` (§3.2) or of K uniform-noise images
            through the untrained encoder (``noise_images``, the code).
        encoder: ``bn_relu`` (App. A) or ``linear`` (the code's conv stack without BN or ReLU).
        channels: encoder widths (ours: 64-128-256); the decoder mirrors them.
        lr: Adam learning rate (ours, = code: 1e-4).
        lr_step_epochs: multiply the learning rate by ``lr_step_gamma`` every this many epochs
            (the code's StepLR: 20 and 0.2); ``None`` keeps it constant.
        lr_step_gamma: the factor of that decay.
        augment: VAEsim (aug): random equalisation (p = 0.5) and a random affine move (+-15
            degrees, +-10% shift, scale 0.9-1.1) of each training image (ours: magnitudes).
        network, hidden, reconstruction: see :class:`~.vae.VAEMethod` (J: conv, MSE).
    """

    fit_length_schedule = "the temperature's annealing (over the fit's steps)"
    fit_length_settings = ("max_epochs", "max_steps")  # the trainer's estimated_stepping_batches

    def __init__(
        self,
        n_clusters: int = 40,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 32,
        beta: float = 5e-3,
        prior_std: float = 1.0,
        similarity: Similarity = "cos",
        tau_schedule: Schedule = "paper",
        tau_start: float = 1.0,
        tau_end: float = 0.01,
        tau_hot: float = 5.0,
        eta: float = 0.95,
        assign: Literal["sample", "argmax"] = "sample",
        init: Literal["first_batch", "noise_images"] = "first_batch",
        encoder: Literal["bn_relu", "linear"] = "bn_relu",
        channels: Sequence[int] = (64, 128, 256),
        lr: float = 1e-4,
        lr_step_epochs: int | None = None,
        lr_step_gamma: float = 0.2,
        augment: bool = False,
        network: Network = "conv",
        hidden: Sequence[int] = VADE_HIDDEN,
        reconstruction: Reconstruction = "mse",
    ) -> None:
        super().__init__(
            n_clusters=n_clusters, input_shape=input_shape, latent_dim=latent_dim, condition_dim=n_clusters,
            beta=beta, prior_std=prior_std, encoder=encoder, channels=channels, lr=lr,
            lr_step_epochs=lr_step_epochs, lr_step_gamma=lr_step_gamma, network=network, hidden=hidden,
            reconstruction=reconstruction,
        )  # fmt: skip
        check_positive(tau_start=tau_start, tau_end=tau_end, tau_hot=tau_hot)
        if not 0 <= eta < 1:
            raise ProtosError(f"eta (the EMA weight of the new batch mean) must be in [0, 1), got {eta}")
        check_choices(
            similarity=(similarity, ("cos", "dot")),
            tau_schedule=(tau_schedule, ("paper", "quarter_hot", "code")),
            assign=(assign, ("sample", "argmax")),
            init=(init, ("first_batch", "noise_images")),
        )
        if augment and len(self.input_shape) != 3:
            raise ProtosError(f"augment moves images (C, H, W), got input shape {self.input_shape}")
        self.save_hyperparameters()
        self.register_buffer("Q", torch.zeros(n_clusters, latent_dim))  # prototypes, rows
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("tau_step", torch.tensor(0))  # training steps taken: the schedule position
        self.register_buffer("tau", torch.tensor(self._temperature(0, 1)))  # tau at tau_step
        # host copies of tau_step and initialised, read once a fit: no device sync per step
        self._host_state: tuple[int, bool] | None = None

    # -- temperature ------------------------------------------------------------------
    def _temperature(self, step: int, total: int) -> float:
        h = self.hparams
        return temperature(step, total, h.tau_schedule, h.tau_start, h.tau_end, h.tau_hot)

    @property
    def final_tau(self) -> float:
        """The temperature at the end of the schedule (used to decode)."""
        return self._temperature(1, 1)

    # -- contract ---------------------------------------------------------------------
    def similarities(self, x: Tensor) -> Tensor:
        """``(B, K)`` s(z_mu, Q_k) of each image to each prototype."""
        with self.full_precision():
            return similarity(self.embed(x).float(), self.Q, self.hparams.similarity)

    def cluster_probs(self, x: Tensor) -> Tensor:
        """c = softmax(s(z_mu, Q) / tau) at the current tau, ``(B, K)`` (Eq. 1)."""
        return torch.softmax(self.similarities(x) / self.tau, dim=-1)  # as predict_step: z_mu in float32

    def prototypes(self) -> Tensor:
        return self.Q.clone()

    def condition(self, z: Tensor, tau: float | Tensor) -> Tensor:
        """c = softmax(s(z, Q) / tau) of latents ``z`` ``(B, q)``, in float32."""
        return self.in_float32(soft_assign, z, self.Q, tau=tau, kind=self.hparams.similarity)

    def decode(self, z: Tensor) -> Tensor:
        """d([z, c]) with c at the final temperature, resized to the input size."""
        c = self.condition(z, self.final_tau).to(z.dtype)
        return self.from_net(self.decoder(torch.cat([z, c], dim=1)))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Adds ``similarity`` ``(B, K)`` to the base output (written as ``sim_k`` columns)."""
        sims = self.similarities(batch["x"])
        return self.prediction(batch, torch.softmax(sims / self.tau, dim=-1), similarity=sims)

    # -- training ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.init == "first_batch" and dm is not None and hasattr(dm, "batch_size"):
            first = min(dm.batch_size, dm.n_train)
            if first < self.n_clusters:
                raise ProtosError(
                    f"init first_batch takes K={self.n_clusters} codes from a first batch of {first}: "
                    "raise data.init_args.batch_size or use init: noise_images"
                )

    def augment(self, x: Tensor) -> Tensor:
        """VAEsim (aug): per image, equalise with p = 0.5, then a random affine move."""
        return random_affine(random_equalize(x, p=0.5), degrees=15.0, translate=0.1, scale=(0.9, 1.1))

    @torch.no_grad()
    def init_prototypes(self, z: Tensor) -> None:
        """Step 1: Q <- K distinct random rows of the first batch's codes ``z`` (``first_batch``),
        or the codes of K uniform-noise images (``noise_images``); rank 0's Q on every rank."""
        if self.hparams.init == "first_batch":
            chosen = z[torch.randperm(len(z), device=z.device)[: self.n_clusters]]
        else:
            noise = torch.rand(self.n_clusters, *self.input_shape, device=z.device)
            with self.evaluating():
                mu, logvar = self.encode(noise)
            chosen = self.reparameterise(mu, logvar)
        self.Q.copy_(chosen.float())
        broadcast_from_rank0([self.Q])
        self.initialised.fill_(True)

    def on_train_start(self) -> None:
        self._host_state = None  # read again after a checkpoint or a state dict was loaded

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        h = self.hparams
        if self._host_state is None:
            self._host_state = (int(self.tau_step), bool(self.initialised))
        step, initialised = self._host_state
        x = self.augment(batch["x"]) if h.augment else batch["x"]
        x = self.to_net(x)
        mu, logvar = self.encoder(x)
        z = self.reparameterise(mu, logvar)
        if not initialised:  # step 1
            self.init_prototypes(z.detach())
        self.tau.fill_(self._temperature(step, self.trainer.estimated_stepping_batches))  # step 4
        c = self.condition(z, self.tau)  # Eq. 1
        out = self.reconstruct(torch.cat([z, c.to(z.dtype)], dim=1))
        loss = self.check_and_log(self.elbo_terms(x, out, mu, logvar))  # Eq. 2
        self.optimize(loss, self.optimizers())
        self.update_prototypes(z.detach(), c.detach())  # step 3
        self.tau_step += 1
        self._host_state = (step + 1, True)

    @torch.no_grad()
    def update_prototypes(self, z: Tensor, c: Tensor) -> None:
        """Alg. 2 on the batch's codes and soft assignments (all-reduced across ranks)."""
        k = draw_assignments(c, self.hparams.assign)
        self.Q.copy_(ema_prototype_update(self.Q, z.float(), k, self.hparams.eta))

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        with self.full_precision():
            self.log_dict({"train/tau": float(self.tau), "train/L_ortho": ortho_loss(self.Q)}, rank_zero_only=True)
