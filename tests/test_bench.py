"""`protos bench`: aggregation on hand-made rows, skip/resume with a fake cell launcher, the
results CSV schema, one-line errors for bad tables, and end-to-end runs of real cells."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_protos.bench import runner as runner_module
from lightning_protos.bench.report import mean_std, pick, summarize, summary_rows, write_report
from lightning_protos.bench.runner import ResultsFile, Runner, attempts_of, main, make_row, report, what_sets
from lightning_protos.bench.spec import BenchError, Cell, load_bench, row_key

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "dataset", "seed", "epochs", "acc", "nmi", "ari", "l_sp", "seconds"]


def write_table(tmp_path: Path, **changes) -> Path:
    """A small table file in ``tmp_path``: CM and k-means on digits, 2 seeds."""
    table = {
        "name": "t",
        "results": str(tmp_path / "results" / "t.csv"),
        "columns": COLUMNS,
        "seeds": [0, 1],
        "datasets": ["digits"],
        "overrides": {"trainer.max_epochs": 1},
        "methods": [
            {"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")},
            {"method": "kmeans", "reference": "kmeans", "init": "random"},
        ],
    }
    table.update(changes)
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(table))
    return path


class FakeLaunch:
    """Stands in for the cell processes: records each command and leaves what a run leaves."""

    def __init__(
        self, fail: tuple[str, ...] = (), interrupt: tuple[str, ...] = (), killed: dict[str, int] | None = None
    ) -> None:
        self.fail, self.interrupt, self.killed = fail, interrupt, killed or {}
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, cell: Cell, command: list[str], log: Path, env: dict[str, str]) -> int:
        self.calls.append((cell.name, command))
        with open(log, "a") as f:
            f.write("training\n")
            if cell.name in self.fail:
                f.write("RuntimeError: boom\n")
                return 1
        if cell.name in self.interrupt:  # Ctrl-C after the cell's first checkpoint
            (cell.run_dir / "checkpoints").mkdir()
            (cell.run_dir / "checkpoints" / "last.ckpt").write_text("ckpt")
            # Ctrl-C reaches the bench as a KeyboardInterrupt (raised here rather than sent as
            # SIGINT: a background shell, as CI's may be, starts Python with SIGINT ignored)
            raise KeyboardInterrupt
        if cell.name in self.killed:  # the training process alone got a signal after a checkpoint
            (cell.run_dir / "checkpoints").mkdir(exist_ok=True)
            (cell.run_dir / "checkpoints" / "last.ckpt").write_text("ckpt")
            code = self.killed[cell.name]
            if code == 0:  # SIGTERM: Lightning ends the fit, exit 0, no final test
                with open(log, "a") as f:
                    f.write("Received SIGTERM: 15\n")
            return code
        test = {"epoch": 1, "acc": 0.5 + cell.seed / 10, "nmi": 0.4, "ari": 0.3, "l_sp": 9.0 - cell.seed}
        (cell.run_dir / "metrics.json").write_text(json.dumps({"test": test}))
        return 0


def names(launch: FakeLaunch) -> list[str]:
    return [name for name, _ in launch.calls]


# -- aggregation --------------------------------------------------------------------------


def row(method: str, seed: int, acc: str, ari: str, l_sp: str = "", seconds: str = "10") -> dict:
    return {
        "method": method,
        "dataset": "mnist",
        "seed": str(seed),
        "acc": acc,
        "nmi": acc,
        "ari": ari,
        "l_sp": l_sp,
        "seconds": seconds,
        "note": "",
    }


ROWS = [
    row("cm", 0, "0.80", "0.60", l_sp="5.0", seconds="10"),
    row("cm", 1, "0.90", "0.75", l_sp="7.0", seconds="20"),
    row("cm", 2, "0.70", "0.55", l_sp="3.0", seconds="30"),
    {**row("cm", 3, "", "", seconds="1"), "note": "exit 1: CUDA out of memory"},
    row("kmeans", 0, "0.50", "0.40"),
]


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([0.8, 0.9, 0.7])
    assert mean == pytest.approx(0.8)
    assert std == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0.01) / 2)
    assert mean_std([0.5]) == (0.5, None)


def test_summarize_means_best_and_lsp_selection():
    cm, km = summarize(ROWS, ["method", "dataset"], ["acc", "nmi", "ari"])
    assert cm.group == {"method": "cm", "dataset": "mnist"}
    assert (cm.n, cm.n_failed) == (3, 1)  # the failed run counts apart, not in the means
    assert cm.mean["acc"] == pytest.approx(0.8)
    assert cm.std["acc"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.7]))
    assert cm.mean["ari"] == pytest.approx((0.60 + 0.75 + 0.55) / 3)
    assert cm.best["seed"] == "1"  # highest ARI
    assert cm.selected["seed"] == "2"  # lowest L_sp, whatever its ARI
    assert cm.seconds == pytest.approx(20.0)
    assert (km.n, km.std["acc"], km.selected) == (1, None, None)


def test_pick_ignores_empty_values_and_keeps_the_first_tie():
    rows = [{"seed": "0", "ari": "0.5"}, {"seed": "1", "ari": ""}, {"seed": "2", "ari": "0.5"}]
    assert pick(rows, "ari", highest=True)["seed"] == "0"
    assert pick(rows, "ari", highest=False)["seed"] == "0"
    assert pick([{"ari": ""}], "ari", highest=True) is None


def test_a_nan_score_neither_wins_nor_averages():
    rows = [{"seed": "0", "ari": "nan", "l_sp": "nan"}, {"seed": "1", "ari": "0.5", "l_sp": "3"}]
    assert pick(rows, "ari", highest=True)["seed"] == "1"
    assert pick(rows, "l_sp", highest=False)["seed"] == "1"


def test_summary_rows_are_fractions_with_best_and_selected_runs():
    flat = summary_rows(summarize(ROWS, ["method", "dataset"], ["acc", "ari"]), ["acc", "ari"], True)
    assert flat[0]["acc_mean"] == pytest.approx(0.8)
    assert (flat[0]["best_seed"], flat[0]["best_ari"]) == ("1", 0.75)
    assert (flat[0]["lsp_seed"], flat[0]["lsp_l_sp"]) == ("2", 3.0)
    assert flat[1]["lsp_seed"] is None


def test_write_report_files(tmp_path):
    results = tmp_path / "cm.csv"
    paths = write_report(ROWS, ["method", "dataset"], [*COLUMNS, "note"], results, "table1")
    table = paths["table"].read_text()
    assert paths["table"] == tmp_path / "cm_table.md"
    assert "| cm | mnist | 3 (+1 failed) | 80.0 ± 10.0 |" in table
    assert "75.0 (seed 1)" in table
    assert "55.0 (seed 2)" in table
    with open(paths["summary"]) as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["cm", "kmeans"]
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


# -- results file -------------------------------------------------------------------------


def test_results_csv_header_is_the_columns_then_note(tmp_path):
    bench = load_bench(write_table(tmp_path))
    assert bench.columns == [*COLUMNS, "note"]
    results = ResultsFile(bench.results, bench.columns)
    results.append(
        make_row(
            {"method": "cm", "dataset": "digits", "seed": "0"},
            bench.columns,
            {"epoch": 3, "acc": 0.123456789, "l_sp": 12.5},
            4.26,
        )
    )
    lines = bench.results.read_text().splitlines()
    assert lines == [",".join(bench.columns), "cm,digits,0,3,0.123457,,,12.5,4.3,"]
    with pytest.raises(BenchError, match="has columns"):
        ResultsFile(bench.results, [c for c in bench.columns if c != "l_sp"])


def test_a_row_appended_after_a_hand_edit_that_lost_the_last_newline_stays_a_row(tmp_path):
    bench = load_bench(write_table(tmp_path))
    results = ResultsFile(bench.results, bench.columns)
    results.append(make_row({"method": "cm", "dataset": "digits", "seed": "0"}, bench.columns, {"acc": 0.5}, 1.0))
    bench.results.write_text(bench.results.read_text().rstrip("\n"))  # a failed row deleted by hand
    results.append(make_row({"method": "cm", "dataset": "digits", "seed": "1"}, bench.columns, {"acc": 0.6}, 1.0))
    assert [(r["seed"], r["acc"], r["note"]) for r in results.rows()] == [("0", "0.5", ""), ("1", "0.6", "")]


# -- skip and resume with a fake launcher -------------------------------------------------


def test_second_run_launches_nothing(tmp_path):
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    launch = FakeLaunch()
    runner = Runner(bench, launch)
    assert runner.run(runner.pending(bench.cells())) == 0
    assert names(launch) == [
        "cm_digits_seed0",
        "kmeans-random_digits_seed0",
        "cm_digits_seed1",
        "kmeans-random_digits_seed1",
    ]
    first = bench.results.read_text()
    again = Runner(bench, FakeLaunch(fail=tuple(names(launch))))
    assert again.pending(bench.cells()) == []
    assert again.run([]) == 0
    assert bench.results.read_text() == first


def test_finished_run_without_row_gets_its_row_without_training(tmp_path):
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    Runner(bench, FakeLaunch()).run(bench.cells())
    bench.results.unlink()
    launch = FakeLaunch()
    runner = Runner(bench, launch)
    runner.run(runner.pending(bench.cells()))
    assert launch.calls == []
    assert len(ResultsFile(bench.results, bench.columns).rows()) == 4


def test_interrupted_cell_resumes_from_last_ckpt_and_every_cell_is_present_once(tmp_path):
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    runner = Runner(bench, FakeLaunch(interrupt=("cm_digits_seed1",)))
    with pytest.raises(KeyboardInterrupt):
        runner.run(runner.pending(bench.cells()))
    assert [r["seed"] for r in runner.results.rows()] == ["0", "0"]
    launch = FakeLaunch()
    runner = Runner(bench, launch)
    runner.run(runner.pending(bench.cells()))
    (resumed, command), *rest = launch.calls
    assert resumed == "cm_digits_seed1"
    assert command[-2:] == ["--ckpt_path", str(bench.root / "t" / resumed / "checkpoints" / "last.ckpt")]
    assert all("--ckpt_path" not in c for _, c in rest)
    keys = [(r["method"], r["seed"]) for r in runner.results.rows()]
    assert sorted(keys) == sorted(set(keys))
    assert len(keys) == 4
    times = json.loads((bench.root / "t" / resumed / "bench.json").read_text())
    assert times["attempts"] == 2
    assert times["running_since"] is None


def test_each_attempt_s_set_is_noted_in_the_row(tmp_path):
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    runner = Runner(bench, FakeLaunch(interrupt=("cm_digits_seed1",)), note="set trainer.precision=32-true")
    with pytest.raises(KeyboardInterrupt):
        runner.run(runner.pending(bench.cells()))
    runner = Runner(bench, FakeLaunch())  # resumed without the --set
    runner.run(runner.pending(bench.cells()))
    notes = {(r["method"], r["seed"]): r["note"] for r in runner.results.rows()}
    assert notes[("cm", "0")] == "set trainer.precision=32-true"
    assert notes[("cm", "1")] == "attempts: set trainer.precision=32-true / the table's settings"
    assert notes[("kmeans", "1")] == ""  # a scikit-learn reference takes no --set
    bench.results.unlink()  # the rows written again by a bench without --set: the runs' notes stay
    runner = Runner(bench, FakeLaunch())
    runner.run(runner.pending(bench.cells()))
    assert {(r["method"], r["seed"]): r["note"] for r in runner.results.rows()} == notes


def test_a_training_process_killed_alone_writes_no_row_and_resumes(tmp_path, capsys):
    table = write_table(tmp_path)
    bench = load_bench(table, root=tmp_path / "runs")
    argv = ["bench", "--config", str(table), "--root", str(tmp_path / "runs")]
    assert main(argv, FakeLaunch(killed={"cm_digits_seed1": 0})) == 1  # a cell left without its row
    out, err = capsys.readouterr()
    assert "cm_digits_seed1: stopped before its final test; run the bench again" in out
    assert "1 cell(s) stopped before their final test, no row yet (cm_digits_seed1): run the same command" in err
    runner = Runner(bench, FakeLaunch())
    assert [(r["method"], r["seed"]) for r in runner.results.rows()] == [("cm", "0"), ("kmeans", "0"), ("kmeans", "1")]
    launch = FakeLaunch()
    runner = Runner(bench, launch)
    assert runner.run(runner.pending(bench.cells())) == 0
    ((name, command),) = launch.calls
    assert name == "cm_digits_seed1"
    assert command[command.index("--ckpt_path") + 1].endswith("cm_digits_seed1/checkpoints/last.ckpt")
    assert runner.results.rows()[-1]["acc"] == "0.6"
    # a crash (the kernel's out-of-memory kill: -9) is a failure, not a stop: a failed row
    other = load_bench(table, root=tmp_path / "runs2", results=tmp_path / "results2" / "t.csv")
    runner = Runner(other, FakeLaunch(killed={"cm_digits_seed0": -9}))
    assert runner.run(runner.pending(other.cells())) == 1
    assert runner.results.rows()[0]["note"] == "exit -9: training"
    assert not runner.stopped


def test_a_set_that_changes_what_is_trained_needs_rows_and_run_dirs_of_its_own(tmp_path, capsys):
    table = str(write_table(tmp_path))
    argv = ["bench", "--config", table, "--root", str(tmp_path / "runs")]
    assert main(argv, FakeLaunch(interrupt=("cm_digits_seed1",))) == 130  # seed 0 has a row, seed 1 a run
    capsys.readouterr()
    variant = ["--set", "model.init_args.n_clusters=20"]
    launch = FakeLaunch()
    assert main([*argv, *variant], launch) == 2
    err = capsys.readouterr().err
    assert "cm_digits_seed0 was trained with the table's settings (its row in" in err
    assert "asks for model.init_args.n_clusters=20" in err
    assert "--results NEW.csv --root NEW_DIR" in err
    assert launch.calls == []
    # seed 1's interrupted run, begun with the table's settings (its bench.json), is refused too
    assert main([*argv, "--only", "cm_*seed1", *variant], launch) == 2
    assert "cm_digits_seed1 was trained with the table's settings" in capsys.readouterr().err
    # how fast it trains is not what it trains: the table finishes in fp32, compiled
    speed = ["--set", "trainer.precision=32-true", "--set", "compile.enabled=true"]
    assert main([*argv, *speed], launch) == 0
    assert names(launch) == ["cm_digits_seed1", "kmeans-random_digits_seed1"]
    # the variant in a file and run dirs of its own
    own = ["--results", str(tmp_path / "k20" / "t.csv"), "--root", str(tmp_path / "k20")]
    assert main([*argv[:3], *own, *variant], launch) == 0
    assert [n for n in names(launch)[2:] if n.startswith("cm")] == ["cm_digits_seed0", "cm_digits_seed1"]
    with open(tmp_path / "k20" / "t.csv") as f:
        assert [r["note"] for r in csv.DictReader(f) if r["method"] == "cm"] == [
            "set model.init_args.n_clusters=20"
        ] * 2


def test_a_table_edited_since_its_runs_needs_rows_and_run_dirs_of_its_own(tmp_path, capsys):
    """An override of the table changed between two benches (here max_epochs 1 -> 2): its
    finished row would be averaged with new ones, its interrupted run resumed under the new
    setting. Both are refused, naming the change; a change of speed only is not."""
    table = write_table(tmp_path)
    argv = ["bench", "--config", str(table), "--root", str(tmp_path / "runs")]
    assert main(argv, FakeLaunch(interrupt=("cm_digits_seed1",))) == 130  # seed 0 has a row, seed 1 a run
    capsys.readouterr()
    write_table(tmp_path, overrides={"trainer.max_epochs": 2})
    launch = FakeLaunch()
    assert main(argv, launch) == 2
    err = capsys.readouterr().err
    assert "cm_digits_seed0 was trained with other settings (" in err
    assert "trainer.max_epochs 1 -> 2): give the changed table results and run dirs of its own" in err
    assert launch.calls == []
    assert main([*argv, "--only", "cm_*seed1"], launch) == 2  # the interrupted run, too
    assert "cm_digits_seed1 was trained with other settings" in capsys.readouterr().err
    write_table(tmp_path, overrides={"trainer.max_epochs": 1, "trainer.precision": "32-true"})
    assert main(argv, launch) == 0
    assert names(launch) == ["cm_digits_seed1", "kmeans-random_digits_seed1"]


def test_a_cell_left_to_the_process_training_it_is_no_success(tmp_path, capsys, monkeypatch):
    """A cell that another process is still training gets no row from this bench: exit 1 and a
    closing line, so that ``protos bench ... && protos report`` does not go on as if complete."""
    table = write_table(tmp_path)
    busy = "cm_digits_seed1"
    monkeypatch.setattr(runner_module, "training_elsewhere", lambda cell: 4242 if cell.name == busy else None)
    launch = FakeLaunch()
    assert main(["bench", "--config", str(table), "--root", str(tmp_path / "runs")], launch) == 1
    out, err = capsys.readouterr()
    assert f"{busy}: process 4242 is training it already" in out
    assert f"1 cell(s) left to the process training them, no row yet ({busy}): run the same command" in err
    assert busy not in names(launch)


def test_what_sets_reads_what_a_note_changes_in_training():
    assert what_sets("set model.init_args.n_clusters=20 trainer.precision=32-true compile.enabled=true") == {
        "model.n_clusters": "20"
    }
    assert what_sets("set trainer.devices=[0, 1] data.num_workers=2") == {}  # a value with spaces, speed keys
    assert what_sets("set model.init_args.channels=[4, 8] trainer.max_epochs=5") == {
        "model.channels": "[4, 8]",
        "trainer.max_epochs": "5",
    }
    assert what_sets("") == what_sets("exit 1: boom x=1") == {}
    assert attempts_of("attempts: set model.x=1 / the table's settings; exit 1: y") == [
        "set model.x=1",
        "the table's settings",
    ]
    assert attempts_of("set a=1; no final test metrics") == ["set a=1"]


def test_killed_attempt_counts_until_its_last_checkpoint_not_its_log(tmp_path):
    """A killed attempt writes nothing more to its log after the start; its epochs show in the
    files it wrote since (checkpoints, logger events), and its time runs to the newest of them.
    The bench's own record is not the attempt's work: a later rewrite of it (by hand, say) does
    not lengthen the attempt."""
    run_dir = tmp_path / "cell"
    (run_dir / "checkpoints").mkdir(parents=True)
    t0 = time.time() - 1000
    (run_dir / "bench.json").write_text(json.dumps({"seconds": 50.0, "attempts": 1, "running_since": t0}))
    for name, at in (("log.txt", t0 + 5), ("checkpoints/last.ckpt", t0 + 600), ("events.out", t0 + 480)):
        (run_dir / name).write_text("x")
        os.utime(run_dir / name, (at, at))
    os.utime(run_dir / "bench.json", (t0 + 900, t0 + 900))
    runner_module.start_attempt(run_dir)
    times = json.loads((run_dir / "bench.json").read_text())
    assert times["seconds"] == pytest.approx(650.0)
    assert times["attempts"] == 2


def test_a_finished_attempt_counts_from_the_start_its_record_holds(tmp_path, monkeypatch):
    """A pause taken out by hand (``running_since`` moved forward while the run was stopped) is
    left out of a finished attempt's time too, not only of a killed one's."""
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    clock = iter([1000.0, 1500.0])
    monkeypatch.setattr(runner_module.time, "time", lambda: next(clock))
    started = runner_module.start_attempt(run_dir)
    times = json.loads((run_dir / "bench.json").read_text())
    (run_dir / "bench.json").write_text(json.dumps({**times, "running_since": times["running_since"] + 120}))
    runner_module.end_attempt(run_dir, started)
    times = json.loads((run_dir / "bench.json").read_text())
    assert times["seconds"] == pytest.approx(380.0)
    assert times["running_since"] is None


def test_failed_cell_is_a_row_with_a_note_and_the_bench_goes_on(tmp_path):
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    runner = Runner(bench, FakeLaunch(fail=("cm_digits_seed0",)), jobs=2)
    assert runner.run(bench.cells()) == 1
    rows = {(r["method"], r["seed"]): r for r in runner.results.rows()}
    assert len(rows) == 4
    failed = rows[("cm", "0")]
    assert failed["acc"] == failed["ari"] == failed["epochs"] == ""
    assert failed["note"] == "exit 1: RuntimeError: boom"
    assert rows[("cm", "1")]["acc"] == "0.6"
    assert rows[("cm", "1")]["note"] == ""


def test_gpus_give_each_running_cell_its_own_device(tmp_path):
    bench = load_bench(write_table(tmp_path, seeds=[0, 1, 2]), root=tmp_path / "runs")
    seen: list[str] = []
    busy: set[str] = set()
    fake = FakeLaunch()

    def launch(cell: Cell, command: list[str], log: Path, env: dict[str, str]) -> int:
        gpu = env["CUDA_VISIBLE_DEVICES"]
        assert gpu not in busy
        busy.add(gpu)
        seen.append(gpu)
        time.sleep(0.05)
        busy.discard(gpu)
        return fake(cell, command, log, env)

    assert Runner(bench, launch, jobs=2, gpus=["0", "1"]).run(bench.cells()) == 0
    assert sorted(set(seen)) == ["0", "1"]
    assert len(seen) == 6


@pytest.mark.parametrize(
    ("cores", "jobs", "user", "expected"),
    [(8, 2, None, "4"), (1, 3, None, "1"), (8, 2, "2", "2"), (8, 1, None, None)],
    ids=["equal-share", "at-least-one", "user-setting-stands", "one-job-torch-default"],
)
def test_cpu_cells_run_at_once_share_the_cores(tmp_path, monkeypatch, cores, jobs, user, expected):
    bench = load_bench(
        write_table(tmp_path, methods=[{"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")}]),
        root=tmp_path / "runs",
    )
    fake, threads = FakeLaunch(), []

    def launch(cell: Cell, command: list[str], log: Path, env: dict[str, str]) -> int:
        threads.append(env.get("OMP_NUM_THREADS"))
        return fake(cell, command, log, env)

    monkeypatch.setattr(runner_module, "usable_cores", lambda: cores)
    if user is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user)
    assert Runner(bench, launch, jobs=jobs).run(bench.cells()) == 0
    assert threads == [expected, expected]


# -- bad input ----------------------------------------------------------------------------


CM = {"method": "cm", "config": str(ROOT / "configs" / "cm_digits.yaml")}
KM, GMM = {"method": "kmeans", "reference": "kmeans"}, {"method": "gmm", "reference": "gmm"}
BAD_TABLES = [
    ({"methods": [{**KM, "method": "kmean"}]}, "unknown method 'kmean'"),
    ({"datasets": ["digitz"]}, "unknown data set 'digitz'"),
    ({"seeds": []}, "seeds: give a non-empty list"),
    ({"methods": [{**CM, "config": "configs/none_{dataset}.yaml"}]}, "not found"),
    ({"overrides": {"trainer.max_epochz": 1}}, "override trainer.max_epochz=1 rejected"),
    ({"methods": [{**CM, "overrides": {"model.init_args.alpah": 2}}]}, "'alpah' is not accepted"),
    ({"datasets": ["5gaussians"], "methods": [CM]}, "trains on Digits, not on 5gaussians"),
    ({"methods": [KM, KM]}, "share a run dir"),
    ({"methods": [{**GMM, "init": "random"}, {**GMM, "init": "kmeans"}]}, "or a results row"),
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"results": 5}, "results: give a .csv path, e.g. benchmarks/results/NAME.csv, got 5"),
    ({"results": None}, "results: give a .csv path"),
    ({"methods": [{**CM, "results": "elsewhere"}]}, "methods[0].results: give a .csv path"),
    ({"methods": [{**KM, "method": "gmm"}]}, "method 'gmm' with reference 'kmeans'"),
    ({"overrides": {"trainer.max_e": 1}}, "override trainer.max_e=1 rejected"),  # no abbreviation
    ({"curves": 5}, "curves: give a non-empty list of TensorBoard scalar tags"),
    ({"curves": ["val/mse", {"val": "ari"}]}, "curves: give a non-empty list"),
    ({"curves": ["val/mse", "val/mse"]}, "curves: duplicates"),
    # a column the bench fills, given as a label, would overwrite the row's value
    ({"methods": [{**KM, "dataset": "mnist"}]}, "'dataset' is not a label: the bench fills that column"),
    ({"methods": [{**KM, "epochs": 50}]}, "'epochs' is not a label"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_TABLES)
def test_bad_table_is_a_one_line_error_before_any_cell(tmp_path, capsys, changes, message):
    launch = FakeLaunch()
    code = main(["bench", "--config", str(write_table(tmp_path, **changes)), "--root", str(tmp_path)], launch)
    err = capsys.readouterr().err
    assert code == 2
    assert launch.calls == []
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("protos bench: error:")
    assert message in err


def test_a_column_the_rows_leave_empty_warns_before_its_file_is_written(tmp_path, capsys):
    """A misspelt score would be a label column, empty in every row: the bench says so. A label
    only another table sharing the file sets is the same to this table, and a file that exists
    keeps its header: no warning then."""
    launch = FakeLaunch()
    table = str(write_table(tmp_path, columns=[*COLUMNS, "secnds"]))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.csv").touch()  # an empty file is a new one, as ResultsFile has it
    assert main(["bench", "--config", table, "--root", str(tmp_path / "runs"), "--dry-run"], launch) == 0
    err = capsys.readouterr().err
    assert "[bench] warning: " in err
    assert "column 'secnds' is neither a metrics.json value nor a label of this table's entries (init)" in err
    assert main(["bench", "--config", table, "--root", str(tmp_path / "runs")], launch) == 0
    assert {r["secnds"] for r in ResultsFile(tmp_path / "results" / "t.csv", [*COLUMNS, "secnds", "note"]).rows()} == {
        ""
    }
    capsys.readouterr()
    assert main(["bench", "--config", table, "--root", str(tmp_path / "runs"), "--dry-run"], launch) == 0
    assert "warning" not in capsys.readouterr().err
    assert load_bench(write_table(tmp_path)).unfilled_columns() == []  # every column known


def test_main_runs_reports_and_dry_runs_with_a_fake_launcher(tmp_path, capsys):
    table = str(write_table(tmp_path))
    launch = FakeLaunch()
    assert main(["bench", "--config", table, "--root", str(tmp_path / "runs"), "--report"], launch) == 0
    out = capsys.readouterr().out
    assert "[bench] cell 4/4 " in out
    assert "remaining" in out
    assert (tmp_path / "results" / "t_table.md").is_file()
    assert main(["report", "--config", table]) == 0
    assert main(["bench", "--config", table, "--root", str(tmp_path / "runs"), "--dry-run"], launch) == 0
    assert "4 in " in capsys.readouterr().out
    assert len(launch.calls) == 4


BENCH_TABLES = sorted((ROOT / "configs" / "bench").glob("*.yaml"))


def test_every_bench_table_in_configs_loads():
    assert len(BENCH_TABLES) >= 10
    for path in BENCH_TABLES:
        bench = load_bench(path)
        assert bench.cells(), path


def test_tables_that_share_a_results_row_train_it_alike():
    """A row written by one table counts as done for every table with the same cell (e.g.
    table5_mnist's DEC family and dec_family_mnist): they must agree on how it is trained."""
    trained_by: dict[tuple, tuple] = {}
    for path in BENCH_TABLES:
        bench = load_bench(path)
        for cell in bench.cells():
            row = (cell.results, row_key(cell.fields(), bench.ids_of(cell.columns)))
            how = (cell.config, cell.reference, sorted(cell.overrides))
            first = trained_by.setdefault(row, (path.name, how))
            assert first[1] == how, f"{cell.name}: {path.name} trains it as {how}, {first[0]} as {first[1]}"
    assert len(trained_by) > len(BENCH_TABLES)


# -- real cells -----------------------------------------------------------------------------


def bench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_protos.cli", "bench", *args]


def test_real_cell_then_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    """One real `protos fit` child (1 epoch on digits, seed 1 over the config's 0); the rerun
    starts no process."""
    monkeypatch.chdir(ROOT)
    table = write_table(tmp_path, seeds=[1], methods=[{"method": "cm", "config": "configs/cm_{dataset}.yaml"}])
    args = ["bench", "--config", str(table), "--root", str(tmp_path / "runs")]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "t" / "cm_digits_seed1"
    assert {"metrics.json", "config.yaml", "log.txt", "bench.json"} <= {p.name for p in run_dir.iterdir()}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"] == 1  # the cell's seed ran
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(run_dir.rglob("version_*"))
    (row,) = ResultsFile(tmp_path / "results" / "t.csv", [*COLUMNS, "note"]).rows()
    assert row["epochs"] == "1"
    assert float(row["acc"]) > 0.2
    assert float(row["seconds"]) > 0
    refuse = FakeLaunch(fail=("cm_digits_seed1",))
    assert main(args, refuse) == 0
    assert refuse.calls == []
    assert "1 in " in capsys.readouterr().out


@pytest.mark.parametrize(("name", "init"), [("kmeans", "random"), ("kmeans", None), ("gmm", "random")])
def test_a_reference_cell_scores_scikit_learns_fit_with_its_seed_and_init(name, init, tmp_path):
    """`python -m lightning_protos.bench.reference` on digits, seeds 0 and 1: the scores of
    scikit-learn's own KMeans / GaussianMixture with that seed and init on the raw features."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture

    from lightning_protos.bench.reference import main as reference_main

    x, y = load_digits(return_X_y=True)
    x = x / 16.0  # the data layer's scaling of the 0..16 pixel values
    aris = []
    for seed in (0, 1):
        argv = [name, "--dataset", "digits", "--seed", str(seed), "--run-dir", str(tmp_path / str(seed))]
        reference_main([*argv, *(["--init", init] if init else [])])
        got = json.loads((tmp_path / str(seed) / "metrics.json").read_text())["test"]
        if name == "kmeans":
            model = KMeans(10, init=init or "k-means++", n_init=1, random_state=seed)
        else:
            model = GaussianMixture(10, covariance_type="full", init_params=init, random_state=seed)
        assert got["ari"] == pytest.approx(adjusted_rand_score(y, model.fit_predict(x)), abs=1e-9)
        aris.append(got["ari"])
    assert aris[0] != aris[1]  # the seed reaches the fit


@pytest.mark.slow
def test_smoke_twice_and_killed_mid_cell(tmp_path):
    """The issue's measured claims on configs/bench/smoke.yaml: the second run trains nothing and
    writes the same table; killed in the middle of a cell, a rerun has every cell once."""
    args = bench_cmd(
        "--config",
        "configs/bench/smoke.yaml",
        "--root",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "smoke.csv"),
        "--report",
    )
    start = time.monotonic()
    assert subprocess.run(args, cwd=ROOT, timeout=600).returncode == 0
    assert time.monotonic() - start < 120
    table, rows = (tmp_path / "smoke_table.md").read_text(), (tmp_path / "smoke.csv").read_text()
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("log.txt")}
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "[bench] cell" not in again.stdout
    assert (tmp_path / "smoke_table.md").read_text() == table
    assert (tmp_path / "smoke.csv").read_text() == rows
    assert {p: p.stat().st_mtime for p in logs} == logs

    (tmp_path / "smoke.csv").unlink()
    shutil.rmtree(tmp_path / "runs")
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    log = tmp_path / "runs" / "smoke" / "cm_digits_seed0" / "log.txt"
    while proc.poll() is None and not log.is_file():
        time.sleep(0.2)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)  # the bench and its cell, in the middle of the cell
    proc.wait()
    assert subprocess.run(args, cwd=ROOT, timeout=600).returncode == 0
    done = ResultsFile(tmp_path / "smoke.csv", [*COLUMNS, "note"]).rows()
    cells = sorted((r["method"], r["seed"]) for r in done)
    assert cells == [("cm", "0"), ("cm", "1"), ("kmeans", "0"), ("kmeans", "1")]
    assert all(r["acc"] for r in done)


def test_config_can_be_given_per_data_set(tmp_path):
    cm = {
        "digits": str(ROOT / "configs" / "cm_digits.yaml"),
        "5gaussians": str(ROOT / "configs" / "cm_5gaussians.yaml"),
    }
    path = write_table(tmp_path, datasets=["digits", "5gaussians"], methods=[{"method": "cm", "config": cm}])
    cells = load_bench(path, root=tmp_path / "runs").cells()
    assert {c.dataset: c.config.name for c in cells} == {"digits": "cm_digits.yaml", "5gaussians": "cm_5gaussians.yaml"}
    path = write_table(tmp_path, datasets=["digits", "usps"], methods=[{"method": "cm", "config": cm}])
    with pytest.raises(BenchError, match="no config for data set 'usps'"):
        load_bench(path, root=tmp_path / "runs").cells()


def test_method_entry_can_write_its_own_results_file(tmp_path):
    own = tmp_path / "results" / "own.csv"
    methods = [
        {"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")},
        {
            "method": "kmeans",
            "reference": "kmeans",
            "results": str(own),
            "columns": ["method", "dataset", "seed", "acc"],
        },
    ]
    bench = load_bench(write_table(tmp_path, methods=methods), root=tmp_path / "runs")
    runner = Runner(bench, FakeLaunch())
    assert runner.run(runner.pending(bench.cells())) == 0
    assert [r["method"] for r in runner.results.rows()] == ["cm", "cm"]
    assert own.read_text().splitlines()[0] == "method,dataset,seed,acc,note"
    assert [
        (r["method"], r["seed"]) for r in ResultsFile(own, ["method", "dataset", "seed", "acc", "note"]).rows()
    ] == [
        ("kmeans", "0"),
        ("kmeans", "1"),
    ]
    assert Runner(bench, FakeLaunch()).pending(bench.cells()) == []  # both files count as done
    assert set(report(bench)) == {f"{p.stem}/{k}" for p in (bench.results, own) for k in ("table", "summary", "chart")}


def test_results_moves_every_file_of_the_table_and_report_takes_root(tmp_path, capsys):
    methods = [
        {"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")},
        {"method": "kmeans", "reference": "kmeans", "results": str(tmp_path / "results" / "own.csv")},
    ]
    table = write_table(tmp_path, methods=methods)
    bench = load_bench(table, results=tmp_path / "elsewhere" / "main.csv")
    assert set(bench.results_files()) == {tmp_path / "elsewhere" / "main.csv", tmp_path / "elsewhere" / "main_own.csv"}
    # a new file beside the table's own moves the entry's file too
    near = load_bench(table, results=tmp_path / "results" / "t_k20.csv")
    assert set(near.results_files()) == {tmp_path / "results" / "t_k20.csv", tmp_path / "results" / "t_k20_own.csv"}
    root = ["--root", str(tmp_path / "runs")]
    assert (
        main(
            ["bench", "--config", str(table), *root, "--results", str(tmp_path / "elsewhere" / "main.csv")],
            FakeLaunch(),
        )
        == 0
    )
    assert not (tmp_path / "results").exists()  # the table's own files untouched
    assert main(["report", "--config", str(table), *root, "--results", str(tmp_path / "elsewhere" / "main.csv")]) == 0
    assert (tmp_path / "elsewhere" / "main_own_table.md").is_file()


def test_report_does_not_group_by_a_metric_column_such_as_n_clusters_used(tmp_path):
    columns = ["method", "dataset", "seed", "acc", "n_clusters_used"]
    bench = load_bench(write_table(tmp_path, columns=columns), root=tmp_path / "runs")
    results = ResultsFile(bench.results, [*columns, "note"])
    for seed, used in ((0, 10), (1, 9), (2, 10)):
        results.append(
            {"method": "cm", "dataset": "digits", "seed": str(seed), "acc": "0.6", "n_clusters_used": str(used)}
        )
    report(bench)
    with open(bench.results.with_name("t_summary.csv")) as f:
        groups = [r for r in csv.DictReader(f) if r["method"] == "cm"]
    assert len(groups) == 1
    assert groups[0]["n"] == "3"
    assert "n_clusters_used" not in groups[0]


def test_a_failed_attempt_after_a_stopped_one_is_a_failure(tmp_path):
    """The log holds every attempt: the first attempt's SIGTERM must not make the second's crash
    a stop (which writes no row, on every bench again)."""
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    cm0 = [c for c in bench.cells() if c.name == "cm_digits_seed0"]
    runner = Runner(bench, FakeLaunch(killed={"cm_digits_seed0": 0}))
    assert runner.run(cm0) == 0
    assert runner.stopped == ["cm_digits_seed0"]
    runner = Runner(bench, FakeLaunch(fail=("cm_digits_seed0",)))
    assert runner.run(cm0) == 1
    assert not runner.stopped
    assert runner.results.rows()[0]["note"] == "exit 1: RuntimeError: boom"


def test_two_benches_of_one_table_write_each_row_once(tmp_path):
    """Bench B reads the file, bench A then runs every cell; B finds A's finished runs and would
    write their rows again."""
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    late = Runner(bench, FakeLaunch())
    todo = late.pending(bench.cells())
    first = Runner(bench, FakeLaunch())
    assert first.run(first.pending(bench.cells())) == 0
    assert late.run(todo) == 0
    rows = [(r["method"], r["seed"]) for r in first.results.rows()]
    assert sorted(rows) == [("cm", "0"), ("cm", "1"), ("kmeans", "0"), ("kmeans", "1")]


def test_a_row_another_table_labelled_is_not_this_tables(tmp_path):
    """Two tables share a file; one sets the label k. Its row is not the other table's row of
    the same method, data set and seed (whose k is empty): that cell still runs."""
    shared = tmp_path / "results" / "shared.csv"
    columns = ["method", "dataset", "k", "seed", "acc"]
    entry = {"method": "kmeans", "reference": "kmeans", "results": str(shared), "columns": columns}
    labelled = load_bench(write_table(tmp_path, seeds=[0], methods=[{**entry, "k": 5}]), root=tmp_path / "a")
    Runner(labelled, FakeLaunch()).run(labelled.cells())
    plain = load_bench(write_table(tmp_path, seeds=[0], methods=[entry]), root=tmp_path / "b")
    assert [c.name for c in Runner(plain, FakeLaunch()).pending(plain.cells())] == ["kmeans_digits_seed0"]


def test_report_of_a_table_without_rows_is_one_line(tmp_path, capsys):
    table = str(write_table(tmp_path))
    argv = ["bench", "--config", table, "--root", str(tmp_path / "runs"), "--only", "cm_digits_seed0", "--report"]
    assert main(argv, FakeLaunch(killed={"cm_digits_seed0": -15})) == 2
    err = capsys.readouterr().err
    assert "protos bench: error: no results yet in" in err
    assert "Traceback" not in err


def test_report_keeps_apart_rows_that_another_table_labelled(tmp_path):
    # two tables share a file; the rows of the one that sets a label (here `clip`) must not be
    # averaged with the other's when the other reports
    columns = ["method", "dataset", "clip", "seed", "acc"]
    shared = tmp_path / "results" / "shared.csv"
    entry = {"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml"), "results": str(shared)}
    results = ResultsFile(shared, [*columns, "note"])
    for clip, seed, acc in (("", 0, 0.2), ("", 1, 0.4), ("100", 0, 0.8), ("100", 1, 0.9)):
        results.append({"method": "cm", "dataset": "digits", "clip": clip, "seed": str(seed), "acc": str(acc)})
    report(load_bench(write_table(tmp_path, methods=[{**entry, "columns": columns}]), root=tmp_path / "runs"))
    with open(shared.with_name("shared_summary.csv")) as f:
        means = {r["clip"]: float(r["acc_mean"]) for r in csv.DictReader(f)}
    assert means == pytest.approx({"": 0.3, "100": 0.85})


def test_method_entry_can_keep_to_some_data_sets(tmp_path):
    cm = {"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")}
    gmm = {"method": "gmm", "reference": "gmm", "datasets": ["5gaussians"]}
    path = write_table(tmp_path, datasets=["digits", "5gaussians"], methods=[cm, gmm])
    cells = load_bench(path, root=tmp_path / "runs").cells()
    assert sorted({(c.method, c.dataset) for c in cells}) == [
        ("cm", "5gaussians"),
        ("cm", "digits"),
        ("gmm", "5gaussians"),
    ]
    path = write_table(tmp_path, methods=[cm, gmm])  # 5gaussians is not a data set of this table
    with pytest.raises(BenchError, match="not all among the table's"):
        load_bench(path, root=tmp_path / "runs")


def test_only_runs_the_matching_cells_and_rejects_a_glob_that_matches_none(tmp_path, capsys):
    table, root = str(write_table(tmp_path)), str(tmp_path / "runs")
    launch = FakeLaunch()
    assert main(["bench", "--config", table, "--root", root, "--only", "kmeans-*", "--only", "*_seed1"], launch) == 0
    assert sorted(names(launch)) == ["cm_digits_seed1", "kmeans-random_digits_seed0", "kmeans-random_digits_seed1"]
    assert main(["bench", "--config", table, "--root", root, "--only", "dec*"], launch) == 2
    assert "no cell of" in capsys.readouterr().err


@pytest.mark.parametrize("native", [False, True])
def test_bench_warns_of_bf16_overrides_on_a_cpu_without_bf16_hardware(tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(runner_module, "cpu_has_native_bf16", lambda: native)
    table = str(write_table(tmp_path, overrides={"trainer.max_epochs": 1, "trainer.precision": "bf16-mixed"}))
    assert main(["bench", "--config", table, "--root", str(tmp_path / "runs"), "--dry-run"], FakeLaunch()) == 0
    warned = "[bench] warning: precision bf16-mixed on a CPU without bf16 hardware" in capsys.readouterr().err
    assert warned == (not native)


def test_set_overrides_every_lightning_cell_and_is_noted_in_its_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner_module, "cpu_has_native_bf16", lambda: False)
    table = str(write_table(tmp_path, overrides={"trainer.max_epochs": 1, "trainer.precision": "bf16-mixed"}))
    launch = FakeLaunch(fail=("kmeans-random_digits_seed0",))
    finished = tmp_path / "runs" / "t" / "cm_digits_seed1"  # trained before, its row not written
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({"test": {"acc": 0.5, "nmi": 0.4, "ari": 0.3}}))
    argv = ["bench", "--config", table, "--root", str(tmp_path / "runs"), "--set", "trainer.precision=32-true"]
    assert main([*argv, "--set", "trainer.max_epochs=2"], launch) == 1  # one cell failed
    out, err = capsys.readouterr()
    assert "warning" not in err  # --set replaced the table's bf16
    for name, command in launch.calls:
        if name.startswith("cm_"):
            i = command.index("--trainer.precision=bf16-mixed")
            assert command[i + 1 : i + 3] == ["--trainer.precision=32-true", "--trainer.max_epochs=2"]
        else:  # scikit-learn references take no trainer keys
            assert not any("trainer" in a for a in command)
    with open(tmp_path / "results" / "t.csv", newline="") as f:
        notes = {(r["method"], r["seed"]): r["note"] for r in csv.DictReader(f)}
    set_note = "set trainer.precision=32-true trainer.max_epochs=2"
    assert notes[("cm", "0")] == set_note
    assert notes[("cm", "1")] == ""  # not trained under --set
    assert notes[("kmeans", "0")] == "exit 1: RuntimeError: boom"  # references take no --set
    assert notes[("kmeans", "1")] == ""
    assert "cm_digits_seed1" not in names(launch)
    assert out.count("failed in") == 1  # only the failed cell, not the noted ones
    assert main(["bench", "--config", table, "--set", "precision"], launch) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


def test_report_of_probe_and_mse_columns_picks_its_best_run_and_formats_errors(tmp_path):
    from lightning_protos.bench.report import write_report

    columns = ["method", "dataset", "seed", "stat_acc", "knn_acc", "test_mse"]
    rows = [
        {"method": "vaesim", "dataset": "x", "seed": "0", "stat_acc": "0.5", "knn_acc": "0.9", "test_mse": "0.0123"},
        {"method": "vaesim", "dataset": "x", "seed": "1", "stat_acc": "0.7", "knn_acc": "0.8", "test_mse": "0.0456"},
    ]
    paths = write_report(rows, ["method", "dataset"], columns, tmp_path / "v.csv", "v")
    table = paths["table"].read_text()
    assert "best run (max STAT_ACC)" in table
    assert "| 60.0 ± 14.1 | 85.0 ± 7.1 | 0.029 ± 0.0235 | 70.0 / 80.0 / 0.0456 (seed 1) |" in table
    assert paths["chart"].is_file()
    only_mse = write_report(rows, ["method"], ["method", "seed", "test_mse"], tmp_path / "m.csv", "m")
    assert "best run (min TEST_MSE)" in only_mse["table"].read_text()
    assert "chart" not in only_mse  # no score to draw


# -- learning curves ----------------------------------------------------------------------


def log_run(run_dir: Path, mse: dict[int, float], epochs: int = 4, steps_per_epoch: int = 3) -> None:
    """Event files as a Lightning run leaves them: every log call through TensorBoardLogger with
    the ``epoch`` scalar the trainer adds; ``val/mse`` in the epochs of ``mse``, then a test
    logged after fit (step and epoch one past the last) into a second event file."""
    from lightning.pytorch.loggers import TensorBoardLogger

    def logger() -> TensorBoardLogger:
        return TensorBoardLogger(save_dir=run_dir.parent, name="", version=run_dir.name)

    fit = logger()
    for epoch in range(epochs):
        step = (epoch + 1) * steps_per_epoch - 1
        fit.log_metrics({"train/loss": 1.0 / (epoch + 1), "epoch": epoch}, step)
        if epoch in mse:
            fit.log_metrics({"val/mse": mse[epoch], "epoch": epoch}, step)
    fit.finalize("success")
    test = logger()
    test.log_metrics({"test/mse": min(mse.values()), "epoch": epochs}, epochs * steps_per_epoch)
    test.finalize("success")


def test_report_writes_curves_per_epoch_and_skips_cells_without_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # `protos report` reads the run dirs under ./bench_runs
    methods = [
        {"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")},
        {"method": "aecm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml"), "init": "random"},
        {"method": "kmeans", "reference": "kmeans", "init": "random"},
    ]
    table = write_table(tmp_path, methods=methods, curves=["val/mse", "test/mse", "val/ari"])
    bench = load_bench(table)
    assert bench.curves == ["val/mse", "test/mse", "val/ari"]
    Runner(bench, FakeLaunch()).run(bench.cells())  # results rows and run dirs
    mse = {("cm", 0): 0.5, ("cm", 1): 0.7, ("aecm", 0): 0.2, ("aecm", 1): 0.4}
    for cell in bench.cells():
        if (cell.method, cell.seed) in mse:  # val/mse after epochs 1 and 3 (0-based), halving
            base = mse[cell.method, cell.seed]
            log_run(cell.run_dir, {1: base, 3: base / 2})
    shutil.rmtree(bench.root / "t" / "aecm-random_digits_seed1")
    curves = tmp_path / "results" / "t_curves.csv"
    curves.write_text(  # a row of another table sharing the results file, one stale row of ours,
        # and one of a cell whose run dir is gone (read on another machine): kept
        "method,init,dataset,seed,tag,epoch,value\ndec,random,digits,0,val/mse,9,0.9\ncm,,digits,0,val/mse,9,9\n"
        "aecm,random,digits,1,val/mse,3,0.3\n"
    )
    capsys.readouterr()

    assert main(["report", "--config", str(table)]) == 0
    out = capsys.readouterr().out
    assert "[report] curves: skipped aecm-random_digits_seed1: no run dir" in out
    assert "[report] curves: cm_digits_seed0 logged no val/ari" in out
    assert "kmeans" not in out  # references train no epochs: nothing to skip
    assert f"[report] wrote {curves}" in out
    with open(curves, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "init", "dataset", "seed", "tag", "epoch", "value"]
    got = [(r["method"], r["init"], r["seed"], r["tag"], int(r["epoch"]), float(r["value"])) for r in rows]
    assert got == [
        ("dec", "random", "0", "val/mse", 9, 0.9),
        ("aecm", "random", "1", "val/mse", 3, 0.3),
        ("cm", "", "0", "val/mse", 1, 0.5),
        ("cm", "", "0", "val/mse", 3, 0.25),
        ("cm", "", "0", "test/mse", 4, 0.25),
        ("aecm", "random", "0", "val/mse", 1, 0.2),
        ("aecm", "random", "0", "val/mse", 3, 0.1),
        ("aecm", "random", "0", "test/mse", 4, 0.1),
        ("cm", "", "1", "val/mse", 1, 0.7),
        ("cm", "", "1", "val/mse", 3, 0.35),
        ("cm", "", "1", "test/mse", 4, 0.35),
    ]
    assert {r["dataset"] for r in rows} == {"digits"}
    assert (tmp_path / "results" / "t_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert set(report(bench)) >= {"t/curves", "t/curves_chart", "t/table"}


def test_report_writes_no_curves_file_without_run_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    methods = [{"method": "cm", "config": str(ROOT / "configs" / "cm_{dataset}.yaml")}]
    bench = load_bench(write_table(tmp_path, methods=methods, curves=["val/mse"]))
    Runner(bench, FakeLaunch()).run(bench.cells())
    shutil.rmtree(bench.root)

    assert "t/table" in report(bench)
    assert not (tmp_path / "results" / "t_curves.csv").exists()


def test_a_cell_another_process_trains_is_left_to_it(tmp_path, capsys):
    """A second bench of the table, or the child of a bench killed without it, is found by the
    cell's run directory on its command line, relative to its own working directory: the cell
    is not trained twice. The same path under another directory is another cell."""
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    busy, reference = bench.cells()[0], bench.cells()[1]
    assert reference.reference is not None
    relative = busy.run_dir.relative_to(tmp_path) / "checkpoints"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    other = subprocess.Popen([*sleep, f"--last_checkpoint.dirpath={relative}"], cwd=tmp_path)
    (tmp_path / "another_checkout").mkdir()
    elsewhere = subprocess.Popen([*sleep, f"--last_checkpoint.dirpath={relative}"], cwd=tmp_path / "another_checkout")
    ref = subprocess.Popen([*sleep, "--run-dir", str(reference.run_dir)])
    try:
        time.sleep(0.3)
        assert runner_module.training_elsewhere(busy) == other.pid
        assert runner_module.training_elsewhere(reference) == ref.pid
        assert runner_module.training_elsewhere(bench.cells()[2]) is None
        ref.kill()
        ref.wait()
        loop = tmp_path / "loop"
        loop.symlink_to(loop)  # a command line naming a path that cannot be resolved is no match
        looping = subprocess.Popen([*sleep, "--run-dir", str(loop)])
        time.sleep(0.2)
        assert runner_module.training_elsewhere(bench.cells()[2]) is None
        looping.kill()
        looping.wait()
        launch = FakeLaunch()
        Runner(bench, launch).run(bench.cells())
        assert busy.name not in names(launch)
        assert len(names(launch)) == 3
        assert f"{busy.name}: process {other.pid} is training it already" in capsys.readouterr().out
        other.kill()
        other.wait()
        assert runner_module.training_elsewhere(busy) is None  # the same path from another directory
    finally:
        for proc in (other, elsewhere, ref):
            proc.kill()
            proc.wait()


def test_a_finished_run_whose_process_is_still_finishing_is_left_to_it(tmp_path, capsys):
    """Its metrics are written, its attempt is not closed, and its process (the final test's
    end) is alive: no row yet, and its time is left for that attempt to record."""
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    cell = bench.cells()[0]
    cell.run_dir.mkdir(parents=True)
    times = {"seconds": 30.0, "attempts": 1, "running_since": time.time() - 100}
    (cell.run_dir / "bench.json").write_text(json.dumps(times))
    (cell.run_dir / "metrics.json").write_text(json.dumps({"test": {"epoch": 1, "acc": 0.5, "nmi": 0.4, "ari": 0.3}}))
    marker = f"--last_checkpoint.dirpath={cell.run_dir / 'checkpoints'}"
    finishing = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        time.sleep(0.2)
        runner = Runner(bench, FakeLaunch())
        runner.run([cell])
    finally:
        finishing.kill()
        finishing.wait()
    assert runner.results.rows() == []
    assert json.loads((cell.run_dir / "bench.json").read_text()) == times
    assert "is training it already" in capsys.readouterr().out


def test_a_run_that_finished_after_its_bench_was_killed_counts_its_last_attempt(tmp_path):
    """The child went on and finished after its bench was killed: the next bench writes the row,
    the attempt counted up to the last file it wrote (its metrics)."""
    bench = load_bench(write_table(tmp_path), root=tmp_path / "runs")
    cell = bench.cells()[0]
    cell.run_dir.mkdir(parents=True)
    t0 = time.time() - 1000
    (cell.run_dir / "bench.json").write_text(json.dumps({"seconds": 30.0, "attempts": 2, "running_since": t0}))
    (cell.run_dir / "metrics.json").write_text(json.dumps({"test": {"epoch": 1, "acc": 0.5, "nmi": 0.4, "ari": 0.3}}))
    os.utime(cell.run_dir / "metrics.json", (t0 + 400, t0 + 400))
    launch = FakeLaunch()
    runner = Runner(bench, launch)
    runner.run([cell])
    assert launch.calls == []
    assert float(runner.results.rows()[0]["seconds"]) == pytest.approx(430.0)
    assert json.loads((cell.run_dir / "bench.json").read_text())["running_since"] is None
