"""DEC (Xie, Girshick, Farhadi; ICML 2016) and IDEC (Guo, Gao, Liu, Yin; IJCAI 2017).

Phases, by epoch, inside one ``fit`` (shared with AE-CM, DCN and DKM: methods/pretrain.py):

pretrained init (DEC^p, IDEC^p): ``pretrain_epochs`` of the DAE alone on reconstruction (cached);
random init (DEC^r, IDEC^r, AE-CM paper Table 5): no pretraining; then, for both:
  1. mu <- k-means (k-means++, ``kmeans_n_init`` restarts) on the codes z = f(x) of all samples
  2. every ``update_interval`` iterations: Q over the whole training set (Eq. 1) and the target
        p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'),  f_j = sum_i q_ij                (Eq. 3)
     stored in the buffer ``target_p`` (N, K); stop once fewer than ``tol`` of the hard
     assignments argmax_j q_ij changed since the previous refresh
     (``target: batch``, ClustPy's variant: no stored P; each batch's P comes from its own Q by
     Eq. 3, detached, so the target follows the model at every step)
  3. each batch takes its targets by sample index and minimises
        DEC:  L = L_c = KL(P || Q) = sum_i sum_j p_ij log(p_ij / q_ij)                     (Eq. 2)
              on the encoder and the centroids; the decoder is not used
        IDEC: L = L_r + gamma L_c, L_r = sum_i mean_d (x_id - x^_id)^2 (Eq. 4 of Guo et al.)
              on the whole autoencoder and the centroids
Prediction: argmax_j q_ij.

Choices where the papers are silent or differ (METHODS 2 and 3.5, REFERENCE_CODE 5):
- q uses the Student's t with a = 1 degree of freedom, as both papers.
- L_r is the per-sample mean squared error (mean over the d features) as in the IDEC code, whose
  gamma = 0.1 was set against it (the IDEC paper writes the squared norm); every term is summed
  over the batch, which leaves the ratio gamma of the per-sample terms as in the code.
- Adam (lr 1e-3) in every phase, as in the AE-CM paper's runs; the DEC paper used SGD. The
  papers do not give Adam's epsilon; the AE-CM authors' code (behind Table 5) uses 1e-3 on a
  batch-mean KL, i.e. 1e-3 B on our batch sum: ``cluster_adam_eps`` sets it for the clustering
  phase alone (their DAE pretraining is a separate SGD run), and it damps the small late
  gradients of L_c (REFERENCE_CODE 5; on USPS it is worth ~2.5 ARI points to DEC^p).
- No early stop by default: the AE-CM paper states no tolerance and its authors' code has none;
  ``tol: 0.001`` is the DEC paper's stop (< 0.1% of the assignments changed between refreshes).
- Random init starts the centroids from k-means on the untrained network's codes (step 1); the
  AE-CM authors' code, behind Table 5's ^r rows, draws them Glorot-uniform instead (REFERENCE_CODE
  5). The same code runs IDEC with Adam epsilon 1e-3 too; our IDEC configs keep 1e-8 (IDEC^p meets
  Table 5 with it, BENCHMARKS.md), ``cluster_adam_eps`` sets it.
- The centroids are parameters trained by gradient (DDP averages their gradients), not buffers.
- ``target: batch`` is not in either paper: it is what ClustPy's DEC and IDEC do (f_j summed
  over the batch; under DDP over each rank's part of it), kept so that
  `benchmarks/vs_clustpy.py` can time the same algorithm on both sides. The refreshes of step 2
  then run only for ``tol``'s stopping test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..errors import ProtosError, check_choices, check_positive
from ..ops import kl_clustering_loss, student_t_assign, student_t_logits, target_distribution
from .pretrain import AutoencoderMethod, encode_all, reconstruction_loss


class DEC(AutoencoderMethod):
    """Deep Embedded Clustering; :class:`IDEC` adds the reconstruction term.

    Args:
        n_clusters: K.
        input_shape: shape of one sample (linked from the data by the CLI).
        latent_dim: code size p (AE-CM paper: 10).
        hidden: encoder widths (decoder mirrored): d-500-500-2000-p.
        update_interval: iterations between refreshes of the target distribution (Table 14:
            MNIST 140, USPS 30, Pendigits 20).
        target: ``dataset`` (the papers': P from Q over all samples at each refresh) or
            ``batch`` (ClustPy's: P from each batch's own Q, every step).
        tol: stop when the share of changed assignments between two refreshes falls below it
            (DEC paper: 0.001); ``None`` (default) never stops early, as the AE-CM authors' code.
        dof: degrees of freedom a of the Student's t kernel (1).
        lr: Adam learning rate (0.001).
        adam_eps: Adam epsilon (every phase, unless ``cluster_adam_eps``).
        cluster_adam_eps: Adam epsilon of the clustering phase; ``None``: ``adam_eps``. The AE-CM
            authors' code: 1e-3 on the batch-mean loss, so 1e-3 x batch size here (B = 256: 0.256).
        init: ``pretrained`` (DEC^p, the paper's) or ``random`` (DEC^r).
        pretrain_epochs: DAE pretraining epochs for ``init: pretrained`` (AE-CM code: 100).
        kmeans_n_init: k-means restarts on the codes (DEC: 20).
        slope: LeakyReLU slope of the DAE (AE-CM paper: 0.2).
        pretrain_cache: where pretrained DAE weights are cached (see ``AutoencoderMethod``).
    """

    ddp_unused_parameters = True  # the centroids wait out the pretraining; DEC's decoder is idle once it clusters

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (784,),
        latent_dim: int = 10,
        hidden: Sequence[int] = (500, 500, 2000),
        update_interval: int = 140,
        target: Literal["dataset", "batch"] = "dataset",
        tol: float | None = None,
        dof: float = 1.0,
        lr: float = 1e-3,
        adam_eps: float = 1e-8,
        cluster_adam_eps: float | None = None,
        init: Literal["random", "pretrained"] = "pretrained",
        pretrain_epochs: int = 100,
        kmeans_n_init: int = 20,
        slope: float = 0.2,
        pretrain_cache: bool | str = True,
    ) -> None:
        if update_interval < 1:
            raise ProtosError(f"update_interval must be >= 1, got {update_interval}")
        check_choices(target=(target, ("dataset", "batch")))
        if tol is not None and not 0 <= tol < 1:
            raise ProtosError(f"tol must be in [0, 1) or null, got {tol}")
        if not dof > 0:
            raise ProtosError(f"dof must be > 0, got {dof}")
        check_positive(cluster_adam_eps=cluster_adam_eps)
        super().__init__(
            n_clusters, input_shape, latent_dim, hidden, slope, lr, adam_eps, init, pretrain_epochs,
            kmeans_n_init, pretrain_cache,
        )  # fmt: skip
        self.save_hyperparameters()
        self.mu = nn.Parameter(torch.zeros(n_clusters, latent_dim))  # set by k-means (step 1)
        self.register_per_sample_buffer("target_p", (n_clusters,))  # P of the last refresh (Eq. 3)
        self.register_per_sample_buffer("assignments", (), torch.long)  # argmax Q of the last refresh
        self.register_buffer("stop_iteration", torch.tensor(-1))  # iteration of a tol stop, else -1
        self.register_buffer("stop_delta", torch.tensor(math.nan))  # share of changed assignments then
        self._delta: float | None = None

    # -- contract ---------------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        return self._soft_assign(self.embed(x))  # Eq. 1

    def prototypes(self) -> Tensor:
        return self.mu.detach()

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped before ``max_epochs``, or ``None``."""
        if int(self.stop_iteration) < 0:
            return None
        return (
            f"tol: {float(self.stop_delta):.4%} of the assignments changed between the target refreshes "
            f"before iteration {int(self.stop_iteration)} (< tol {self.hparams.tol:.4%})"
        )

    # -- training ---------------------------------------------------------------------
    def clustering_parameters(self) -> list[nn.Parameter]:
        """DEC trains the encoder and the centroids; the decoder is not part of DEC."""
        return [*self.ae.encoder.parameters(), self.mu]

    def clustering_optimizers(self):
        return [self.adam(self.clustering_parameters(), self.hparams.cluster_adam_eps)]

    @torch.no_grad()
    def init_from_codes(self, z: Tensor) -> None:
        """Step 1: mu <- k-means on the codes; the assignments start as the nearest centroids."""
        self.mu.copy_(self.kmeans(z))
        self.size_per_sample_buffers(len(z))
        self.assignments.copy_(self._soft_assign(z).argmax(dim=1))

    @torch.no_grad()
    def _soft_assign(self, z: Tensor, chunk: int = 4096) -> Tensor:
        with self.full_precision():
            mu = self.mu.float()
            return torch.cat([student_t_assign(c.float(), mu, self.hparams.dof) for c in z.split(chunk)])

    @torch.no_grad()
    def refresh_target(self, iteration: int) -> bool:
        """Step 2: P from Q over the whole training set (Eq. 3); ``True`` when ``tol`` stops training."""
        q = self._soft_assign(encode_all(self.encode, self.fit_data()))
        if self.hparams.target == "dataset":
            self.target_p.copy_(target_distribution(q))
        labels = q.argmax(dim=1)
        delta = float((labels != self.assignments).float().mean())
        self.assignments.copy_(labels)
        self._delta = delta
        tol = self.hparams.tol
        if tol is None or iteration == 0 or delta >= tol:
            return False
        self.stop_iteration.fill_(iteration)
        self.stop_delta.fill_(delta)
        self.trainer.should_stop = True
        rank_zero_info(f"{type(self).__name__} stops: {self.stop_reason}")
        return True

    def kl_loss(self, z: Tensor, p: Tensor | None) -> Tensor:
        """L_c = KL(P || Q) (Eq. 2) of codes ``z`` ``(B, p)`` against their targets ``p`` ``(B, K)``;
        ``None``: P from the batch's own Q (Eq. 3, ``target: batch``), outside the gradient."""
        with self.full_precision():
            log_q = torch.log_softmax(student_t_logits(z.float(), self.mu.float(), self.hparams.dof), dim=-1)
            if p is None:
                p = target_distribution(log_q.detach().exp())
            return kl_clustering_loss(p, log_q)

    def clustering_terms(self, x: Tensor, p: Tensor | None) -> dict[str, Tensor]:
        """The loss terms on a batch ``x`` ``(B, d)`` with targets ``p`` ``(B, K)`` (``None``: the
        batch's own, ``target: batch``); DEC: L_c only."""
        return {"L_c": self.kl_loss(self.encode(x), p)}

    def clustering_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        iteration = self.cluster_iteration(batch_idx)
        per_dataset = self.hparams.target == "dataset"
        refresh = per_dataset or self.hparams.tol is not None  # ``target: batch`` refreshes only for tol
        if refresh and iteration % self.hparams.update_interval == 0 and self.refresh_target(iteration):
            return  # step 2 stopped training (tol)
        p = self.target_p[batch["index"]] if per_dataset else None
        terms = self.clustering_terms(self.flat(batch["x"]), p)  # step 3
        self.optimize(self.check_and_log(terms), self.optimizers()[1])

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._delta is not None:  # the last refresh's share of changed assignments, and a stop
            self.log_dict({"train/delta_label": self._delta, "train/tol_stop": float(self.stop_iteration >= 0)})


class IDEC(DEC):
    """Improved DEC: DEC's clustering loss plus the reconstruction of the kept decoder,
    L = L_r + gamma L_c (Guo et al. 2017, Eq. 4). Takes DEC's arguments and:

    Args:
        gamma: weight of the clustering loss L_c (IDEC and AE-CM paper Table 14: 0.1).
    """

    def __init__(self, gamma: float = 0.1, **kwargs) -> None:
        if not gamma > 0:
            raise ProtosError(f"gamma must be > 0, got {gamma}")
        super().__init__(**kwargs)

    def clustering_parameters(self) -> list[nn.Parameter]:
        """IDEC trains the whole autoencoder and the centroids."""
        return [*self.ae.parameters(), self.mu]

    def clustering_terms(self, x: Tensor, p: Tensor | None) -> dict[str, Tensor]:
        z, x_rec = self.autoencode(x)
        with self.full_precision():
            l_r = reconstruction_loss(x.float(), x_rec.float())
        return {"L_r": l_r, "L_c": self.hparams.gamma * self.kl_loss(z, p)}
