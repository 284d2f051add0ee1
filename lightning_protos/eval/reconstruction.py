"""Reconstruction MSE of a method, through the contract: mean (x - decode(embed(x)))^2."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from .callbacks import EvaluationCallback


@torch.no_grad()
def reconstruction_sse(pl_module, x: Tensor) -> tuple[Tensor, int] | None:
    """(sum of squared errors in float64, number of scalars) of decode(embed(x)) against x;
    ``None`` for a method without a decoder."""
    x_rec = pl_module.decode(pl_module.embed(x))
    if x_rec is None:
        return None
    return (x_rec.double() - x.double()).pow(2).sum(), x.numel()


class ReconstructionEvaluator(EvaluationCallback):
    """Logs the per-scalar reconstruction MSE of the validation and test sets (``val/mse``,
    ``test/mse``; ProtoVAE Fig. 6) and records them as ``val_mse`` / ``test_mse`` in
    ``metrics.json``. At test end it also scores the whole training split (``train_mse``).
    Methods whose ``decode`` is ``None`` are skipped.

    Args:
        batch_size: batch size for the pass over the training split.
    """

    def __init__(self, batch_size: int = 1024) -> None:
        super().__init__()
        self.batch_size = batch_size
        self._reset()

    def _reset(self) -> None:
        self._sse, self._n = 0.0, 0

    def _collect(self, pl_module, batch: dict[str, Tensor]) -> None:
        scored = reconstruction_sse(pl_module, batch["x"])
        if scored is None:
            return
        sse, n = scored
        self._sse, self._n = self._sse + sse, self._n + n

    def _train_mse(self, trainer: L.Trainer, pl_module) -> float | None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "features"):
            return None
        x = dm.features("fit")
        sse, n = 0.0, 0
        for i in range(0, len(x), self.batch_size):
            s, m = reconstruction_sse(pl_module, x[i : i + self.batch_size].to(pl_module.device))
            sse, n = sse + float(s), n + m
        return sse / n

    def _finish(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        if not self._n:
            return
        sse = pl_module.all_gather(torch.as_tensor(self._sse, device=pl_module.device)).sum()
        n = pl_module.all_gather(torch.as_tensor(self._n, device=pl_module.device)).sum()
        scores = {f"{stage}_mse": float(sse / n)}
        if stage == "test":
            train_mse = self._train_mse(trainer, pl_module)
            if train_mse is not None:
                scores["train_mse"] = train_mse
        pl_module.log_dict(
            {f"{stage}/{k.removeprefix(stage + '_')}": v for k, v in scores.items()},
            sync_dist=False,
            rank_zero_only=True,
        )
        self.record(stage, trainer, pl_module, scores)
        self._reset()
