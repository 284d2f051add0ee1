"""Exact resume: what a checkpoint holds beside the weights, and its checks on load, so that a
run resumed from it, even mid-epoch and on other ranks, continues as the uninterrupted run.
:class:`~.base.ClusteringMethod` mixes it in; tests/test_resume.py kills and resumes every method."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..errors import ProtosError
from .distributed import average_batchnorm_stats, gather_objects, rank_seed, rng_state, set_rng_state


def epochs_trained(checkpoint: dict[str, Any]) -> int | None:
    """The training epochs behind a checkpoint's weights, counted as ``trainer.current_epoch``
    counts them after a fit. Its ``epoch`` is the index of the epoch it was written in: one more
    where that epoch's last batch had been trained (``best.ckpt`` from the validation at an
    epoch's end), or where the epoch had ended (``last.ckpt``, written at each epoch's end, also
    of an epoch that ``max_steps`` cut short, which Lightning counts)."""
    epoch = checkpoint.get("epoch")
    if epoch is None:
        return None
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    last_batch = bool(loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"))
    ended = int(loop.get("epoch_progress", {}).get("current", {}).get("processed", 0))
    return max(int(epoch) + last_batch, ended)


class ExactResume:
    """The checkpoint hooks of :class:`~.base.ClusteringMethod` (a LightningModule): the random
    generators of every rank, the run's seed, the epoch's loss sums (``_epoch_sums``) and the
    fit's length go into each checkpoint; a checkpoint of another method or configuration is
    refused before Lightning loads it."""

    # What of the method is laid out over the whole fit's length, e.g. "the averaging epoch (the
    # fit's last)", and the trainer settings that length is read from: a fit resumed with another
    # value of one of them warns that it will not end as one uninterrupted fit of that length would.
    fit_length_schedule: str | None = None
    fit_length_settings: tuple[str, ...] = ("max_epochs",)
    # Buffers with a row per training sample, sized by the data (``AutoencoderMethod``'s
    # ``register_per_sample_buffer``): a checkpoint gives them its own shape.
    _per_sample: tuple[str, ...] | list[str] = ()
    # The training epochs behind the checkpoint the weights were last loaded from (``None`` until
    # one is): what the evaluators record for a ``test`` / ``predict`` of a checkpoint, where
    # Lightning leaves ``current_epoch`` at 0.
    checkpoint_epochs: int | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Beside the parameters and buffers: every rank's random generators (VAESim's draws, the
        noise of the VAEs and the MMD), the run's seed (:attr:`run_seed`: a resumed run seeds its
        later k-means with it, whatever its own seed) and the loss sums and gradient-norm
        statistics of the epoch so far, so that a run resumed from a checkpoint, even one taken
        mid-epoch, continues as the uninterrupted run. A loss that was not finite since the last
        check stops the run here, before the checkpoint is written."""
        self.check_finite()
        # a mid-epoch checkpoint holds the ranks' mean statistics too (its state dict is taken
        # before this hook, so the averaged values are written into it)
        checkpoint["state_dict"].update({k: v.detach().clone() for k, v in average_batchnorm_stats(self).items()})
        checkpoint["protos_resume"] = {
            "method": type(self).__qualname__,  # DEC and IDEC share their weights' names
            "rng_ranks": gather_objects(rng_state()),  # every rank's generators, by rank
            "run_seed": self.run_seed,
            "epoch": self.current_epoch,
            "max_epochs": self.trainer.max_epochs,
            "max_steps": self.trainer.max_steps,
            **self._epoch_sums(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses, in one line, a checkpoint whose weights are not this model's (another method,
        or another configuration), before Lightning loads them."""
        self.checkpoint_epochs = epochs_trained(checkpoint)
        trainer = self._trainer  # on a fit (a test may take other data), per-sample buffers sized
        dm = trainer.datamodule if trainer is not None and trainer.state.fn == "fit" else None
        self.check_checkpoint(checkpoint, getattr(dm, "n_train", None))
        self._resumed = checkpoint.get("protos_resume")
        planned = {k: v for k, v in (self._resumed or {}).items() if k in self.fit_length_settings}
        changed = [k for k, v in planned.items() if dm is not None and v != getattr(trainer, k)]
        if self.fit_length_schedule and changed:
            rank_zero_warn(
                f"this fit continues one of {', '.join(f'{k} {planned[k]}' for k in changed)} with "
                f"{', '.join(f'{k} {getattr(trainer, k)}' for k in changed)}: {self.fit_length_schedule} "
                "follows the new length, so it will not end as one uninterrupted fit of that length"
            )
        if self._resumed is not None and "run_seed" in self._resumed:  # the seeds of fits still to come
            self._run_seed = self._resumed["run_seed"]

    def check_checkpoint(self, checkpoint: dict[str, Any], n_train: int | None = None) -> None:
        """Raises a one-line :class:`ProtosError` where ``checkpoint`` does not fit this model:
        another method, other input shapes, other weights, or (given the training set's size
        ``n_train``) per-sample buffers of other data. The CLI also calls it before a command opens
        its run directory."""
        stored, own = checkpoint.get("state_dict", {}), self.state_dict()
        per_sample = set(self._per_sample)
        missing = [k for k in own if k not in stored]
        unexpected = [k for k in stored if k not in own]
        reshaped = [k for k in own if k in stored and k not in per_sample and stored[k].shape != own[k].shape]
        saved_by = (checkpoint.get("protos_resume") or {}).get("method", type(self).__qualname__)
        if saved_by != type(self).__qualname__:
            raise ProtosError(f"the checkpoint holds a {saved_by}, not a {type(self).__name__}")
        # (0 rows: a checkpoint of the pretraining epochs)
        other = [k for k in per_sample if k in stored and n_train is not None and len(stored[k]) not in (0, n_train)]
        if other:
            raise ProtosError(
                f"the checkpoint's per-sample buffers ({', '.join(other)}) hold {len(stored[other[0]])} training "
                f"samples, the data {n_train}: resume it on the data it was trained on"
            )
        trained_on = (checkpoint.get("hyper_parameters") or {}).get("input_shape")
        if reshaped and trained_on is not None and tuple(trained_on) != tuple(self.input_shape):
            raise ProtosError(
                f"the checkpoint was trained on inputs of shape {tuple(trained_on)}, these data give "
                f"{tuple(self.input_shape)}"
            )
        if missing or unexpected or reshaped:
            what = ", ".join(
                f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
                if keys
            )
            raise ProtosError(
                f"the checkpoint does not fit this {type(self).__name__} (weights {what}): it holds another "
                "method or another configuration"
            )

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> int | None:
        """The first batch after a resume restores each rank's generators (here, not at load
        time: Lightning's sanity check and loader set-up run in between) and, within the same
        epoch, the loss sums and gradient-norm statistics of the steps before the checkpoint.
        The first batch of a DDP fit gives each rank > 0 its own random stream (see :meth:`setup`);
        so does a resume onto more ranks than the checkpoint's."""
        resumed, self._resumed = self._resumed, None
        own_stream, self._own_stream = self._own_stream, False
        if resumed is not None:
            rank = self.global_rank
            # checkpoints written before 2026-12-07 hold one state, rank 0's: still loadable
            states = resumed["rng_ranks"] if "rng_ranks" in resumed else [resumed["rng"]]
            own_stream = rank >= len(states)
            if not own_stream and not set_rng_state(states[rank]) and rank > 0:
                torch.cuda.manual_seed_all(self._rank_seed())  # at least not rank 0's CUDA stream
        if own_stream:
            torch.manual_seed(self._rank_seed())  # CPU and CUDA
        if resumed is not None and resumed["epoch"] == self.current_epoch:
            self._restore_epoch_sums(resumed)
        return None

    def _rank_seed(self) -> int:
        return rank_seed(self.run_seed, self.global_rank, self.global_step)
