"""In-memory LightningDataModules and the registry of named data sets."""

from __future__ import annotations

from .base import ArrayDataModule, DataError, resolve_root
from .medmnist import MedMNIST, PneumoniaMNIST
from .synthetic import Blobs, Digits, FiveGaussians
from .tabular import ArrayFile, ImageFolder, Pendigits
from .vision import CIFAR10, CIFAR100, MNIST, USPS, FashionMNIST

DATASETS: dict[str, type[ArrayDataModule]] = {
    "mnist": MNIST,
    "fashionmnist": FashionMNIST,
    "usps": USPS,
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "pneumoniamnist": PneumoniaMNIST,
    "pendigits": Pendigits,
    "digits": Digits,
    "5gaussians": FiveGaussians,
    "blobs": Blobs,
}


def get_datamodule(name: str, **kwargs) -> ArrayDataModule:
    """The DataModule registered as ``name`` (see ``DATASETS``)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)


__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "MNIST",
    "USPS",
    "ArrayDataModule",
    "ArrayFile",
    "Blobs",
    "DataError",
    "Digits",
    "FashionMNIST",
    "FiveGaussians",
    "ImageFolder",
    "MedMNIST",
    "Pendigits",
    "PneumoniaMNIST",
    "get_datamodule",
    "resolve_root",
]
