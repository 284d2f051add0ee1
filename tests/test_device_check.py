"""benchmarks/device_check.sh (the GPU checks of one device call), run on this CPU with
``ACCEL=cpu``: it installs from the bundle, unpacks the data, and leaves a flat $OUT with the
AE-CM run's final evaluation and curve. Needs ``make device-bundle`` (skipped without it)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".device" / "wheels").is_dir(), reason="no .device bundle: make device-bundle")
def test_device_check_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ, "ACCEL": "cpu", "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1",
        "DEVICE_DATA_DIR": str(tmp_path / "data"), "AECM_ARGS": "--trainer.check_val_every_n_epoch 1",
    }  # fmt: skip
    subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "25"], env=env, check=True)
    files = {p.name for p in out.iterdir()}
    assert files == {
        "machine.txt", "gpu_tests.log", "overhead.csv", "aecm.log", "aecm_seconds.txt", "aecm_metrics.json",
        "aecm_curve.csv",
    }  # fmt: skip
    assert all(p.is_file() for p in out.iterdir())  # flat: the device tool returns 2 folders down at most
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 47040016
    test = json.loads((out / "aecm_metrics.json").read_text())["test"]
    assert test["epoch"] >= 1
    assert 0 < test["ari"] <= 1
    with open(out / "aecm_curve.csv") as f:
        tags = {row["tag"] for row in csv.DictReader(f)}
    assert tags == {"val/ari", "val/acc"}
