"""ProtoVAE's convolutional encoder and decoder (§3.1; METHODS 1.2, 3.2), shared by ProtoVAE
and its reconstruction baselines (AE, VAE-KL, InfoVAE).

Encoder: len(channels) blocks [Conv k3 -> ReLU], stride 2 in the first two blocks only (28 -> 7
for MNIST with 2 blocks, 32 -> 8 for CIFAR with 3), then a bottleneck Dense + ReLU. The heads
(ProtoVAE's 256-d projection, a VAE's mu / logvar) belong to the methods.
Decoder: Dense(z -> 256 * s * s), s = side / 2^len(channels) (7 for MNIST, 4 for CIFAR), then
len(channels) x [ConvTranspose k4 s2 p1 -> ReLU] up to the input side (widths: the encoder's
mirrored), then Conv k3 to the image channels and a sigmoid.
Kernel sizes, widths and the bottleneck size are not stated in the paper (ours).
Conv weights and feature maps are channels-last, as in nets/conv.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from ..errors import ProtosError
from .conv import channels_last

DECODER_MAPS = 256  # activation maps the decoder's dense layer is reshaped into (§3.1)


class ProtoEncoder(nn.Module):
    """``(B, C, H, H)`` images -> ``(B, bottleneck_dim)`` features (after the ReLU).

    Args:
        in_channels: image channels C.
        side: H (the images are square).
        channels: conv block widths (MNIST 32-64, CIFAR 32-64-128; ours).
        bottleneck_dim: units of the bottleneck Dense layer (ours: 256).
    """

    def __init__(self, in_channels: int, side: int, channels: Sequence[int], bottleneck_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise([in_channels, *channels])):
            layers += [nn.Conv2d(a, b, kernel_size=3, stride=2 if i < 2 else 1, padding=1), nn.ReLU()]
        for _ in range(min(2, len(channels))):
            side = (side + 1) // 2
        self.net = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(channels[-1] * side * side, bottleneck_dim), nn.ReLU()
        )
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(channels_last(x))


class ProtoDecoder(nn.Module):
    """``(B, latent_dim)`` -> ``(B, C, side, side)`` images in [0, 1].

    Args:
        latent_dim: size of z.
        out_channels: image channels C.
        side: the image side; divisible by 2^len(channels).
        channels: the encoder's widths; the transposed convs use them mirrored.
    """

    def __init__(self, latent_dim: int, out_channels: int, side: int, channels: Sequence[int]) -> None:
        super().__init__()
        start = side // 2 ** len(channels)
        if start * 2 ** len(channels) != side:
            raise ProtosError(f"image side {side} is not divisible by 2^{len(channels)} ({len(channels)} conv blocks)")
        self.shape = (DECODER_MAPS, start, start)
        self.fc = nn.Linear(latent_dim, DECODER_MAPS * start * start)
        layers: list[nn.Module] = []
        for a, b in pairwise([DECODER_MAPS, *reversed(channels)]):
            layers += [nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(channels_last(self.fc(z).reshape(len(z), *self.shape)))
