"""``torch.compile`` for a method's networks during ``fit``: ``protos fit ... --compile.enabled true``.

Compiling fuses a conv net's batch norms, activations and their gradients into a few
generated kernels; the convolutions stay with oneDNN / cuDNN. Whole ``protos fit`` epochs in
fp32 on 2 CPU cores (``benchmarks/compile_speed.py``): VAESim on PneumoniaMNIST 1.31x faster
after ~55 s of compiling; the fully connected nets gained nothing (CM 1.03x) or lost (AE-CM
0.63x), so a method compiles only the networks it names in ``compile_modules`` (its conv nets).
Off by default: the compilation costs more than a short run gains.

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

from .errors import ProtosError

# The C++ compilers inductor looks for when it builds its CPU kernels.
CXX = ("g++", "c++", "clang++")


def compile_targets(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The submodules to compile: ``names`` (dotted, e.g. ``encoder.features``), else the
    method's ``compile_modules``, else (a module without that attribute) every direct child
    that holds parameters."""
    names = names if names is not None else getattr(model, "compile_modules", None)
    if names is None:
        return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
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
        modules: dotted names of the submodules to compile; ``None`` for the method's
            ``compile_modules``, else every direct child that holds parameters. Only a module's
            ``forward`` is compiled: name the parts a method calls directly (e.g.
            ``[ae.encoder, ae.decoder]``).
        mode: ``torch.compile``'s mode (``None``: its default; ``max-autotune`` on a GPU).
    """

    def __init__(self, enabled: bool = False, modules: list[str] | None = None, mode: str | None = None) -> None:
        self.enabled, self.modules, self.mode = enabled, modules, mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        if not compile_targets(pl_module, self.modules):  # a bad name fails here, before any training
            rank_zero_warn(
                f"compile.enabled: {type(pl_module).__name__} compiles nothing (its fully connected nets ran "
                "no faster compiled; BENCHMARKS.md); --compile.modules names modules to compile anyway"
            )
            return
        on_cpu = trainer.strategy.root_device.type == "cpu"
        if on_cpu and not any(shutil.which(c) for c in CXX):
            raise ProtosError(
                "compile.enabled on a CPU needs a C++ compiler (torch.compile builds its CPU kernels "
                f"with one; none of {', '.join(CXX)} is on PATH): install g++ or drop --compile.enabled"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            for _, module in compile_targets(pl_module, self.modules):
                module.compile(mode=self.mode)
