"""benchmarks/overhead.py (a protos fit epoch against a plain PyTorch loop): both sides run the
same optimizer steps, and the breakdown counts Lightning's hook rounds per step outside its own
timings. Tiny random data; what is timed is not asserted."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("steps_per_batch", ["1", "4"])
def test_ratio_row_of_a_tiny_cm_epoch(tmp_path, steps_per_batch):
    out = tmp_path / "overhead.csv"
    overhead.main(
        ["--n", "1000", "--cases", "cm", "--precisions", "32-true", "--steps-per-batch", steps_per_batch,
         "--repeats", "1", "--data", "random", "--accelerator", "cpu", "--out", str(out)]
    )  # fmt: skip
    (row,) = read(out)
    assert (row["case"], row["precision"], row["steps_per_batch"]) == ("cm", "32-true", steps_per_batch)
    # the ratio of the unrounded times (the seconds are rounded to 3 decimals)
    assert float(row["ratio"]) == pytest.approx(float(row["lightning_s"]) / float(row["plain_s"]), rel=0.05)


def test_protos_epoch_refuses_a_different_number_of_steps(tmp_path, monkeypatch):
    out = tmp_path / "overhead.csv"
    monkeypatch.setattr(overhead, "TrainTimer", type("Short", (overhead.TrainTimer,), {}))

    def on_train_end(self, trainer, pl_module):
        self.seconds, self.steps = 1.0, trainer.global_step - 1

    monkeypatch.setattr(overhead.TrainTimer, "on_train_end", on_train_end)
    with pytest.raises(RuntimeError, match="optimizer steps"):
        overhead.main(
            ["--n", "500", "--cases", "cm", "--precisions", "32-true", "--steps-per-batch", "1",
             "--repeats", "1", "--data", "random", "--accelerator", "cpu", "--out", str(out)]
        )  # fmt: skip


def test_breakdown_counts_hook_rounds_outside_its_timings(tmp_path):
    out = tmp_path / "breakdown.csv"
    overhead.main(
        ["--n", "2000", "--breakdown", "--repeats", "5", "--max-batches", "12", "--data", "random",
         "--accelerator", "cpu", "--out", str(out)]
    )  # fmt: skip
    rows = {r["piece"].split(" (")[0]: r for r in read(out)}
    assert set(rows) == {
        "backward",
        "optimizer step",
        "loss sum and finite check",
        "batch fetch",
        "one callback-hook round around the batch",
    }
    # Lightning's loop calls the batch-start and batch-end hooks once a batch (one step each here);
    # counting during the timings, or the backward and optimizer hooks, would give more
    assert float(rows["one callback-hook round around the batch"]["count_per_step"]) == 2
    for r in rows.values():
        assert float(r["extra_us_per_step"]) == pytest.approx(
            (float(r["protos_us"]) - float(r["plain_us"])) * float(r["count_per_step"]), abs=0.5
        )
