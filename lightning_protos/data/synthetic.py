"""Embedded and synthetic data sets: no download, no files."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import ArrayDataModule

# Five isotropic unit-variance Gaussians with means on a circle (AE-CM paper Fig. 1 / Table 3).
# The paper does not publish its generator; our radius makes neighbouring clusters overlap so
# that the Bayes-optimal assignment under the true parameters scores ARI 0.857 (seed 0; a
# full-covariance GaussianMixture fitted on the same points scores 0.856):
# radius 5 would separate them by ~6 sigma and make the paper's 83.3 trivial.
FIVE_GAUSSIANS_RADIUS = 3.25


class Digits(ArrayDataModule):
    """scikit-learn's 8x8 digits (1,797 samples, 10 classes), shipped with scikit-learn.

    Pixels 0..16 are scaled to [0, 1]. There is no test split: train = eval = all.
    """

    name = "digits"

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        return {"train": (x, torch.as_tensor(d.target, dtype=torch.long))}


def five_gaussians(n: int = 2000, radius: float = FIVE_GAUSSIANS_RADIUS, seed: int = 0):
    """Samples ``(X, y)`` of 5 equal-weight N(m_k, I) in R^2, m_k on a circle, standardised.

    Returns:
        ``X`` ``(n, 2)`` float32 standardised features, ``y`` ``(n,)`` labels, and the
        ``(5, 2)`` true means in the raw (unstandardised) space.
    """
    rng = np.random.default_rng(seed)
    angles = 2 * math.pi * np.arange(5) / 5
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = rng.permutation(np.arange(n) % 5)
    x = means[y] + rng.standard_normal((n, 2))
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y, means


class FiveGaussians(ArrayDataModule):
    """The AE-CM paper's 5-Gaussians set: 2,000 points in R^2, K = 5 (see ``five_gaussians``)."""

    name = "5gaussians"

    def __init__(self, n_samples: int = 2000, radius: float = FIVE_GAUSSIANS_RADIUS, seed: int = 0, **kwargs) -> None:
        kwargs.setdefault("download", False)
        super().__init__(**kwargs)
        self.n_samples, self.radius, self.seed = n_samples, radius, seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        x, y, _ = five_gaussians(self.n_samples, self.radius, self.seed)
        return {"train": (torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long))}


class Blobs(ArrayDataModule):
    """Well-separated isotropic blobs from scikit-learn's ``make_blobs`` (for quick tests),
    standardised per feature unless ``standardize`` is false."""

    name = "blobs"

    def __init__(
        self,
        n_samples: int = 1000,
        n_features: int = 2,
        centers: int = 3,
        cluster_std: float = 0.5,
        standardize: bool = True,
        seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("download", False)
        super().__init__(**kwargs)
        self.n_samples, self.n_features, self.centers = n_samples, n_features, centers
        self.cluster_std, self.standardize, self.seed = cluster_std, standardize, seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import make_blobs

        x, y = make_blobs(
            self.n_samples,
            self.n_features,
            centers=self.centers,
            cluster_std=self.cluster_std,
            center_box=(-10, 10),
            random_state=self.seed,
        )
        if self.standardize:
            x = (x - x.mean(0)) / x.std(0)
        return {"train": (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))}
