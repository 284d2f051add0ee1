"""The machine a run is about to use: a GPU this PyTorch build has no kernels for (a one-line
message, or an error for the process's own GPU), bf16 autocast asked of a CPU without bf16
hardware (a one-line warning), and the CPU cores this process may use."""

from __future__ import annotations

import os
import platform

import torch

from .errors import ProtosError


def check_cuda_arch(capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """``None`` if a kernel image for a GPU of this compute capability is in ``arch_list``
    (``sm_XY`` binaries run on the same major version with minor >= Y; ``compute_XY`` PTX
    JIT-compiles for any newer GPU), else a one-line fix."""
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return None
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return None
    cuda = torch.version.cuda or "?"
    return (
        f"this PyTorch (CUDA {cuda}) has no kernels for the GPU's compute capability sm_{major}{minor} "
        f"(built for {' '.join(arch_list)}); install a build that has them, e.g. rebuild the "
        "Docker image with --build-arg TORCH_CUDA=cu126 for V100 (sm_70)"
    )


def check_device(device: torch.device) -> None:
    """:func:`check_cuda_arch` for the GPU a process runs on, as a one-line error; nothing for
    another device. Called by every method's ``setup``, inside each process (checking from the
    launcher would initialise CUDA there, which ``ddp_fork`` / ``ddp_notebook`` cannot fork
    from, and would check GPU 0 also for a CPU run)."""
    if device.type == "cuda":
        problem = check_cuda_arch(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list())
        if problem:
            raise ProtosError(problem)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX-512 BF16 or AMX on x86 (torch's own CPU
    feature checks), bf16 instructions on ARM (as oneDNN reports them). Plain AVX-512 does not
    count: oneDNN then converts to float32 and back around each op, as it does on AVX2."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these private checks: assume emulation
        return False


def check_cpu_bf16(precision: object, on_cpu: bool, native: bool) -> str | None:
    """A one-line warning where bf16 autocast would run on a CPU without bf16 hardware, else
    ``None``. On such a CPU (an AVX2-only AMD EPYC) an AE-CM MNIST epoch of 30 batches took
    58.3 s in bf16-mixed against 4.4 s in 32-true (``benchmarks/overhead.py``, BENCHMARKS.md),
    where the AVX-512 BF16 box runs bf16 ~2x faster than 32-true."""
    if not on_cpu or native or not str(precision).startswith("bf16"):
        return None
    return (
        f"precision {precision} on a CPU without bf16 hardware (no AVX-512 BF16 or AMX): autocast is "
        "emulated (~13x slower than 32-true on an AVX2 CPU); pass --trainer.precision 32-true"
    )


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one (a
    container's or a SLURM job's cpuset), else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1
