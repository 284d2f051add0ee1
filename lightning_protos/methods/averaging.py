"""The clustering module's averaging epoch (Boubekki et al., 2021, Sec. 4.1), for CM and AE-CM:
the parameters are set to their mean over the steps of the fit's last epoch."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..nets import ParameterAverage


class AveragingEpoch:
    """Mixin for a :class:`~.base.ClusteringMethod` with the ``average_last_epoch`` argument.

    The averaged parameters (:meth:`averaged_params`) accumulate after every step of the
    trainer's last epoch (``max_epochs - 1``) and are set to their mean after its last step,
    after the callbacks' batch hooks and before the epoch's validation, so the last validation,
    ``last.ckpt`` and the final test all see the averaged model. A fit that stops inside that
    epoch (``max_steps``, ``max_time``, a callback's ``should_stop``) averages the steps it
    took, at the step it stops. A fit that ends before it (``max_steps`` earlier, an early stop)
    keeps its last step's parameters and says so in a warning. The sums start empty at every
    epoch (a checkpoint taken inside the averaging epoch resumes with the sums of its steps).
    """

    average: ParameterAverage

    def init_average(self) -> None:
        """Call at the end of ``__init__``, once the averaged parameters exist."""
        self.average = ParameterAverage(self.averaged_params())
        self._averaged_in_fit = False

    def averaged_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def averaging(self) -> bool:
        return self.hparams.average_last_epoch and self.is_last_epoch()

    def accumulate_average(self) -> None:
        """Call after each optimizer step."""
        if self.averaging():
            self.average.accumulate(self.averaged_params())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._averaged_in_fit = False

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        resumed = self._resumed  # (read at the epoch's first batch)
        if not (resumed is not None and resumed.get("epoch") == self.current_epoch):
            self.average.reset()  # nothing of an earlier epoch, or of a checkpoint's other schedule

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        t = self.trainer
        # the fit's last step: the epoch's, max_steps', or a stop the callbacks' hooks just asked
        # for (Lightning then leaves the epoch; its min_epochs / min_steps can veto the stop)
        stops = t.should_stop and getattr(t.fit_loop, "_can_stop_early", True)
        if self.averaging() and (t.is_last_batch or 0 <= t.max_steps <= t.global_step or stops):
            self.average.apply(self.averaged_params())
            self._averaged_in_fit = True

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.hparams.average_last_epoch and not self._averaged_in_fit:
            epochs = self.trainer.max_epochs
            last = f"the last of max_epochs={epochs}" if epochs not in (None, -1) else "max_epochs is not set"
            rank_zero_warn(
                f"{type(self).__name__}: the fit ended at epoch {self.current_epoch}, step {self.global_step}, "
                f"before its averaging epoch ({last}): the parameters are the last step's, not averaged"
            )
