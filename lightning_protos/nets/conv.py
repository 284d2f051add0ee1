"""Convolutional VAE encoder and decoder for 32x32 images (VAESim, J App. A; METHODS 1.1).

Encoder: 3 x [Conv k4 s2 p1 -> BatchNorm -> ReLU], 32 -> 16 -> 8 -> 4, then two Linear heads
(z_mu, z_logvar). Decoder: Linear(in_features -> C_0 * 4 * 4), 3 x [ConvTranspose k4 s2 p1 ->
BatchNorm -> ReLU], 4 -> 8 -> 16 -> 32, then Conv k3 p1 to the image channels and a sigmoid.
Images of another size are resized to 32x32 by the method that uses these networks.

Both keep their conv weights and feature maps in the channels-last (NHWC) memory layout, the
fast path of oneDNN and cuDNN convolutions: a VAESim training step of these networks runs
~1.3x faster in bf16 on this CPU (~1.08x in fp32; BENCHMARKS.md). Shapes and values are as in
NCHW: only the strides differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NET_SIZE = 32  # the side of the images the networks see
FEATURE_SIZE = NET_SIZE // 8  # after three stride-2 layers


def channels_last(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` in the channels-last memory layout (the same tensor if it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` images resized to ``size`` by bilinear interpolation (antialiased when
    shrinking), as torchvision's ``Resize`` on tensors; unchanged if already that size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class ConvEncoder(nn.Module):
    """``(B, C, 32, 32)`` images -> (z_mu, z_logvar), each ``(B, latent_dim)``.

    Args:
        in_channels: image channels C.
        latent_dim: q.
        channels: widths of the three conv layers (ours: 64-128-256).
        activation: BatchNorm + ReLU after each conv (J App. A); ``False`` gives the plain
            linear conv stack of the authors' code (REFERENCE_CODE 1.1, item 7 of 1.4).
    """

    def __init__(
        self, in_channels: int, latent_dim: int, channels: Sequence[int] = (64, 128, 256), activation: bool = True
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"the conv encoder has 3 layers, got channels {tuple(channels)}")
        layers: list[nn.Module] = []
        widths = [in_channels, *channels]
        for a, b in pairwise(widths):
            layers.append(nn.Conv2d(a, b, kernel_size=4, stride=2, padding=1))
            if activation:
                layers += [nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = channels[-1] * FEATURE_SIZE * FEATURE_SIZE
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(channels_last(x))
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    """``(B, in_features)`` -> ``(B, C, 32, 32)`` images in [0, 1].

    Args:
        in_features: q for a VAE, q + K for VAESim (the latent concatenated with the condition).
        out_channels: image channels C.
        channels: widths of the 4x4, 8x8 and 16x16 feature maps (ours: 256-128-64, the encoder's
            mirrored); the last transposed conv keeps ``channels[-1]`` at 32x32.
    """

    def __init__(self, in_features: int, out_channels: int, channels: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"the conv decoder has 3 layers, got channels {tuple(channels)}")
        self.shape = (channels[0], FEATURE_SIZE, FEATURE_SIZE)
        self.fc = nn.Linear(in_features, channels[0] * FEATURE_SIZE * FEATURE_SIZE)
        layers: list[nn.Module] = []
        widths = [*channels, channels[-1]]
        for a, b in pairwise(widths):
            layers += [nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)

    def maps(self, h: Tensor) -> Tensor:
        """``(B, in_features)`` -> the first feature maps ``(B, C_0, 4, 4)``, channels-last."""
        return channels_last(self.fc(h).reshape(len(h), *self.shape))

    def logits(self, h: Tensor) -> Tensor:
        """The output before the sigmoid (for a Bernoulli likelihood computed from logits)."""
        return self.net[:-1](self.maps(h))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(self.maps(h))
