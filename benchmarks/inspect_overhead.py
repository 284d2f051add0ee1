"""Cost of the pictures (``InspectionImages``, issue 10) against training, per config.

For each config, in one process and one thread: the config's model and data (``ProtosCLI``,
``run=False``), then

* ``epoch_s``: the wall time of the config's training epochs without the pictures, timed from
  ``on_train_epoch_start`` to ``on_train_epoch_end`` over ``--epochs`` epochs of at most
  ``--batches`` batches each, scaled to the full number of batches of an epoch;
* ``pictures_s``: the wall time of one drawing with the config's ``InspectionImages`` settings
  (sample, embedding, decodings, t-SNE, the TensorBoard images, figure and projector), the
  median of ``--repeats`` calls, on the model after those epochs.

The overhead of a whole run with the config's defaults is then
``calls * pictures_s / (max_epochs * epoch_s)`` with ``calls = max_epochs // every_n_epochs + 1``
(the last one at test end). The pictures cost the same whatever the weights, so timing them
apart from training measures the same thing as two runs with and without the callback, in
minutes instead of hours on a CPU.

    OMP_NUM_THREADS=1 PROTOS_DATA_DIR=../shared/data python benchmarks/inspect_overhead.py
    python benchmarks/inspect_overhead.py --configs configs/vaesim_pneumonia.yaml --batches 3

Prints a Markdown table and appends rows (config, max_epochs, every_n_epochs, calls, epoch_s,
pictures_s, overhead, device) to ``benchmarks/results/inspect_overhead.csv``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_protos.cli import ProtosCLI
from lightning_protos.eval.images import InspectionImages

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["vaesim_pneumonia", "vaesim_mnist", "protovae_mnist", "aecm_mnist"]


class EpochTimer(L.Callback):
    """Wall time of each training epoch and its number of batches."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.batches: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._n += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.batches.append(self._n)


def measure(config: Path, epochs: int, batches: int, repeats: int, root: Path) -> dict[str, float]:
    args = [
        "--config", str(config), "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches",
        str(batches), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root),
    ]  # fmt: skip
    cli = ProtosCLI(args=args, run=False)
    found = [c for c in cli.trainer.callbacks if isinstance(c, InspectionImages)]
    callback = found[0] if found else InspectionImages()
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, InspectionImages)]
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    full = yaml_max_epochs(config)
    cli.trainer.fit(cli.model, cli.datamodule)
    n_batches = len(cli.datamodule.train_dataloader())
    epoch_s = statistics.median(s / n * n_batches for s, n in zip(timer.seconds, timer.batches, strict=True))
    writer = SummaryWriter(root / "tb")
    cli.model.eval()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        pictures = callback.pictures(cli.model, cli.datamodule)
        callback.write_tensorboard(writer, pictures, "test", 0, config.stem)
        writer.flush()
        seconds.append(time.perf_counter() - start)
    writer.close()
    every = callback.every_n_epochs
    calls = (full // every if every else 0) + 1
    pictures_s = statistics.median(seconds)
    return {
        "config": config.stem,
        "max_epochs": full,
        "every_n_epochs": every,
        "calls": calls,
        "epoch_s": round(epoch_s, 2),
        "pictures_s": round(pictures_s, 2),
        "overhead": round(calls * pictures_s / (full * epoch_s), 4),
    }


def yaml_max_epochs(config: Path) -> int:
    import yaml

    return int(yaml.safe_load(config.read_text())["trainer"]["max_epochs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=[ROOT / "configs" / f"{c}.yaml" for c in CONFIGS])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs timed")
    parser.add_argument("--batches", type=int, default=10, help="at most this many batches an epoch")
    parser.add_argument("--repeats", type=int, default=2, help="drawings timed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inspect_overhead.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = f"{platform.machine()} CPU, 1 thread"
    rows = []
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append({**measure(config, args.epochs, args.batches, args.repeats, Path(tmp)), "device": device})
        print(rows[-1], flush=True)
    print("\n| config | epochs | every | calls | epoch s | pictures s | overhead |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['max_epochs']} | {r['every_n_epochs']} | {r['calls']} | {r['epoch_s']} | "
            f"{r['pictures_s']} | {100 * r['overhead']:.1f}% |"
        )
    new = not args.out.exists()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
