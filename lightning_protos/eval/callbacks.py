"""Evaluation callbacks: they read a method only through its contract (DESIGN.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .metrics import clustering_scores


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: the logger's version folder, else the trainer's root."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class ClusteringEvaluator(L.Callback):
    """Scores the assignments of ``cluster_probs`` at validation and test end.

    Logs ``{stage}/acc``, ``nmi``, ``ari``, ``homogeneity`` and each of the method's
    ``selection_criteria`` (e.g. ``l_sp``) to every logger, and writes the latest figures
    of each stage to ``metrics.json`` in the run directory.
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
        if trainer.is_global_zero:
            path = run_dir(trainer) / "metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results, indent=2))
        self._reset()

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


class AssignmentWriter(BasePredictionWriter):
    """Writes ``predictions.csv``: index, label (if known), cluster and each cluster probability."""

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions or (trainer.world_size > 1 and not trainer.is_global_zero):
            return
        batches = predictions[0] if isinstance(predictions[0], list) else predictions
        path = run_dir(trainer) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        k = batches[0]["probs"].shape[1]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            has_y = "y" in batches[0]
            w.writerow(["index", *(["label"] if has_y else []), "cluster", *(f"p_{j}" for j in range(k))])
            for b in batches:
                for i in range(len(b["index"])):
                    label = [int(b["y"][i])] if has_y else []
                    probs = [f"{p:.6g}" for p in b["probs"][i].tolist()]
                    w.writerow([int(b["index"][i]), *label, int(b["cluster"][i]), *probs])
        print(f"assignments written to {path}")
