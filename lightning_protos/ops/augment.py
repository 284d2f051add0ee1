"""Batch augmentations on image tensors, on their own device, one draw per image
(VAESim (aug), J §4: random histogram equalisation plus rotation, scaling and translation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def random_equalize(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Histogram-equalises each image of ``x`` ``(B, C, H, W)`` (floats in [0, 1]) with
    probability ``p``, as torchvision's ``RandomEqualize`` (on the 8-bit image)."""
    if p <= 0:
        return x
    as_uint8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    equalized = TF.equalize(as_uint8).to(x.dtype) / 255
    chosen = torch.rand(len(x), device=x.device, generator=generator) < p
    return torch.where(chosen.view(-1, 1, 1, 1), equalized, x)


def affine(x: Tensor, angle: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Rotates each image of ``x`` ``(B, C, H, W)`` by ``angle`` ``(B,)`` degrees (counter-clockwise),
    scales it by ``scale`` ``(B,)`` and moves it by ``shift`` ``(B, 2)`` pixels (right, down),
    about the image centre, with bilinear sampling and zero fill: torchvision's ``affine``
    (no shear), one transform per image of the batch instead of one per call."""
    _, _, h, w = x.shape
    rad = torch.deg2rad(angle.float())
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    # the sampling grid needs the inverse map, output -> input: p_in = R(-angle) / s (p_out - shift),
    # written in pixel units (so that rotations of non-square images stay rigid), then normalised
    # to [-1, 1] along each side
    aspect = h / w
    inv = torch.stack([torch.stack([cos, sin * aspect], -1), torch.stack([-sin / aspect, cos], -1)], dim=1)
    normalised = torch.stack([2 / w * shift[:, 0], 2 / h * shift[:, 1]], dim=-1).float()
    offset = -(inv @ normalised.unsqueeze(-1))
    theta = torch.cat([inv, offset], dim=2).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(
    x: Tensor,
    degrees: float = 15.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random rotation, scaling and translation of each image of ``x`` ``(B, C, H, W)``, as
    torchvision's ``RandomAffine(degrees, translate=(t, t), scale)`` with bilinear sampling and
    zero fill: angle ~ U(-degrees, degrees), scale ~ U(scale), shift ~ U(-t, t) of the width and
    of the height (:func:`affine`)."""
    b, _, h, w = x.shape
    u = torch.rand(b, 4, device=x.device, generator=generator, dtype=torch.float32)
    angle = degrees * (2 * u[:, 0] - 1)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    shift = torch.stack([translate * w * (2 * u[:, 2] - 1), translate * h * (2 * u[:, 3] - 1)], dim=-1)
    return affine(x, angle, s, shift)
