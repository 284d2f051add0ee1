"""The ``protos`` command: fit -> test -> predict on digits, every config parses, errors are one
line, and the GPU architecture check."""

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS, ROOT, make_trainer
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_protos import cli, hardware
from lightning_protos.cli import CONTINUED, continue_run, main
from lightning_protos.data import Blobs
from lightning_protos.errors import ProtosError
from lightning_protos.hardware import (
    check_cpu_bf16,
    check_cuda_arch,
    check_device,
    cpu_has_native_bf16,
    usable_cores,
)
from lightning_protos.methods.cm import CM

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """Runs ``protos ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # sys.exit("message") prints the message and exits 1
        err, code = err + code + "\n", 1
    return code or 0, out, err


def protos_error(err: str) -> str:
    """The single ``protos: error:`` line, which must be the last line of stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("protos: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0]
    assert "Traceback" not in err
    assert "usage:" not in err
    return errors[0]


def digits(tmp_path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "cm_digits.yaml"),
        "--trainer.default_root_dir", str(tmp_path), *QUIET, *extra,
    ]  # fmt: skip


def test_best_ckpt_is_the_epoch_with_the_highest_val_acc(tmp_path, capsys):
    """best.ckpt holds the validation with the highest val/acc of the run (as logged to
    TensorBoard), and testing it scores that accuracy (digits: one split, validated and tested
    on the same samples)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = digits(tmp_path, "--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "1")
    code, _, err = run_main(["fit", *args, "--model.init_args.lr", "0.3", "--final_test", "false"], capsys)
    assert code == 0, err
    run = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(run)).Reload()
    accs = [e.value for e in events.Scalars("val/acc")]
    assert len(accs) == 4
    assert len(set(accs)) > 1  # the choice matters
    aris = [e.value for e in events.Scalars("val/ari")]
    assert [e.value for e in events.Scalars("hp_metric")][-4:] == aris  # the HParams tab's score
    best = run / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=False)["epoch"] == int(np.argmax(accs))
    code, _, err = run_main(["test", *digits(tmp_path, "--ckpt_path", str(best))], capsys)
    assert code == 0, err
    tested = json.loads((tmp_path / "lightning_logs" / "version_1" / "metrics.json").read_text())
    assert tested["test"]["acc"] == pytest.approx(max(accs), abs=1e-6)
    assert tested["test"]["epoch"] == int(np.argmax(accs)) + 1  # epochs trained, as its validation counted


def test_a_checkpoint_the_cli_saved_is_refused_by_another_method_s_config(tmp_path, capsys):
    """Lightning's CLI replaces the config's model by the class its checkpoint names: a CM's
    checkpoint given to a DEC config would test (or train on) the CM, silently."""
    code, _, err = run_main(["fit", *digits(tmp_path, "--trainer.max_epochs", "1")], capsys)
    assert code == 0, err
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    dec = [
        "--config", str(ROOT / "configs" / "dec_pendigits.yaml"), "--data", "lightning_protos.data.Digits",
        "--data.init_args.flatten", "true", "--trainer.default_root_dir", str(tmp_path), *QUIET,
    ]  # fmt: skip
    for sub in ("test", "fit"):
        code, _, err = run_main([sub, *dec, "--ckpt_path", str(ckpt)], capsys)
        assert code != 0
        assert (
            "holds a model of class lightning_protos.methods.cm.CM, the config's model is "
            "lightning_protos.methods.dec.DEC" in protos_error(err)
        )
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # no run started


def test_last_checkpoint_keeps_model_checkpoint_s_state_key():
    """Checkpoints written before LastCheckpoint hold its state under ModelCheckpoint's key."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_protos.cli import LastCheckpoint

    assert (
        LastCheckpoint(filename="last", save_top_k=1).state_key
        == ModelCheckpoint(filename="last", save_top_k=1).state_key
    )


@pytest.mark.parametrize("every", ["19", "20"])  # digits' 57 batches: a save on the last batch, or none
def test_a_step_based_last_ckpt_holds_the_end_of_each_epoch(tmp_path, capsys, every):
    """With ``--last_checkpoint.every_n_train_steps``, Lightning saves only at those steps: one
    on the last batch comes before the averaging epoch sets the CM's weights to their mean,
    and with 20 the fit's last 14 steps are never saved. last.ckpt is written at every epoch's
    end as well, so testing it scores the fit's final model."""
    steps = ["--trainer.max_epochs", "2", "--last_checkpoint.every_n_train_steps", every]
    code, _, err = run_main(["fit", *digits(tmp_path, *steps)], capsys)
    assert code == 0, err
    run = tmp_path / "lightning_logs" / "version_0"
    fitted = json.loads((run / "metrics.json").read_text())["test"]
    assert int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["average.count"]) == 0
    code, _, err = run_main(["test", *digits(tmp_path, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))], capsys)
    assert code == 0, err
    tested = json.loads((tmp_path / "lightning_logs" / "version_1" / "metrics.json").read_text())["test"]
    assert {k: tested[k] for k in ("acc", "nmi", "ari")} == {k: fitted[k] for k in ("acc", "nmi", "ari")}


def test_fit_test_predict_round_trip_on_digits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CONTINUED, "unset")  # what `--ckpt_path last` sets there is removed after the test
    code, out, err = run_main(
        ["fit", *digits(tmp_path, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1")],
        capsys,
    )
    assert code == 0, err
    run = tmp_path / "lightning_logs" / "version_0"
    assert f"run directory: {run}" in out
    assert "final evaluation: acc=" in out
    for name in ("config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in ("val", "test"):
        assert {"acc", "nmi", "ari", "homogeneity", "l_sp"} <= set(metrics[stage])
    assert 0.3 < metrics["test"]["acc"] <= 1.0  # 10 digits: chance is 0.1
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard logs

    last = str(run / "checkpoints" / "last.ckpt")
    code, _, err = run_main(["test", *digits(tmp_path, "--ckpt_path", last)], capsys)
    assert code == 0, err
    tested = json.loads((tmp_path / "lightning_logs" / "version_1" / "metrics.json").read_text())
    assert tested["test"]["acc"] == pytest.approx(metrics["test"]["acc"])
    # one count of epochs trained everywhere: the fit's last validation, its final test, and a
    # test of its last.ckpt (whose own "epoch" is Lightning's 0-based index, not Lightning's 0)
    assert metrics["val"]["epoch"] == metrics["test"]["epoch"] == tested["test"]["epoch"] == 2
    assert torch.load(last, weights_only=False)["epoch"] == 1

    code, _, err = run_main(["test", *digits(tmp_path, "--ckpt_path", "last")], capsys)  # the newest run's
    assert code == 0, err
    assert f"loading {run} from last.ckpt" in err
    by_name = json.loads((tmp_path / "lightning_logs" / "version_2" / "metrics.json").read_text())
    assert by_name["test"] == tested["test"]  # the trained model, not Lightning's untrained one
    code, _, err = run_main(["test", *digits(tmp_path, "--ckpt_path", "best")], capsys)
    assert code != 0
    assert "--ckpt_path best: name the file" in protos_error(err)
    with pytest.warns(UserWarning, match="no --ckpt_path: this test runs the untrained model"):
        code, _, err = run_main(["test", *digits(tmp_path)], capsys)  # a forgotten checkpoint
    assert code == 0, err
    untrained = json.loads((tmp_path / "lightning_logs" / "version_3" / "metrics.json").read_text())["test"]
    assert untrained["epoch"] == 0
    assert untrained["acc"] < tested["test"]["acc"]

    code, out, err = run_main(["predict", *digits(tmp_path, "--ckpt_path", last)], capsys)
    assert code == 0, err
    path = tmp_path / "lightning_logs" / "version_4" / "predictions.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "label", "cluster", *(f"p_{k}" for k in range(10))]
    assert len(rows) - 1 == 1797
    assert sorted(int(r[0]) for r in rows[1:]) == list(range(1797))
    assert all(0 <= int(r[2]) < 10 for r in rows[1:])
    assert sum(float(p) for p in rows[1][3:]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    code, out, err = run_main(["fit", "--config", str(config), "--print_config"], capsys)
    assert code == 0, err
    assert "class_path: lightning_protos." in out
    assert "trainer:" in out
    printed = yaml.safe_load(out)
    cli.check_own_callbacks(printed["trainer"].get("callbacks"))  # no second evaluator
    if (printed["model"].get("init_args") or {}).get("n_clusters", 1) == 1:  # constant ACC: pick best by MSE
        assert printed["checkpoint"]["monitor"] == "val/mse"
        assert printed["checkpoint"]["mode"] == "min"


@pytest.mark.parametrize("listed", ["--trainer.callbacks+", "--trainer.callbacks"], ids=["in-a-list", "alone"])
def test_a_callback_the_cli_adds_itself_is_a_one_line_error(tmp_path, capsys, listed):
    own = "lightning_protos.eval.callbacks.ClusteringEvaluator"
    code, _, err = run_main(["fit", *digits(tmp_path, listed, own)], capsys)
    assert code == 1
    assert protos_error(err) == (
        "protos: error: trainer.callbacks lists ClusteringEvaluator, which every protos run has: remove it "
        "and set its options under evaluation: (--evaluation.<option>)"
    )
    assert not (tmp_path / "lightning_logs").exists()  # before any run directory


def test_a_single_callback_of_the_users_own_trains():
    """``trainer.callbacks`` may be one callback instead of a list (Lightning takes both)."""
    single = Namespace(class_path="lightning.pytorch.callbacks.ModelSummary", init_args=Namespace(max_depth=1))
    cli.check_own_callbacks(single)  # no error, as for [single] and None
    cli.check_own_callbacks([single])
    cli.check_own_callbacks(None)
    cli.check_own_callbacks("my_lab.callbacks.Compile")  # a user's own class of the same name
    with pytest.raises(ProtosError, match="lists AssignmentWriter"):
        cli.check_own_callbacks({"class_path": "lightning_protos.eval.callbacks.AssignmentWriter"})


def test_data_paths_made_absolute_are_only_relative_ones_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Namespace(data=Namespace(class_path="x", init_args=Namespace(path="a/b.npz", data_dir="")))
    cli.absolute_data_paths(config)
    assert config.data.init_args.path == str(tmp_path / "a" / "b.npz")
    assert config.data.init_args.data_dir == ""  # unset: $PROTOS_DATA_DIR, not the current directory
    config.data.init_args.path, config.data.init_args.data_dir = "~/b.npz", "/abs"
    cli.absolute_data_paths(config)
    assert (config.data.init_args.path, config.data.init_args.data_dir) == ("~/b.npz", "/abs")


def test_a_fit_cut_short_mid_epoch_counts_its_epochs_as_a_test_of_its_last_ckpt(tmp_path, capsys):
    """max_steps inside the second epoch: Lightning counts that epoch (current_epoch 2 after the
    fit), and so do the fit's final test and a later test of its last.ckpt."""
    code, _, err = run_main(
        ["fit", *digits(tmp_path, "--trainer.max_epochs", "5", "--trainer.max_steps", "70")], capsys
    )
    assert code == 0, err
    run = tmp_path / "lightning_logs" / "version_0"
    fitted = json.loads((run / "metrics.json").read_text())["test"]["epoch"]
    code, _, err = run_main(["test", *digits(tmp_path, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))], capsys)
    assert code == 0, err
    tested = json.loads((tmp_path / "lightning_logs" / "version_1" / "metrics.json").read_text())["test"]["epoch"]
    assert (fitted, tested) == (2, 2)  # 57 batches an epoch: 70 steps end in the second


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.lr", "0"], "lr must be > 0, got 0.0"),
        (["--model.init_args.alpha", "-1"], "alpha must be > 0"),
        (["--model.init_args.n_clusters", "5000"], "exceeds the 1797 training samples"),
        (["--data", "lightning_protos.data.Nope"], "lightning_protos.data' has no attribute 'Nope'"),
        (["--data", "Nope"], "data sets in lightning_protos.data: Blobs"),
        (["--model", "lightning_protos.methods.cm.CMM"], "no attribute 'CMM'"),
        (["--model.init_args.optimizer", "rmsprop"], "Got value: rmsprop"),
        (["--trainer.max_epochz", "3"], "unrecognized arguments: --trainer.max_epochz 3"),
        (["--trainer.max_e", "3"], "unrecognized arguments: --trainer.max_e 3"),  # no prefix of max_epochs
        (["--config", "missing.yaml"], "missing.yaml"),
        (["--model.init_args.lr", "1e30"], "non-finite loss term E"),
        (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch must be >= 1 (or null), got 0"),
        (["--trainer.max_epochs", "-5"], "`max_epochs` must be a non-negative integer or -1"),  # Lightning's check
        (["--data.init_args.fit_on", "test"], "Parser key \"fit_on\": Expected a typing.Literal['train', 'all']"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, extra, message):
    code, _, err = run_main(["fit", *digits(tmp_path, "--trainer.max_epochs", "3", *extra)], capsys)
    assert code != 0
    line = protos_error(err)
    assert message in line
    if "--data" not in extra:  # the list of data sets answers an unknown data set only
        assert "data sets in lightning_protos.data" not in line


def test_missing_data_offline_through_the_cli(tmp_path, capsys):
    extra = [
        "--data", "lightning_protos.data.MNIST", "--data.init_args.flatten", "true",
        "--data.init_args.data_dir", str(tmp_path / "none"), "--data.init_args.download", "false",
    ]  # fmt: skip
    code, _, err = run_main(["fit", *digits(tmp_path, *extra)], capsys)
    line = protos_error(err)
    assert code != 0
    assert "MNIST/raw/t10k-images-idx3-ubyte" in line
    assert str(tmp_path / "none") in line


def test_too_few_clusters_from_the_shell(tmp_path):
    """The installed entry point, as a user runs it: non-zero exit and one error line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_protos.cli", "fit", *digits(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--model.init_args.n_clusters", "1"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode != 0
    assert protos_error(proc.stderr) == "protos: error: n_clusters (K) must be >= 2, got 1"


# -- the GPU architecture check ------------------------------------------------------------

CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def test_volta_is_missing_from_cuda13_wheels():
    problem = check_cuda_arch((7, 0), CUDA13_ARCHS)
    assert problem is not None
    assert "\n" not in problem
    assert "sm_70" in problem
    assert "TORCH_CUDA=cu126" in problem


@pytest.mark.parametrize(
    ("capability", "archs"),
    [
        ((8, 6), ["sm_80"]),  # A6000: sm_80 binaries run on 8.6
        ((8, 6), CUDA13_ARCHS),
        ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"]),  # cu126 wheels on a V100
        ((9, 0), ["sm_80", "compute_80"]),  # PTX for 8.0 JIT-compiles on newer GPUs
        ((12, 0), ["sm_90", "compute_90"]),
    ],
)
def test_supported_architectures(capability, archs):
    assert check_cuda_arch(capability, archs) is None


def test_each_process_checks_the_gpu_it_runs_on(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or (7, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13_ARCHS)
    check_device(torch.device("cpu"))  # a CPU run never asks CUDA
    assert asked == []
    with pytest.raises(ProtosError, match="sm_70") as err:
        check_device(torch.device("cuda:1"))  # rank 1's GPU, not GPU 0
    assert asked == [torch.device("cuda:1")]
    assert "\n" not in str(err.value)


def test_a_plain_trainer_checks_its_gpu_too(monkeypatch):
    """The check is in every method's setup, not only behind the CLI: a Trainer built in Python
    stops before the model moves to a GPU this PyTorch has no kernels for."""
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("cuda:0")))
    monkeypatch.setattr(CPUAccelerator, "setup_device", lambda self, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13_ARCHS)
    model = CM(3, (2,), alpha=2.0)
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ProtosError, match="sm_70"):
        trainer.fit(model, Blobs(n_samples=60, centers=3, batch_size=20, device_fraction=0))
    assert trainer.global_step == 0
    assert model.device.type == "cpu"


@pytest.mark.parametrize(
    ("capability", "archs"),
    [
        ((8, 0), ["sm_86", "sm_90"]),  # an sm_86 binary does not run on 8.0
        ((9, 0), ["sm_80", "sm_86"]),  # binaries do not cross major versions
        ((7, 0), ["compute_80"]),  # PTX does not run on older GPUs
        ((7, 5), []),
    ],
)
def test_unsupported_architectures(capability, archs):
    assert f"sm_{capability[0]}{capability[1]}" in check_cuda_arch(capability, archs)


def test_top_level_help_names_the_protos_subcommands_too(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in ("protos bench", "protos report", "protos inspect", "{fit,validate,test,predict}"):
        assert command in out


def test_fit_on_unlabelled_data_keeps_last_ckpt_and_scores_l_sp(tmp_path, capsys):
    """A user's features without labels: no best checkpoint by val/acc (Lightning would stop at
    the first validation), last.ckpt and the unsupervised criterion instead."""
    x = np.random.default_rng(0).normal(size=(120, 4)).astype(np.float32)
    np.save(tmp_path / "features.npy", x)
    args = [
        "fit", "--model", "lightning_protos.methods.cm.CM", "--model.init_args.n_clusters", "3",
        "--data", "lightning_protos.data.ArrayFile", "--data.init_args.path", str(tmp_path / "features.npy"),
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path), *QUIET,
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="no labels: no best checkpoint by val/acc"):
        code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert "final evaluation: l_sp=" in out
    assert ", n_clusters_used=" in out
    run = tmp_path / "lightning_logs" / "version_0"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]) == {"epoch", "l_sp", "n_clusters_used"}

    # the checkpoint names its training data: predicting on other data warns, on the same not
    np.save(tmp_path / "other.npy", x[:60])
    predict = ["predict", *args[1:3], "--trainer.default_root_dir", str(tmp_path), *QUIET]
    predict += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data", "lightning_protos.data.ArrayFile"]
    with pytest.warns(
        UserWarning, match=r"trained on ArrayFile\(.*features.npy\), this predict runs on ArrayFile\(.*other"
    ):
        assert run_main([*predict, "--data.init_args.path", str(tmp_path / "other.npy")], capsys)[0] == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the checkpoint was trained on")
        assert run_main([*predict, "--data.init_args.path", str(tmp_path / "features.npy")], capsys)[0] == 0
        # training on from it on the other data: the new run's checkpoints and test are the other data's
        shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "start.ckpt")
        on = [a if a != str(tmp_path / "features.npy") else str(tmp_path / "other.npy") for a in args]
        on = [a if a != "2" else "3" for a in on]  # max_epochs
        assert run_main([*on, "--ckpt_path", str(tmp_path / "start.ckpt")], capsys)[0] == 0
    newest = max((tmp_path / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)
    state = torch.load(newest / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert any(str(tmp_path / "other.npy") in str(v.get("trained_on")) for v in state.values())


def test_a_run_config_finds_relative_data_paths_from_any_directory(tmp_path, capsys, monkeypatch):
    """A data path given relative to the current directory is saved absolute in the run's
    config.yaml, so that ``--config RUN/config.yaml`` predicts on the same data from elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    x = np.random.default_rng(0).normal(size=(90, 4)).astype(np.float32)
    np.savez(work / "mine.npz", X=x, y=np.arange(90) % 3)
    monkeypatch.chdir(work)
    args = [
        "fit", "--model", "lightning_protos.methods.cm.CM", "--model.init_args.n_clusters", "3",
        "--data", "lightning_protos.data.ArrayFile", "--data.init_args.path", "mine.npz",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET,
    ]  # fmt: skip
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["init_args"]["path"] == str(work / "mine.npz")
    monkeypatch.chdir(tmp_path)
    predict = ["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    code, _, err = run_main(predict, capsys)
    assert code == 0, err
    with open(tmp_path / "runs" / "lightning_logs" / "version_1" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == (np.arange(90) % 3).tolist()


def test_main_stops_on_a_gpu_without_kernels(monkeypatch, capsys, tmp_path):
    # the process's device is a V100 (sm_70) under a CUDA 13 build: stopped in setup, before
    # the model moves to it
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("cuda:0")))
    monkeypatch.setattr(CPUAccelerator, "setup_device", lambda self, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13_ARCHS)
    args = ["fit", "--config", str(ROOT / "configs" / "cm_digits.yaml"), "--data.init_args.device_fraction", "0",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    code, _, err = run_main(args, capsys)  # (the data stay on the host: no CUDA call before the check)
    assert code == 1
    assert "sm_70" in protos_error(err)


@pytest.mark.parametrize(
    ("precision", "on_cpu", "native", "warns"),
    [
        ("bf16-mixed", True, False, True),
        ("bf16-true", True, False, True),
        ("bf16-mixed", True, True, False),  # AVX-512 BF16 / AMX: the fast path
        ("bf16-mixed", False, False, False),  # a GPU
        ("32-true", True, False, False),
        (32, True, False, False),
        (None, True, False, False),
    ],
)
def test_bf16_on_a_cpu_without_bf16_hardware_is_warned(precision, on_cpu, native, warns):
    problem = check_cpu_bf16(precision, on_cpu, native)
    assert (problem is not None) == warns
    if warns:
        assert "\n" not in problem
        assert "--trainer.precision 32-true" in problem


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_native_bf16_means_avx512_bf16_or_amx_on_x86(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)  # plain AVX-512 is not enough
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cpu_has_native_bf16() is native


@pytest.mark.parametrize("native", [False, True])
def test_fit_warns_of_emulated_bf16_before_training(tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: native)
    args = ["fit", *digits(tmp_path, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_main(args, capsys)
    assert code == 0, err
    emulated = [w for w in caught if "CPU without bf16 hardware" in str(w.message)]
    assert len(emulated) == (0 if native else 1)


def test_an_epoch_of_few_batches_is_logged_without_lightnings_logging_interval_warning(tmp_path, capsys):
    """Digits gives 15 batches an epoch, fewer than Lightning's log_every_n_steps (50): the
    methods log once per epoch, so the loss reaches TensorBoard and the warning is dropped."""
    from lightning_protos.bench.report import read_curves

    args = ["fit", *digits(tmp_path, "--trainer.max_epochs", "2", "--data.init_args.batch_size", "128")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert not [w for w in caught if "logging interval" in str(w.message)]
    curves = read_curves(tmp_path / "lightning_logs" / "version_0", ["train/loss"])
    assert sorted(curves["train/loss"]) == [0, 1]  # one point per epoch


def test_one_line_keeps_the_informative_lines():
    report = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [<class 'X'>, <class 'NoneType'>]\n  Errors:\n"
        "    - Problem with given class_path 'a.B':\n        bad thing\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: a.B"
    )
    assert cli.one_line(report) == "Parser key \"model\": Problem with given class_path 'a.B': bad thing"


def test_last_ckpt_is_written_at_the_end_of_every_epoch(tmp_path):
    """A run killed during epoch e resumes from the end of epoch e - 1, not from scratch."""
    import lightning as L

    class SeenAtEpochStart(L.Callback):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def on_train_epoch_start(self, trainer, pl_module):
            path = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
            if path.is_file():
                self.epochs.append(torch.load(path, weights_only=False)["epoch"])

    seen = SeenAtEpochStart()
    args = ["fit", *digits(tmp_path, "--trainer.max_epochs", "3", "--final_test", "false")]
    cli.ProtosCLI(args=args, trainer_defaults={"callbacks": [seen]})
    assert seen.epochs == [0, 1]
    names = {p.name for p in (tmp_path / "lightning_logs" / "version_0" / "checkpoints").iterdir()}
    assert "last.ckpt" in names
    assert names <= {"last.ckpt", "best.ckpt"}  # one rolling file


def test_fit_ckpt_path_last_continues_the_newest_run_in_its_own_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CONTINUED, "unset")  # what the fit sets there is removed after the test
    code, _, err = run_main(["fit", *digits(tmp_path, "--ckpt_path", "last")], capsys)
    assert code == 1
    assert "last.ckpt to continue" in protos_error(err)

    first = ["fit", *digits(tmp_path, "--trainer.max_epochs", "2", "--final_test", "false")]
    assert run_main(first, capsys)[0] == 0
    again = ["fit", *digits(tmp_path, "--trainer.max_epochs", "4", "--ckpt_path", "last")]
    code, _, err = run_main(again, capsys)
    assert code == 0, err
    run = tmp_path / "lightning_logs" / "version_0"
    assert f"continuing {run}" in err
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 3
    assert "test" in json.loads((run / "metrics.json").read_text())
    # the run's config.yaml trains it from the start: no checkpoint, no pinned version, so a
    # command reusing it opens a run directory of its own
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["ckpt_path"] is None
    assert saved["trainer"]["logger"] is None
    last = run / "checkpoints" / "last.ckpt"
    code, _, err = run_main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)], capsys)
    assert code == 0, err
    assert (tmp_path / "lightning_logs" / "version_1" / "predictions.csv").is_file()
    assert not (run / "predictions.csv").exists()

    # fit from a run's last.ckpt by name continues that run; from another of its files, a new one
    longer = ["fit", *digits(tmp_path, "--trainer.max_epochs", "5", "--final_test", "false")]
    code, _, err = run_main([*longer, "--ckpt_path", str(last)], capsys)
    assert code == 0, err
    assert f"continuing {run}" in err
    assert torch.load(last, weights_only=False)["epoch"] == 4
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    kept = run / "checkpoints" / "epoch_4.ckpt"
    shutil.copy(last, kept)
    code, _, err = run_main([*longer, "--trainer.max_epochs", "6", "--ckpt_path", str(kept)], capsys)
    assert code == 0, err
    assert (tmp_path / "lightning_logs" / "version_2" / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(last, weights_only=False)["epoch"] == 4  # the run it came from is as it was


def test_ckpt_path_last_is_chosen_once_for_the_processes_launched_for_ddp(tmp_path, monkeypatch):
    """Lightning's DDP launcher starts the other ranks by running the command again: they take
    the first process's checkpoint, not a newer ``last.ckpt`` another run wrote in between."""
    runs = tmp_path / "lightning_logs"
    older, newer = (runs / v / "checkpoints" / "last.ckpt" for v in ("version_0", "version_1"))
    for i, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (1000 + i, 1000 + i))

    def config() -> Namespace:
        return Namespace(trainer=Namespace(logger=None, default_root_dir=str(tmp_path)), ckpt_path="last")

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv(CONTINUED, "unset")  # restored (removed) after the test
    first = config()
    continue_run(first)
    assert first.ckpt_path == os.environ[CONTINUED] == str(newer)
    os.utime(older, (2000, 2000))  # another run saves its last.ckpt meanwhile
    monkeypatch.setenv("LOCAL_RANK", "1")
    launched = config()
    continue_run(launched)
    assert launched.ckpt_path == str(newer)
    assert launched.trainer.logger.init_args.version == "version_1"
    monkeypatch.setenv("LOCAL_RANK", "0")
    by_int = config()  # a logger's `version: 0`, as Lightning names the folder: version_0
    by_int.trainer.logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=str(tmp_path), name="lightning_logs", version=0),
    )
    continue_run(by_int)
    assert by_int.ckpt_path == str(older)
    monkeypatch.setenv("LOCAL_RANK", "0")  # a new command chooses again
    again = config()
    continue_run(again)
    assert again.ckpt_path == str(older)


def test_bad_picture_or_probe_settings_are_one_line_errors(tmp_path, capsys):
    for option in (
        "--trainer.callbacks+=lightning_protos.eval.images.InspectionImages",
        "--trainer.callbacks+=lightning_protos.eval.probes.ProbeEvaluator",
    ):
        bad, says = (
            ("--trainer.callbacks.init_args.every_n_epochs=-1", "every_n_epochs must be >= 0, got -1")
            if "images" in option
            else ("--trainer.callbacks.init_args.knn_k=0", "knn_k must be > 0, got 0")
        )
        code, _, err = run_main(["fit", *digits(tmp_path, option, bad)], capsys)
        assert code != 0
        assert says in protos_error(err)


def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    assert 1 <= usable_cores() <= os.cpu_count()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # a one-core cpuset
    assert usable_cores() == 1
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity mask (macOS): every core
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == 6


def test_the_final_line_prints_every_evaluators_test_scores(tmp_path, capsys):
    """A reconstruction config's headline (test_mse, train_mse; ProtoVAE Fig. 6) is printed with
    the clustering scores, as the probes' are, not left to metrics.json."""
    args = ["fit", "--config", str(ROOT / "configs" / "ae_mnist.yaml"), "--data", "lightning_protos.data.Digits"]
    args += [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    code, out, err = run_main([*args, *QUIET], capsys)
    assert code == 0, err
    line = next(s for s in out.splitlines() if s.startswith("final evaluation: "))
    assert line.startswith("final evaluation: acc=")
    test = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())["test"]
    for key in ("test_mse", "train_mse"):
        assert f"{key}={test[key]:.4f}" in line


def test_a_csv_label_column_given_by_index_in_a_yaml_config(tmp_path, capsys):
    """README: ``label_column`` is a header name or a 0-based index; in YAML an index is an int."""
    rng = np.random.default_rng(0)
    rows = [f"{a:.3f},{b:.3f},{k}" for k in range(4) for a, b in rng.normal(3 * k, 0.1, (10, 2))]
    (tmp_path / "feat.csv").write_text("\n".join(["a,b,label", *rows]) + "\n")
    data = {"class_path": "lightning_protos.data.ArrayFile"}
    data["init_args"] = {"path": str(tmp_path / "feat.csv"), "label_column": 2, "batch_size": 8}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    args = ["fit", *digits(tmp_path, "--data", str(tmp_path / "data.yaml"), "--trainer.max_epochs", "1")]
    code, _, err = run_main([*args, "--model.init_args.n_clusters", "4"], capsys)
    assert code == 0, err
    test = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())["test"]
    assert "ari" in test  # the labels were read from the third column, not taken as a feature
