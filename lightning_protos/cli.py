"""The ``protos`` command: LightningCLI's fit / validate / test / predict, plus bench and report.

protos fit --config configs/cm_mnist.yaml [--data.data_dir DIR] [--seed_everything 1]
protos test --config configs/cm_mnist.yaml --ckpt_path RUN/checkpoints/last.ckpt
protos predict --config configs/cm_mnist.yaml --ckpt_path ...   # RUN/predictions.csv
protos bench --config configs/bench/smoke.yaml [--jobs N] [--report]
"""

from __future__ import annotations

import sys
from argparse import ArgumentError

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .data import DATASETS, ArrayDataModule
from .errors import ProtosError
from .eval.callbacks import AssignmentWriter, ClusteringEvaluator
from .eval.probes import ProbeEvaluator
from .methods.base import ClusteringMethod


class ProtosCLI(LightningCLI):
    """LightningCLI with the evaluation callbacks always on, the input shape linked from the
    data to the model, and a final test pass on the trained model after ``fit``.

    Every run directory (``lightning_logs/version_N`` by default, TensorBoard) holds
    ``config.yaml``, ``checkpoints/{last,best}.ckpt`` and ``metrics.json``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(
            ClusteringMethod,
            ArrayDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # Raise instead of printing the whole usage: ``main`` reports the error in one line.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ClusteringEvaluator, "evaluation")
        parser.add_lightning_class_args(AssignmentWriter, "assignments")
        # best.ckpt by val/acc at each validation; last.ckpt at the end of every training epoch
        # (independent of how often validation runs), so a killed run loses at most one epoch.
        # last.ckpt is a rolling top-1 named "last": Lightning's own save_last writes only when
        # a top-k checkpoint was written in the same step, i.e. never with save_top_k=0.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
                "last_checkpoint.save_on_train_epoch_end": True,
                "checkpoint.save_last": False,
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "trainer.num_sanity_val_steps": 0,
                "trainer.deterministic": False,
            }
        )
        parser.add_argument("--final_test", type=bool, default=True, help="test the trained model after fit")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")

    def after_fit(self) -> None:
        if self.config[self.subcommand].final_test and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            evaluator = next(c for c in self.trainer.callbacks if isinstance(c, ClusteringEvaluator))
            metrics = dict(evaluator.results.get("test", {}))
            for probes in (c for c in self.trainer.callbacks if isinstance(c, ProbeEvaluator)):
                metrics.update(probes.results.get("test", {}))
            if self.trainer.is_global_zero:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                print(f"final evaluation: {shown}\nrun directory: {self.trainer.log_dir}")


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


# Lines of jsonargparse's nested union-type report that say nothing about the mistake.
_NOISE = (
    "Expected a path but",
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
)


def one_line(message: str) -> str:
    """jsonargparse's multi-line report of a bad argument, reduced to its informative lines."""
    lines = (line.strip().lstrip("- ").strip() for line in message.splitlines())
    text = " ".join(line for line in lines if line and not line.startswith(_NOISE))
    if text.startswith('Parser key "data"') and ("class_path" in text or "import path" in text):
        known = ", ".join(sorted({c.__name__ for c in DATASETS.values()}))
        text += f" (data sets in lightning_protos.data: {known}; ArrayFile or ImageFolder)"
    return text


def _protos_cause(err: BaseException) -> BaseException | None:
    """The ProtosError / FloatingPointError behind ``err`` (jsonargparse wraps constructors')."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ProtosError, FloatingPointError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("bench", "report"):
        from .bench.runner import main as bench_main

        sys.exit(bench_main(args))
    if torch.cuda.is_available():
        problem = check_cuda_arch(torch.cuda.get_device_capability(), torch.cuda.get_arch_list())
        if problem:
            sys.exit(f"protos: error: {problem}")
    try:
        ProtosCLI(args=argv)  # None: LightningCLI reads sys.argv itself (no double-args warning)
    except ArgumentError as err:  # a bad option, value, class path or config file
        print(f"protos: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        cause = _protos_cause(err)
        if cause is not None:
            sys.exit(f"protos: error: {cause}")
        if isinstance(err, ValueError) and "Does not validate against any of the Union" in str(err):
            sys.exit(f"protos: error: {one_line(str(err))}")  # a constructor rejected its arguments
        raise


if __name__ == "__main__":
    main()
