"""benchmarks/conv_layout.py (NHWC against NCHW training steps): its NCHW side really runs the
conv nets in NCHW and gives the layout back; a tiny run writes a row per case and precision.
What is timed is not asserted."""

import csv
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import conv_layout  # noqa: E402


def layouts(model: nn.Module) -> set[bool]:
    """For each conv weight of ``model``: is it channels-last (a 1-channel weight can be both)?"""
    return {
        m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and m.weight.shape[1] > 1
    }


def test_nchw_side_runs_in_nchw_and_restores_channels_last():
    model = conv_layout.CASES["vaesim"]()
    maps = []
    model.encoder.features[0].register_forward_hook(lambda m, args, out: maps.append(out))
    x = torch.rand(2, 1, 28, 28)
    with conv_layout.nchw(model):
        assert layouts(model) == {False}
        model.embed(x)
    model.embed(x)
    assert layouts(model) == {True}
    assert maps[0].is_contiguous()
    assert maps[1].is_contiguous(memory_format=torch.channels_last)
    assert not maps[1].is_contiguous()


def test_tiny_run_writes_a_row_per_case_and_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOS_DATA_DIR", str(tmp_path))  # no MNIST there: random images
    out = tmp_path / "layout.csv"
    conv_layout.main(
        ["--batch", "40", "--steps", "2", "--rounds", "1", "--precisions", "32-true", "--out", str(out)]
    )  # fmt: skip
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["precision"]) for r in rows] == [("vaesim", "32-true"), ("protovae", "32-true")]
    for r in rows:
        assert float(r["speedup"]) == pytest.approx(float(r["nchw_s"]) / float(r["nhwc_s"]), rel=0.02)
