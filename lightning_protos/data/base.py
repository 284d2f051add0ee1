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
from pathlib import Path
from typing import Literal

import lightning as L
import torch
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


def missing_files_error(name: str, root: Path, files: list[str], cause: Exception | None) -> DataError:
    """One-line error naming the files a data set expects and where they were looked for."""
    why = f" (download failed: {type(cause).__name__}: {str(cause).splitlines()[0][:120]})" if cause else ""
    return DataError(
        f"{name}: expected {', '.join(files)} under {root}{why}; set --data.data_dir or "
        "PROTOS_DATA_DIR to the folder holding them, or allow the download"
    )


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
        batch = {"x": to_float(self.x[index]), "index": index}
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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if fit_on not in ("train", "all"):
            raise DataError(f"fit_on must be 'train' or 'all', got {fit_on!r}")
        self.root = resolve_root(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.fit_on, self.flatten = fit_on, flatten
        self.num_workers, self.download = num_workers, download
        self._splits: dict[str, tuple[Tensor, Tensor | None]] | None = None
        self._all: tuple[Tensor, Tensor | None] | None = None

    # -- subclasses -------------------------------------------------------------------
    def load(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Read the data set from ``self.root``: ``{"train": (x, y), "test": (x, y)}``."""
        raise NotImplementedError

    # -- in-memory splits -------------------------------------------------------------
    @property
    def splits(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        if self._splits is None:
            splits = self.load()
            if self.flatten:
                splits = {k: (x.reshape(len(x), -1), y) for k, (x, y) in splits.items()}
            self._splits = splits
        return self._splits

    def _split(self, stage: Literal["fit", "eval"]) -> tuple[Tensor, Tensor | None]:
        splits = self.splits
        if self.fit_on == "all" or "test" not in splits:
            if self._all is None:  # concatenated once: training and evaluation share the tensors
                parts = list(splits.values())
                x = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
                has_y = all(p[1] is not None for p in parts)
                y = (torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]) if has_y else None
                self._all = (x, y)
            return self._all
        return splits["train"] if stage == "fit" else splits["test"]

    def prepare_data(self) -> None:
        """Read (and download) once on rank zero so that missing data fails before training."""
        self.splits  # noqa: B018

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample as served, e.g. ``(1, 28, 28)`` or ``(784,)``."""
        return tuple(self._split("fit")[0].shape[1:])

    @property
    def input_dim(self) -> int:
        return int(torch.tensor(self.input_shape).prod())

    @property
    def n_classes(self) -> int | None:
        y = self._split("eval")[1]
        return None if y is None else int(y.max()) + 1

    @property
    def n_train(self) -> int:
        return len(self._split("fit")[0])

    def features(self, stage: Literal["fit", "eval"] = "fit") -> Tensor:
        """The whole split as float features in the served shape (for initialisations)."""
        return to_float(self._split(stage)[0])

    def labels(self, stage: Literal["fit", "eval"] = "eval") -> Tensor | None:
        return self._split(stage)[1]

    def n_of(self, stage: Literal["fit", "eval"]) -> int:
        return len(self._split(stage)[0])

    # -- loaders ----------------------------------------------------------------------
    def _loader(self, stage: Literal["fit", "eval"], shuffle: bool, batch_size: int, labels: bool):
        x, y = self._split(stage)
        dataset = TensorBatches(x, y, with_labels=labels)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # seeded by seed_everything (the CLI's seed_everything), one permutation per epoch
            sampler=EpochShuffle(dataset, torch.initial_seed() % 2**31) if shuffle else None,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", True, self.batch_size, labels=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("eval", False, self.eval_batch_size, labels=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("eval", False, self.eval_batch_size, labels=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("eval", False, self.eval_batch_size, labels=True)
