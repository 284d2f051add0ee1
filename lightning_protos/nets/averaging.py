"""Running parameter average (the CM's averaging epoch), kept in checkpointable buffers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


class ParameterAverage(nn.Module):
    """Accumulates a flat sum of parameters and, at the end, sets them to the mean.

    The sum and count are buffers, so an interrupted averaging epoch resumes exactly.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        n = sum(p.numel() for p in params)
        self.register_buffer("total", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def accumulate(self, params: list[nn.Parameter]) -> None:
        self.total += parameters_to_vector(params).double()
        self.count += 1

    @torch.no_grad()
    def apply(self, params: list[nn.Parameter]) -> None:
        """Set ``params`` to their average over the accumulated steps, then reset."""
        if int(self.count) == 0:
            return
        vector_to_parameters((self.total / self.count).to(params[0].dtype), params)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the accumulated steps."""
        if int(self.count):
            self.total.zero_()
            self.count.zero_()
