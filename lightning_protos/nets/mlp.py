"""Fully connected encoders and decoders: the DAE of DEC / IDEC / DCN / AE-CM, and VaDE's
Gaussian encoder and Bernoulli decoder (Jiang et al. 2017: d-500-500-2000-q, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import check_non_negative


def mlp(sizes: Sequence[int], slope: float = 0.2, last_activation: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with LeakyReLU(slope) between them
    (slope 0 gives ReLU); the last layer is linear unless ``last_activation``."""
    check_non_negative(slope=slope)  # the widths: the methods check their ``hidden``
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.LeakyReLU(slope) if slope > 0 else nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def keras_glorot_normal_(tensor: Tensor) -> Tensor:
    """Keras's ``glorot_normal`` in place: a normal truncated at two standard deviations whose
    variance after truncation is 2 / (fan_in + fan_out). Keras takes fan_in = fan_out = n for a
    1-d tensor of n values (a bias), so a bias gets variance 1 / n."""
    if tensor.dim() == 1:
        fan_in = fan_out = tensor.numel()
    else:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    # 0.8796...: the std of a unit normal truncated to [-2, 2], which Keras divides out
    std = (2.0 / (fan_in + fan_out)) ** 0.5 / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


BiasInit = Literal["zeros", "glorot_normal"]


def glorot_init(module: nn.Module, bias: BiasInit = "zeros") -> None:
    """Xavier-uniform weights for every Linear layer of ``module`` and zero biases (Keras's
    default initialisation) or Glorot-normal ones (what the AE-CM authors' Keras code sets,
    REFERENCE_CODE 2.1 and 3.1)."""
    if bias not in ("zeros", "glorot_normal"):
        raise ValueError(f"bias_init must be 'zeros' or 'glorot_normal', got {bias!r}")
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if bias == "zeros":
                nn.init.zeros_(m.bias)
            else:
                keras_glorot_normal_(m.bias)


class MLPAutoencoder(nn.Module):
    """d-h1-..-p encoder and the mirrored decoder, linear code and linear output.

    Args:
        in_dim: input dimension d.
        hidden: hidden widths, e.g. ``(500, 500, 2000)`` (DEC's DAE).
        latent_dim: code dimension p.
        slope: LeakyReLU slope (0 for ReLU).
        bias_init: ``zeros`` or ``glorot_normal`` (see :func:`glorot_init`).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (500, 500, 2000),
        latent_dim: int = 10,
        slope: float = 0.2,
        bias_init: BiasInit = "zeros",
    ):
        super().__init__()
        sizes = [in_dim, *hidden, latent_dim]
        self.encoder = mlp(sizes, slope)
        self.decoder = mlp(sizes[::-1], slope)
        glorot_init(self, bias_init)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, d)`` -> (code ``(B, p)``, reconstruction ``(B, d)``)."""
        z = self.encoder(x)
        return z, self.decoder(z)


class MLPEncoder(nn.Module):
    """``(B, d)`` -> (z_mu, z_logvar), each ``(B, latent_dim)``: a ReLU trunk d-h1-..-hn
    (``features``) and two linear heads (``mu``, ``logvar``), as :class:`~.conv.ConvEncoder`.

    Args:
        in_dim: input dimension d.
        latent_dim: q.
        hidden: trunk widths (VaDE: 500-500-2000).
    """

    def __init__(self, in_dim: int, latent_dim: int, hidden: Sequence[int] = (500, 500, 2000)) -> None:
        super().__init__()
        self.features = mlp([in_dim, *hidden], slope=0.0, last_activation=True)
        width = hidden[-1] if hidden else in_dim
        self.mu = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)
        glorot_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return self.mu(h), self.logvar(h)


class MLPDecoder(nn.Module):
    """``(B, in_features)`` -> ``(B, d)`` in [0, 1]: ReLU layers of the widths ``hidden``
    (VaDE: 2000-500-500, the encoder's mirrored), a linear output layer and a sigmoid.

    Args:
        in_features: q (plus the condition's width for VAESim).
        out_dim: d.
        hidden: widths of the hidden layers, in order from the latent.
    """

    def __init__(self, in_features: int, out_dim: int, hidden: Sequence[int] = (2000, 500, 500)) -> None:
        super().__init__()
        self.net = mlp([in_features, *hidden, out_dim], slope=0.0)
        glorot_init(self)

    def logits(self, h: Tensor) -> Tensor:
        """The output before the sigmoid (for a Bernoulli likelihood computed from logits)."""
        return self.net(h)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(h))
