"""benchmarks/vade_pretraining.py (the mixture's basin on VaDE's pretrained codes): a tiny run on
real MNIST writes a row per checkpoint, and the mixture on the pretrained codes scores above
chance; the denoising variant zeroes a fifth of the input."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import vade_pretraining


@pytest.fixture
def mnist_dir(shared_data, monkeypatch):
    if not (shared_data / "MNIST").exists():
        pytest.skip("MNIST is not in the offline data folder")
    monkeypatch.setenv("PROTOS_DATA_DIR", str(shared_data))


def test_tiny_run_scores_the_mixture_at_each_checkpoint(mnist_dir):
    rows = vade_pretraining.main(["base", "0", "--epochs", "2", "--every", "1", "--n", "1000"])
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["variant"] == "base" and r["seed"] == 0 for r in rows)
    # 20 steps on 1,000 images is far from converged (~0.25); test clusters scored against the
    # wrong labels would sit at chance (~0.11 for 10 classes)
    assert rows[-1]["acc"] > 0.18


def test_dae_variant_masks_a_fifth_of_the_input_and_base_none():
    x = torch.rand(200, 784) + 0.5  # no zero entries
    torch.testing.assert_close(vade_pretraining.corrupt(x, "base"), x)
    masked = vade_pretraining.corrupt(x, "dae")
    zeroed = masked == 0
    assert abs(zeroed.float().mean().item() - vade_pretraining.MASKED) < 0.01
    torch.testing.assert_close(masked[~zeroed], x[~zeroed])  # the rest is untouched
