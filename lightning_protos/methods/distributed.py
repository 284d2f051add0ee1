"""The processes' shared state: rank 0's work and values sent to every DDP rank, BatchNorm
statistics averaged over the ranks, and the random generators a checkpoint holds (by rank) for
an exact resume."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def set_ddp_options(strategy: Any, find_unused_parameters: bool) -> None:
    """Two of DDP's options, set on a DDP strategy so that a plain ``--trainer.strategy ddp``, or
    the DDP that ``--trainer.devices N`` picks, runs the methods as they need (its keyword
    arguments are read when the model is wrapped, after the module's ``setup``; Lightning 2.x has
    no public setter); nothing for another strategy:

    - ``find_unused_parameters`` for the methods that leave parameters out of a step
      (``ClusteringMethod.ddp_unused_parameters``);
    - ``broadcast_buffers=False`` unless given: every buffer is kept equal across ranks by the
      method itself (initialisations broadcast, prototype and centroid updates all-reduced,
      BatchNorm statistics averaged: ``tests/test_ddp.py`` checks whole runs), so DDP's copy of
      all of rank 0's buffers before every step (AE-CM's float64 averaging sums alone: ~27 MB on
      MNIST) is not needed.
    """
    if isinstance(strategy, DDPStrategy):
        if find_unused_parameters:
            strategy._ddp_kwargs["find_unused_parameters"] = True
        strategy._ddp_kwargs.setdefault("broadcast_buffers", False)


def average_batchnorm_stats(module: torch.nn.Module) -> dict[str, Tensor]:
    """Under DDP, sets the BatchNorm running statistics of ``module`` to their mean over the
    ranks (a collective: every rank calls it) and returns them by state-dict name; ``{}``
    otherwise.

    Each rank updates its statistics from its own batches, r <- (1 - m) r + m s. The update
    is linear and the ranks start equal, so the mean of the ranks' statistics is the running
    average of the rank-averaged batch statistics whenever it is taken: averaging where the
    statistics are read (evaluation) or written (epoch end, checkpoints) gives what averaging
    after every step would, without a collective per step. (SyncBatchNorm,
    ``--trainer.sync_batchnorm true``, averages inside the forward pass, on GPUs only; the
    mean then leaves the equal values as they are.)
    """
    if not is_distributed():
        return {}
    stats = [
        (f"{name}.{stat}", getattr(m, stat))
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
        for stat in ("running_mean", "running_var")
    ]
    if stats:
        flat = torch.cat([t.flatten() for _, t in stats])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for (_, t), part in zip(stats, flat.split([t.numel() for _, t in stats]), strict=True):
            t.copy_(part.view_as(t))
    return dict(stats)


def broadcast_from_rank0(tensors) -> None:
    """Under DDP, rank 0's values of ``tensors`` (parameters or buffers) on every rank, in place;
    nothing otherwise. For the initialisations each rank sets (the first prototypes, and what
    the ranks derive from a fit shared by :func:`on_rank0`): DDP synchronises the parameters
    only when it wraps the model, before them, and the ranks' codes, computed on their own
    devices, need not agree to the last bit."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def on_rank0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` computed by global rank 0 alone and sent, pickled, to every rank
    under DDP (``broadcast_object_list``); a plain call otherwise. For the CPU fits of the
    initialisations (k-means, the elbow's k-means, a GMM): called by every rank, they would
    repeat the same fit once per process, each process on all of the node's cores, and
    multi-threaded fits may differ in their last bits between ranks."""
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, fn(*args, **kwargs))]
        except Exception as error:  # the others learn of it, instead of waiting for the result
            dist.broadcast_object_list([(False, f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__qualname__', fn)}: {value}")
    return value


def rng_state() -> dict[str, Any]:
    """The global random generators' states (torch, CUDA, NumPy, Python) as tensors and plain
    Python values, so that a checkpoint holding them loads with ``weights_only``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, by rank, under DDP (a collective: every rank calls it); ``[obj]``
    otherwise."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the random stream of a process of rank ``rank`` > 0 from the optimizer step
    ``step`` on, derived from the run's ``seed`` (numpy's ``SeedSequence``: streams independent
    of each other and of rank 0's)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def set_rng_state(state: dict[str, Any]) -> bool:
    """Restores what :func:`rng_state` returned; ``False`` where CUDA's generators could not be
    restored (a checkpoint from another number of visible GPUs, or without them)."""
    torch.set_rng_state(state["torch"])
    cuda_restored = not torch.cuda.is_available()
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
        cuda_restored = True
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return cuda_restored
