"""Probes of a learnt representation (VAESim J §3.5; METHODS 1.1): statistical accuracy of the
clusters, kNN accuracy and linear-probe accuracy of the embedding, fitted on the training split
and scored on the evaluation split (where training and evaluation share their samples, on a
random share held out of them).

Functions first (numpy / torch in, a fraction out), then :class:`ProbeEvaluator`, the callback
that reads a method through its contract (``embed``, ``predict_clusters``) only.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor

from ..errors import ProtosError, check_positive
from ..methods.distributed import on_rank0
from .callbacks import ScoreRecorder

# The authors' code's linear probe (REFERENCE_CODE 1.2): Adam 1e-3, 10 epochs, batch 512, 10 outputs
# (one a class where a data set has more).
REFERENCE_LINEAR = {"lr": 1e-3, "epochs": 10, "batch_size": 512, "n_outputs": 10}


def statistical_accuracy(fit_clusters, fit_labels, eval_clusters, eval_labels) -> float:
    """The "statistical" accuracy (J §3.5): each cluster maps to the most frequent label among the
    fitting samples assigned to it (many-to-one, any number of clusters; ties go to the smaller
    label); a cluster with no fitting sample maps to the most frequent label overall. The
    accuracy of that map on the evaluation samples.

    >>> statistical_accuracy([0, 0, 1, 2], [1, 1, 0, 1], [0, 1, 2, 3], [1, 0, 0, 1])
    0.75
    """
    fit_clusters, fit_labels = np.asarray(fit_clusters), np.asarray(fit_labels)
    eval_clusters, eval_labels = np.asarray(eval_clusters), np.asarray(eval_labels)
    n_clusters = int(max(fit_clusters.max(), eval_clusters.max())) + 1
    n_labels = int(max(fit_labels.max(), eval_labels.max())) + 1
    counts = np.zeros((n_clusters, n_labels), dtype=np.int64)
    np.add.at(counts, (fit_clusters, fit_labels), 1)
    mapping = counts.argmax(axis=1)
    mapping[counts.sum(axis=1) == 0] = np.bincount(fit_labels, minlength=n_labels).argmax()
    return float((mapping[eval_clusters] == eval_labels).mean())


def knn_accuracy(fit_x, fit_labels, eval_x, eval_labels, k: int = 5) -> float:
    """Accuracy of scikit-learn's k-nearest-neighbour vote (Euclidean, uniform weights) with all
    fitting samples as the memory bank (J §3.5; the authors' code)."""
    knn = KNeighborsClassifier(n_neighbors=k).fit(np.asarray(fit_x), np.asarray(fit_labels))
    return float(knn.score(np.asarray(eval_x), np.asarray(eval_labels)))


def linear_probe_accuracy(
    fit_x: Tensor,
    fit_labels: Tensor,
    eval_x: Tensor,
    eval_labels: Tensor,
    lr: float = 3e-4,
    epochs: int = 200,
    batch_size: int = 512,
    n_outputs: int | None = None,
    seed: int = 0,
) -> float:
    """Accuracy of a linear classifier Linear(p -> n_outputs) trained with cross-entropy by Adam
    on shuffled mini-batches of the fitting samples (J §3.5: Adam 3e-4, 200 epochs; batch 512
    ours), on the evaluation samples. Runs on the inputs' device, with its own seeded random
    stream (the caller's is left untouched).

    Args:
        fit_x: ``(N, p)`` embeddings; fit_labels: ``(N,)`` integer labels.
        eval_x: ``(M, p)``; eval_labels: ``(M,)``.
        n_outputs: logits of the layer (the code used 10); never fewer than the number of labels,
            the default.
    """
    device = fit_x.device
    n_out = max(n_outputs or 0, int(max(fit_labels.max(), eval_labels.max())) + 1)
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with fork, torch.inference_mode(False), torch.enable_grad():  # also inside Lightning's evaluation loops
        fit_x, eval_x = fit_x.float().clone(), eval_x.float().clone()  # clone: no inference tensors
        fit_labels, eval_labels = fit_labels.to(device).long().clone(), eval_labels.to(device).long().clone()
        torch.manual_seed(seed)
        layer = torch.nn.Linear(fit_x.shape[1], n_out).to(device)
        optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in torch.randperm(len(fit_x), device=device).split(batch_size):
                loss = torch.nn.functional.cross_entropy(layer(fit_x[idx]), fit_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return float((layer(eval_x).argmax(1) == eval_labels).float().mean())


def holdout_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of a random split of the samples with ``share`` held out, by class
    (scikit-learn's stratified ``train_test_split``) where every class has two samples and the
    held-out share has room for each, else at random."""
    idx = np.arange(len(labels))
    try:
        fit, held = train_test_split(idx, test_size=share, random_state=seed, stratify=labels)
    except ValueError:  # a class of one sample, or fewer held-out samples than classes
        fit, held = train_test_split(idx, test_size=share, random_state=seed)
    return fit, held


@torch.no_grad()
def embed_and_assign(pl_module, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """``embed`` ``(N, p)`` float32 on the method's device and ``predict_clusters`` ``(N,)`` on
    the CPU of the inputs ``x`` ``(N, *input_shape)``, in batches of ``batch_size``."""
    z, k = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(pl_module.device)
        z.append(pl_module.embed(xb).float())
        k.append(pl_module.predict_clusters(xb))
    return torch.cat(z), torch.cat(k).cpu()


class ProbeEvaluator(ScoreRecorder):
    """Statistical, kNN and linear-probe accuracy at the end of validation and test.

    The method is read through its contract only: ``predict_clusters`` (statistical accuracy)
    and ``embed`` (kNN and linear probe) on the whole fitting split and the whole evaluation
    split of the DataModule, with their labels. Logged as ``{stage}/stat_acc``, ``knn_acc``,
    ``linear_acc`` (and ``linear_acc_reference``) and merged into ``metrics.json``. Computed on
    global rank zero; a data set without labels gets no probes.

    Where the data module trains and evaluates on the same samples (``fit_on: all``, or a
    user's file with one split), scoring on them would let kNN find each sample at distance 0:
    the probes then fit on a random ``1 - holdout`` of the samples and score on the rest, and
    say so in one warning.

    Args:
        knn_k: neighbours of the kNN vote (the authors: 5 on MNIST, 10 on PneumoniaMNIST).
        linear_lr: Adam learning rate of the linear probe (J: 3e-4).
        linear_epochs: its epochs (J: 200).
        linear_batch_size: its batch size (ours: 512, as the code).
        linear_outputs: its outputs; default the number of classes.
        reference_linear: also report ``linear_acc_reference``, the authors' code's probe
            (Adam 1e-3, 10 epochs, batch 512, 10 outputs or one a class where there are more;
            REFERENCE_CODE 1.2). On a few hundred samples that is 10 Adam steps, which may leave
            it predicting a class the data do not have (a score near 0); ``linear_acc`` is the
            trained probe.
        stages: ``val`` and / or ``test``.
        holdout: the share scored on data with one split (scikit-learn's ``train_test_split``).
        seed: seed of the linear probe's initialisation and shuffling, and of that split.
    """

    def __init__(
        self,
        knn_k: int = 5,
        linear_lr: float = 3e-4,
        linear_epochs: int = 200,
        linear_batch_size: int = 512,
        linear_outputs: int | None = None,
        reference_linear: bool = False,
        stages: tuple[str, ...] = ("val", "test"),
        holdout: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive(
            knn_k=knn_k, linear_epochs=linear_epochs, linear_batch_size=linear_batch_size, linear_lr=linear_lr
        )
        if not 0 < holdout < 1:
            raise ProtosError(f"holdout must be in (0, 1), got {holdout}")
        self.knn_k = knn_k
        self.linear = {"lr": linear_lr, "epochs": linear_epochs, "batch_size": linear_batch_size}
        self.linear["n_outputs"] = linear_outputs
        self.reference_linear = reference_linear
        self.stages = tuple(stages)
        self.holdout, self.seed = holdout, seed

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Before any training: a one-line error for fewer linear outputs than classes, and the
        warning for data with one split."""
        dm = trainer.datamodule
        if dm is None or stage == "predict" or dm.labels("fit") is None:
            return
        if not getattr(dm, "held_out", True):
            rank_zero_warn(
                f"ProbeEvaluator: {type(dm).__name__} trains and evaluates on the same samples (fit_on: all, "
                f"or one split): the probes fit on a random {1 - self.holdout:.0%} and score on the other "
                f"{self.holdout:.0%}"
            )
        n_outputs, n_classes = self.linear["n_outputs"], dm.n_classes
        if n_outputs is not None and n_classes is not None and n_outputs < n_classes:
            raise ProtosError(f"ProbeEvaluator: linear_outputs={n_outputs} is fewer than the {n_classes} classes")

    def scores(self, pl_module, datamodule) -> dict[str, float]:
        """The probes' accuracies for ``pl_module`` on ``datamodule`` (empty without labels)."""
        fit_y, eval_y = datamodule.labels("fit"), datamodule.labels("eval")
        if fit_y is None or eval_y is None:
            return {}
        batch_size = getattr(datamodule, "eval_batch_size", 1024)
        fit_z, fit_k = embed_and_assign(pl_module, datamodule.features("fit"), batch_size)
        fit_y, eval_y = fit_y.cpu(), eval_y.cpu()
        if getattr(datamodule, "held_out", True):
            eval_z, eval_k = embed_and_assign(pl_module, datamodule.features("eval"), batch_size)
        else:  # one split: score on a random share of it, held out of the fits, by class where it can
            fit_i, eval_i = map(torch.as_tensor, holdout_split(fit_y.numpy(), self.holdout, self.seed))
            eval_z, eval_k, eval_y = fit_z[eval_i], fit_k[eval_i], fit_y[eval_i]
            fit_z, fit_k, fit_y = fit_z[fit_i], fit_k[fit_i], fit_y[fit_i]
        k = min(self.knn_k, len(fit_y))  # a small held-out set: at most every fitting sample
        out = {
            "stat_acc": statistical_accuracy(fit_k.numpy(), fit_y.numpy(), eval_k.numpy(), eval_y.numpy()),
            "knn_acc": knn_accuracy(fit_z.cpu().numpy(), fit_y.numpy(), eval_z.cpu().numpy(), eval_y.numpy(), k),
            "linear_acc": linear_probe_accuracy(fit_z, fit_y, eval_z, eval_y, **self.linear, seed=self.seed),
        }
        if self.reference_linear:
            ref = linear_probe_accuracy(fit_z, fit_y, eval_z, eval_y, **REFERENCE_LINEAR, seed=self.seed)
            out["linear_acc_reference"] = ref
        return out

    def _run(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        if stage not in self.stages or trainer.datamodule is None:
            return
        # fitted once, by rank 0, and logged by every rank: a checkpoint or an early stop that
        # monitors a probe's score looks for it on each rank (under DDP, a rank without it fails)
        scores = on_rank0(self.scores, pl_module, trainer.datamodule)
        if not scores:
            return
        pl_module.log_dict({f"{stage}/{k}": v for k, v in scores.items()}, sync_dist=True)  # equal on every rank
        self.record(stage, trainer, pl_module, scores)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._run("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._run("test", trainer, pl_module)
