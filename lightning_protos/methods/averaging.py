"""The clustering module's averaging epoch (Boubekki et al., 2021, Sec. 4.1), for CM and AE-CM:
the parameters are set to their mean over the steps of the fit's last epoch."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..nets import ParameterAverage


class AveragingEpoch:
    """Mixin for a :class:`~.base.ClusteringMethod` with the ``average_last_epoch`` argument.

    The averaged parameters (:meth:`averaged_params`) accumulate after every step of the
    trainer's last epoch (``max_epochs - 1``) and are set to their mean after its last step,
    after the callbacks' batch hooks and before the epoch's validation, so the last validation,
    ``last.ckpt`` and the final test all see the averaged model. A fit that stops inside that
    epoch averages the steps it took: at the step it stops (``max_steps``, ``max_time``, a
    callback's ``should_stop``), or at the epoch's end (a stop asked for by a validation inside
    the epoch), before the epoch's checkpoints. A fit that ends before it (``max_steps``
    earlier, an early stop) keeps its last step's parameters and says so in a warning. The sums
    are tagged with their epoch: steps of an earlier epoch (a checkpoint of another schedule)
    never enter the average.
    """

    average: ParameterAverage
    fit_length_schedule = "its averaging epoch (the fit's last)"

    def init_average(self) -> None:
        """Call at the end of ``__init__``, once the averaged parameters exist."""
        self.average = ParameterAverage(self.averaged_params())
        self._averaged_in_fit = False
        self._summing = None  # the epoch whose steps the sums were last started for

    def averaged_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def averaging(self) -> bool:
        return self.hparams.average_last_epoch and self.is_last_epoch()

    def accumulate_average(self) -> None:
        """Call after each optimizer step."""
        if self.averaging():
            if self._summing != self.current_epoch:
                self.average.start(self.current_epoch)
                self._summing = self.current_epoch
            self.average.accumulate(self.averaged_params())

    def _apply_average(self) -> None:
        # nothing summed (AE-CM^p's last epoch still in its CM-alone phase): nothing averaged
        self._averaged_in_fit = self._averaged_in_fit or int(self.average.count) > 0
        self.average.apply(self.averaged_params())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._averaged_in_fit, self._summing = False, None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints from before the sums were tagged: steps summed there are their epoch's
        state = checkpoint.get("state_dict", {})
        if "average.count" in state and "average.epoch" not in state:
            summed = int(state["average.count"]) > 0
            state["average.epoch"] = torch.tensor(checkpoint.get("epoch", -1) if summed else -1)
        super().on_load_checkpoint(checkpoint)
        self._summing = None  # the loaded sums' epoch is read again at the next step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.averaging() and self.ends_epoch():
            self._apply_average()

    def on_train_epoch_end(self) -> None:
        # a stop asked for by a validation inside the averaging epoch (val_check_interval < 1):
        # before the epoch's checkpoints, which the monitoring callbacks write after this hook
        if self.averaging() and self.average.holds(self.current_epoch):
            self._apply_average()
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        super().on_train_end()
        epochs = self.trainer.max_epochs
        if self.hparams.average_last_epoch and epochs not in (None, -1) and self.average.holds(epochs - 1):
            # resumed from a checkpoint of the averaging epoch's last step, taken before the
            # average was applied: Lightning runs no epoch or batch hook then
            self._apply_average()
            rank_zero_warn(
                f"{type(self).__name__}: the averaging epoch's mean is applied at the end of training; "
                "the checkpoints of this fit hold the last step's parameters"
            )
        if self.hparams.average_last_epoch and not self._averaged_in_fit:
            last = f"the last of max_epochs={epochs}" if epochs not in (None, -1) else "max_epochs is not set"
            if epochs not in (None, -1) and self.current_epoch >= epochs:  # it ran them all
                rank_zero_warn(
                    f"{type(self).__name__}: the fit's last epoch ({last}) had no step to average, being still "
                    "in a pretraining or CM-alone phase: the parameters are the last step's"
                )
                return
            rank_zero_warn(
                f"{type(self).__name__}: the fit ended at epoch {self.current_epoch}, step {self.global_step}, "
                f"before its averaging epoch ({last}): the parameters are the last step's, not averaged"
            )
