"""Evaluation callbacks: they read a method only through its contract, DESIGN.md's table
(``embed``, ``cluster_probs``, ``prototypes``, ``decode``) and the members ``methods/base.py``
adds to it (``similarities``, ``selection_criteria``, ``model_criteria``, ``prepare_evaluation``, ``evaluating``
and ``checkpoint_epochs``, the epochs behind a loaded checkpoint)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..methods.base import stop_requested
from .metrics import clustering_scores


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: the first logger's version folder, else the trainer's root.

    Read from the logger here, not through ``trainer.log_dir``: that is a broadcast under DDP,
    which would hang the rank-zero-only writers that call this.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    folder = (getattr(logger, "log_dir", None) or logger.save_dir) if logger is not None else None
    return Path(folder or trainer.default_root_dir)


def evaluated_epoch(trainer: L.Trainer, pl_module) -> int:
    """The training epochs behind the weights being evaluated (``metrics.json``'s ``epoch``), one
    count for every stage: 2 after a 2-epoch fit, for its validation at the end of the second
    epoch, its final test, and a later ``test`` of its ``last.ckpt`` (Lightning does not restore
    the epoch outside ``fit``: the checkpoint's count, ``methods.resume.epochs_trained``)."""
    loaded = getattr(pl_module, "checkpoint_epochs", None)
    if trainer.state.fn != TrainerFn.FITTING and trainer.ckpt_path and loaded is not None:
        return loaded
    if trainer.state.fn == TrainerFn.FITTING:
        # a validation at an epoch's end counts that epoch, and so does one at a stop asked for
        # within it (DEC's tol), as Lightning counts the epoch it stops in
        return trainer.current_epoch + int(trainer.is_last_batch or stop_requested(trainer))
    return trainer.current_epoch


def record_metrics(trainer: L.Trainer, stage: str, scores: dict[str, float]) -> None:
    """Merges ``scores`` into the ``stage`` entry of the run's ``metrics.json`` (global rank zero
    only; written to a temporary file, then renamed), so that several callbacks share the file."""
    if not trainer.is_global_zero:
        return
    path = run_dir(trainer) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results[stage] = {**results.get(stage, {}), **scores}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def gather_shards(trainer: L.Trainer, pl_module, shard: Tensor) -> Tensor:
    """Every rank's ``(n_r, ...)`` shard, concatenated on the host, ``(sum_r n_r, ...)``.

    Under DDP each rank evaluates a disjoint shard of the evaluation set, no sample twice (see
    ``ArrayDataModule``), so the shards may differ in length by one: they are padded to the
    longest, gathered on the module's device (NCCL gathers GPU tensors only) and trimmed.
    """
    if trainer.world_size == 1:
        return shard.cpu()
    shard = shard.to(pl_module.device)
    sizes = pl_module.all_gather(torch.tensor(len(shard), device=pl_module.device)).reshape(-1).tolist()
    padded = shard.new_zeros((max(sizes), *shard.shape[1:]))
    padded[: len(shard)] = shard
    gathered = pl_module.all_gather(padded)  # (world_size, max(sizes), ...)
    return torch.cat([part[:n] for part, n in zip(gathered, sizes, strict=True)]).cpu()


class ScoreRecorder(L.Callback):
    """A callback with scores per stage: ``results[stage]`` holds its latest ones, with the
    training epochs behind them, also merged into ``metrics.json``; ``protos fit``'s final line
    prints every recorder's test scores."""

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, dict[str, float]] = {}

    def record(self, stage: str, trainer: L.Trainer, pl_module, scores: dict[str, float]) -> None:
        self.results[stage] = {"epoch": evaluated_epoch(trainer, pl_module), **scores}
        record_metrics(trainer, stage, self.results[stage])


class EvaluationCallback(ScoreRecorder):
    """Accumulates over the validation / test batches and reports at the epoch's end: a
    subclass implements ``_reset``, ``_collect(pl_module, batch)`` and
    ``_finish(stage, trainer, pl_module)``. Sanity-check batches are ignored."""

    def _reset(self) -> None:
        raise NotImplementedError

    def _collect(self, pl_module, batch: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _finish(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._collect(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._finish("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish("test", trainer, pl_module)


class ClusteringEvaluator(EvaluationCallback):
    """Scores the assignments of ``cluster_probs`` at validation and test end.

    Logs ``{stage}/acc``, ``nmi``, ``ari``, ``homogeneity`` and each of the method's
    ``selection_criteria`` (e.g. ``l_sp``) to every logger, the ARI also as ``hp_metric`` (the
    score of TensorBoard's HParams tab), and records the latest figures
    of each stage in ``metrics.json`` in the run directory (:func:`record_metrics`).

    Checkpoints record the data the model was trained on (the data module's ``source``); a
    checkpoint tested, validated or predicted on other data warns, naming both, since a
    ``--config`` without the fit's ``--data`` options silently falls back to the config's data.
    """

    def __init__(self) -> None:
        super().__init__()
        self._preds: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._criteria: dict[str, Tensor] = {}
        self.trained_on: str | None = None

    def on_fit_start(self, trainer, pl_module) -> None:  # after a checkpoint's state was restored
        self.trained_on = getattr(trainer.datamodule, "source", None)

    def state_dict(self) -> dict[str, str | None]:
        return {"trained_on": self.trained_on}

    def load_state_dict(self, state: dict[str, str | None]) -> None:
        self.trained_on = state.get("trained_on", self.trained_on)

    def _check_data(self, trainer) -> None:
        now = getattr(trainer.datamodule, "source", None)
        if trainer.state.fn != TrainerFn.FITTING and self.trained_on and now and now != self.trained_on:
            rank_zero_warn(
                f"the checkpoint was trained on {self.trained_on}, this {trainer.state.fn.value} runs on {now}: "
                "to use the fit's data, repeat its --data options or pass --config RUN/config.yaml"
            )

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check_data(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._check_data(trainer)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._check_data(trainer)

    def _reset(self) -> None:
        self._preds, self._labels, self._criteria = [], [], {}

    def _collect(self, pl_module, batch: dict[str, Tensor]) -> None:
        with torch.no_grad():
            probs = pl_module.cluster_probs(batch["x"])  # once: the criteria may read them too
            self._preds.append(probs.argmax(dim=-1).cpu())  # predict_clusters
            for name, value in pl_module.selection_criteria(batch["x"], probs).items():
                self._criteria[name] = self._criteria.get(name, 0.0) + value.detach().double().cpu()
        if "y" in batch:
            self._labels.append(batch["y"].cpu())

    def _finish(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        if not self._preds:
            return
        preds = gather_shards(trainer, pl_module, torch.cat(self._preds))
        scores: dict[str, float] = {}
        if self._labels:
            labels = gather_shards(trainer, pl_module, torch.cat(self._labels))
            scores.update(clustering_scores(labels.numpy(), preds.numpy()))
        for name, value in self._criteria.items():  # sums over each rank's shard
            scores[name] = float(pl_module.all_gather(value.to(pl_module.device)).sum())
        for name, value in pl_module.model_criteria().items():  # once, not per batch or rank
            scores[name] = scores.get(name, 0.0) + float(value.detach())
        scores["n_clusters_used"] = int(preds.unique().numel())
        logged = {f"{stage}/{k}": float(v) for k, v in scores.items()}
        if "ari" in scores:  # TensorBoard's HParams tab compares runs by hp_metric (Lightning's -1 until then)
            logged["hp_metric"] = scores["ari"]
        pl_module.log_dict(logged, sync_dist=False, rank_zero_only=True)
        self.record(stage, trainer, pl_module, scores)
        self._reset()


# (B, K) outputs of ``predict_step`` written one column per cluster, and their column prefixes.
PER_CLUSTER_COLUMNS = {"probs": "p", "similarity": "sim"}


class AssignmentWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` from the outputs of ``predict_step``: index, label (if known),
    cluster, then one column per cluster for each ``(B, K)`` output it finds: ``probs`` as
    ``p_k`` and ``similarity`` (VAESim: the similarity to prototype k) as ``sim_k``; last,
    where the data name them, each label's ``label_name`` (MedMNIST's, a folder's classes) and
    each sample's ``file`` (a user's image folder).

    When the outputs carry ``similarity``, also writes ``prototype_neighbours.csv``: for each
    prototype, its ``n_nearest`` most similar images (rank 0 the most similar), with their
    index, label, similarity (and label name and file): real exemplars of each prototype.

    Args:
        filename: the predictions file, in the run directory.
        neighbours_filename: the nearest-images file, in the run directory.
        n_nearest: images listed per prototype.
    """

    def __init__(
        self,
        filename: str = "predictions.csv",
        neighbours_filename: str = "prototype_neighbours.csv",
        n_nearest: int = 5,
    ) -> None:
        super().__init__(write_interval="epoch")
        self.filename, self.neighbours_filename, self.n_nearest = filename, neighbours_filename, n_nearest

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            return
        batches = predictions[0] if isinstance(predictions[0], list) else predictions
        # under DDP every rank predicted its own shard: gathered, then written by rank zero
        out = {
            key: gather_shards(trainer, pl_module, torch.cat([b[key].detach() for b in batches])) for key in batches[0]
        }
        if not trainer.is_global_zero:
            return
        order = out["index"].argsort()
        out = {key: value[order] for key, value in out.items()}
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        dm = trainer.datamodule
        names = getattr(dm, "sample_names", lambda stage: None)("eval")
        classes = getattr(dm, "class_names", None)
        text = {}  # text columns, after the numbers, one value per row
        if classes and "y" in out:
            text["label_name"] = [classes[k] for k in out["y"].tolist()]
        if names:
            text["file"] = [names[i] for i in out["index"].tolist()]
        self._write_predictions(folder / self.filename, out, text)
        print(f"assignments written to {folder / self.filename}")
        if "similarity" in out and self.n_nearest > 0:
            self._write_neighbours(folder / self.neighbours_filename, out, text)
            print(f"nearest images of each prototype written to {folder / self.neighbours_filename}")

    @staticmethod
    def _write_predictions(path: Path, out: dict[str, Tensor], text: dict[str, list[str]]) -> None:
        per_cluster = [(key, prefix) for key, prefix in PER_CLUSTER_COLUMNS.items() if key in out]
        ids = [key for key in ("index", "y", "cluster") if key in out]
        header = ["label" if key == "y" else key for key in ids]
        for key, prefix in per_cluster:
            header += [f"{prefix}_{j}" for j in range(out[key].shape[1])]
        # one formatted write of the whole (N, columns) table, no per-row Python
        table = np.column_stack(
            [out[key].double().numpy() for key in ids] + [out[key].double().numpy() for key, _ in per_cluster]
        )
        fmt = ["%d"] * len(ids) + ["%.6g"] * (table.shape[1] - len(ids))
        if not text:
            np.savetxt(path, table, fmt=fmt, delimiter=",", header=",".join(header), comments="")
            return
        numbers = io.StringIO()
        np.savetxt(numbers, table, fmt=fmt, delimiter=",")
        with open(path, "w", newline="") as f:  # the csv writer quotes names holding commas or quotes
            w = csv.writer(f, lineterminator="\n")
            w.writerow([*header, *text])
            rows = numbers.getvalue().splitlines()
            w.writerows([*row.split(","), *names] for row, *names in zip(rows, *text.values(), strict=True))

    def _write_neighbours(self, path: Path, out: dict[str, Tensor], text: dict[str, list[str]]) -> None:
        sims = out["similarity"].float()  # (N, K)
        top = sims.topk(min(self.n_nearest, len(sims)), dim=0)  # (n, K) each
        has_y = "y" in out
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["prototype", "rank", "index", *(["label"] if has_y else []), "similarity", *text])
            for j in range(sims.shape[1]):
                for rank in range(top.indices.shape[0]):
                    row = int(top.indices[rank, j])
                    label = [int(out["y"][row])] if has_y else []
                    named = [column[row] for column in text.values()]
                    w.writerow([j, rank, int(out["index"][row]), *label, f"{float(top.values[rank, j]):.6g}", *named])
