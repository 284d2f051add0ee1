"""Running parameter average (the CM's averaging epoch), kept in checkpointable buffers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


class ParameterAverage(nn.Module):
    """Accumulates a flat sum of parameters and, at the end, sets them to the mean.

    The sum, the count and the epoch the steps belong to are buffers, so an interrupted
    averaging epoch resumes exactly; steps of another epoch start a new sum.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        n = sum(p.numel() for p in params)
        self.register_buffer("total", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.tensor(-1))  # of the summed steps; -1: none

    @torch.no_grad()
    def start(self, epoch: int) -> None:
        """Sum the steps of ``epoch`` from here on: a sum of another epoch is dropped (once an
        epoch, not every step: reading the buffer is a device-to-host copy on a GPU)."""
        if int(self.epoch) != epoch:
            self.reset()
            self.epoch.fill_(epoch)

    @torch.no_grad()
    def accumulate(self, params: list[nn.Parameter]) -> None:
        self.total += parameters_to_vector(params).double()
        self.count += 1

    def holds(self, epoch: int) -> bool:
        """Whether steps of ``epoch`` are summed and not yet applied."""
        return int(self.count) > 0 and int(self.epoch) == epoch

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
