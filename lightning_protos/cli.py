"""The ``protos`` command: LightningCLI's fit / validate / test / predict, plus bench and report.

protos fit --config configs/cm_mnist.yaml [--data.data_dir DIR] [--seed_everything 1]
protos test --config configs/cm_mnist.yaml --ckpt_path RUN/checkpoints/last.ckpt
protos predict --config configs/cm_mnist.yaml --ckpt_path ...   # NEW_RUN/predictions.csv
protos inspect --config configs/vaesim_mnist.yaml --ckpt_path ...   # test + NEW_RUN/inspect/*.png

(test, predict and inspect write a new run directory, NEW_RUN; fit from RUN's last.ckpt continues RUN)
protos bench --config configs/bench/smoke.yaml [--jobs N] [--report]
"""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
from argparse import ArgumentError
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .compile import Compile
from .data import DATASETS, ArrayDataModule
from .errors import ProtosError
from .eval.callbacks import AssignmentWriter, ClusteringEvaluator, ScoreRecorder, run_dir
from .eval.images import InspectionImages
from .eval.metrics import LABEL_SCORES
from .hardware import check_cpu_bf16, cpu_has_native_bf16
from .methods.base import ClusteringMethod


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``'s ModelCheckpoint, which saves at the end of every training epoch also when
    it saves by steps or time (``every_n_train_steps``, ``train_time_interval``), where Lightning
    saves only at those: the fit's end would be missing, and a save that fell on an epoch's last
    batch would miss the methods' end-of-epoch work (the averaging epoch's mean, a
    learning-rate step, DCN's reassignment, a k-means refit), which runs after it."""

    @property
    def state_key(self) -> str:  # as ModelCheckpoint's: checkpoints from before this class resume
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.every_n_epochs < 1:  # saving by steps or time: Lightning saved nothing at this epoch's end
            self._last_global_step_saved = -1  # a save at this step came before the epoch's end
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class ProtosCLI(LightningCLI):
    """LightningCLI with the clustering evaluation and the assignment export always on (probes,
    reconstruction and pictures are the configs' callbacks), the input shape linked from the
    data to the model, and a final test pass on the trained model after ``fit``.

    A fit's run directory (``lightning_logs/version_N`` by default, TensorBoard) holds
    ``config.yaml``, ``checkpoints/last.ckpt`` and ``best.ckpt`` (the best by validation ACC,
    where the data have labels) and ``metrics.json``; a ``test`` / ``validate`` / ``predict``
    writes a new run directory with its ``config.yaml`` and its outputs (``metrics.json``,
    ``predictions.csv``). With ``inspect`` (``protos inspect``, run as ``test``) the test also
    writes the pictures of :class:`InspectionImages` as ``NEW_RUN/inspect/*.png``.
    """

    def __init__(self, *args, inspect: bool = False, **kwargs) -> None:
        self.inspect = inspect
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
        # Raise instead of printing the whole usage: ``main`` reports the error in one line; and
        # take no abbreviated option (``--trainer.max_e 3``): a typo must not pass as a prefix.
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning merges the checkpoint's hyperparameters into the config, the method's class
        # included: a checkpoint of another method would silently replace the config's model
        wanted, ckpt = self._configured_method(), self.config[self.config.subcommand].get("ckpt_path")
        try:
            super()._parse_ckpt_path()
        except ArgumentError as err:  # hyperparameters the config's model does not take
            raise ProtosError(
                f"checkpoint {ckpt}: its hyperparameters do not fit the config's model (another method?): "
                f"{one_line(str(err))}"
            ) from err
        held = self._configured_method()
        if wanted and held != wanted:
            raise ProtosError(
                f"checkpoint {ckpt} holds a model of class {held}, the config's model is {wanted}: use "
                "the config it was trained with (its run's config.yaml)"
            )

    def _configured_method(self) -> str | None:
        model = self.config[self.config.subcommand].get("model")
        return model.get("class_path") if isinstance(model, Namespace) else None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for callback, group in OWN_CALLBACKS.items():  # Compile is off unless --compile.enabled true
            parser.add_lightning_class_args(callback, group)
        # best.ckpt by val/acc at each validation; last.ckpt at the end of every training epoch
        # (independent of how often validation runs), so a killed run loses at most one epoch.
        # last.ckpt is a rolling top-1 named "last": Lightning's own save_last writes only when
        # a top-k checkpoint was written in the same step, i.e. never with save_top_k=0.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None:
            absolute_data_paths(config)
            trainer = config.get("trainer") or {}
            check_own_callbacks(trainer.get("callbacks"))
            every = trainer.get("check_val_every_n_epoch")
            if every is not None and every < 1:  # Lightning divides by it after the first epoch
                raise ProtosError(f"trainer.check_val_every_n_epoch must be >= 1 (or null), got {every}")
            accelerator = str(trainer.get("accelerator") or "auto")
            on_cpu = accelerator == "cpu" or (
                accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
            )
            problem = check_cpu_bf16(trainer.get("precision"), on_cpu, cpu_has_native_bf16())
            if problem:
                rank_zero_warn(problem)
            if self.subcommand != "fit" and not config.get("ckpt_path"):  # Lightning uses the model as built
                rank_zero_warn(
                    f"no --ckpt_path: this {self.subcommand} runs the untrained model, as initialised "
                    "before any fit; pass --ckpt_path RUN/checkpoints/best.ckpt (or last) for a trained one"
                )
        # where the fit continues a run: (the logger as given,), a 1-tuple since that may be None
        self._given_logger: tuple | None = None
        if config is not None and config.get("ckpt_path"):
            logger = config.trainer.get("logger")
            given = logger.clone() if isinstance(logger, Namespace) else logger
            if continue_run(config, fit=self.subcommand == "fit"):
                self._given_logger = (given,)

    def before_fit(self) -> None:
        self.check_checkpoint_fits()
        if self._given_logger is not None:
            # the run's config.yaml is the one that trains it from the start: without the
            # checkpoint it continued from and the version that pinned its directory, so that
            # `--config RUN/config.yaml` neither resumes a fit nor writes into RUN
            saver = next(c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback))
            saver.config = saver.config.clone()
            saver.config.trainer.logger, saver.config.ckpt_path = self._given_logger[0], None
        # best.ckpt is picked by a score against the labels (val/acc by default): data without
        # labels (a user's .npy, an image folder without class sub-folders) keep last.ckpt only
        if self.datamodule.labels("eval") is None:
            by_labels = [
                c for c in self.trainer.checkpoint_callbacks if c.monitor and c.monitor.split("/")[-1] in LABEL_SCORES
            ]
            for callback in by_labels:
                self.trainer.callbacks.remove(callback)
                rank_zero_warn(f"the data have no labels: no best checkpoint by {callback.monitor}, last.ckpt only")

    def check_checkpoint_fits(self) -> None:
        """A checkpoint that does not fit the model stops the command here, before it opens a run
        directory (Lightning would find out once it had, loading the checkpoint)."""
        path = self.config[self.subcommand].get("ckpt_path")
        if path and Path(path).is_file() and isinstance(self.model, ClusteringMethod):
            self.model.check_checkpoint(torch.load(path, map_location="cpu", weights_only=False))

    before_validate = before_predict = check_checkpoint_fits

    def before_test(self) -> None:
        self.check_checkpoint_fits()
        if self.inspect:
            pictures = [c for c in self.trainer.callbacks if isinstance(c, InspectionImages)]
            if not pictures:
                pictures = [InspectionImages()]
                self.trainer.callbacks.append(pictures[0])
            pictures[0].save_png = True

    def after_fit(self) -> None:
        if self.config[self.subcommand].final_test and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics: dict[str, float] = {}
            recorders = [c for c in self.trainer.callbacks if isinstance(c, ScoreRecorder)]  # clustering first
            for recorder in sorted(recorders, key=lambda c: not isinstance(c, ClusteringEvaluator)):
                metrics.update(recorder.results.get("test", {}))
            if self.trainer.is_global_zero:
                shown = ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and k != "epoch"
                )
                print(f"final evaluation: {shown}\nrun directory: {run_dir(self.trainer)}")


# The callbacks every run has, and the option group that sets each (``add_arguments_to_parser``).
OWN_CALLBACKS = {ClusteringEvaluator: "evaluation", AssignmentWriter: "assignments", Compile: "compile"}


def check_own_callbacks(callbacks) -> None:
    """Refuses, in one line, a callback in ``trainer.callbacks`` (a list, or a single one) that the
    CLI adds itself: a second ClusteringEvaluator stops Lightning on its duplicate state, a second
    AssignmentWriter or Compile would run twice."""
    groups = {cls.__name__: group for cls, group in OWN_CALLBACKS.items()}
    for callback in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        path = str(callback if isinstance(callback, str) else callback.get("class_path"))
        name = path.rsplit(".", 1)[-1]
        if path.startswith("lightning_protos.") and name in groups:
            raise ProtosError(
                f"trainer.callbacks lists {name}, which every protos run has: remove it and "
                f"set its options under {groups[name]}: (--{groups[name]}.<option>)"
            )


def absolute_data_paths(config: Namespace) -> None:
    """Makes the data's relative ``path`` and ``data_dir`` absolute (from the current directory),
    in the data module and in the run's saved ``config.yaml``, so that ``--config RUN/config.yaml``
    finds the data from any directory."""
    data = config.get("data")
    args = data.get("init_args") if isinstance(data, Namespace) else None
    for key in ("path", "data_dir"):
        value = args.get(key) if isinstance(args, Namespace) else None
        if value and isinstance(value, (str, os.PathLike)) and not Path(value).expanduser().is_absolute():
            args[key] = str(Path(value).expanduser().absolute())


# The checkpoint ``--ckpt_path last`` chose, for the DDP processes launched after the choice.
CONTINUED = "PROTOS_CONTINUED_CKPT"


def continue_run(config, fit: bool = True) -> bool:
    """Where a run given ``--ckpt_path`` writes; ``True`` if it continues an existing run directory.

    ``last``: the newest run under the logger's folder that has a ``checkpoints/last.ckpt`` (or
    the run the logger's ``version`` names). ``fit`` continues it in that same run directory, so
    its TensorBoard curves, checkpoints and ``metrics.json`` carry on; ``test`` / ``validate`` /
    ``predict`` / ``inspect`` load it and write a new run directory. Lightning's own ``last``
    looks in the new run's directory, where nothing is yet (outside ``fit`` it then evaluates the
    untrained model). ``fit`` from a file ``RUN/checkpoints/last.ckpt`` of a run in the logger's
    folder continues RUN likewise; any other file (``best.ckpt``, a copy elsewhere) starts a new
    run directory, leaving the run it came from as it was. For the default logger and a
    configured TensorBoardLogger / CSVLogger. The processes Lightning launches for DDP run this
    again: they take the first process's choice of ``last`` from the environment they inherit
    (:data:`CONTINUED`), not a newer ``last.ckpt`` another run may have written since."""
    named = config.ckpt_path != "last"
    if named and not (fit and Path(config.ckpt_path).name == "last.ckpt"):
        return False
    trainer, logger = config.trainer, config.trainer.get("logger")
    if logger in (None, True):
        init_args = Namespace(save_dir=trainer.get("default_root_dir") or ".", name="lightning_logs", version=None)
    elif isinstance(logger, Namespace) and "init_args" in logger:
        init_args = logger.init_args
    elif named:
        return False
    else:
        raise ProtosError("--ckpt_path last needs the default logger or one TensorBoardLogger / CSVLogger")
    folder = Path(init_args.get("save_dir") or ".", init_args.get("name") or "")
    if named:
        last = Path(config.ckpt_path)
        run = last.resolve().parent.parent
        if last.parent.name != "checkpoints" or run.parent != folder.resolve():
            return False  # not one of the logger's runs: a new run directory
    elif os.environ.get("LOCAL_RANK", "0") != "0" and CONTINUED in os.environ:  # a launched DDP process
        last = Path(os.environ[CONTINUED])
    elif init_args.get("version") not in (None, ""):
        version = init_args.version  # an int names version_<int>, as the loggers write it
        last = folder / (version if isinstance(version, str) else f"version_{version}") / "checkpoints" / "last.ckpt"
    else:
        found = sorted(folder.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        last = found[-1] if found else folder / "*" / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ProtosError(f"--ckpt_path last: no {last} to {'continue' if fit else 'load'}")
    if not named:
        config.ckpt_path = os.environ[CONTINUED] = str(last)
    if fit:
        if logger in (None, True):
            trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=init_args)
        init_args.version = last.parents[1].name
    print(f"{'continuing' if fit else 'loading'} {last.parents[1]} from {last.name}", file=sys.stderr)
    return fit


# Lines of jsonargparse's nested union-type report, and of the parser's usage printed before it
# (``protos bench`` reads that from stderr), that say nothing about the mistake.
_NOISE = (
    "Expected a path but",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "usage:",
    "tip:",
    "[",
)


def one_line(message: str) -> str:
    """jsonargparse's multi-line report of a bad argument, reduced to its informative lines."""
    lines = (line.strip().lstrip("- ").strip().removeprefix("error: ") for line in message.splitlines())
    text = " ".join(dict.fromkeys(line for line in lines if line and not line.startswith(_NOISE)))
    unknown = "class_path" in text or "import path" in text
    if text.startswith('Parser key "data"') and unknown and text.count("Parser key") == 1:  # not an option's value
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


def check_checkpoint(args: list[str]) -> str | None:
    """``None`` if the ``--ckpt_path`` among ``args`` (if any) is a readable checkpoint file or one
    of Lightning's names (``last``, ...), else a one-line reason: a missing file, a truncated or
    foreign one (a checkpoint is a zip archive; its members are checked whole), or ``best``."""
    values = [a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--ckpt_path"]
    for value in values:
        path = Path(value).expanduser()
        if value == "best":  # Lightning knows it only inside the fit that saved it
            return "--ckpt_path best: name the file, RUN/checkpoints/best.ckpt (or use last)"
        if value in ("last", "hpc", "registry") or "://" in value:
            continue
        if path.is_dir():
            return f"checkpoint {path} is a folder: name a file in it, e.g. RUN/checkpoints/last.ckpt"
        if not path.is_file():
            return f"checkpoint {path}: no such file"
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"checkpoint {path} is unreadable (truncated, or not a checkpoint): {err}"
        if bad is not None:
            return f"checkpoint {path} is corrupt: member {bad} fails its checksum"
        if not any(name.endswith("/data.pkl") for name in names):  # torch.save's archive layout
            return f"checkpoint {path} is a zip archive but not a PyTorch checkpoint"
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    problem = check_checkpoint(args)
    if problem:
        sys.exit(f"protos: error: {problem}")
    inspect = bool(args) and args[0] == "inspect"
    if inspect and any(a in ("-h", "--help") for a in args):
        print("protos inspect: a `protos test` of --ckpt_path that draws its pictures in NEW_RUN/inspect/")
    elif inspect and not any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in args):
        sys.exit("protos: error: inspect needs --ckpt_path CHECKPOINT, the trained model to draw")
    if args in ([], ["-h"], ["--help"]):  # Lightning's help lists only its own subcommands
        print(
            "protos: fit / validate / test / predict (below), and bench, report, inspect:\n"
            "  protos bench --config configs/bench/T.yaml [--report]   a table's runs over seeds\n"
            "  protos report --config configs/bench/T.yaml             its tables from the rows so far\n"
            "  protos inspect --config C.yaml --ckpt_path CKPT          a trained model's pictures\n"
        )
    if args and args[0] in ("bench", "report"):
        from .bench.runner import main as bench_main

        sys.exit(bench_main(args))
    try:
        with warnings.catch_warnings():  # inspect runs `test`, handing the CLI its own args
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            # the methods log once per epoch (ClusteringMethod.check_and_log), so Lightning's advice
            # to log more often than an epoch of few batches has nothing to act on
            warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller")
            # None: LightningCLI reads sys.argv itself (no double-args warning)
            ProtosCLI(args=["test", *args[1:]] if inspect else argv, inspect=inspect)
    except ArgumentError as err:  # a bad option, value, class path or config file
        print(f"protos: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        cause = _protos_cause(err)
        if cause is not None:
            sys.exit(f"protos: error: {cause}")
        if isinstance(err, MisconfigurationException):  # Lightning's own check of a trainer option
            sys.exit(f"protos: error: {one_line(str(err))}")
        if isinstance(err, ValueError) and "Does not validate against any of the Union" in str(err):
            sys.exit(f"protos: error: {one_line(str(err))}")  # a constructor rejected its arguments
        raise


if __name__ == "__main__":
    main()
