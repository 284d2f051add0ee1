"""DCN: the Deep Clustering Network (Yang, Fu, Sidiropoulos, Hong; ICML 2017).

Phases, by epoch, inside one ``fit`` (shared with AE-CM, DEC and DKM: methods/pretrain.py):

pretrained init (DCN^p): ``pretrain_epochs`` of the DAE alone on reconstruction (cached);
random init (DCN^r, AE-CM paper Table 5): no pretraining; then, for both:
  1. M <- k-means on the codes of all samples, s_i <- nearest centroid, c_k <- ``initial_count``
  2. each batch, the alternating updates of Sec. 4:
     (a) network, with M and the stored s_i fixed:                                       (Eq. 10)
            L = L_rec + L_km,  L_rec = sum_i mean_d (x_id - x^_id)^2,
                               L_km = (lambda / 2) sum_i ||z_i - M s_i||^2
     (b) s_i <- argmin_k ||f(x_i) - m_k||^2 with the updated network                      (Eq. 11)
     (c) per sample, c_k <- c_k + 1 and m_k <- m_k - (1 / c_k)(m_k - z_i)                  (Eq. 12)
         done for the whole batch at once in closed form (ops.running_mean_update)
Prediction: the nearest centroid (hard assignment).

Choices (METHODS 2 and 3.5, REFERENCE_CODE 5):
- L_rec is the per-sample mean squared error, the AE-CM paper's "mean square error regardless
  of the model"; lambda = 0.1 is its Table 14 weight (the DCN code's MNIST setting, 0.05 on the
  squared norm of the reconstruction against 1 on the k-means term, is of the same size).
- The counts start at 100, as in the DCN authors' code (a k-means centroid weighs as 100 samples).
- The centroids, counts and assignments are buffers; their batch updates are all-reduced across
  ranks, so that every rank holds the same M, c and s.
- Adam (lr 1e-3) as in the AE-CM paper's runs, epsilon 1e-8 (the AE-CM authors' code: 1e-3,
  ``adam_eps``).
- Random init starts the centroids from k-means on the untrained network's codes (step 1); the
  AE-CM authors' code draws them Glorot-uniform instead (REFERENCE_CODE 5).
- ``centroid_update: epoch`` replaces steps (b) and (c) by what the AE-CM authors' code does (their
  Table 5 numbers come from it; REFERENCE_CODE 5): after each clustering epoch, every sample is
  reassigned to its nearest centroid with the trained network, and each centroid becomes the
  mean of its samples' codes (a cluster left empty keeps its centroid); the counts are unused.
  With the DCN paper's persistent counts (``batch``) the centroids move less and less (1 / c_k);
  here they follow the codes every epoch.
- The code layers (the encoder's last Linear and the decoder's first) run in float32 under
  ``bf16-mixed`` (``code_precision: float32``; ``autocast`` leaves them to autocast). The k-means
  term has no scale: the encoder shrinks the codes and the decoder's first layer grows to undo it
  (on MNIST, 40 clustering epochs halve the code layer's norm, 1.94 -> 1.06, codes of norm < 0.5),
  and with both layers in bf16 one MNIST run (DCN^p, seed 4, per-epoch update) blew up in its
  50th clustering epoch (L_rec x 1000 within 20 steps, final ARI 3); the same 10 epochs replayed
  from its checkpoint end at ARI 78.7 with these two layers in float32 (BENCHMARKS.md). They are
  2 x 2000 x p multiply-adds a sample: the cost does not show. They do not prevent every such
  runaway under bf16 (a per-batch-update MNIST run blew up with them): fp32, the configs'
  precision, is the safe choice for DCN. Under bf16, ``max_grad_norm`` (ours) clips each
  step's gradient norm: that run's runaway starts with steps of norm ~100-400 where the
  epoch before peaked at 52, and replayed from its checkpoint with clipping at 100 it goes on
  as in fp32 (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..errors import ProtosError, check_choices, check_non_negative, check_positive
from ..ops import cluster_sums, nearest_one_hot, running_mean_update, squared_distances
from .distributed import is_distributed
from .pretrain import AutoencoderMethod, encode_all, reconstruction_loss


class DCN(AutoencoderMethod):
    """Reconstruction plus a k-means loss, with online k-means on the codes.

    Args:
        n_clusters: K.
        input_shape: shape of one sample (linked from the data by the CLI).
        latent_dim: code size p (AE-CM paper: 10).
        hidden: encoder widths (decoder mirrored): d-500-500-2000-p.
        lam: weight lambda of the k-means term (AE-CM paper Table 14: 0.1).
        initial_count: c_k after the k-means initialisation (DCN code: 100).
        centroid_update: ``batch`` (the DCN paper: steps (b), (c) after every batch) or ``epoch`` (the
            AE-CM authors' code: all samples reassigned and centroids set to their means after
            each epoch).
        lr: Adam learning rate (0.001).
        adam_eps: Adam epsilon.
        code_precision: ``float32`` (the code layers in float32 under bf16 autocast, see above) or
            ``autocast`` (the whole DAE under the trainer's precision).
        max_grad_norm: clip the norm of each step's gradient to this (ours, not in the DCN
            paper; ``None``: no clipping), against the runaway described above.
        init: ``pretrained`` (DCN^p, the paper's) or ``random`` (DCN^r).
        pretrain_epochs: DAE pretraining epochs for ``init: pretrained`` (AE-CM code: 100).
        kmeans_n_init: k-means restarts on the codes.
        slope: LeakyReLU slope of the DAE (AE-CM paper: 0.2).
        pretrain_cache: where pretrained DAE weights are cached (see ``AutoencoderMethod``).
    """

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (784,),
        latent_dim: int = 10,
        hidden: Sequence[int] = (500, 500, 2000),
        lam: float = 0.1,
        initial_count: int = 100,
        centroid_update: Literal["batch", "epoch"] = "batch",
        lr: float = 1e-3,
        adam_eps: float = 1e-8,
        code_precision: Literal["float32", "autocast"] = "float32",
        max_grad_norm: float | None = None,
        init: Literal["random", "pretrained"] = "pretrained",
        pretrain_epochs: int = 100,
        kmeans_n_init: int = 20,
        slope: float = 0.2,
        pretrain_cache: bool | str = True,
    ) -> None:
        check_non_negative(lam=lam)
        if initial_count < 1:
            raise ProtosError(f"initial_count must be >= 1, got {initial_count}")
        check_choices(
            centroid_update=(centroid_update, ("batch", "epoch")),
            code_precision=(code_precision, ("float32", "autocast")),
        )
        check_positive(max_grad_norm=max_grad_norm)
        super().__init__(
            n_clusters, input_shape, latent_dim, hidden, slope, lr, adam_eps, init, pretrain_epochs,
            kmeans_n_init, pretrain_cache,
        )  # fmt: skip
        self.save_hyperparameters()
        self.register_buffer("centroids", torch.zeros(n_clusters, latent_dim))  # M
        self.register_buffer("counts", torch.zeros(n_clusters, dtype=torch.long))  # c_k
        self.register_per_sample_buffer("assignments", (), torch.long)  # s_i

    # -- the network, its code layers in float32 ---------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """``(B, d)`` -> codes ``(B, p)``; the last layer in float32 unless ``code_precision: autocast``."""
        if self.hparams.code_precision == "autocast":
            return self.ae.encoder(x)
        *body, code = self.ae.encoder  # the layers themselves: no sub-Sequential built per batch
        for layer in body:
            x = layer(x)
        with self.full_precision():
            return code(x.float())

    def reconstruct(self, z: Tensor) -> Tensor:
        """Codes ``(B, p)`` -> ``(B, d)``; the first layer in float32 unless ``code_precision: autocast``."""
        if self.hparams.code_precision == "autocast":
            return self.ae.decoder(z)
        first, *rest = self.ae.decoder
        with self.full_precision():
            h = first(z.float())
        for layer in rest:
            h = layer(h)
        return h

    # -- contract ---------------------------------------------------------------------
    def nearest(self, z: Tensor) -> Tensor:
        """``(B,)`` index of the nearest centroid of each code (Eq. 11)."""
        with self.full_precision():
            return squared_distances(z.float(), self.centroids).argmin(dim=1)

    def cluster_probs(self, x: Tensor) -> Tensor:
        """The one-hot of the nearest centroid: DCN's assignments are hard."""
        z = self.embed(x)
        with self.full_precision():
            return nearest_one_hot(z.float(), self.centroids)

    def prototypes(self) -> Tensor:
        return self.centroids.clone()

    # -- training ---------------------------------------------------------------------
    def clustering_optimizers(self):
        return [self.adam(self.ae.parameters())]

    @torch.no_grad()
    def init_from_codes(self, z: Tensor) -> None:
        """Step 1: M by k-means, s_i the nearest centroid, c_k the initial count."""
        self.centroids.copy_(self.kmeans(z))
        self.counts.fill_(self.hparams.initial_count)
        self.size_per_sample_buffers(len(z))
        self.assignments.copy_(self.nearest(z))  # (N, K) distances: small for any K we cluster into

    def clustering_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, index = self.flat(batch["x"]), batch["index"]
        z, x_rec = self.autoencode(x)  # (a) network step, M and s fixed
        m_s = self.centroids[self.assignments[index]]
        with self.full_precision():
            terms = {
                "L_rec": reconstruction_loss(x.float(), x_rec.float()),
                "L_km": self.hparams.lam / 2 * (z.float() - m_s).pow(2).sum(),
            }
        self.optimize(self.check_and_log(terms), self.optimizers()[1], self.hparams.max_grad_norm)
        if self.hparams.centroid_update == "batch":
            self.update_clusters(x, index)

    @torch.no_grad()
    def update_clusters(self, x: Tensor, index: Tensor) -> None:
        """Steps (b) and (c) on a batch, with the codes of the updated network."""
        z = self.encode(x).float()
        s = self.nearest(z)  # (b)
        sums, sizes = cluster_sums(z, s, self.n_clusters, over_ranks=True)  # the union of every rank's batch
        if is_distributed():
            index, s = self.all_gather(index).reshape(-1), self.all_gather(s).reshape(-1)
        centroids, counts = running_mean_update(self.centroids, self.counts, sums, sizes)  # (c)
        self.centroids.copy_(centroids)
        self.counts.copy_(counts)
        self.assignments[index] = s

    @torch.no_grad()
    def reassign_all(self) -> None:
        """``centroid_update: epoch``: s_i <- the nearest centroid of every training sample's code, then
        m_k <- the mean of the codes assigned to k (an empty cluster keeps m_k). Every rank holds
        the whole training set, so every rank computes the same M and s."""
        z = encode_all(self.encode, self.fit_data()).float()
        s = self.nearest(z)
        sums, sizes = cluster_sums(z, s, self.n_clusters)
        filled = sizes > 0
        self.centroids[filled] = sums[filled] / sizes[filled, None]
        self.assignments.copy_(s)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # after the epoch's last step and before its validation, which (with best.ckpt) then
        # scores the reassigned centroids, as the final test does
        if (
            self.hparams.centroid_update == "epoch"
            and self.phase(self.current_epoch) == "cluster"
            and self.ends_epoch()
        ):
            self.reassign_all()
