"""CM: the Clustering Module (Boubekki, Kampffmeyer, Brefeld, Jenssen; Machine Learning 2021).

1. init: random (Glorot) or k-means++: W_dec rows = centres, W_enc = pinv(W_dec)   (Sec. 4.1)
2. each batch: Gamma = softmax(x W_enc + b_enc), mu = W_dec + b_dec                (Eq. 6)
   minimise L_CM = E1 + E2 + E3 + E4 (batch sums) with Adam                        (Eq. 3 / 7)
3. last epoch: ordinary updates; the parameters are then set to their average over
   that epoch's iterations (the "averaging epoch", Sec. 4.1; all parameters, as in the
   authors' code, or ``average: centroids``)
4. predict argmax Gamma; model selection by L_sp = E2 + E3 on the full data (Table 4)

The latent space of the contract is that of the assignments: ``embed`` is Gamma (K-d),
``prototypes`` the K one-hot vertices (the latent of centroid k) and ``decode`` the linear map
x = Gamma mu, so ``decode(prototypes())`` are the centroids mu (``centroids()``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import ProtosError, check_non_negative, check_positive
from ..nets import ClusteringModule
from ..nets.mlp import BiasInit
from ..ops import cm_terms, kmeans_pp_centres, nearest_one_hot, sparsity_terms
from .averaging import AveragingEpoch
from .base import ClusteringMethod, adam
from .distributed import broadcast_from_rank0, on_rank0


class CM(AveragingEpoch, ClusteringMethod):
    """The clustering module on raw (flattened) features.

    Args:
        n_clusters: K.
        input_shape: shape of one sample (linked from the data by the CLI).
        alpha: symmetric Dirichlet concentration (Table 12: MNIST 177).
        lr: Adam learning rate (Sec. 5.1: 0.001).
        adam_eps: Adam epsilon; the paper is silent, the authors' code uses 1e-3.
        optimizer: ``adam`` (MNIST etc.) or ``sgd`` (5 Gaussians, Fig. 1).
        init: ``random`` (CM^r) or ``kmeans++`` (CM^p).
        bias_init: the biases of the random init: ``zeros`` (the paper is silent; ours) or
            ``glorot_normal`` (the authors' Keras code, REFERENCE_CODE 2.1). The k-means++ init
            sets both biases to zero either way.
        init_lloyd_steps: Lloyd iterations after the k-means++ seeding (code: 1).
        average_last_epoch: run the averaging epoch as the trainer's last epoch (``max_steps``
            inside it averages the steps taken; a fit that ends before it warns: methods/averaging.py).
        average: average ``all`` parameters (argmax uses the averaged encoder) or only the
            ``centroids`` (then predict by the nearest averaged centroid).
        e3_weight: weight of the merging term E3 (Fig. 11 uses 0, 1, 1.5).
        terms: the loss terms kept (Table 3 ablation), a subset of E1..E4 (Table 3 numbers
            them E0..E3: its E0 is Eq. 3's E1, and so on).
        step_batch: the batch size of one Adam step when it is smaller than the loaded batch:
            each loaded batch is cut into steps of this size (``None``: one step per loaded
            batch). With ``data.batch_size`` a multiple of it, the steps are exactly those of
            loading ``step_batch`` samples at a time; CM's steps take ~2 ms on a CPU, so
            Lightning's fixed ~0.5 ms per loaded batch is then paid once per several steps.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (784,),
        alpha: float = 177.0,
        lr: float = 1e-3,
        adam_eps: float = 1e-8,
        optimizer: Literal["adam", "sgd"] = "adam",
        init: Literal["random", "kmeans++"] = "random",
        bias_init: BiasInit = "zeros",
        init_lloyd_steps: int = 0,
        average_last_epoch: bool = True,
        average: Literal["all", "centroids"] = "all",
        e3_weight: float = 1.0,
        terms: tuple[str, ...] = ("E1", "E2", "E3", "E4"),
        step_batch: int | None = None,
    ) -> None:
        super().__init__(n_clusters, input_shape)
        check_positive(lr=lr, alpha=alpha, adam_eps=adam_eps)
        check_non_negative(e3_weight=e3_weight, init_lloyd_steps=init_lloyd_steps, step_batch=step_batch)
        if not terms or not set(terms) <= {"E1", "E2", "E3", "E4"}:
            raise ProtosError(f"terms must be one or more of E1, E2, E3, E4, got {list(terms)}")
        self.save_hyperparameters()
        self.cm = ClusteringModule(self.input_dim, n_clusters, bias_init)
        self.init_average()
        self.register_buffer("initialised", torch.tensor(init == "random"))

    def averaged_params(self) -> list[torch.nn.Parameter]:
        if self.hparams.average == "centroids":
            return [self.cm.decoder.weight, self.cm.decoder.bias]
        return list(self.cm.parameters())

    # -- contract ---------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        return self.cluster_probs(x)

    def cluster_probs(self, x: Tensor) -> Tensor:
        x = self.flat(x)
        if self.hard_assignments:
            return nearest_one_hot(x, self.cm.centroids())  # nearest averaged centroid (hard)
        return self.cm(x)

    @property
    def hard_assignments(self) -> bool:
        """Whether :meth:`cluster_probs` is the nearest averaged centroid (``average: centroids``,
        in evaluation) rather than the softmax layer's gamma."""
        return self.hparams.average == "centroids" and not self.training

    def prototypes(self) -> Tensor:
        """``(K, K)`` the one-hot vertices of the simplex: centroid k's assignment."""
        return torch.eye(self.n_clusters, dtype=self.cm.decoder.weight.dtype, device=self.device)

    def centroids(self) -> Tensor:
        """``(K, D)`` the centroids mu in the (flattened) input space, ``decode(prototypes())``."""
        return self.cm.centroids().detach()

    def decode(self, z: Tensor) -> Tensor:
        """Convex weights ``(B, K)`` -> inputs: x = z mu (the linear CM decoder)."""
        return self.cm.decoder(z).reshape(len(z), *self.input_shape)

    def selection_criteria(self, x: Tensor, probs: Tensor | None = None) -> dict[str, Tensor]:
        # E2 + E3 of the softmax layer's gamma: ``probs`` where they are it, not the hard
        # nearest-centroid assignments of ``average: centroids``
        gamma = self.cm(self.flat(x)) if probs is None or self.hard_assignments else probs
        return {"l_sp": sum(self.in_float32(sparsity_terms, gamma, self.cm.centroids()))}

    # -- training ---------------------------------------------------------------------
    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.cm.parameters(), lr=self.hparams.lr)
        return adam(self.cm.parameters(), self.hparams.lr, self.hparams.adam_eps)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not bool(self.initialised):  # k-means++ (checkpoints keep the flag: no re-init)
            seed = self.sklearn_seed
            x = self.fit_features().reshape(-1, self.input_dim)
            centres = on_rank0(kmeans_pp_centres, x, self.n_clusters, seed, self.hparams.init_lloyd_steps)
            self.cm.init_from_centres(centres)
            self.initialised.fill_(True)
            broadcast_from_rank0(self.cm.parameters())  # the pseudo-inverse each rank computed

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x_all = self.flat(batch["x"])
        for x in x_all.split(self.hparams.step_batch or len(x_all)):
            gamma = self.cm(x)
            terms = self.in_float32(cm_terms, x, gamma, self.cm.centroids(), alpha=self.hparams.alpha)  # Eq. 7
            terms["E3"] = self.hparams.e3_weight * terms["E3"]
            loss = self.check_and_log({k: v for k, v in terms.items() if k in self.hparams.terms})
            self.optimize(loss, self.optimizers())
            self.accumulate_average()
