"""Whole ``protos fit`` runs with and without ``--compile.enabled true`` (``torch.compile`` of
the method's networks, ``lightning_protos/compile.py``).

Each side is the user's command on a config (default: VAESim on PneumoniaMNIST) for
``--epochs`` epochs with its evaluation and final test, in a fresh process with an empty
inductor cache of its own (``TORCHINDUCTOR_CACHE_DIR``), so every compiled run pays the whole
compilation. Per run: the command's wall time; the first epoch, from the command's start
(imports, data, compilation); the median of the later epochs, from the once-an-epoch
``train/loss`` events of its TensorBoard log; and a test metric of its final evaluation, to show
the compiled run learns the same. ``--repeats`` alternates eager and compiled runs, so that
both sides see the same machine.

    PROTOS_DATA_DIR=../shared/data python benchmarks/compile_speed.py --epochs 4 --repeats 2
    PROTOS_DATA_DIR=../shared/data python benchmarks/compile_speed.py --config configs/aecm_mnist.yaml \
        --epochs 4 --repeats 2

Prints a Markdown table and appends rows to ``benchmarks/results/compile.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from overhead import device_label, write_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compile.csv"
COLUMNS = [
    "config", "precision", "epochs", "compiled", "total_s", "first_epoch_s", "epoch_s", "metric", "value", "device",
]  # fmt: skip
METRICS = ("knn_acc", "acc")  # the first the run's metrics.json has is reported


def epoch_ends(run: Path) -> list[float]:
    """Wall times of the once-an-epoch ``train/loss`` events, in step order."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.wall_time for e in sorted(acc.Scalars("train/loss"), key=lambda e: e.step)]


def fit(config: str, epochs: int, precision: str, compiled: bool, tmp: Path, modules: str | None = None) -> dict:
    root = tmp / ("compiled" if compiled else "eager")
    cmd = [
        sys.executable, "-m", "lightning_protos.cli", "fit", "--config", config, "--seed_everything", "0",
        "--trainer.max_epochs", str(epochs), "--trainer.precision", precision,
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--compile.enabled", str(compiled).lower(), *(["--compile.modules", modules] if modules else []),
    ]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor" / root.name)}
    start, wall = time.perf_counter(), time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - start
    run = root / "lightning_logs" / "version_0"
    ends = epoch_ends(run)
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    metric = next(m for m in METRICS if m in metrics)
    return {
        "config": Path(config).name,
        "precision": precision,
        "epochs": epochs,
        "compiled": compiled,
        "total_s": round(total, 1),
        "first_epoch_s": round(ends[0] - wall, 1),  # from the command's start: imports and data included
        "epoch_s": round(statistics.median(b - a for a, b in itertools.pairwise(ends)), 2),
        "metric": metric,
        "value": round(float(metrics[metric]), 4),
        "device": device_label(torch.device("cpu")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vaesim_pneumonia.yaml")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--repeats", type=int, default=1, help="eager / compiled pairs, alternating")
    parser.add_argument("--modules", help="what to compile, as protos fit's --compile.modules, e.g. '[cm]'")
    args = parser.parse_args()
    print(f"{args.config}, {args.epochs} epochs, {args.precision}, {device_label(torch.device('cpu'))}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for compiled in (False, True):
                rows.append(fit(args.config, args.epochs, args.precision, compiled, Path(tmp) / str(i), args.modules))
                print(rows[-1], flush=True)
    write_rows(rows, COLUMNS, RESULTS)
    for key in ("epoch_s", "total_s"):
        eager, comp = (statistics.median(r[key] for r in rows if r["compiled"] == c) for c in (False, True))
        print(f"{key}: eager {eager}, compiled {comp}: {eager / comp:.2f}x as fast compiled (medians)")


if __name__ == "__main__":
    main()
