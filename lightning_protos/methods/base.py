"""The method contract every clustering / prototype method implements (DESIGN.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..errors import ProtosError
from ..hardware import check_device
from .distributed import average_batchnorm_stats, set_ddp_options
from .resume import ExactResume

T = TypeVar("T")


def adam(params, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """``torch.optim.Adam`` with its fused kernel, the optimizer of every method: the same update
    as the default multi-tensor step, in one pass over each parameter (the MNIST DAE encoder's
    step, 1.66M parameters: 2.5 ms against 10-14 ms on one CPU thread; BENCHMARKS.md)."""
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)


def stop_requested(trainer: L.Trainer) -> bool:
    """Whether the fit stops after the step just taken, on a stop asked for within the epoch (a
    method's, as DEC's ``tol``, or a callback's batch hook) that Lightning will honour (its
    ``min_epochs`` / ``min_steps`` can veto it): it then leaves the epoch and counts it."""
    return trainer.should_stop and getattr(trainer.fit_loop, "_can_stop_early", True)


class ClusteringMethod(ExactResume, L.LightningModule):
    """Base of every method: the contract read by evaluation, plus manual-optimization helpers.

    Subclasses implement ``training_step`` (manual optimization: each method writes out its
    own updates) and the contract members :meth:`cluster_probs` and :meth:`embed`; methods
    with centroids or a decoder also override :meth:`prototypes` and :meth:`decode`, and those
    with their own measure of likeness to a prototype :meth:`similarities`. Beyond DESIGN.md's
    table, evaluation also reads :meth:`selection_criteria` and :meth:`model_criteria`, :meth:`prepare_evaluation`,
    :meth:`evaluating` and :attr:`checkpoint_epochs`, and otherwise only LightningModule's own API.

    Args:
        n_clusters: K, the number of clusters / prototypes (>= ``min_clusters``).
        input_shape: shape of one input sample; linked from the DataModule by the CLI.
    """

    # The smallest K a method accepts: 2 for clustering; 1 where one cluster is meaningful
    # (ProtoVAE's K = 1 run, the reconstruction baselines that have no clusters).
    min_clusters: int = 2
    # True where some backward passes leave parameters out (AE-CM's CM-alone epochs, the
    # pretraining epochs before the clustering parameters, DEC's unused decoder, ProtoVAE's
    # three optimisers): under DDP such a method gets ``find_unused_parameters`` (see :meth:`setup`).
    ddp_unused_parameters: bool = False
    # Steps between the reads of the non-finite-loss flag (:meth:`check_and_log`); ``None``: every
    # step on a CPU, where reading a tensor is free, every 50 on an accelerator, where each read
    # is a host round trip that stops the host from queuing the next steps ahead of the device.
    finite_check_every: int | None = None
    # The networks (dotted submodule names) whose ``forward`` the training steps call, where
    # those are not the direct children: what ``--compile.enabled`` considers compiling
    # (:class:`~lightning_protos.compile.Compile`, which keeps the conv nets among them).
    compile_modules: tuple[str, ...] | None = None

    def __init__(self, n_clusters: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if n_clusters < self.min_clusters:
            raise ProtosError(f"n_clusters (K) must be >= {self.min_clusters}, got {n_clusters}")
        self.automatic_optimization = False
        self.n_clusters = n_clusters
        self.input_shape = tuple(input_shape)
        self.input_dim = math.prod(self.input_shape)
        self._term_sums: dict[str, Tensor] = {}
        self._term_steps = 0
        self._loss_keys: dict[str, None] = {}  # the summed keys that are loss terms, in order
        self._first_bad: Tensor | None = None  # the first step whose loss was not finite, or -1
        self._grad_stats: dict[str, Tensor] = {}  # this epoch's gradient norms under max_grad_norm
        self._resumed: dict[str, Any] | None = None  # what on_load_checkpoint read, until the next batch
        self._run_seed: int | None = None  # torch's seed when the trainer set the method up
        self._own_stream = False  # a rank > 0 of a DDP fit, before its first batch: see setup

    # -- the contract -----------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> ``(B, p)`` deterministic latent (kNN, probes, t-SNE)."""
        raise NotImplementedError

    def cluster_probs(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> ``(B, K)`` soft assignment (rows sum to 1)."""
        raise NotImplementedError

    def predict_clusters(self, x: Tensor) -> Tensor:
        """``(B,)`` hard assignment, the argmax of :meth:`cluster_probs`."""
        return self.cluster_probs(x).argmax(dim=-1)

    def prototypes(self) -> Tensor | None:
        """``(K, p)`` centroids / prototypes in latent space, or ``None``."""
        return None

    def decode(self, z: Tensor) -> Tensor | None:
        """``(B, p)`` latents -> ``(B, *input_shape)`` inputs, or ``None`` without a decoder."""
        return None

    def similarities(self, x: Tensor) -> Tensor | None:
        """``(B, K)`` similarity of each input to each prototype by the method's own measure
        (VAESim's), or ``None`` (the default): it ranks a prototype's nearest images, which
        are otherwise the closest in the embedding."""
        return None

    def selection_criteria(self, x: Tensor, probs: Tensor | None = None) -> dict[str, Tensor]:
        """Unsupervised model-selection criteria as sums over the batch (summed over the data
        by the evaluator), e.g. the CM's L_sp. ``probs``: the batch's :meth:`cluster_probs`
        where the caller has them (the evaluator does), so that a method needing them does not
        encode the batch again. Empty by default."""
        return {}

    def model_criteria(self) -> dict[str, Tensor]:
        """The parts of :meth:`selection_criteria` that depend on the model alone, not on the
        data (AE-CM's L_orth), added once to the evaluator's sums. Empty by default."""
        return {}

    def prepare_evaluation(self) -> None:
        """Brings state that evaluation reads, and that training only refreshes when asked, up
        to date: under DDP the BatchNorm running statistics (``distributed.average_batchnorm_stats``);
        VAE+KMeans adds its k-means on the current latents. Called on every rank when a
        validation starts, and by ``InspectionImages`` before it draws during ``fit``."""
        average_batchnorm_stats(self)

    @property
    def run_seed(self) -> int:
        """The run's seed (``seed_everything``'s) as every rank had it when the trainer set the
        method up, or as the checkpoint a run resumes from holds it: the seed of the scikit-learn
        fits (k-means, the GMM) and of the pretraining cache's key. (From its first training
        batch on, a DDP rank > 0 draws from a stream of its own.)"""
        return torch.initial_seed() if self._run_seed is None else self._run_seed

    @property
    def sklearn_seed(self) -> int:
        """:attr:`run_seed` as scikit-learn's ``random_state`` takes it (below 2^31)."""
        return self.run_seed % 2**31

    # -- helpers for subclasses -------------------------------------------------------
    def flat(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> ``(B, D)``."""
        return x.reshape(len(x), -1)

    def optimize(self, loss: Tensor, optimizer, max_grad_norm: float | None = None) -> None:
        """One manual step: zero_grad, backward, step. With ``max_grad_norm``, the gradient of the
        optimizer's parameters is first scaled down to that norm where it is larger
        (``torch.nn.utils.clip_grad_norm_``, for float32 and bf16-mixed: no loss scaler); the
        epoch's largest norm before clipping and its number of clipped steps are logged
        (``train/grad_norm_max``, ``train/clipped_steps``), kept on the device until then."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if max_grad_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).detach()
            stats = self._grad_stats
            stats["train/grad_norm_max"] = torch.maximum(stats.get("train/grad_norm_max", norm), norm)
            stats["train/clipped_steps"] = stats.get("train/clipped_steps", 0) + (norm > max_grad_norm).float()
        optimizer.step()

    def check_and_log(
        self, terms: dict[str, Tensor], prefix: str = "train", metrics: dict[str, Tensor] | None = None
    ) -> Tensor:
        """Sum the loss terms, stop on a NaN/Inf naming the term, log each term and the total;
        ``metrics`` (e.g. a training MSE beside a BCE loss) are logged the same way, outside the sum.

        The terms are summed on the device and logged once per epoch (``self.log`` on every step
        costs more than a CM step). A non-finite loss sets a flag on the device, the first such
        step, read every ``finite_check_every`` steps, before each validation and each checkpoint:
        the run stops there, naming the terms whose sums went non-finite and that first step, and
        no checkpoint holds the damaged weights."""
        loss = sum(terms.values())
        for k, v in {**terms, "loss": loss, **(metrics or {})}.items():
            key = f"{prefix}/{k}"
            self._term_sums[key] = self._term_sums.get(key, 0.0) + v.detach()
            if k in terms:
                self._loss_keys.setdefault(key)
        self._term_steps += 1
        finite = torch.isfinite(loss.detach())
        every = self.finite_check_every or (1 if loss.device.type == "cpu" else 50)
        if every == 1:  # read at once: no flag to keep on the device
            if not finite:
                self._first_bad = torch.tensor(self.global_step)
                self.check_finite()
            return loss
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, self.global_step, self._first_bad)
        if self._term_steps % every == 0:
            self.check_finite()
        return loss

    def check_finite(self) -> None:
        """Raises the one-line error of :meth:`check_and_log` if a loss since the start of the
        epoch was not finite (one host read)."""
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        bad = [k.split("/", 1)[1] for k in self._loss_keys if not torch.isfinite(self._term_sums[k])] or ["loss"]
        raise FloatingPointError(
            f"non-finite loss term {', '.join(bad)} at epoch {self.current_epoch}, step "
            f"{int(self._first_bad)}: lower the learning rate or check the data"
        )

    def _epoch_sums(self) -> dict[str, Any]:
        """The loss sums and gradient-norm statistics of the epoch so far, on the host, as a
        checkpoint keeps them (:class:`~.resume.ExactResume`)."""
        return {
            "term_sums": {k: v.detach().cpu() for k, v in self._term_sums.items()},
            "term_steps": self._term_steps,
            "loss_keys": list(self._loss_keys),
            "grad_stats": {k: v.detach().cpu() for k, v in self._grad_stats.items()},
        }

    def _restore_epoch_sums(self, saved: dict[str, Any]) -> None:
        """The inverse of :meth:`_epoch_sums`, on this device."""
        self._term_sums = {k: v.to(self.device) for k, v in saved["term_sums"].items()}
        self._term_steps = saved["term_steps"]
        self._loss_keys = dict.fromkeys(saved.get("loss_keys", ()))
        self._grad_stats = {k: v.to(self.device) for k, v in saved.get("grad_stats", {}).items()}

    def on_train_epoch_end(self) -> None:
        """Log the epoch mean of every loss term summed by :meth:`check_and_log`; under DDP,
        average the BatchNorm statistics before the epoch's checkpoint is written."""
        self.check_finite()
        average_batchnorm_stats(self)
        if self._term_steps:
            self.log_dict({k: v / self._term_steps for k, v in self._term_sums.items()}, sync_dist=True)
        if self._grad_stats:
            self.log_dict(self._grad_stats, reduce_fx="max", sync_dist=True)
        self._term_sums, self._term_steps, self._loss_keys, self._grad_stats = {}, 0, {}, {}

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the block (BatchNorm's running statistics, which it leaves alone), then
        the mode the method was in."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def full_precision(self):
        """Context for loss terms: float32 even under ``--trainer.precision bf16-mixed`` (the
        networks run in bf16; sums over a batch and Gram matrices need float32)."""
        return torch.autocast(self.device.type, enabled=False)

    def in_float32(self, fn: Callable[..., T], *tensors: Tensor, **kwargs) -> T:
        """``fn(*tensors, **kwargs)`` with the tensors in float32, outside autocast: how a method
        computes its loss terms (and other sums a bf16 rounding would spoil) under
        ``--trainer.precision bf16-mixed``. Without autocast no context is entered (that costs
        ~10 us, a CM step ~1.7 ms)."""
        tensors = [t.float() for t in tensors]
        if not torch.is_autocast_enabled(self.device.type):
            return fn(*tensors, **kwargs)
        with self.full_precision():
            return fn(*tensors, **kwargs)

    def fit_features(self) -> Tensor:
        """The whole training split as float features on this device (for initialisations)."""
        return self.trainer.datamodule.features("fit").to(self.device)

    def is_last_epoch(self) -> bool:
        return self.trainer.max_epochs is not None and self.current_epoch == self.trainer.max_epochs - 1

    def ends_epoch(self) -> bool:
        """Whether the training step just taken is the last of its epoch in this fit: the epoch's
        last batch, the step ``max_steps`` stops at, or a stop the callbacks' batch hooks just
        asked for (Lightning then leaves the epoch; its min_epochs / min_steps can veto it)."""
        return self.trainer.is_last_batch or self.max_steps_reached() or stop_requested(self.trainer)

    def max_steps_reached(self) -> bool:
        """Whether the trainer's ``max_steps`` ends the fit at this step."""
        max_steps = self.trainer.max_steps
        return max_steps is not None and 0 <= max_steps <= self.global_step

    # -- Lightning hooks shared by all methods ----------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.check_finite()  # evaluation of weights a non-finite loss damaged would fail less clearly
        self.prepare_evaluation()

    def clustering_start(self) -> int:
        """The epoch from which the method trains its clustering objective, after its pretraining
        or warm-up epochs: ``fit`` warns when ``max_epochs`` ends before it."""
        return 0

    def before_clustering(self) -> bool:
        """Whether this epoch is one of the pretraining or warm-up epochs before :meth:`clustering_start`."""
        return self.current_epoch < self.clustering_start()

    def setup(self, stage: str) -> None:
        """Checks the GPU this process runs on (``hardware.check_device``: before the model moves
        to it) and the data against the network, records the run's seed (:attr:`run_seed`),
        and, on a DDP rank > 0 of a fit, asks for a random stream of its own from the first batch
        on: ``seed_everything`` seeds every rank alike, and the ranks would otherwise draw the
        same noise (reparameterisation, augmentation, MMD samples) for the samples at the same
        place of their batches; rank 0 draws as a single process does. Under DDP it sets the
        options the methods need (``distributed.set_ddp_options``)."""
        epochs, start = self.trainer.max_epochs, self.clustering_start()
        if stage == "fit" and start > 0 and epochs is not None and 0 <= epochs <= start:
            # not an error: a run may be trained in parts, each resumed from the last
            rank_zero_warn(
                f"max_epochs ({epochs}) ends within the {start} epochs of pretraining / warm-up: this fit of "
                f"{type(self).__name__} does not reach its clustering (resume it with more epochs)"
            )
        strategy = self.trainer.strategy
        check_device(strategy.root_device)
        self._resumed = None  # what an earlier call's checkpoint left (this call's loads after setup)
        self._run_seed = torch.initial_seed()
        self._own_stream = stage == "fit" and self.trainer.global_rank > 0
        set_ddp_options(strategy, find_unused_parameters=stage == "fit" and self.ddp_unused_parameters)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "input_shape"):
            return
        if tuple(dm.input_shape) != self.input_shape:
            raise ProtosError(
                f"input shape {tuple(dm.input_shape)} of data set {dm.name!r} does not match the "
                f"network's input_shape {self.input_shape}"
            )
        if stage == "fit" and self.n_clusters > dm.n_train:
            raise ProtosError(f"n_clusters (K={self.n_clusters}) exceeds the {dm.n_train} training samples")
        if stage == "fit" and self.bernoulli_inputs() and hasattr(dm, "value_range"):
            low, high = dm.value_range()
            if low < 0 or high > 1:
                raise ProtosError(
                    f"{type(self).__name__}'s Bernoulli reconstruction (BCE) needs inputs in [0, 1]; "
                    f"{dm.name!r} holds [{low:.4g}, {high:.4g}]: scale the data"
                )

    def bernoulli_inputs(self) -> bool:
        """Whether the reconstruction is a Bernoulli likelihood (BCE), defined for inputs in [0, 1]
        only: ``fit`` checks the data first."""
        return False

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Evaluation lives in callbacks (``eval/``), which read the method via the contract."""

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """See :meth:`validation_step`."""

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.prediction(batch, self.cluster_probs(batch["x"]))

    @staticmethod
    def prediction(batch: dict[str, Tensor], probs: Tensor, **extra: Tensor) -> dict[str, Tensor]:
        """A predicted batch as the AssignmentWriter reads it: index, cluster (argmax of
        ``probs``), probs, the label where the batch has one, and ``extra`` outputs."""
        out = {"index": batch["index"], "cluster": probs.argmax(-1), "probs": probs, **extra}
        if "y" in batch:
            out["y"] = batch["y"]
        return out
