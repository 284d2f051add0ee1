"""AE-CM: the clustering module on the code of a deep autoencoder (Boubekki et al., 2021, Sec. 4.2).

Phases, by epoch, all inside one ``fit`` (so a checkpoint resumes in the right phase):

random init (AE-CM^r): every weight random; joint training from the first step.
pretrained init (AE-CM^p), Sec. 4.2.2:
  1. ``pretrain_epochs``: the DAE alone on reconstruction, cached (methods/pretrain.py)
  2. k-means (k-means++, ``kmeans_n_init`` restarts) on the codes; W_dec = centres,
     W_enc = pinv(W_dec), zero biases                              (Sec. 4.1)
     (full k-means, best of 20 runs, as the authors' code: REFERENCE_CODE 3; the paper's
     "k-means++" could also mean its seeding alone, which is how CM^p reads it: ``init_lloyd_steps``)
     (``cm_init: posterior``, ours: W_enc, b_enc = the isotropic GMM posterior at the centres)
  3. ``cm_epochs``: the CM alone on the frozen codes, non-orthonormal CM loss E1..E4 (Eq. 7)
then, for both:
  4. joint training of encoder, decoder and CM on                   (Eq. 10)
        L = L_rec + E1 + E2 + E4 + L_orth
        L_rec  = beta sum_i ||x_i - dec(z_i)||^2      (the DAE reconstructs from z, not z~)
        E1     = sum_i ||z_i - gamma_i mu||^2
        E2     = sum_i sum_k gamma_ik (1 - gamma_ik)  (||mu_k||^2 = 1 and E3 = 0 under Eq. 8-9)
        E4     = sum_k (1 - alpha) log gamma~_k
        L_orth = lam ||mu mu^T - I_K||_1              (element-wise; mu includes the decoder bias)
  5. the last epoch is the averaging epoch: all parameters are set to their mean over its steps.
Prediction: argmax gamma(enc(x)). Model selection: L_sp = E2 + E3 of the CM (Eq. 7, with
||mu_k||^2 and k != l) on the codes of the full data (METHODS 3.4; ``lsp: orthonormal`` uses
the orthonormal sparsity term plus L_orth instead).

Deviations from the paper, each a documented choice (METHODS 3.4, REFERENCE_CODE 3):
the paper prints mu^T mu for the K x K Gram matrix mu mu^T; Adam epsilon is 1e-8 unless
``adam_eps`` is set (the authors' code: 1e-3); pretraining uses Adam (paper config), at the
data module's batch size (the authors' code pretrains with SGD at batch 256, REFERENCE_CODE 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..errors import check_choices, check_non_negative, check_positive
from ..nets import ClusteringModule
from ..nets.mlp import BiasInit
from ..ops import aecm_terms, cm_terms, orthonormality_penalty, sparsity_terms
from .averaging import AveragingEpoch
from .pretrain import AutoencoderMethod


class AECM(AveragingEpoch, AutoencoderMethod):
    """AE-CM with both initialisations.

    Args:
        n_clusters: K.
        input_shape: shape of one sample (linked from the data by the CLI).
        latent_dim: code size p (Table 13: 10 for MNIST).
        hidden: encoder widths (decoder mirrored): d-500-500-2000-p (Sec. 5.1).
        alpha: Dirichlet concentration (Table 13: MNIST 230).
        beta: weight of the DAE reconstruction (Table 13: MNIST 5).
        lam: weight of the orthonormality penalty (Table 13: 1).
        lr: Adam learning rate (0.001).
        adam_eps: Adam epsilon (paper silent; authors' code 1e-3).
        init: ``random`` (AE-CM^r) or ``pretrained`` (AE-CM^p).
        pretrain_epochs: DAE pretraining epochs (pretrained init; ours 100 = code).
        cm_epochs: CM-alone epochs on frozen codes (pretrained init; ours 100 = code).
        kmeans_n_init: k-means restarts for the pretrained init (code: 20).
        cm_init: how the CM's encoder reads the k-means centres (pretrained init): ``pinv``
            (Sec. 4.1) or ``posterior`` (ours, keeps the k-means partition; see
            :meth:`ClusteringModule.init_from_centres`).
        bias_init: the biases of the DAE and the CM, ``zeros`` (the paper is silent; ours) or
            ``glorot_normal`` (the authors' Keras code, REFERENCE_CODE 3.1).
        average_last_epoch: run the averaging epoch as the trainer's last epoch (``max_steps``
            inside it averages the steps taken; a fit that ends before it warns: methods/averaging.py).
        lsp: ``cm`` (E2 + E3 of Eq. 7 on the codes) or ``orthonormal`` (E2 + L_orth).
        slope: LeakyReLU slope of the DAE (0.2).
        pretrain_cache: where pretrained DAE weights are cached (see ``AutoencoderMethod``).
    """

    ddp_unused_parameters = True  # the CM is trained alone in its first epochs, the DAE alone in pretraining

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (784,),
        latent_dim: int = 10,
        hidden: Sequence[int] = (500, 500, 2000),
        alpha: float = 230.0,
        beta: float = 5.0,
        lam: float = 1.0,
        lr: float = 1e-3,
        adam_eps: float = 1e-8,
        init: Literal["random", "pretrained"] = "random",
        pretrain_epochs: int = 100,
        cm_epochs: int = 100,
        kmeans_n_init: int = 20,
        cm_init: Literal["pinv", "posterior"] = "pinv",
        bias_init: BiasInit = "zeros",
        average_last_epoch: bool = True,
        lsp: Literal["cm", "orthonormal"] = "cm",
        slope: float = 0.2,
        pretrain_cache: bool | str = True,
    ) -> None:
        check_positive(alpha=alpha)
        check_non_negative(beta=beta, lam=lam, cm_epochs=cm_epochs)
        check_choices(cm_init=(cm_init, ("pinv", "posterior")))
        super().__init__(
            n_clusters, input_shape, latent_dim, hidden, slope, lr, adam_eps, init, pretrain_epochs,
            kmeans_n_init, pretrain_cache, init_from_codes=init == "pretrained", bias_init=bias_init,
        )  # fmt: skip
        self.save_hyperparameters()
        self.cm = ClusteringModule(latent_dim, n_clusters, bias_init)
        self.init_average()

    # -- phases -----------------------------------------------------------------------
    @property
    def joint_start(self) -> int:
        """First epoch of joint training (Eq. 10)."""
        h = self.hparams
        return 0 if h.init == "random" else h.pretrain_epochs + h.cm_epochs

    def clustering_start(self) -> int:
        return self.joint_start

    def phase(self, epoch: int) -> str:
        if super().phase(epoch) == "pretrain":
            return "pretrain"
        return "cm" if epoch < self.joint_start else "joint"

    # -- contract ---------------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        return self.cm(self.embed(x))

    def prototypes(self) -> Tensor:
        return self.cm.centroids().detach()

    def selection_criteria(self, x: Tensor, probs: Tensor | None = None) -> dict[str, Tensor]:
        gamma = self.cluster_probs(x) if probs is None else probs
        if self.hparams.lsp == "orthonormal":  # E2 here, L_orth once in model_criteria
            return {"l_sp": sum(self.in_float32(sparsity_terms, gamma))}
        return {"l_sp": sum(self.in_float32(sparsity_terms, gamma, self.cm.centroids()))}

    def model_criteria(self) -> dict[str, Tensor]:
        if self.hparams.lsp != "orthonormal":
            return {}
        return {"l_sp": self.in_float32(orthonormality_penalty, self.cm.centroids(), lam=self.hparams.lam)}

    # -- training ---------------------------------------------------------------------
    def clustering_optimizers(self):
        # the CM alone (step 3) and everything (step 4); the DAE's (step 1) comes first
        return [self.adam(self.cm.parameters()), self.adam(self.parameters())]

    @torch.no_grad()
    def init_from_codes(self, z: Tensor) -> None:
        """Step 2: k-means on the pretrained codes initialises the CM (Sec. 4.1)."""
        self.cm.init_from_centres(self.kmeans(z), encoder=self.hparams.cm_init)

    def clustering_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = self.flat(batch["x"])
        _, opt_cm, opt_joint = self.optimizers()
        if self.phase(self.current_epoch) == "cm":  # step 3: CM alone on frozen codes, Eq. 7
            with torch.no_grad():
                z = self.encode(x)
            terms = self.in_float32(cm_terms, z, self.cm(z), self.cm.centroids(), alpha=self.hparams.alpha)
            self.optimize(self.check_and_log(terms, prefix="cm"), opt_cm)
            return
        z, x_rec = self.autoencode(x)  # step 4: joint, Eq. 10
        h = self.hparams
        gamma = self.cm(z)
        terms = self.in_float32(
            aecm_terms, x, x_rec, z, gamma, self.cm.centroids(), alpha=h.alpha, beta=h.beta, lam=h.lam
        )
        self.optimize(self.check_and_log(terms), opt_joint)
        self.accumulate_average()  # step 5
