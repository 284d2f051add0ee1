"""Fully connected encoders and decoders (the DAE of DEC / IDEC / DCN / AE-CM)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn


def mlp(sizes: Sequence[int], slope: float = 0.2, last_activation: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with LeakyReLU(slope) between them
    (slope 0 gives ReLU); the last layer is linear unless ``last_activation``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.LeakyReLU(slope) if slope > 0 else nn.ReLU())
    return nn.Sequential(*layers)


class MLPAutoencoder(nn.Module):
    """d-h1-..-p encoder and the mirrored decoder, linear code and linear output.

    Args:
        in_dim: input dimension d.
        hidden: hidden widths, e.g. ``(500, 500, 2000)`` (DEC's DAE).
        latent_dim: code dimension p.
        slope: LeakyReLU slope (0 for ReLU).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (500, 500, 2000), latent_dim: int = 10, slope: float = 0.2):
        super().__init__()
        sizes = [in_dim, *hidden, latent_dim]
        self.encoder = mlp(sizes, slope)
        self.decoder = mlp(sizes[::-1], slope)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, d)`` -> (code ``(B, p)``, reconstruction ``(B, d)``)."""
        z = self.encoder(x)
        return z, self.decoder(z)
