"""Evaluation callbacks: they read a method only through its contract (DESIGN.md)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .metrics import clustering_scores


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: the logger's version folder, else the trainer's root."""
    return Path(trainer.log_dir or trainer.default_root_dir)


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


class EvaluationCallback(L.Callback):
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
    ``selection_criteria`` (e.g. ``l_sp``) to every logger, and records the latest figures
    of each stage in ``metrics.json`` in the run directory (:func:`record_metrics`).
    """

    def __init__(self) -> None:
        self._preds: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._criteria: dict[str, Tensor] = {}
        self.results: dict[str, dict[str, float]] = {}

    def _reset(self) -> None:
        self._preds, self._labels, self._criteria = [], [], {}

    def _collect(self, pl_module, batch: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self._preds.append(pl_module.predict_clusters(batch["x"]).cpu())
            for name, value in pl_module.selection_criteria(batch["x"]).items():
                self._criteria[name] = self._criteria.get(name, 0.0) + value.detach().double().cpu()
        if "y" in batch:
            self._labels.append(batch["y"].cpu())

    def _finish(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        if not self._preds:
            return
        preds = pl_module.all_gather(torch.cat(self._preds)).reshape(-1).cpu()
        scores: dict[str, float] = {}
        if self._labels:
            labels = pl_module.all_gather(torch.cat(self._labels)).reshape(-1).cpu()
            scores.update(clustering_scores(labels.numpy(), preds.numpy()))
        for name, value in self._criteria.items():
            scores[name] = float(pl_module.all_gather(value.to(pl_module.device)).sum())
        scores["n_clusters_used"] = int(preds.unique().numel())
        pl_module.log_dict({f"{stage}/{k}": float(v) for k, v in scores.items()}, sync_dist=False, rank_zero_only=True)
        self.results[stage] = {"epoch": trainer.current_epoch, **scores}
        record_metrics(trainer, stage, self.results[stage])
        self._reset()


# (B, K) outputs of ``predict_step`` written one column per cluster, and their column prefixes.
PER_CLUSTER_COLUMNS = {"probs": "p", "similarity": "sim"}


class AssignmentWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` from the outputs of ``predict_step``: index, label (if known),
    cluster, then one column per cluster for each ``(B, K)`` output it finds: ``probs`` as
    ``p_k`` and ``similarity`` (VAESim: the similarity to prototype k) as ``sim_k``.

    When the outputs carry ``similarity``, also writes ``prototype_neighbours.csv``: for each
    prototype, its ``n_nearest`` most similar images (rank 0 the most similar), with their
    index, label and similarity: real exemplars of each prototype.

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
        if not predictions or (trainer.world_size > 1 and not trainer.is_global_zero):
            return
        batches = predictions[0] if isinstance(predictions[0], list) else predictions
        out = {key: torch.cat([b[key].detach().cpu() for b in batches]) for key in batches[0]}
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self._write_predictions(folder / self.filename, out)
        print(f"assignments written to {folder / self.filename}")
        if "similarity" in out and self.n_nearest > 0:
            self._write_neighbours(folder / self.neighbours_filename, out)
            print(f"nearest images of each prototype written to {folder / self.neighbours_filename}")

    @staticmethod
    def _write_predictions(path: Path, out: dict[str, Tensor]) -> None:
        has_y = "y" in out
        per_cluster = [(key, prefix) for key, prefix in PER_CLUSTER_COLUMNS.items() if key in out]
        header = ["index", *(["label"] if has_y else []), "cluster"]
        for key, prefix in per_cluster:
            header += [f"{prefix}_{j}" for j in range(out[key].shape[1])]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(len(out["index"])):
                row = [int(out["index"][i]), *([int(out["y"][i])] if has_y else []), int(out["cluster"][i])]
                for key, _ in per_cluster:
                    row += [f"{v:.6g}" for v in out[key][i].tolist()]
                w.writerow(row)

    def _write_neighbours(self, path: Path, out: dict[str, Tensor]) -> None:
        sims = out["similarity"].float()  # (N, K)
        top = sims.topk(min(self.n_nearest, len(sims)), dim=0)  # (n, K) each
        has_y = "y" in out
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prototype", "rank", "index", *(["label"] if has_y else []), "similarity"])
            for j in range(sims.shape[1]):
                for rank in range(top.indices.shape[0]):
                    row = int(top.indices[rank, j])
                    label = [int(out["y"][row])] if has_y else []
                    w.writerow([j, rank, int(out["index"][row]), *label, f"{float(top.values[rank, j]):.6g}"])
