"""DKM: Deep k-Means (Fard, Thonet, Gaussier; Pattern Recognition Letters 2020).

Phases, by epoch, inside one ``fit`` (shared with AE-CM, DEC and DCN: methods/pretrain.py):

pretrained init (DKM^p): ``pretrain_epochs`` of the DAE alone on reconstruction (cached);
random init (DKM^r): no pretraining; then, for both:
  1. r <- k-means on the codes of all samples
  2. each batch, one gradient step on the autoencoder and the centroids r jointly:
        L = L_rec + L_clust,  L_rec = sum_i ||x_i - x^_i||^2,
        L_clust = lambda sum_i sum_k ||z_i - r_k||^2 G_k(z_i),
        G_k(z_i) = softmax_k(-alpha ||z_i - r_k||^2)
  3. alpha: constant (``alpha``, the paper's 1000 for DKM^p), or annealed when ``alpha`` is
     null (DKM^r): alpha(0) = 0.1, alpha(n) = 2^(1/ln(n+1)^2) alpha(n-1), one step every
     ``anneal_every`` epochs (ops.annealed_alpha); the step follows from the epoch, so a
     resumed fit continues the schedule, and the buffer ``alpha`` holds the value in use.
Prediction: argmax_k G_k = the nearest centroid.

Choices (METHODS 2 and 3.5, REFERENCE_CODE 5):
- ReLU activations (``slope: 0``), as the AE-CM paper's App. 3 states for DKM. DKM^p pretrains
  this ReLU DAE itself; the AE-CM authors' code loads the LeakyReLU DAE of the other methods
  into it instead.
- L_rec is the squared norm summed over the features, as in the DKM paper and both the DKM
  and the AE-CM authors' code, against which Table 14's lambdas were set (the AE-CM paper says
  "mean square error" for every model, which would make lambda d times stronger).
- Centroids are initialised by k-means for both inits (the DKM code draws Uniform[-1, 1] for
  DKM^r); the DKM code's early stop on a flat loss is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ProtosError, check_non_negative
from ..ops import annealed_alpha, dkm_clustering_loss, dkm_weights, squared_distances
from .pretrain import AutoencoderMethod


class DKM(AutoencoderMethod):
    """Autoencoder and a differentiable soft k-means loss, trained jointly by gradient.

    Args:
        n_clusters: K.
        input_shape: shape of one sample (linked from the data by the CLI).
        latent_dim: code size p (AE-CM paper: 10).
        hidden: encoder widths (decoder mirrored): d-500-500-2000-p.
        lam: weight lambda of the clustering term (AE-CM paper Table 14: MNIST 0.1 random,
            1.0 pretrained).
        alpha: constant inverse temperature of the softmax (DKM^p: 1000), or ``None`` to anneal
            it from 0.1 (DKM^r).
        anneal_every: epochs per annealing step (AE-CM paper App. 3: 5).
        lr: Adam learning rate (0.001).
        adam_eps: Adam epsilon.
        init: ``pretrained`` (DKM^p) or ``random`` (DKM^r).
        pretrain_epochs: DAE pretraining epochs for ``init: pretrained``.
        kmeans_n_init: k-means restarts on the codes.
        slope: activation slope of the DAE (0: ReLU, as DKM).
        pretrain_cache: where pretrained DAE weights are cached (see ``AutoencoderMethod``).
    """

    ddp_unused_parameters = True  # the centroids wait out the pretraining

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (784,),
        latent_dim: int = 10,
        hidden: Sequence[int] = (500, 500, 2000),
        lam: float = 1.0,
        alpha: float | None = 1000.0,
        anneal_every: int = 5,
        lr: float = 1e-3,
        adam_eps: float = 1e-8,
        init: Literal["random", "pretrained"] = "pretrained",
        pretrain_epochs: int = 100,
        kmeans_n_init: int = 20,
        slope: float = 0.0,
        pretrain_cache: bool | str = True,
    ) -> None:
        check_non_negative(lam=lam)
        if alpha is not None and not alpha > 0:
            raise ProtosError(f"alpha must be > 0 or null (annealing), got {alpha}")
        if anneal_every < 1:
            raise ProtosError(f"anneal_every must be >= 1, got {anneal_every}")
        super().__init__(
            n_clusters, input_shape, latent_dim, hidden, slope, lr, adam_eps, init, pretrain_epochs,
            kmeans_n_init, pretrain_cache,
        )  # fmt: skip
        self.save_hyperparameters()
        self.centroids = nn.Parameter(torch.zeros(n_clusters, latent_dim))  # r, set by k-means
        # the alpha in use (hparams.alpha is the constant asked for, or None: annealed)
        self.register_buffer("alpha", torch.tensor(annealed_alpha(0) if alpha is None else alpha))

    # -- contract ---------------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        """G(z) with the current alpha; its argmax is the nearest centroid."""
        z = self.embed(x)
        with self.full_precision():
            return dkm_weights(squared_distances(z.float(), self.centroids.float()), self.alpha)

    def prototypes(self) -> Tensor:
        return self.centroids.detach()

    # -- training ---------------------------------------------------------------------
    def clustering_optimizers(self):
        return [self.adam([*self.ae.parameters(), self.centroids])]

    @torch.no_grad()
    def init_from_codes(self, z: Tensor) -> None:
        """Step 1: r <- k-means on the codes."""
        self.centroids.copy_(self.kmeans(z))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.hparams.alpha is None and self.phase(self.current_epoch) == "cluster":  # step 3
            self.alpha.fill_(annealed_alpha((self.current_epoch - self.pretrain_end) // self.hparams.anneal_every))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints before 2026-12-07 also hold the schedule's step, which the epoch gives
        checkpoint.get("state_dict", {}).pop("alpha_step", None)
        super().on_load_checkpoint(checkpoint)

    def clustering_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = self.flat(batch["x"])
        z, x_rec = self.autoencode(x)
        with self.full_precision():
            terms = {
                "L_rec": (x.float() - x_rec.float()).pow(2).sum(),
                "L_clust": self.hparams.lam * dkm_clustering_loss(z.float(), self.centroids.float(), self.alpha),
            }
        self.optimize(self.check_and_log(terms), self.optimizers()[1])

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.phase(self.current_epoch) == "cluster":
            self.log("train/alpha", self.alpha.float())
