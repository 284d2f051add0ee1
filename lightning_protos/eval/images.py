"""Image galleries for TensorBoard: the decoded prototypes of a method (contract only)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torchvision.utils import make_grid


class PrototypeImages(L.Callback):
    """Logs ``decode(prototypes())`` as one image grid (``{stage}/prototypes``) to every logger
    that takes images (TensorBoard), at the end of validation and test. Methods whose
    ``prototypes`` or ``decode`` is ``None``, or whose inputs are not images, get no gallery.

    Args:
        stages: ``val`` and / or ``test``.
    """

    def __init__(self, stages: tuple[str, ...] = ("val", "test")) -> None:
        self.stages = tuple(stages)

    @torch.no_grad()
    def gallery(self, pl_module) -> torch.Tensor | None:
        """``(3, H', W')`` grid of the decoded prototypes, or ``None``."""
        prototypes = pl_module.prototypes()
        if prototypes is None:
            return None
        images = pl_module.decode(prototypes.to(pl_module.device))
        if images is None or images.ndim != 4:
            return None
        return make_grid(images.float().clamp(0, 1).cpu(), nrow=math.ceil(math.sqrt(len(images))), pad_value=1.0)

    def _log(self, stage: str, trainer: L.Trainer, pl_module) -> None:
        if stage not in self.stages or not trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]
        if not writers:
            return
        grid = self.gallery(pl_module)
        if grid is None:
            return
        for writer in writers:
            writer.add_image(f"{stage}/prototypes", grid, global_step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", trainer, pl_module)
