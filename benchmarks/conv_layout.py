"""The conv nets' memory layout: channels-last (NHWC, what nets/conv.py and nets/protovae.py
use) against the default NCHW, on real training steps.

Each case trains its method through Lightning on MNIST (random images of MNIST's shape when
``$PROTOS_DATA_DIR`` lacks it) for ``--steps`` steps per round, at ``--batch`` images a step,
the two layouts alternating round by round so that both see the same machine load; a round's
first step (oneDNN picks its kernels) is not counted and the median step of all rounds is kept.
The NCHW side is the same code with the conv weights turned back to NCHW and the nets'
``channels_last`` conversion replaced by ``contiguous``: the layout is the only difference.

Cases: ``vaesim`` (VAESim's conv encoder/decoder, 32x32, K = 40, latent 32) and ``protovae``
(ProtoVAE's MNIST nets).

    OMP_NUM_THREADS=1 PROTOS_DATA_DIR=../shared/data python benchmarks/conv_layout.py
    python benchmarks/conv_layout.py --cases vaesim --precisions bf16-mixed --steps 3 --rounds 1

Prints a Markdown table and appends rows (case, precision, batch, nchw_s, nhwc_s, speedup,
device) to ``benchmarks/results/conv_layout.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from overhead import device_label, print_machine, quiet_setup, write_rows
from torch import nn

import lightning_protos.nets.conv as conv_nets
import lightning_protos.nets.protovae as protovae_nets
from lightning_protos.data import MNIST, ArrayFile, DataError
from lightning_protos.methods.protovae import ProtoVAE
from lightning_protos.methods.vaesim import VAESim

CASES = {
    "vaesim": lambda: VAESim(n_clusters=40, input_shape=(1, 28, 28), latent_dim=32),
    "protovae": lambda: ProtoVAE(n_clusters=10, input_shape=(1, 28, 28)),
}
COLUMNS = ["case", "precision", "batch", "nchw_s", "nhwc_s", "speedup", "device"]


class StepTimer(L.Callback):
    """Seconds of each training step (``on_train_batch_start`` to ``_end``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


@contextlib.contextmanager
def nchw(model: nn.Module):
    """``model`` with its weights in NCHW and the nets' feature maps left NCHW."""
    model.to(memory_format=torch.contiguous_format)
    saved = conv_nets.channels_last, protovae_nets.channels_last
    conv_nets.channels_last = protovae_nets.channels_last = lambda t: t.contiguous()
    try:
        yield
    finally:
        conv_nets.channels_last, protovae_nets.channels_last = saved
        model.to(memory_format=torch.channels_last)


def data(batch: int, tmp: Path) -> L.LightningDataModule:
    """MNIST from ``$PROTOS_DATA_DIR`` if there, else 4,096 random images of its shape (a file in ``tmp``)."""
    try:
        dm = MNIST(batch_size=batch, fit_on="train", download=False)
        dm.setup("fit")  # reads the files now
        return dm
    except DataError:  # no MNIST here: the timings need only its shape
        path = tmp / "random_mnist.npy"
        np.save(path, np.random.default_rng(0).integers(0, 256, (4096, 1, 28, 28), dtype=np.uint8))
        return ArrayFile(path=str(path), batch_size=batch, flatten=False)


def steps(model: nn.Module, dm, precision: str, n_steps: int) -> list[float]:
    """Seconds of ``n_steps`` training steps of ``model``, the first one dropped."""
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=n_steps, limit_val_batches=0, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(model, dm)
    return timer.seconds[1:]


def run_case(case: str, precision: str, batch: int, n_steps: int, rounds: int, tmp: Path) -> dict:
    L.seed_everything(0, verbose=False)
    model, dm = CASES[case](), data(batch, tmp)
    times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
    for _ in range(rounds):
        with nchw(model):
            times["nchw"] += steps(model, dm, precision, n_steps)
        times["nhwc"] += steps(model, dm, precision, n_steps)
    nchw_s, nhwc_s = (statistics.median(times[k]) for k in ("nchw", "nhwc"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "case": case, "precision": precision, "batch": batch, "nchw_s": round(nchw_s, 4),
        "nhwc_s": round(nhwc_s, 4), "speedup": round(nchw_s / nhwc_s, 3), "device": device_label(device),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="steps per round (the first is not counted)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "conv_layout.csv")
    args = parser.parse_args(argv)
    quiet_setup(args.threads)
    print_machine(args.batch, "MNIST-shaped (a batch of)", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run_case(c, p, args.batch, args.steps, args.rounds, Path(tmp)) for c in args.cases for p in args.precisions
        ]
    write_rows(rows, COLUMNS, args.out)


if __name__ == "__main__":
    main()
