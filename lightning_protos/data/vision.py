"""Image data sets read by torchvision's readers (MNIST, Fashion-MNIST, CIFAR-10/100) and USPS."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import Tensor

from .base import ArrayDataModule, channels_first, from_numpy


class _TorchvisionImages(ArrayDataModule):
    """A torchvision data set with ``train``/``test`` splits, held as ``uint8`` tensors."""

    reader: type = torchvision.datasets.MNIST
    files: tuple[str, ...] = ()

    def _read(self, train: bool):
        try:
            return self.reader(root=str(self.root), train=train, download=self.download)
        except Exception as err:  # torchvision raises RuntimeError, URLError, ...
            raise self.missing_files(list(self.files), err) from None

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for split, train in (("train", True), ("test", False)):
            ds = self._read(train)
            x = channels_first(torch.as_tensor(np.asarray(ds.data)))
            out[split] = (x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long))
        return out


class MNIST(_TorchvisionImages):
    """MNIST digits, 1x28x28 (60,000 train + 10,000 test)."""

    name = "mnist"
    reader = torchvision.datasets.MNIST
    files = tuple(
        f"MNIST/raw/{f}"
        for f in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )


class FashionMNIST(_TorchvisionImages):
    """Fashion-MNIST, 1x28x28 (60,000 train + 10,000 test)."""

    name = "fashionmnist"
    reader = torchvision.datasets.FashionMNIST
    files = tuple(f.replace("MNIST/", "FashionMNIST/") for f in MNIST.files)


class CIFAR10(_TorchvisionImages):
    """CIFAR-10, 3x32x32 (50,000 train + 10,000 test)."""

    name = "cifar10"
    reader = torchvision.datasets.CIFAR10
    files = ("cifar-10-batches-py/data_batch_{1..5}", "cifar-10-batches-py/test_batch")


class CIFAR100(_TorchvisionImages):
    """CIFAR-100, 3x32x32 (50,000 train + 10,000 test), labelled by its 100 fine classes."""

    name = "cifar100"
    reader = torchvision.datasets.CIFAR100
    files = ("cifar-100-python/train", "cifar-100-python/test")


class USPS(ArrayDataModule):
    """USPS digits, 1x16x16 floats in [0, 1] (7,291 train + 2,007 test).

    Reads ``usps/usps.npz`` (arrays ``X_train, y_train, X_test, y_test``) when present,
    else torchvision's USPS reader (LIBSVM files, downloaded where allowed).
    """

    name = "usps"

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        npz = self.root / "usps" / "usps.npz"
        if npz.exists():
            d = np.load(npz)
            return {
                s: (
                    from_numpy(d[f"X_{s}"]).reshape(-1, 1, 16, 16),
                    torch.as_tensor(d[f"y_{s}"], dtype=torch.long),
                )
                for s in ("train", "test")
            }
        out = {}
        for split, train in (("train", True), ("test", False)):
            try:
                ds = torchvision.datasets.USPS(root=str(self.root / "usps"), train=train, download=self.download)
            except Exception as err:
                raise self.missing_files(["usps/usps.npz", "usps/usps.bz2", "usps/usps.t.bz2"], err) from None
            out[split] = (
                channels_first(torch.as_tensor(ds.data)),
                torch.as_tensor(np.asarray(ds.targets), dtype=torch.long),
            )
        return out
