"""In-memory data layer: every data set is read once into tensors and sliced per batch.

A data set is a pair of tensors ``(x, y)`` per split. Images stay ``uint8`` until a
batch is formed; the batch is then scaled to ``[0, 1]`` floats. A batch is fetched
whole by index through ``__getitems__``, so there is no per-sample Python work and
Lightning's ``DistributedSampler`` still applies.

Training batches carry no labels (``{"x", "index"}``): a method cannot read them in
``training_step``. Evaluation batches carry ``{"x", "y", "index"}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..errors import ProtosError

DEFAULT_ROOT = Path("~/.cache/lightning_protos").expanduser()


class DataError(ProtosError):
    """Bad data configuration or missing files; the message is one line."""


def resolve_root(data_dir: str | os.PathLike | None) -> Path:
    """Root of the data files: ``data_dir``, else ``$PROTOS_DATA_DIR``, else the user cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("PROTOS_DATA_DIR"):
        return Path(os.environ["PROTOS_DATA_DIR"]).expanduser()
    return DEFAULT_ROOT


def check_samples(source: str, splits: dict[str, tuple[Tensor, Tensor | None]]) -> None:
    """One-line errors for data no method can train on: a split without samples, or features
    holding NaN or Inf (float data only: uint8 images cannot)."""
    for split, (x, _) in splits.items():
        if len(x) == 0 or x[0].numel() == 0:
            what = "samples" if len(x) == 0 else "features"
            raise DataError(f"{source}: no {what} in its {split} split (shape {tuple(x.shape)})")
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(
                f"{source}: {bad} feature values of its {split} split are NaN or Inf; remove or impute them"
            )


def from_numpy(a: np.ndarray) -> Tensor:
    """A stored array as held in memory: ``uint8`` images stay ``uint8``, the rest float32."""
    return torch.as_tensor(a) if a.dtype == np.uint8 else torch.as_tensor(a, dtype=torch.float32)


def channels_first(x: Tensor) -> Tensor:
    """Images as ``(N, C, H, W)``: ``(N, H, W)`` gains one channel, and channels-last
    ``(N, H, W, C)`` (as NumPy and PIL hold images) moves C first: C = 1 or 3 where H is not,
    and C = 2 or 4 (grey + alpha, RGBA: kept as channels) where H > 4. Any other shape is
    returned as it is (``(N, C, H, W)`` already, or features)."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    last = x.ndim == 4 and (
        (x.shape[3] in (1, 3) and x.shape[1] not in (1, 3)) or (x.shape[3] in (2, 4) and x.shape[1] > 4)
    )
    if last:
        return x.permute(0, 3, 1, 2).contiguous()
    return x


def class_indices(y: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """Labels as class indices 0..C-1 and the names of those classes: labels already 0..C-1
    (each present) stay as they are, with no names; others (1..10, or 0, 2, 5) are mapped in
    sorted order and named by their original values."""
    values, index = np.unique(y, return_inverse=True)
    if np.array_equal(values, np.arange(len(values))):
        return y, None
    return index.reshape(y.shape), [str(v.item()) for v in values]


def to_float(x: Tensor) -> Tensor:
    """``uint8`` images to ``[0, 1]`` floats; other features to float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def collate_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch is already formed by ``__getitems__``; pass it through."""
    return batch


class TensorBatches(Dataset):
    """A data set held as tensors whose batches are gathered in one indexing op.

    Args:
        x: ``(N, ...)`` features; ``uint8`` images are scaled to ``[0, 1]`` per batch.
        y: ``(N,)`` integer labels, or ``None``.
        with_labels: whether batches carry ``"y"`` (evaluation) or not (training).
    """

    def __init__(self, x: Tensor, y: Tensor | None, with_labels: bool) -> None:
        self.x, self.y, self.with_labels = x, y, with_labels and y is not None

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        # data held on a GPU: a non-blocking copy of the indices, so that PyTorch does not
        # synchronise the stream after it (i.e. wait for the queued steps) on every batch
        batch = {"x": to_float(self.x[index.to(self.x.device, non_blocking=True)]), "index": index}
        if self.with_labels:
            batch["y"] = self.y[index]
        return batch

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


class EpochShuffle(RandomSampler):
    """A random permutation per epoch drawn from ``(seed, epoch)``: Lightning calls
    ``set_epoch`` before each epoch, so a run resumed from a checkpoint sees exactly the
    batches an uninterrupted run would (torch's ``RandomSampler`` draws from the global RNG,
    whose state a checkpoint does not hold). Under DDP Lightning replaces it, as any
    ``RandomSampler``, by a shuffling ``DistributedSampler`` built on the same idea."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that resumes in the middle of an epoch.

    Lightning stores the ``state_dict`` of a loader that has one in every checkpoint and hands
    it back through ``load_state_dict`` on resume. The state is the sampler's epoch and the
    batches served in it so far; the next pass over that same epoch skips them, so that a run
    resumed from a mid-epoch checkpoint trains on the batches an uninterrupted run trains on
    (:class:`EpochShuffle` gives the same permutation for the same epoch). Batches are counted
    where they are served, so worker prefetching does not shift the count, and skipped by
    drawing them (in-memory batches cost little), which works with :class:`EpochShuffle` and
    with the ``DistributedSampler`` Lightning puts in its place under DDP (both carry
    ``epoch``). A checkpoint taken at an epoch's end resumes at the next epoch's first batch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch, self._served = 0, 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served, "seed": int(getattr(self.sampler, "seed", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after ``state["batches"]`` of epoch ``state["epoch"]``, shuffling with the
        checkpointed run's seed (a resumed job may be started with another)."""
        self._resume = (int(state["epoch"]), int(state["batches"]))
        if "seed" in state and hasattr(self.sampler, "seed"):
            self.sampler.seed = int(state["seed"])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # a generator: this runs at the first batch, after Lightning's set_epoch
        self._epoch = int(getattr(self.sampler, "epoch", 0))
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self._epoch else 0
        self._resume, self._served = None, 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch


class ArrayDataModule(L.LightningDataModule):
    """Base DataModule over in-memory tensors.

    Subclasses implement :meth:`load` returning ``{"train": (x, y), "test": (x, y)}``
    (``y`` may be ``None``; ``"test"`` may be absent).

    Args:
        data_dir: root of the data files (else ``$PROTOS_DATA_DIR``, else the user cache).
        batch_size: training batch size.
        eval_batch_size: batch size of evaluation and prediction passes.
        fit_on: ``"all"`` trains and evaluates on train + test together (the clustering
            papers' protocol); ``"train"`` trains on train and evaluates on test.
        flatten: serve ``(B, D)`` vectors instead of ``(B, C, H, W)`` images.
        num_workers: DataLoader workers (0 is fastest for in-memory batches).
        download: fetch missing files where the source allows it.
        device_fraction: on a GPU, the whole data set moves there once (and batches are sliced
            there) when it takes at most this share of the GPU's free memory and
            ``num_workers`` is 0; 0 keeps the data on the host.
    """

    name: str = "array"

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 2048,
        fit_on: Literal["train", "all"] = "all",
        flatten: bool = False,
        num_workers: int = 0,
        download: bool = True,
        device_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0 <= device_fraction <= 1:
            raise DataError(f"device_fraction must be in [0, 1], got {device_fraction}")
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError(f"batch_size and eval_batch_size must be >= 1, got {batch_size} and {eval_batch_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if fit_on not in ("train", "all"):
            raise DataError(f"fit_on must be 'train' or 'all', got {fit_on!r}")
        self.root = resolve_root(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.fit_on, self.flatten = fit_on, flatten
        self.num_workers, self.download = num_workers, download
        self.device_fraction = device_fraction
        self._splits: dict[str, tuple[Tensor, Tensor | None]] | None = None
        self._all: tuple[Tensor, Tensor | None] | None = None
        self._sample_shape: tuple[int, ...] = ()
        self.class_names: list[str] | None = None  # label k's name, where the data name them
        self._shuffle_seed: int | None = None  # the training order's seed, kept in checkpoints

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """The seed of the training order: Lightning restores it before the loaders are built,
        so that a run resumed at an epoch's end (where Lightning hands the loader no state)
        shuffles its next epochs as the uninterrupted run, whatever seed the new process has."""
        return {} if self._shuffle_seed is None else {"shuffle_seed": self._shuffle_seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "shuffle_seed" in state:
            self._shuffle_seed = int(state["shuffle_seed"])

    def missing_files(self, files: list[str], cause: Exception | None = None, tried: bool | None = None) -> DataError:
        """One-line error naming the files this data set expects and where they were looked for,
        with ``cause``: why the files found could not be read, or why the download failed
        (``tried``: whether one was, by default ``self.download``)."""
        why, tried = "", self.download if tried is None else tried
        if cause is not None:
            reason = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:120]}"
            if any((self.root / f).exists() for f in files):
                why = f" (found, but cannot read them: {reason})"
            elif tried:
                why = f" (download failed: {reason})"
        return DataError(
            f"{self.name}: expected {', '.join(files)} under {self.root}{why}; set --data.data_dir or "
            f"PROTOS_DATA_DIR to the folder holding them{'' if tried else ', or allow the download'}"
        )

    # -- subclasses -------------------------------------------------------------------
    def load(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Read the data set from ``self.root``: ``{"train": (x, y), "test": (x, y)}``."""
        raise NotImplementedError

    # -- in-memory splits -------------------------------------------------------------
    @property
    def splits(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        if self._splits is None:
            where = getattr(self, "path", self.root)  # ArrayFile / ImageFolder name their file or folder
            try:
                splits = self.load()
            except DataError:
                raise
            except Exception as err:  # a corrupt or truncated file: one line, no traceback
                cause = (str(err).splitlines() or [""])[0][:200]
                raise DataError(f"{self.name}: cannot read {where}: {type(err).__name__}: {cause}") from None
            check_samples(f"{self.name} ({where})", splits)
            self._sample_shape = tuple(next(iter(splits.values()))[0].shape[1:])
            if self.flatten:
                splits = {k: (x.reshape(len(x), -1), y) for k, (x, y) in splits.items()}
            self._splits = splits
        return self._splits

    def _split(self, stage: Literal["fit", "eval"]) -> tuple[Tensor, Tensor | None]:
        splits = self.splits
        if not self.held_out:
            if self._all is None:  # concatenated once: training and evaluation share the tensors
                parts = list(splits.values())
                x = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
                has_y = all(p[1] is not None for p in parts)
                y = (torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]) if has_y else None
                self._all = (x, y)
                self._view_splits()
            return self._all
        return splits["train"] if stage == "fit" else splits["test"]

    def _view_splits(self) -> None:
        """Each split as a view of the concatenation ``_all``, so that the data are held once."""
        start, views = 0, {}
        for name, (x, y) in self.splits.items():
            end = start + len(x)
            views[name] = (self._all[0][start:end], y if self._all[1] is None else self._all[1][start:end])
            start = end
        self._splits = views

    def prepare_data(self) -> None:
        """Read (and download) once on rank zero so that missing data fails before training."""
        self.splits  # noqa: B018

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018
        if stage == "fit":  # each fit draws its order's seed anew (a resumed fit then restores it)
            self._shuffle_seed = None
        device = self.resident_device()
        if device is not None:
            self.move_to(device)

    def resident_device(self) -> torch.device | None:
        """The accelerator to hold the whole data set on, or ``None`` to keep it on the host: the
        trainer's root device when it is a GPU, ``num_workers`` is 0 (workers cannot share GPU
        tensors) and the features take at most ``device_fraction`` of its free memory."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or self.num_workers or not self.device_fraction:
            return None
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return device if self._feature_tensors_nbytes() <= self.device_fraction * free else None

    def _feature_tensors(self) -> list[Tensor]:
        """The tensors holding the features, each once: the concatenation of ``fit_on: all``
        (whose splits are views of it), else each split."""
        self._split("fit")  # the concatenation of fit_on: all is built first
        return [self._all[0]] if self._all is not None else [x for x, _ in self.splits.values()]

    def _feature_tensors_nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self._feature_tensors() if x.device.type == "cpu")

    def move_to(self, device: torch.device) -> None:
        """Moves the features of every split to ``device`` once (labels stay on the host, where
        evaluation reads them); batches are then sliced there."""
        self._split("fit")
        if self._all is not None:
            self._all = (self._all[0].to(device), self._all[1])
            self._view_splits()
        else:
            self._splits = {k: (x.to(device), y) for k, (x, y) in self.splits.items()}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample as served, e.g. ``(1, 28, 28)`` or ``(784,)``."""
        return tuple(self._split("fit")[0].shape[1:])

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of one sample as read, before ``flatten``, for image data (one or three
        channels); else ``None``."""
        self.splits  # noqa: B018
        shape = self._sample_shape
        return shape if len(shape) == 3 and shape[0] in (1, 3) else None

    @property
    def source(self) -> str:
        """Which data these are, as a checkpoint records them: the class and its file, folder
        (absolute) or name, e.g. ``ArrayFile(/data/xrays.npz)`` or ``PneumoniaMNIST(pneumoniamnist)``."""
        path = getattr(self, "path", None)
        return f"{type(self).__name__}({Path(path).resolve() if path else self.name})"

    @property
    def n_classes(self) -> int | None:
        """The number of classes: the largest label + 1 (labels are class indices; a user's
        that are not 0..C-1 are numbered so when read, :func:`class_indices`)."""
        y = self._split("eval")[1]
        return None if y is None else int(y.max()) + 1

    @property
    def held_out(self) -> bool:
        """Whether the evaluation split is distinct from the training one (``fit_on: train`` on a
        data set with a test split)."""
        return self.fit_on == "train" and "test" in self.splits

    @property
    def n_train(self) -> int:
        return len(self._split("fit")[0])

    def features(self, stage: Literal["fit", "eval"] = "fit") -> Tensor:
        """The whole split as float features in the served shape (for initialisations)."""
        return to_float(self._split(stage)[0])

    def labels(self, stage: Literal["fit", "eval"] = "eval") -> Tensor | None:
        return self._split(stage)[1]

    def value_range(self) -> tuple[float, float]:
        """(min, max) of the training features as served (``uint8`` images: within [0, 1])."""
        x = self._split("fit")[0]
        if x.dtype == torch.uint8:
            return 0.0, 1.0
        low, high = torch.aminmax(x)
        return float(low), float(high)

    def sample_names(self, stage: Literal["fit", "eval"] = "eval") -> list[str] | None:
        """A name per sample of the split (a user's image files), or ``None`` where samples are
        known by index alone."""
        return None

    def n_of(self, stage: Literal["fit", "eval"]) -> int:
        return len(self._split(stage)[0])

    # -- loaders ----------------------------------------------------------------------
    def _loader(self, stage: Literal["fit", "eval"], shuffle: bool, batch_size: int, labels: bool):
        x, y = self._split(stage)
        dataset = TensorBatches(x, y, with_labels=labels)
        seed = torch.initial_seed() % 2**31  # set by seed_everything (the CLI's seed_everything)
        if shuffle:  # one permutation per epoch; Lightning swaps in its DistributedSampler under DDP
            if self._shuffle_seed is None:
                self._shuffle_seed = seed
            seed = self._shuffle_seed
            sampler = EpochShuffle(dataset, seed)
        elif self.trainer is not None and self.trainer.world_size > 1:
            # evaluation under DDP: each rank takes every world_size-th sample, none twice (the
            # evaluators gather the shards, so every metric covers the whole set exactly once);
            # a rank without a sample would skip the loop and leave the others waiting for it
            if len(dataset) < self.trainer.world_size:
                raise ProtosError(
                    f"the {stage} split has {len(dataset)} samples, fewer than the {self.trainer.world_size} "
                    "processes: every process evaluates at least one (run on fewer devices)"
                )
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        else:
            sampler = None
        return ResumableLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # the loader's own generator: creating an iterator leaves the global RNG (whose state
            # a checkpoint holds) untouched
            generator=torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", True, self.batch_size, labels=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("eval", False, self.eval_batch_size, labels=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("eval", False, self.eval_batch_size, labels=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("eval", False, self.eval_batch_size, labels=True)
