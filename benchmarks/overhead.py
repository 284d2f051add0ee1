"""Framework overhead: one ``protos fit`` epoch against a hand-written PyTorch loop.

Both sides train the same network on the same in-memory uint8 data (scaled to [0, 1] per
batch), with the same batch size, loss terms and Adam update, in one process, alternating
(plain, protos, plain, protos, ...) so that both see the same machine load; the best of
``--repeats`` epochs is kept on each side.

* protos: ``ProtosCLI`` (what ``protos fit`` runs) on the method's MNIST config, with one
  epoch, progress bar off, TensorBoard logger and ``last.ckpt`` on as in normal use, no
  validation (the configs validate every 10-25 epochs) and no averaging epoch. Its time runs
  from ``on_train_start`` to ``on_train_end``: the whole training epoch with Lightning's
  loop, the DataLoader over ``__getitems__`` batches, the method's ``training_step`` (its
  NaN check and term sums included), the epoch-end logging and the checkpoint save;
  argument parsing and reading the data are not counted.
* plain: a shuffled index, a slice of the tensor, forward, the same loss terms, a finite
  check, ``zero_grad / backward / step``.

Cases: ``cm`` (the clustering module on 784-d inputs, ``configs/cm_mnist.yaml``: batch 111)
and ``aecm`` (AE-CM^r, the 784-500-500-2000-10 autoencoder with a CM on its code,
``configs/aecm_mnist.yaml``: batch 500, joint phase). Data: random uint8 images of MNIST's
shape, or the real MNIST when ``$PROTOS_DATA_DIR`` holds it (``--data auto``).

    python benchmarks/overhead.py                      # both cases, fp32 and bf16-mixed
    python benchmarks/overhead.py --n 2000 --out /tmp/overhead.csv   # a quick check
    python benchmarks/overhead.py --cases cm --steps-per-batch 1 8    # CM with model.step_batch

Prints a Markdown table and appends rows (case, precision, lightning_s, plain_s, ratio,
device) to ``benchmarks/results/overhead.csv``.

``--breakdown`` says where CM's difference goes, inside one real ``protos fit`` of it:
each piece Lightning wraps around a step (``manual_backward`` against ``loss.backward()``,
``LightningOptimizer.step`` against the optimizer's own step, ``check_and_log`` against a
plain sum and finite check, a batch from the DataLoader against a slice of the tensor, one
round of a callback hook over the trainer's callbacks) is
timed on the run's own model, optimizer and a batch of its data, and the callback-hook rounds
around each loaded batch (beside the two of ``manual_backward`` and the one of the optimizer
step, inside their timings) are counted over real training batches, so the pieces add up. Rows (case,
piece, count_per_step, protos_us, plain_us, extra_us_per_step, device) go to
``benchmarks/results/overhead_breakdown.csv``:

    python benchmarks/overhead.py --breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import logging
import os
import platform
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from torch import Tensor

from lightning_protos.cli import ProtosCLI
from lightning_protos.data import MNIST
from lightning_protos.hardware import cpu_has_native_bf16, usable_cores
from lightning_protos.methods.base import adam
from lightning_protos.nets import ClusteringModule, MLPAutoencoder
from lightning_protos.ops import aecm_terms, cm_terms

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cm": ROOT / "configs" / "cm_mnist.yaml", "aecm": ROOT / "configs" / "aecm_mnist.yaml"}
DEFAULT_REPEATS = {"cm": 3, "aecm": 1}
# Training batches per epoch on a CPU (None: the whole epoch). A full AE-CM epoch on MNIST
# (140 batches of 500) takes minutes on 2 CPU cores; its steps are uniform, so a shorter
# epoch gives the same ratio. On a GPU every epoch is whole unless --max-batches says so.
CPU_MAX_BATCHES = {"cm": None, "aecm": 30}


# -- data ---------------------------------------------------------------------------------------


def load_images(kind: str, n: int, seed: int = 0) -> tuple[Tensor, str]:
    """``(n, 784)`` uint8 images: MNIST (all 70,000, then the first ``n``) or random pixels."""
    root = os.environ.get("PROTOS_DATA_DIR")
    has_mnist = root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    if kind == "mnist" or (kind == "auto" and has_mnist):
        splits = MNIST(fit_on="all", flatten=True, download=False).splits
        return torch.cat([x for x, _ in splits.values()])[:n].contiguous(), "mnist"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=g), "random"


# -- the plain PyTorch side -----------------------------------------------------------------------


def plain_epoch(
    step: Callable[[Tensor], Tensor], params, x_u8: Tensor, batch_size: int, lr: float, eps: float,
    device: torch.device, precision: str, max_batches: int | None,
) -> float:  # fmt: skip
    """Seconds for one shuffled epoch (or its first ``max_batches``) of Adam steps on
    ``step(x) -> loss``, with the methods' Adam (fused)."""
    opt = adam(params, lr, eps)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    sync()
    start = time.perf_counter()
    order = torch.randperm(len(x_u8))
    for b, i in enumerate(range(0, len(x_u8), batch_size)):
        if max_batches is not None and b == max_batches:
            break
        x = x_u8[order[i : i + batch_size]].float().div_(255.0).to(device)
        with autocast:
            loss = step(x)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss in the plain loop")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - start


def plain_cm(init: dict, device: torch.device):
    """The CM's training step (Eq. 7) on a bare ``ClusteringModule``."""
    cm = ClusteringModule(784, init["n_clusters"]).to(device)
    alpha = init["alpha"]

    def step(x: Tensor) -> Tensor:
        return sum(cm_terms(x, cm(x), cm.centroids(), alpha).values())

    return step, list(cm.parameters())


def plain_aecm(init: dict, device: torch.device):
    """AE-CM's joint step (Eq. 10) on a bare ``MLPAutoencoder`` + ``ClusteringModule``."""
    hidden = tuple(init.get("hidden", (500, 500, 2000)))
    p, k = init.get("latent_dim", 10), init["n_clusters"]
    ae = MLPAutoencoder(784, hidden, p, init.get("slope", 0.2)).to(device)
    cm = ClusteringModule(p, k).to(device)
    alpha, beta, lam = init["alpha"], init.get("beta", 5.0), init.get("lam", 1.0)

    def step(x: Tensor) -> Tensor:
        z, x_rec = ae(x)
        return sum(aecm_terms(x, x_rec, z, cm(z), cm.centroids(), alpha, beta, lam).values())

    return step, [*ae.parameters(), *cm.parameters()]


PLAIN = {"cm": plain_cm, "aecm": plain_aecm}


# -- the protos side -----------------------------------------------------------------------------


class TrainTimer(L.Callback):
    """Wall time from ``on_train_start`` to ``on_train_end``, and the optimizer steps taken."""

    def on_train_start(self, trainer, pl_module) -> None:
        sync()
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        sync()
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step


def fit_one_epoch(
    case: str, npz: Path, run_dir: Path, accelerator: str, extra: list[str], callback: L.Callback
) -> None:
    """``protos fit`` of one epoch of the case's config on the data in ``npz``, as in normal use
    (TensorBoard logger, checkpoints) but without progress bar, averaging epoch or final test."""
    args = [
        "fit", "--config", str(CONFIGS[case]),
        "--data", "lightning_protos.data.ArrayFile", "--data.init_args.path", str(npz),
        "--model.init_args.average_last_epoch", "false", "--trainer.max_epochs", "1",
        "--trainer.accelerator", accelerator, "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir), "--final_test", "false", *extra,
    ]  # fmt: skip
    ProtosCLI(args=args, trainer_defaults={"callbacks": [callback]})


def protos_epoch(
    case: str, npz: Path, n: int, run_dir: Path, precision: str, accelerator: str, max_batches: int | None,
    batch_size: int, steps_per_batch: int,
) -> float:  # fmt: skip
    """Seconds of one ``protos fit`` training epoch on the case's config; with
    ``steps_per_batch`` > 1 (CM) each loaded batch holds that many Adam steps of ``batch_size``."""
    timer = TrainTimer()
    limit = [] if max_batches is None else ["--trainer.limit_train_batches", str(-(-max_batches // steps_per_batch))]
    if steps_per_batch > 1:
        limit += [
            "--data.init_args.batch_size", str(batch_size * steps_per_batch),
            "--model.init_args.step_batch", str(batch_size),
        ]  # fmt: skip
    fit_one_epoch(case, npz, run_dir, accelerator, ["--trainer.precision", precision, *limit], timer)
    n_batches = -(-n // batch_size)
    steps = n_batches if max_batches is None else min(n_batches, max_batches)
    if (max_batches is None or steps_per_batch == 1) and timer.steps != steps:  # the same Adam steps
        raise RuntimeError(f"protos took {timer.steps} optimizer steps, the plain loop {steps}")
    return timer.seconds


# -- where the time goes ------------------------------------------------------------------------


def paired_us(protos: Callable[[], object], plain: Callable[[], object], n: int) -> tuple[float, float]:
    """Median microseconds of ``protos()`` and of ``plain()`` over ``n`` calls each, the two
    alternating so that both see the same machine load."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(2 * n + 2):
        fn, out = (protos, times[0]) if i % 2 == 0 else (plain, times[1])
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= 2:  # one warm-up call each
            out.append((time.perf_counter() - start) * 1e6)
    return float(np.median(times[0])), float(np.median(times[1]))


class Breakdown(L.Callback):
    """Times Lightning's pieces around a step on the running model (at ``on_train_start``), then
    counts the callback-hook rounds of the training batches that follow."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.batch_hook_calls = 0  # rounds around the loaded batches; those around each backward
        self.counting, self.first_step = False, 0  # and optimizer step are inside their timings
        self.rows: dict[str, dict] = {}

    def on_train_batch_start(self, *args) -> None:
        self.batch_hook_calls += self.counting  # not during the timings (they step the optimizer too)

    def on_train_batch_end(self, *args) -> None:
        self.batch_hook_calls += self.counting

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.trainer import call

        loader = trainer.datamodule.train_dataloader()
        x = loader.dataset.__getitems__(list(range(loader.batch_size)))["x"].to(pl_module.device)
        opt = pl_module.optimizers()
        loss_fn = self.loss_fn(pl_module)
        params = [p for group in opt.optimizer.param_groups for p in group["params"]]
        n = self.n

        def plain_backward():
            for p in params:
                p.grad = None
            loss_fn(x).backward()

        def protos_backward():
            for p in params:
                p.grad = None
            pl_module.manual_backward(loss_fn(x))

        terms = {k: v.detach() for k, v in self.terms_fn(pl_module)(x).items()}

        def plain_sum():
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError

        saved = (dict(pl_module._term_sums), pl_module._term_steps, dict(pl_module._loss_keys))

        def hook_round():
            call._call_callback_hooks(trainer, "on_before_zero_grad", opt)

        x_u8, batches = loader.dataset.x, iter(loader)
        order = torch.randperm(len(x_u8))

        def protos_fetch():
            nonlocal batches
            if next(batches, None) is None:  # a new epoch
                batches = iter(loader)

        def plain_fetch():
            i = int(torch.randint(len(x_u8) - len(x), ()))
            x_u8[order[i : i + len(x)]].float().div_(255.0)

        pieces = {
            "backward (manual_backward vs loss.backward, forward included)": (
                1, *paired_us(protos_backward, plain_backward, n)),
            "optimizer step (LightningOptimizer.step vs Adam.step)": (1, *paired_us(opt.step, opt.optimizer.step, n)),
            "loss sum and finite check (check_and_log vs sum + isfinite)": (
                1, *paired_us(lambda: pl_module.check_and_log(dict(terms)), plain_sum, n)),
            "batch fetch (DataLoader over __getitems__ vs slicing the tensor)": (
                1, *paired_us(protos_fetch, plain_fetch, n)),
            "one callback-hook round": (None, *paired_us(hook_round, lambda: None, n)),
        }  # fmt: skip
        pl_module._term_sums, pl_module._term_steps, pl_module._loss_keys = saved  # the timing's sums out
        for piece, (count, protos_us, plain_us) in pieces.items():
            self.rows[piece] = {"piece": piece, "count_per_step": count, "protos_us": protos_us, "plain_us": plain_us}
        self.counting, self.first_step = True, trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        steps = max(trainer.global_step - self.first_step, 1)
        row = self.rows.pop("one callback-hook round")
        row["count_per_step"] = self.batch_hook_calls / steps
        row["piece"] = f"one callback-hook round around the batch ({len(trainer.callbacks)} callbacks)"
        self.rows[row["piece"]] = row

    @staticmethod
    def terms_fn(pl_module) -> Callable[[Tensor], dict[str, Tensor]]:
        """CM's loss terms (Eq. 7) on a batch."""
        return lambda x: cm_terms(x, pl_module.cm(x), pl_module.cm.centroids(), pl_module.hparams.alpha)

    def loss_fn(self, pl_module) -> Callable[[Tensor], Tensor]:
        terms = self.terms_fn(pl_module)
        return lambda x: sum(terms(x).values())


def breakdown(npz: Path, run_dir: Path, accelerator: str, repeats: int, max_batches: int) -> list[dict]:
    """Rows of :class:`Breakdown` for one ``protos fit`` epoch of CM (fp32) on ``max_batches``."""
    case = "cm"
    probe = Breakdown(n=repeats)
    fit_one_epoch(case, npz, run_dir, accelerator, ["--trainer.limit_train_batches", str(max_batches)], probe)
    rows = []
    for row in probe.rows.values():
        extra = (row["protos_us"] - row["plain_us"]) * row["count_per_step"]
        rows.append({"case": case, **row, "extra_us_per_step": extra})
    return rows


# -- running -------------------------------------------------------------------------------------


@functools.cache
def has_cuda() -> bool:
    return torch.cuda.is_available()  # tens of microseconds a call: asked once


def sync() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def device_label(device: torch.device) -> str:
    """``h100``, ``a6000``, ... or the CPU's cores, vector extension and bf16 hardware:
    ``cpu-2core-avx512-bf16``, ``cpu-2core-avx2`` (RESULTS.md). Rows before 2026-12-06 say
    ``cpu-2core``: the AVX-512 BF16 box."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        m = re.search(r"\b([A-Z]+\d{2,4})\b", name)
        return (m.group(1) if m else name).lower().replace(" ", "-")
    bf16 = "-bf16" if cpu_has_native_bf16() else ""
    return f"cpu-{usable_cores()}core-{torch.backends.cpu.get_cpu_capability().lower()}{bf16}"


def run_case(case, x_u8, precisions, repeats, max_batches, device, accelerator, tmp: Path, steps_per_batch=1):
    config = yaml.safe_load(CONFIGS[case].read_text())
    init, batch_size = config["model"]["init_args"], config["data"]["init_args"]["batch_size"]
    npz = tmp / f"{case}.npz"
    np.savez(npz, X=x_u8.numpy(), y=np.zeros(len(x_u8), dtype=np.int64))
    rows = []
    for precision in precisions:
        plain_s, protos_s = [], []
        for r in range(repeats):
            torch.manual_seed(r)
            step, params = PLAIN[case](init, device)
            plain_s.append(
                plain_epoch(
                    step,
                    params,
                    x_u8,
                    batch_size,
                    init["lr"],
                    init.get("adam_eps", 1e-8),
                    device,
                    precision,
                    max_batches,
                )
            )
            run_dir = tmp / f"{case}_{precision}_{steps_per_batch}_{r}"
            protos_s.append(
                protos_epoch(
                    case, npz, len(x_u8), run_dir, precision, accelerator, max_batches, batch_size, steps_per_batch
                )
            )
        lightning, plain = min(protos_s), min(plain_s)
        rows.append(
            {
                "case": case,
                "precision": precision,
                "steps_per_batch": steps_per_batch,
                "lightning_s": round(lightning, 3),
                "plain_s": round(plain, 3),
                "ratio": round(lightning / plain, 3),
                "device": device_label(device),
            }
        )
        n_batches = -(-len(x_u8) // batch_size)
        steps = n_batches if max_batches is None else min(n_batches, max_batches)
        print(
            f"  {case} {precision}, {steps} steps of {batch_size} ({steps_per_batch} per loaded batch): protos "
            f"{[round(t, 3) for t in protos_s]} s, plain {[round(t, 3) for t in plain_s]} s",
            flush=True,
        )
    return rows


def quiet_setup(threads: int) -> None:
    """Warnings and Lightning's info lines off; ``threads`` torch CPU threads (0: default)."""
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def print_machine(n: int, source: str, device: torch.device) -> None:
    print(
        f"{n} {source} images, {device_label(device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        flush=True,
    )


def write_rows(rows: list[dict], cols: list[str], out: Path) -> None:
    """Prints ``rows`` as a Markdown table and appends them to the CSV ``out``."""
    print("\n| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"rows appended to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=70000, help="samples (MNIST has 70,000)")
    parser.add_argument("--cases", nargs="+", default=["cm", "aecm"], choices=sorted(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--repeats", type=int, default=None, help="epochs per side (best kept)")
    parser.add_argument(
        "--max-batches", type=int, default=None,
        help="batches per epoch, 0 for whole epochs (default: whole, but 30 for aecm on a CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--steps-per-batch", type=int, nargs="+", default=[1, 8],
        help="CM only: Adam steps per loaded batch (model.step_batch); 1 is the configs' setting",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--data", choices=["auto", "mnist", "random"], default="auto")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: benchmarks/results/...)")
    parser.add_argument("--breakdown", action="store_true", help="where CM's time goes (see the module's docstring)")
    args = parser.parse_args(argv)

    quiet_setup(args.threads)
    use_gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_gpu else "cpu")
    accelerator = "gpu" if use_gpu else "cpu"
    x_u8, source = load_images(args.data, args.n)
    print_machine(len(x_u8), source, device)

    results = ROOT / "benchmarks" / "results"
    if args.breakdown:
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "cm.npz"
            np.savez(npz, X=x_u8.numpy(), y=np.zeros(len(x_u8), dtype=np.int64))
            rows = breakdown(npz, Path(tmp) / "cm", accelerator, args.repeats or 500, args.max_batches or 30)
        for row in rows:
            row["device"] = device_label(device)
            for k in ("protos_us", "plain_us", "extra_us_per_step", "count_per_step"):
                row[k] = round(row[k], 1)
        cols = ["case", "piece", "count_per_step", "protos_us", "plain_us", "extra_us_per_step", "device"]
        write_rows(rows, cols, args.out or results / "overhead_breakdown.csv")
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            repeats = args.repeats or DEFAULT_REPEATS[case]
            if args.max_batches is not None:
                max_batches = args.max_batches or None
            else:
                max_batches = None if use_gpu else CPU_MAX_BATCHES[case]
            for spb in args.steps_per_batch if case == "cm" else [1]:
                rows += run_case(case, x_u8, args.precisions, repeats, max_batches, device, accelerator, Path(tmp), spb)

    cols = ["case", "precision", "steps_per_batch", "lightning_s", "plain_s", "ratio", "device"]
    write_rows(rows, cols, args.out or results / "overhead.csv")
    for case in args.cases:
        by_precision = {r["precision"]: r for r in rows if r["case"] == case and r["steps_per_batch"] == 1}
        if {"32-true", "bf16-mixed"} <= set(by_precision):
            speedup = by_precision["32-true"]["lightning_s"] / by_precision["bf16-mixed"]["lightning_s"]
            print(f"{case}: protos bf16-mixed epoch is {speedup:.2f}x the speed of 32-true")


if __name__ == "__main__":
    main()
