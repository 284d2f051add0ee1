"""MedMNIST 2-D data sets through the ``medmnist`` package (PneumoniaMNIST, ...)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .base import ArrayDataModule, DataError, channels_first


class MedMNIST(ArrayDataModule):
    """A MedMNIST 2-D data set, 28x28, held as ``uint8`` tensors.

    Args:
        flag: the MedMNIST name, e.g. ``"pneumoniamnist"``.
        test_split: ``"val+test"`` (VAESim's 1,148 PneumoniaMNIST test images) or ``"test"``.
        **kwargs: see :class:`ArrayDataModule`.
    """

    def __init__(
        self,
        flag: str = "pneumoniamnist",
        test_split: Literal["test", "val+test"] = "val+test",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if test_split not in ("test", "val+test"):
            raise DataError(f"test_split must be 'test' or 'val+test', got {test_split!r}")
        self.flag, self.test_split = flag, test_split
        self.name = flag

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        import medmnist

        if self.flag not in medmnist.INFO:
            raise DataError(f"unknown MedMNIST data set {self.flag!r}")
        reader = getattr(medmnist, medmnist.INFO[self.flag]["python_class"])
        # A file already there is read as it is: medmnist's download=True would fetch it again
        # when its checksum differs from the official one (a rebuilt offline copy, say).
        download = self.download and not (self.root / f"{self.flag}.npz").is_file()
        try:
            ds = reader(split=split, root=str(self.root), download=download)
        except Exception as err:
            raise self.missing_files([f"{self.flag}.npz"], err, tried=download) from None
        imgs, labels = np.asarray(ds.imgs), np.asarray(ds.labels)
        if labels.shape[1:] not in ((), (1,)) or not (imgs.ndim == 3 or (imgs.ndim == 4 and imgs.shape[3] == 3)):
            raise DataError(
                f"{self.flag}: images {imgs.shape[1:]} with labels {labels.shape[1:]} per image; only the 2-D "
                "single-label MedMNIST sets load here (not the multi-label ChestMNIST or the 3-D sets)"
            )
        return channels_first(torch.as_tensor(imgs)), torch.as_tensor(labels.reshape(-1), dtype=torch.long)

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        self.root.mkdir(parents=True, exist_ok=True) if self.download else None
        import medmnist

        train, val, test = (self._read(s) for s in ("train", "val", "test"))
        labels = medmnist.INFO[self.flag]["label"]  # {"0": "normal", "1": "pneumonia"}
        self.class_names = [labels[str(k)] for k in range(len(labels))]
        if self.test_split == "val+test":
            test = (torch.cat([val[0], test[0]]), torch.cat([val[1], test[1]]))
            return {"train": train, "test": test}
        return {"train": train, "val": val, "test": test}


class PneumoniaMNIST(MedMNIST):
    """PneumoniaMNIST chest X-rays, 1x28x28, 0 = normal, 1 = pneumonia (5,856 images)."""

    def __init__(self, test_split: Literal["test", "val+test"] = "val+test", **kwargs) -> None:
        super().__init__(flag="pneumoniamnist", test_split=test_split, **kwargs)
