"""Latent-space walks around prototypes (sampling and interpolation, AE-CM Sec. 5.3.6) and the
nearest real points of each prototype."""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans import squared_distances


def interpolate(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """``steps`` points on the segment from ``a`` to ``b`` (both ``(p,)``), ends included: ``(steps, p)``."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype, device=a.device).unsqueeze(1)
    return (1 - t) * a + t * b


def around(prototype: Tensor, n: int, scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws from N(prototype, scale^2 I): ``(n, p)``."""
    noise = torch.randn(n, prototype.numel(), generator=generator, dtype=prototype.dtype, device=prototype.device)
    return prototype.reshape(1, -1) + scale * noise


def nearest(queries: Tensor, points: Tensor, n: int, allowed: Tensor | None = None) -> Tensor:
    """Indices of the ``n`` points closest (Euclidean) to each query, nearest first: queries
    ``(K, p)``, points ``(N, p)`` -> ``(K, min(n, N))`` indices into ``points``. ``allowed``
    ``(K, N)`` bool: query k ranks only the points it allows; a row with fewer ends in -1s."""
    d = squared_distances(queries, points)
    if allowed is not None:
        d = d.masked_fill(~allowed, float("inf"))
    top = d.topk(min(n, len(points)), dim=1, largest=False)
    return top.indices if allowed is None else top.indices.masked_fill(top.values.isinf(), -1)
