"""The VAE family's base (VAESim, VaDE, GMVAE are built on it), the plain VAE and the VAE+KMeans baseline.

VAE (Kingma & Welling 2014) with VAESim's network (METHODS 1.1, 2):
  1. (z_mu, z_logvar) = e(x), z = z_mu + exp(z_logvar / 2) * eps           (reparameterisation)
  2. x~ = d(z); minimise L = L_recon + beta * KL(q(z|x) || N(0, s^2 I))    (ELBO, VAESim Eq. 2)
        L_recon = mean over pixels and batch of (x - x~)^2   (on the 32x32 images the net sees)
                  (``reconstruction: bce``: of the Bernoulli -[x log x~ + (1 - x) log(1 - x~)])
        KL      = mean over batch and latent dims of the Gaussian KL (ops.gaussian_kl)
VAE+KMeans (VAESim's baseline, J §3.6):
  3. after training: k-means on the z_mu of the training images, with K fixed (``VAE``) or
     chosen by the elbow of the k-means inertia over K = k_min..n_clusters (``VAEKMeans``,
     yellowbrick's KElbowVisualizer in the authors' code; ops.elbow)
Prediction: the nearest k-means centre of z_mu (a hard, one-hot assignment).

Networks (``network``): ``conv`` is VAESim's (nets/conv.py; METHODS 1.1): 28x28 images are
resized to 32x32 on the batch (bilinear) before the encoder, and decoded images are resized back
to the input size (the authors resize with PIL). ``mlp`` is VaDE's fully connected pair
(nets/mlp.py; Jiang et al. 2017): d-500-500-2000 with ReLU and two linear heads, and the mirrored
q-2000-500-500-d decoder with a sigmoid, on the flattened input at its own size (any shape).

Scale of the loss: L_recon is a mean over the d pixels the network sees (d = C * 32 * 32 for
``conv``, the input's size for ``mlp``) and the KL a mean over the q latent dimensions, so
L = (1/d) [sum of the per-pixel terms + beta * d/q * KL summed over z]: beta = q/d gives the ELBO
of the per-pixel likelihood divided by d (with ``bce``, the Bernoulli ELBO of VAE and VaDE;
MNIST with q = 10 and ``mlp``: beta = 10/784). ``bce`` is computed from the decoder's logits
(``reconstruct``), in float32; the pictures and ``decode`` use the sigmoid output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..errors import ProtosError, check_choices, check_non_negative, check_positive, check_widths
from ..nets.conv import NET_SIZE, ConvDecoder, ConvEncoder, resize
from ..nets.mlp import MLPDecoder, MLPEncoder
from ..ops import elbow_kmeans, gaussian_kl, kmeans_centres, nearest_one_hot
from .base import ClusteringMethod, adam
from .distributed import on_rank0
from .pretrain import encode_all

IMAGE_SIZES = ((28, 28), (32, 32))
Network = Literal["conv", "mlp"]
Reconstruction = Literal["mse", "bce"]
VADE_HIDDEN = (500, 500, 2000)  # VaDE's fully connected encoder widths (the decoder mirrors them)


class VAEMethod(ClusteringMethod):
    """The network, the ELBO and the optimiser shared by :class:`VAE`, VAESim, VaDE and GMVAE:
    VAESim's conv network by default, VaDE's fully connected one with ``network: mlp``.

    Args:
        n_clusters: K.
        input_shape: ``(C, 28, 28)`` or ``(C, 32, 32)`` for ``conv``, any for ``mlp`` (linked
            from the data by the CLI).
        latent_dim: q.
        condition_dim: extra decoder inputs beside z (VAESim: K, the soft assignment).
        beta: weight of the KL term.
        prior_std: s of the prior N(0, s^2 I).
        encoder: ``bn_relu`` (J App. A) or ``linear`` (no BatchNorm nor ReLU: the authors' code);
            ``conv`` only.
        channels: encoder widths; the decoder mirrors them (``conv`` only).
        lr: Adam learning rate.
        lr_step_epochs: multiply the learning rate by ``lr_step_gamma`` every this many epochs
            (the authors' StepLR); ``None`` keeps it constant.
        lr_step_gamma: the factor of that decay.
        network: ``conv`` (VAESim's, on 32x32 images) or ``mlp`` (VaDE's, on flattened inputs).
        hidden: the ``mlp`` encoder's hidden widths (VaDE: 500-500-2000); the decoder mirrors them.
        reconstruction: ``mse`` or ``bce`` (Bernoulli likelihood, for data in [0, 1]); both a
            mean over pixels (see the module's note on beta).
    """

    def __init__(
        self,
        n_clusters: int,
        input_shape: tuple[int, ...],
        latent_dim: int,
        condition_dim: int,
        beta: float,
        prior_std: float,
        encoder: Literal["bn_relu", "linear"],
        channels: Sequence[int],
        lr: float,
        lr_step_epochs: int | None,
        lr_step_gamma: float,
        network: Network = "conv",
        hidden: Sequence[int] = VADE_HIDDEN,
        reconstruction: Reconstruction = "mse",
    ) -> None:
        super().__init__(n_clusters, input_shape)
        check_choices(network=(network, ("conv", "mlp")), reconstruction=(reconstruction, ("mse", "bce")))
        if network == "conv" and (len(self.input_shape) != 3 or tuple(self.input_shape[1:]) not in IMAGE_SIZES):
            raise ProtosError(
                f"the conv network takes images (C, 28, 28) or (C, 32, 32), got input shape {self.input_shape}"
                " (set data.init_args.flatten false; resize the images, e.g. --data.init_args.image_size 28 for"
                " an image folder; or use network: mlp)"
            )
        check_positive(lr=lr, latent_dim=latent_dim, prior_std=prior_std)
        check_non_negative(beta=beta)
        check_choices(encoder=(encoder, ("bn_relu", "linear")))
        if lr_step_epochs is not None:
            check_positive(lr_step_epochs=lr_step_epochs, lr_step_gamma=lr_step_gamma)
        self.network, self.reconstruction = network, reconstruction
        if network == "mlp":
            hidden = tuple(hidden)
            check_widths("hidden", hidden)
            self.encoder = MLPEncoder(self.input_dim, latent_dim, hidden)
            self.decoder = MLPDecoder(latent_dim + condition_dim, self.input_dim, hidden[::-1])
            return
        channels = tuple(channels)
        check_widths("channels", channels)
        c = self.input_shape[0]
        self.encoder = ConvEncoder(c, latent_dim, channels, activation=encoder == "bn_relu")
        self.decoder = ConvDecoder(latent_dim + condition_dim, c, channels[::-1])

    # -- network ----------------------------------------------------------------------
    def to_net(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> what the network works on: ``(B, C, 32, 32)`` (conv) or ``(B, d)`` (mlp)."""
        return self.flat(x) if self.network == "mlp" else resize(x, NET_SIZE)

    def from_net(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_net`: -> ``(B, *input_shape)``."""
        if self.network == "mlp":
            return x.reshape(len(x), *self.input_shape)
        return resize(x, self.input_shape[1:])

    def bernoulli_inputs(self) -> bool:
        return self.reconstruction == "bce"

    def reconstruct(self, h: Tensor) -> Tensor:
        """The decoder's output for :meth:`reconstruction_loss`: images in [0, 1] (mse) or their
        logits (bce, so the loss is computed stably from logits)."""
        return self.decoder.logits(h) if self.reconstruction == "bce" else self.decoder(h)

    def reconstruction_loss(self, x_net: Tensor, out: Tensor) -> Tensor:
        """L_recon in float32, a mean over pixels and batch: (x - x~)^2 (mse) or the Bernoulli
        -[x log x~ + (1 - x) log(1 - x~)] with x~ = sigmoid(``out``) (bce); ``out`` from :meth:`reconstruct`."""
        with self.full_precision():
            loss = F.binary_cross_entropy_with_logits if self.reconstruction == "bce" else F.mse_loss
            return loss(out.float(), x_net.float())

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, *input_shape)`` -> (z_mu, z_logvar), each ``(B, q)``."""
        return self.encoder(self.to_net(x))

    @staticmethod
    def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def elbo_terms(self, x_net: Tensor, out: Tensor, mu: Tensor, logvar: Tensor) -> dict[str, Tensor]:
        """L_recon (:meth:`reconstruction_loss` of the decoder's ``out``) and beta * KL of the ELBO,
        in float32 (VAESim Eq. 2; ``KL`` is weighted)."""
        h = self.hparams
        with self.full_precision():
            return {
                "L_recon": self.reconstruction_loss(x_net, out),
                "KL": h.beta * gaussian_kl(mu.float(), logvar.float(), h.prior_std).mean(),
            }

    # -- contract ---------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """z_mu, the posterior mean (deterministic)."""
        return self.encode(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's images of latents ``z`` ``(B, q)`` (VAESim adds its condition c)."""
        return self.from_net(self.decoder(z))

    @torch.no_grad()
    def embed_all(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """``(N, *input_shape)`` -> ``(N, q)`` z_mu in eval mode (BatchNorm running statistics)."""
        with self.evaluating():
            return encode_all(lambda xb: self.embed(xb).float(), x, batch_size)

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        optimizer = adam(self.parameters(), h.lr)
        if h.lr_step_epochs is None:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, h.lr_step_epochs, h.lr_step_gamma)]

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.hparams.lr_step_epochs is not None:  # manual optimization: step the schedule ourselves
            self.lr_schedulers().step()


class VAE(VAEMethod):
    """A plain VAE (the decoder sees z only), clustered by k-means on z_mu after training.

    Args:
        n_clusters: K; with ``k_min`` the largest K the elbow search tries.
        input_shape: ``(C, 28, 28)`` or ``(C, 32, 32)`` (any with ``network: mlp``).
        latent_dim: q (VAESim's baseline: 32).
        beta: weight of the KL term (ours, = VAESim's: 5e-3).
        prior_std: s of the prior N(0, s^2 I).
        encoder: ``bn_relu`` or ``linear`` (see :class:`VAEMethod`).
        channels: encoder widths (ours: 64-128-256).
        lr: Adam learning rate (the authors' code: 1e-4).
        lr_step_epochs: see :class:`VAEMethod`.
        lr_step_gamma: see :class:`VAEMethod`.
        k_min: ``None`` for k-means with K = ``n_clusters``; else K is chosen by the elbow of
            the inertia over K = k_min..n_clusters.
        kmeans_n_init: k-means restarts per K (1: scikit-learn's default since 1.4; the
            authors' 2022 code, through yellowbrick's ``KMeans()``, got that release's 10).
        network, hidden, reconstruction: see :class:`VAEMethod` (ours: conv, MSE).

    The k-means centres are a ``(n_clusters, q)`` buffer of which the first ``k`` rows are used
    (``k``, a buffer too, is 0 until k-means has run), so a checkpoint restores the fitted
    clusters with strict loading. ``cluster_probs`` has ``n_clusters`` columns; those past
    ``k`` are always 0. k-means runs when a validation starts after new training steps, and at
    the end of training (before the last checkpoint is written).
    """

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 32,
        beta: float = 5e-3,
        prior_std: float = 1.0,
        encoder: Literal["bn_relu", "linear"] = "bn_relu",
        channels: Sequence[int] = (64, 128, 256),
        lr: float = 1e-4,
        lr_step_epochs: int | None = None,
        lr_step_gamma: float = 0.2,
        k_min: int | None = None,
        kmeans_n_init: int = 1,
        network: Network = "conv",
        hidden: Sequence[int] = VADE_HIDDEN,
        reconstruction: Reconstruction = "mse",
    ) -> None:
        super().__init__(
            n_clusters=n_clusters, input_shape=input_shape, latent_dim=latent_dim, condition_dim=0, beta=beta,
            prior_std=prior_std, encoder=encoder, channels=channels, lr=lr, lr_step_epochs=lr_step_epochs,
            lr_step_gamma=lr_step_gamma, network=network, hidden=hidden, reconstruction=reconstruction,
        )  # fmt: skip
        check_positive(kmeans_n_init=kmeans_n_init)
        if k_min is not None and not 2 <= k_min < n_clusters - 1:
            raise ProtosError(f"k_min must be >= 2 and leave >= 3 values up to n_clusters={n_clusters}, got {k_min}")
        self.save_hyperparameters()
        self.register_buffer("centres", torch.zeros(n_clusters, latent_dim))
        self.register_buffer("k", torch.tensor(0))  # clusters fitted, 0 before k-means has run
        self.register_buffer("inertias", torch.zeros(n_clusters))  # k-means inertia at each K tried
        self._fitted_at_step = -1

    # -- contract ---------------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        """One-hot of the nearest k-means centre of z_mu, ``(B, n_clusters)``."""
        k = int(self.k)
        if k == 0:
            raise ProtosError("the VAE's k-means has not run yet: train the model first (or load a checkpoint)")
        return nearest_one_hot(self.embed(x).float(), self.centres[:k], self.n_clusters)

    def prototypes(self) -> Tensor | None:
        """The ``k`` fitted k-means centres ``(k, q)``, or ``None`` before k-means."""
        k = int(self.k)
        return self.centres[:k].clone() if k else None

    # -- training ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = self.to_net(batch["x"])
        mu, logvar = self.encoder(x)
        out = self.reconstruct(self.reparameterise(mu, logvar))  # step 1-2
        loss = self.check_and_log(self.elbo_terms(x, out, mu, logvar))
        self.optimize(loss, self.optimizers())

    @torch.no_grad()
    def fit_clusters(self) -> None:
        """Step 3: k-means on z_mu of the whole training split (embedded and fitted by rank 0
        alone under DDP)."""

        def on_codes(fit, *args):  # rank 0's work only: the other ranks take its result
            return fit(self.embed_all(self.fit_features()), *args)

        seed = self.sklearn_seed
        h = self.hparams
        self.centres.zero_()
        self.inertias.zero_()
        if h.k_min is None:
            k, centres = self.n_clusters, on_rank0(on_codes, kmeans_centres, self.n_clusters, seed, h.kmeans_n_init)
        else:
            k_values = list(range(h.k_min, self.n_clusters + 1))
            k, centres, inertias = on_rank0(on_codes, elbow_kmeans, k_values, seed, h.kmeans_n_init)
            self.inertias[h.k_min - 1 :] = torch.as_tensor(inertias, dtype=self.inertias.dtype)
            rank_zero_info(f"VAE+KMeans: the elbow of the k-means inertia over K={h.k_min}..{self.n_clusters} is K={k}")
        self.centres[:k] = torch.as_tensor(centres, dtype=self.centres.dtype, device=self.centres.device)
        self.k.fill_(k)
        self._fitted_at_step = self.global_step

    def _clusters_stale(self) -> bool:
        return self.global_step != self._fitted_at_step

    def prepare_evaluation(self) -> None:
        super().prepare_evaluation()
        if self.trainer.state.fn == TrainerFn.FITTING and self._clusters_stale():
            self.fit_clusters()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # before ModelCheckpoint writes last.ckpt
        if (self.is_last_epoch() or self.max_steps_reached()) and self._clusters_stale():
            self.fit_clusters()

    def on_train_end(self) -> None:
        if self._clusters_stale():  # training stopped early (e.g. interrupted): cluster what there is
            self.fit_clusters()


class VAEKMeans(VAE):
    """VAE+KMeans (VAESim's baseline): a plain VAE, then k-means with K at the elbow of the
    inertia over K = 2..40 (METHODS 2). Arguments as :class:`VAE`; ``n_clusters`` is the top of
    the range."""

    def __init__(
        self,
        n_clusters: int = 40,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 32,
        beta: float = 5e-3,
        prior_std: float = 1.0,
        encoder: Literal["bn_relu", "linear"] = "bn_relu",
        channels: Sequence[int] = (64, 128, 256),
        lr: float = 1e-4,
        lr_step_epochs: int | None = None,
        lr_step_gamma: float = 0.2,
        k_min: int | None = 2,
        kmeans_n_init: int = 1,
        network: Network = "conv",
        hidden: Sequence[int] = VADE_HIDDEN,
        reconstruction: Reconstruction = "mse",
    ) -> None:
        super().__init__(
            n_clusters, input_shape, latent_dim, beta, prior_std, encoder, channels, lr, lr_step_epochs,
            lr_step_gamma, k_min, kmeans_n_init, network, hidden, reconstruction,
        )  # fmt: skip
