"""``torch.compile`` for a method's networks during ``fit``: ``protos fit ... --compile.enabled true``.

Compiling fuses a conv net's batch norms, activations and their gradients into a few
generated kernels; the convolutions stay with oneDNN / cuDNN. Whole ``protos fit`` epochs in
fp32 on 2 CPU cores (``benchmarks/compile_speed.py``): VAESim on PneumoniaMNIST 1.31x faster
after ~55 s of compiling; the fully connected nets gained nothing (CM 1.03x) or lost (AE-CM
0.63x), so by default only the networks that hold a convolution are compiled. Off by default:
the compilation costs more than a short run gains.

The modules keep their parameters and state-dict keys (``nn.Module.compile`` compiles in
place), so checkpoints load into a plain model and the other way round.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .errors import ProtosError, check_choices

# The C++ compilers inductor looks for when it builds its CPU kernels.
CXX = ("g++", "c++", "clang++")


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, _ConvNd) for m in module.modules())


def compile_targets(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The submodules to compile: ``names`` (dotted, e.g. ``encoder.features``) as given, else
    those of the method's ``compile_modules`` (the direct children where it has none) that hold
    a convolution."""
    if names is None:
        chosen = getattr(model, "compile_modules", None)
        candidates = model.named_children() if chosen is None else _named(model, chosen)
        return [(n, m) for n, m in candidates if has_conv(m)]
    return _named(model, names)


def _named(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        children = ", ".join(n for n, _ in model.named_children())
        raise ProtosError(f"compile.modules names no submodule {', '.join(missing)} (the method has {children})")
    return [(n, modules[n]) for n in names]


class Compile(Callback):
    """Compiles the method's networks with ``torch.compile`` when ``fit`` starts.

    Args:
        enabled: compile (off by default: ``protos fit`` always has this callback).
        modules: dotted names of the submodules to compile; ``None`` for the method's conv
            nets (see :func:`compile_targets`). Only a module's ``forward`` is compiled: name
            the parts a method calls directly (e.g. ``[ae.encoder, ae.decoder]``).
        mode: ``torch.compile``'s mode (``None``: its default; ``max-autotune`` on a GPU).
    """

    def __init__(self, enabled: bool = False, modules: list[str] | None = None, mode: str | None = None) -> None:
        if mode is not None:  # a typo would otherwise stop the run after the data are loaded
            from torch._inductor import list_mode_options

            check_choices(**{"compile.mode": (mode, tuple(list_mode_options()))})
        self.enabled, self.modules, self.mode = enabled, modules, mode
        self._targets: list[tuple[str, nn.Module]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        self._targets = compile_targets(pl_module, self.modules)  # a bad name fails before any training
        if not self._targets:
            rank_zero_warn(
                f"compile.enabled: {type(pl_module).__name__} compiles nothing (no conv nets; fully connected "
                "ones ran no faster compiled, BENCHMARKS.md); --compile.modules names modules to compile anyway"
            )
            return
        on_cpu = trainer.strategy.root_device.type == "cpu"
        if on_cpu and not any(shutil.which(c) for c in CXX):
            raise ProtosError(
                "compile.enabled on a CPU needs a C++ compiler (torch.compile builds its CPU kernels "
                f"with one; none of {', '.join(CXX)} is on PATH): install g++ or drop --compile.enabled"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for _, module in self._targets:
            module.compile(mode=self.mode)
