"""Bad input to every ``protos`` subcommand: malformed YAML, a missing config file, a checkpoint
of another method, a truncated checkpoint, a data folder holding a corrupt file. Each gets a
one-line error and a non-zero exit, with no traceback, and leaves every existing run directory
and checkpoint as it was (the CLI runs in-process here; ``main`` is the console entry point)."""

from __future__ import annotations

import hashlib
import traceback

import lightning as L
import numpy as np
import pytest
import torch

from lightning_protos.cli import main
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM

SUBCOMMANDS = ["fit", "validate", "test", "predict"]
CM_DIGITS = """seed_everything: 0
model:
  class_path: lightning_protos.methods.cm.CM
  init_args: {n_clusters: 10, alpha: 20.0}
data:
  class_path: lightning_protos.data.Digits
  init_args: {batch_size: 256, flatten: true}
trainer: {max_epochs: 1, default_root_dir: ROOT}
"""


def protos(argv: list[str], capsys) -> tuple[int, str]:
    """Runs ``protos argv``: its exit status and its stderr; any other exception fails the test
    (it would print a traceback)."""
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except Exception:  # pragma: no cover - the failure this file looks for
        pytest.fail(f"protos {' '.join(argv)} raised instead of a one-line error:\n{traceback.format_exc()}")
    else:
        code = 0
    err = capsys.readouterr().err.strip()
    if isinstance(code, str):  # sys.exit("protos: error: ...") prints the message to stderr
        err, code = "\n".join(filter(None, [err, code])), 1
    return code, err


def snapshot(root) -> dict[str, tuple[int, str]]:
    """mtime and content hash of every file under ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An existing run (its directory, checkpoint and metrics) and the bad inputs."""
    tmp = tmp_path_factory.mktemp("sweep")
    runs = tmp / "runs"
    run = runs / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text('{"test": {"acc": 0.9}}')
    L.seed_everything(0, verbose=False)
    other = AECM(10, (64,), latent_dim=4, hidden=(8,))  # another method than the configs' CM
    bare = {"state_dict": other.state_dict(), "pytorch-lightning_version": L.__version__, "epoch": 0, "global_step": 0}
    torch.save({**bare, "hyper_parameters": dict(other.hparams)}, run / "checkpoints" / "last.ckpt")
    torch.save(bare, run / "checkpoints" / "other_no_hparams.ckpt")  # the weights alone reach the model
    saved = {"_class_path": "lightning_protos.methods.aecm.AECM", **other.hparams}  # as the CLI saves them
    torch.save({**bare, "hyper_parameters": saved}, run / "checkpoints" / "other_class_path.ckpt")
    narrow = CM(10, (32,), alpha=20.0)  # the configs' CM, trained on 32 features instead of digits' 64
    hparams = {"_class_path": "lightning_protos.methods.cm.CM", **narrow.hparams}  # as the CLI saves them
    state = {"state_dict": narrow.state_dict(), "hyper_parameters": hparams}
    torch.save({**bare, **state}, run / "checkpoints" / "narrow.ckpt")
    good = tmp / "cm_digits.yaml"
    good.write_text(CM_DIGITS.replace("ROOT", str(runs)))
    bad_yaml = tmp / "malformed.yaml"
    bad_yaml.write_text("model: {class_path: lightning_protos.methods.cm.CM, init_args: [unclosed\n  - : :\n")
    truncated = tmp / "truncated.ckpt"
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    npz = tmp / "corrupt.npz"
    npz.write_bytes(b"PK\x03\x04 this is not a zip archive")
    arrays = tmp / "arrays.npz"  # a sound zip archive, but not a checkpoint
    np.savez(arrays, X=np.zeros((3, 2)))
    array_file = tmp / "array_file.yaml"
    array_file.write_text(
        CM_DIGITS.replace("ROOT", str(runs))
        .replace("lightning_protos.data.Digits", "lightning_protos.data.ArrayFile")
        .replace("{batch_size: 256, flatten: true}", f"{{path: {npz}, batch_size: 256}}")
    )
    mnist_root = tmp / "mnist_root"
    raw = mnist_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(b"\x00\x00\x08\x03 corrupt")
    mnist = tmp / "mnist.yaml"
    mnist.write_text(
        CM_DIGITS.replace("ROOT", str(runs))
        .replace("lightning_protos.data.Digits", "lightning_protos.data.MNIST")
        .replace("batch_size: 256, flatten: true", f"data_dir: {mnist_root}, download: false, flatten: true")
    )
    return {"tmp": tmp, "runs": runs, "good": good, "bad_yaml": bad_yaml, "truncated": truncated,
            "other": run / "checkpoints" / "last.ckpt", "bare": run / "checkpoints" / "other_no_hparams.ckpt",
            "narrow": run / "checkpoints" / "narrow.ckpt", "class_path": run / "checkpoints" / "other_class_path.ckpt",
            "arrays": arrays,
            "array_file": array_file, "mnist": mnist}  # fmt: skip


def cases(sub: str, i: dict) -> dict[str, tuple[list[str], str]]:
    """The bad invocations of subcommand ``sub``, by name, each with what its error must say."""
    good, ckpt = ["--config", str(i["good"])], "--ckpt_path"
    return {
        "malformed YAML": ([sub, "--config", str(i["bad_yaml"])], "Problems parsing config"),
        "missing config": ([sub, "--config", str(i["tmp"] / "no_such.yaml")], "no_such.yaml"),
        "checkpoint of another method": ([sub, *good, ckpt, str(i["other"])], "hyperparameters do not fit"),
        "class of another method": (
            [sub, *good, ckpt, str(i["class_path"])],
            "holds a model of class lightning_protos.methods.aecm.AECM, the config's model is "
            "lightning_protos.methods.cm.CM",
        ),
        "weights of another method": ([sub, *good, ckpt, str(i["bare"])], "does not fit this CM"),
        "arrays as checkpoint": ([sub, *good, ckpt, str(i["arrays"])], "is a zip archive but not a PyTorch checkpoint"),
        "folder as checkpoint": ([sub, *good, ckpt, str(i["tmp"])], "is a folder: name a file in it"),
        "data of another shape": (
            [sub, *good, ckpt, str(i["narrow"])],
            "trained on inputs of shape (32,), these data give (64,)",
        ),
        "truncated checkpoint": ([sub, *good, ckpt, str(i["truncated"])], "truncated.ckpt is unreadable"),
        "corrupt .npz": ([sub, "--config", str(i["array_file"])], "cannot read"),
        "corrupt MNIST file": ([sub, "--config", str(i["mnist"])], "expected MNIST/raw/train-images-idx3-ubyte"),
    }


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_bad_input_gets_one_line_and_leaves_existing_runs_alone(inputs, sub, capsys, monkeypatch):
    monkeypatch.chdir(inputs["tmp"])
    before = snapshot(inputs["tmp"])
    for name, (argv, says) in cases(sub, inputs).items():
        code, err = protos(argv, capsys)
        assert code != 0, f"{sub}, {name}: exit status 0"
        assert err.startswith("protos: error: "), f"{sub}, {name}: {err!r}"
        assert says in err, f"{sub}, {name}: {err!r}"
        assert "\n" not in err, f"{sub}, {name}: {err!r}"
        assert "Traceback" not in err
    after = snapshot(inputs["tmp"])
    assert after == before  # nothing written, rewritten or deleted: no run directory of a failed command


def test_bench_bad_input_gets_one_line(inputs, capsys, monkeypatch):
    monkeypatch.chdir(inputs["tmp"])
    before = snapshot(inputs["tmp"])
    for name, (argv, says) in {
        "malformed YAML": (["bench", "--config", str(inputs["bad_yaml"])], ": not YAML"),
        "missing config": (["bench", "--config", str(inputs["tmp"] / "no_such.yaml")], "no_such.yaml: no such bench"),
    }.items():
        code, err = protos(argv, capsys)
        assert code != 0, f"bench, {name}: exit status 0"
        assert err.startswith("protos bench: error: "), f"bench, {name}: {err!r}"
        assert says in err, f"bench, {name}: {err!r}"
        assert "\n" not in err, f"bench, {name}: {err!r}"
    after = snapshot(inputs["tmp"])
    assert {k: v for k, v in after.items() if k in before} == before
