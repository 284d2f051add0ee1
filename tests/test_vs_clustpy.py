"""benchmarks/vs_clustpy.py (our DEC family against ClustPy's): both sides start from the same
network and centres, and a tiny run writes complete rows. Skipped without the ``bench`` extra."""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from conftest import ROOT

pytest.importorskip("clustpy", reason="ClustPy is an optional benchmark dependency: pip install -e '.[bench]'")
sys.path.insert(0, str(ROOT / "benchmarks"))
import vs_clustpy


@pytest.mark.parametrize("method", ["idec", "dkm"])  # LeakyReLU 0.2 and ReLU networks
def test_clustpy_network_starts_where_ours_does(tmp_path, method):
    x, y, _ = vs_clustpy.load_data("random", 300)
    model = vs_clustpy.config(method, "random")["model"]
    args = {**model["init_args"], "class_path": model["class_path"]}
    start = vs_clustpy.make_start(args, x, y, seed=0, n_init=1, pretrain_epochs=0, folder=tmp_path)
    ours = vs_clustpy.build_method(args)
    ours.ae.load_state_dict(start.ae_state)
    theirs = vs_clustpy.clustpy_network(vs_clustpy.import_clustpy(), ours, start)
    features = x[:50].float() / 255
    with torch.no_grad():
        z, x_rec = ours.ae(features)
        torch.testing.assert_close(theirs.encode(features), z)
        torch.testing.assert_close(theirs.decode(z), x_rec)
    assert start.centres.shape == (10, 10)
    assert start.labels.shape == (300,)


def test_tiny_run_writes_one_row_per_side(tmp_path):
    out = tmp_path / "vs.csv"
    argv = ["--methods", "dcn", "--n", "300", "--epochs", "1", "--repeats", "1", "--data", "random"]
    rows = vs_clustpy.main([*argv, "--precisions", "32-true", "--kmeans-n-init", "1", "--out", str(out)])
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == vs_clustpy.COLUMNS
    assert [(r["side"], r["precision"]) for r in written] == [("clustpy", "32-true"), ("protos", "32-true")]
    clustpy, protos = rows  # (the same start on both sides: the test above)
    assert protos["speedup"] == pytest.approx(clustpy["epoch_s"] / protos["epoch_s"], rel=0.01)
    for row, written_row in zip(rows, written, strict=True):
        assert (row["method"], row["init"], row["n"], row["epochs"]) == ("dcn", "random", 300, 1)
        assert row["epoch_s"] > 0
        assert row["target_ari"] == vs_clustpy.PAPER_ARI["dcn", "random"]
        assert float(written_row["ari"]) == row["ari"]


def test_clustpy_side_can_have_the_fused_adam(tmp_path, monkeypatch):
    made = []

    class Recorded(torch.optim.Adam):
        def __init__(self, params, **kwargs) -> None:
            made.append(kwargs.get("fused"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(vs_clustpy.torch.optim, "Adam", Recorded)
    argv = ["--methods", "dcn", "--n", "300", "--epochs", "1", "--repeats", "1", "--data", "random"]
    rows = vs_clustpy.main(
        [
            *argv,
            "--precisions",
            "32-true",
            "--kmeans-n-init",
            "1",
            "--clustpy-fused-adam",
            "--out",
            str(tmp_path / "v.csv"),
        ]
    )
    assert [r["side"] for r in rows] == ["clustpy-fused", "protos"]
    assert made[0] is True  # ClustPy's optimizer, built by the benchmark before ours


def test_start_from_a_pretraining_cache_entry(tmp_path):
    """--pretrained-ae: both sides start from a run's cached DAE; another data size is refused."""
    from lightning_protos.methods.pretrain import PretrainCache

    x, y, _ = vs_clustpy.load_data("random", 300)
    model = vs_clustpy.config("dec", "pretrained")["model"]
    args = {**model["init_args"], "class_path": model["class_path"]}
    donor = vs_clustpy.build_method(args)
    torch.nn.init.normal_(donor.ae.encoder[0].weight)  # weights no fresh seeded network has
    key = {"data": {"name": "random", "n": 300}, "seed": 0, "epochs": 50}
    entry = PretrainCache(tmp_path / "cache").save(key, donor.ae)
    start = vs_clustpy.make_start(args, x, y, 0, 1, pretrain_epochs=50, folder=tmp_path, ae_file=entry)
    for name, value in donor.ae.state_dict().items():
        torch.testing.assert_close(start.ae_state[name], value)
    assert not list(tmp_path.glob("dae_*.pt"))  # nothing pretrained here
    with pytest.raises(SystemExit, match="pretrained on 300 samples, not --n 256"):
        vs_clustpy.make_start(args, x[:256], y[:256], 0, 1, pretrain_epochs=50, folder=tmp_path, ae_file=entry)


def test_pretrained_ae_needs_the_pretrained_init(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vs_clustpy.main(["--data", "random", "--n", "300", "--pretrained-ae", str(tmp_path / "x.pt")])
    assert "--pretrained-ae needs --init pretrained" in capsys.readouterr().err


def test_dec_can_run_clustpys_batch_target_on_our_side(tmp_path, monkeypatch):
    built = []
    build = vs_clustpy.build_method

    def recorded(args, **overrides):
        built.append(args)
        return build(args, **overrides)

    monkeypatch.setattr(vs_clustpy, "build_method", recorded)
    argv = ["--methods", "dec", "--n", "300", "--epochs", "1", "--repeats", "1", "--data", "random"]
    options = ["--precisions", "32-true", "--kmeans-n-init", "1", "--dec-target", "batch"]
    rows = vs_clustpy.main([*argv, *options, "--out", str(tmp_path / "v.csv")])
    assert [r["side"] for r in rows] == ["clustpy", "protos-batch-target"]
    assert {(a.get("target"), a.get("tol")) for a in built} == {("batch", None)}
