"""``protos bench``: every (data set, seed, method) cell of a table as an ordinary run.

    protos bench --config configs/bench/smoke.yaml [--jobs N] [--gpus 0,1] [--report] [--dry-run]
    protos report --config configs/bench/smoke.yaml     # tables from the rows so far

The table's YAML schema is in :mod:`lightning_protos.bench.spec`. Each cell runs as a child
process (``python -m lightning_protos.cli fit ...`` or a scikit-learn reference) in its own
run directory ``<root>/<name>/<cell>/`` with its output in ``log.txt``, and adds one row to the
results CSV when it ends. Running the command again skips cells that have a row, writes the row
of a cell that finished without one, and resumes a cell that has ``checkpoints/last.ckpt`` but
no final metrics. A failed cell is a row with empty metrics and the last line of its log in
``note``. ``--set KEY=VALUE`` overrides a key of every Lightning cell after the table's own
overrides (``--set trainer.precision=32-true`` on a CPU without bf16 hardware) and is written
into the ``note`` of the rows of the Lightning cells it trained. ``seconds`` adds up the wall time of every process
a cell ran (``bench.json``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

from ..hardware import check_cpu_bf16, cpu_has_native_bf16, usable_cores
from .report import write_curves, write_report
from .spec import (
    CELL_KEYS,
    CHECKPOINT_DIR_FLAG,
    REFERENCE_DIR_FLAG,
    VALUE_COLUMNS,
    Bench,
    BenchError,
    Cell,
    check_cells,
    has_header,
    load_bench,
    row_key,
)

try:
    import fcntl  # a results file's lock: POSIX
except ImportError:  # Windows: one bench at a time
    fcntl = None

LOG, TIMES, METRICS_FILE = "log.txt", "bench.json", "metrics.json"
Launch = Callable[[Cell, list[str], Path, dict[str, str]], int]
"""Runs a cell's command with its output appended to the log; returns the exit code."""


class ResultsFile:
    """The results CSV: a header of exactly the table's columns, then one row per finished run."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self._lock = threading.Lock()
        if has_header(self.path):
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != columns:
                raise BenchError(
                    f"{path} has columns {','.join(header)}, the table lists {','.join(columns)}; "
                    "move the old file away or restore the table's columns"
                )

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict[str, str], ids: list[str] | None = None) -> bool:
        """Appends ``row``, unless the file holds a row of the same cell already (the same
        values in the ``ids`` columns): another bench of the table, or of one sharing the file,
        may have written it since this one read the file. The check and the write hold the
        file's lock (``flock``, where the system has it). Returns whether it wrote."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+", newline="") as f:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
                f.seek(0)
                text = f.read()
                if ids is not None and text:
                    key = row_key(row, ids)
                    if any(row_key(r, ids) == key for r in csv.DictReader(io.StringIO(text))):
                        return False
                if text and not text.endswith("\n"):  # a last row edited by hand may have lost its newline
                    f.write("\n")
                writer = csv.DictWriter(f, fieldnames=self.columns)
                if not text:
                    writer.writeheader()
                writer.writerow(row)
                return True


def final_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The ``"test"`` entry of the run's ``metrics.json`` (written after fit), if any."""
    try:
        return json.loads((run_dir / METRICS_FILE).read_text()).get("test")
    except (OSError, ValueError):
        return None


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def _times(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / TIMES).read_text())
    except (OSError, ValueError):
        return {"seconds": 0.0, "attempts": 0, "running_since": None}


def _close_unended_attempt(run_dir: Path) -> dict[str, Any]:
    """``bench.json``'s record, with an attempt that ended without recording its time (killed,
    or a child that went on after its bench was killed) counted up to the last file it wrote."""
    state = _times(run_dir)
    if state["running_since"] is not None:
        written = (p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and p != run_dir / TIMES)
        end = max(written, default=state["running_since"])
        state.update(seconds=state["seconds"] + max(0.0, end - state["running_since"]), running_since=None)
    return state


def _run_dirs_named(args: list[str], cwd: Path) -> Iterator[Path]:
    """The cell run directories a command line names, resolved against its working directory."""
    for arg, following in zip(args, [*args[1:], ""], strict=True):
        if arg.startswith(f"{CHECKPOINT_DIR_FLAG}="):
            yield (cwd / arg.split("=", 1)[1]).resolve().parent
        elif arg == REFERENCE_DIR_FLAG and following:
            yield (cwd / following).resolve()


def training_elsewhere(cell: Cell) -> int | None:
    """The pid of a live process already training ``cell`` in its run directory: a second bench
    of the same table, or the child of a bench killed without it. Found by the run directory on
    its command line (Linux's ``/proc``; ``None`` elsewhere). Tables that share a results row
    train it in run directories of their own: two such benches at once are not detected."""
    want = cell.run_dir.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if want in _run_dirs_named(args, Path(os.readlink(proc / "cwd"))):
                return int(proc.name)
        except (OSError, RuntimeError, ValueError):  # gone, another user's, a symlink loop, ...
            continue
    return None


def start_attempt(run_dir: Path, note: str = "", trains: dict[str, str] | None = None) -> float:
    """Notes in ``bench.json`` that a process starts, with what ``--set`` changed for it
    (``note``) and what it trains (``trains``: :func:`what_it_trains`); an attempt killed before
    it could record its time is counted up to the last file it wrote in its run directory (its
    log, its epochs' checkpoints and logger events; ``bench.json``, the bench's own record, is
    not the attempt's work)."""
    state = _close_unended_attempt(run_dir)
    now = time.time()
    state.update(running_since=now, attempts=state["attempts"] + 1)
    state["sets"] = list(dict.fromkeys([*state.get("sets", []), note]))
    if trains is not None:
        state["trains"] = trains
    (run_dir / TIMES).write_text(json.dumps(state))
    return now


def attempts_note(sets: list[str]) -> str:
    """What ``--set`` changed for a cell's attempts: one note, or each where they differed."""
    if len(sets) < 2:
        return sets[0] if sets else ""
    return "attempts: " + " / ".join(s or "the table's settings" for s in sets)


def end_attempt(run_dir: Path, started: float) -> None:
    """Adds the attempt's time, counted from the start ``bench.json`` records (``started`` if
    it records none): moving ``running_since`` forward by hand takes a pause out of the row (a
    run stopped with SIGSTOP while a speed measurement had the machine), for an attempt that
    finishes as for one that is killed."""
    state = _times(run_dir)
    since = state["running_since"] if state["running_since"] is not None else started
    state.update(seconds=state["seconds"] + time.time() - since, running_since=None)
    (run_dir / TIMES).write_text(json.dumps(state))


# --set keys that change how fast a cell trains, not what it trains (``init_args.`` left out):
# a table finished under another precision or compiled keeps its rows (each row's note says
# what its run used)
SPEED_KEYS = (
    "trainer.precision", "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.enable_progress_bar", "data.num_workers", "data.device_fraction",
)  # fmt: skip
SET_ITEM = re.compile(r"(?:^| )([A-Za-z_][\w.]*)=")  # where each KEY=VALUE of a note starts


def attempts_of(note: str) -> list[str]:
    """The ``--set`` note of each attempt in a row's note (before its failure, if any)."""
    ours = note.split("; ")[0]
    if ours.startswith("attempts: "):
        return ours.removeprefix("attempts: ").split(" / ")
    return [ours if ours.startswith("set ") else ""]


def what_sets(note: str) -> dict[str, str]:
    """The ``KEY=VALUE`` settings of one attempt's ``--set`` note (``set k=v k2=v2``, values may
    hold spaces) that change what is trained: not the :data:`SPEED_KEYS` nor ``compile.*``."""
    text = note.removeprefix("set ") if note.startswith("set ") else ""
    starts = list(SET_ITEM.finditer(text))
    items = (
        (item.group(1), text[item.end() : after.start() if after else len(text)])
        for item, after in zip(starts, [*starts[1:], None], strict=False)  # empty: no settings
    )
    return training_settings(items)


def what_it_trains(cell: Cell) -> dict[str, str]:
    """A Lightning cell's config and the overrides (the table's, then ``--set``'s) that change
    what it trains (the last of a key wins, as on the command line)."""
    items = (item.removeprefix("--").partition("=")[::2] for item in cell.overrides)
    return {"config": str(cell.config), **training_settings(items)}


def training_settings(items) -> dict[str, str]:
    """``KEY: VALUE`` of the ``(KEY, VALUE)`` settings that change what is trained, keys without
    ``.init_args.``: not the :data:`SPEED_KEYS` nor ``compile.*``."""
    settings = {}
    for key, value in items:
        key = key.replace(".init_args.", ".")
        if key not in SPEED_KEYS and not key.startswith("compile."):
            settings[key] = value
    return settings


def make_row(
    fields: dict[str, str], columns: list[str], metrics: dict[str, Any] | None, seconds: float | None, note: str = ""
) -> dict[str, str]:
    """A results row: the cell's fields, ``epochs``, ``seconds``, ``note``, else a metric."""
    metrics = metrics or {}
    extra = {"epochs": metrics.get("epoch"), "seconds": seconds, "note": note}
    values = {c: fields[c] if c in fields else extra[c] if c in extra else metrics.get(c) for c in columns}
    return {c: _text(c, v) for c, v in values.items()}


def _text(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "seconds":
        return f"{value:.1f}"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def last_line(log: Path) -> str:
    """The last non-empty line of a log, for a failed row's note."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


# what Lightning logs when a signal ends a fit early (SIGTERM: exit 0, Ctrl-C: exit 1)
STOPPED_BY = ("Received SIGTERM", "Detected KeyboardInterrupt")


def stopped_by_signal(code: int, log: Path, since: int = 0) -> bool:
    """Whether the cell's process was stopped by SIGTERM or SIGINT (sent to it alone: its bench
    goes on) rather than failing: a crash (an out-of-memory kill, a segfault) is a failure.
    Read from the log past ``since``, where this attempt started writing: an earlier attempt's
    stop is not this one's."""
    if code in (-signal.SIGTERM, -signal.SIGINT):
        return True
    try:
        with open(log, "rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - 20_000))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return any(message in tail for message in STOPPED_BY)


class Subprocesses:
    """The default :data:`Launch`: child processes, which :meth:`terminate` stops."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def __call__(self, cell: Cell, command: list[str], log: Path, env: dict[str, str]) -> int:
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            with self._lock:
                self._running.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._running.discard(proc)

    def terminate(self, grace: float = 30.0) -> None:
        """SIGTERM to each running child (Lightning stops after its batch), then SIGKILL."""
        with self._lock:
            procs = list(self._running)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()


class Outcome(NamedTuple):
    """A cell's row (``None`` if stopped), whether a process ran, the seconds it took, and
    whether it failed."""

    row: dict[str, str] | None
    ran: bool
    seconds: float
    failed: bool = False


class Runner:
    """Runs a table's cells that have no row yet, ``jobs`` at a time, appending their rows."""

    def __init__(
        self, bench: Bench, launch: Launch, jobs: int = 1, gpus: list[str] | None = None, note: str = ""
    ) -> None:
        self.bench, self.launch, self.jobs, self.note = bench, launch, jobs, note  # note: of every row written
        self.files = {path: ResultsFile(path, columns) for path, columns in bench.results_files().items()}
        self.results = self.files.get(bench.results) or ResultsFile(bench.results, bench.columns)
        self.stop = threading.Event()
        self.stopped: list[str] = []  # cells whose process alone was stopped: no row, resumable
        self.elsewhere: list[str] = []  # cells another process is training: no row from this bench
        # each CPU cell's share of the cores when several run at once (see _device)
        self._threads = str(max(1, usable_cores() // jobs)) if jobs > 1 and not gpus else None
        self._gpus: queue.Queue[str] | None = None
        if gpus:
            self._gpus = queue.Queue()
            for gpu in gpus:
                self._gpus.put(gpu)

    def _rows(self) -> dict[tuple[Path, tuple], dict[str, str]]:
        return {(path, row_key(r, self.bench.ids_of(f.columns))): r for path, f in self.files.items() for r in f.rows()}

    def pending(self, cells: list[Cell]) -> list[Cell]:
        """The cells with no row in their results file."""
        done = self._rows()
        return [c for c in cells if (c.results, row_key(c.fields(), self.bench.ids_of(c.columns))) not in done]

    def check_settings(self, cells: list[Cell]) -> None:
        """Refuses a bench whose ``--set`` changes what a cell trains (other than :data:`SPEED_KEYS`)
        from what its row or its run directory was trained with: the row would be skipped, or the
        run resumed or written, under the other settings. A variant needs rows and run
        directories of its own."""
        rows, now = self._rows(), what_sets(self.note)
        for cell in cells:
            if cell.reference is not None:
                continue
            row = rows.get((cell.results, row_key(cell.fields(), self.bench.ids_of(cell.columns))))
            recorded = _times(cell.run_dir) if (cell.run_dir / TIMES).is_file() else None
            if row is not None:
                attempts, where = attempts_of(row.get("note") or ""), f"its row in {cell.results}"
            elif recorded is not None:
                attempts, where = recorded.get("sets", []), str(cell.run_dir)
            else:
                continue
            other = next((a for a in attempts if what_sets(a) != now), None)
            if other is not None:
                said, asked = (n.removeprefix("set ") or "the table's settings" for n in (other, self.note))
                raise BenchError(
                    f"{cell.name} was trained with {said} ({where}), this bench asks for {asked}: "
                    "give a variant results and run dirs of its own (--results NEW.csv --root NEW_DIR)"
                )
            # the table's own overrides or config, edited since (run directories of before
            # 2026-12-07 record nothing to compare)
            trained, wants = (recorded or {}).get("trains"), what_it_trains(cell)
            if trained is not None and trained != wants:
                changed = ", ".join(
                    f"{k} {trained.get(k, '(unset)')} -> {wants.get(k, '(unset)')}"
                    for k in sorted(set(trained) | set(wants))
                    if trained.get(k) != wants.get(k)
                )
                raise BenchError(
                    f"{cell.name} was trained with other settings ({cell.run_dir}: {changed}): give the "
                    "changed table results and run dirs of its own (--results NEW.csv --root NEW_DIR)"
                )

    @staticmethod
    def plan(cell: Cell) -> str:
        """What running the cell will do: write a finished run's row, resume, or start."""
        if final_metrics(cell.run_dir) is not None:
            return "finished: write its row"
        return "resume from last.ckpt" if last_checkpoint(cell.run_dir) else "start"

    def run_cell(self, cell: Cell) -> Outcome:
        """Trains the cell unless its run finished, then appends its row. No row if the bench
        was stopped meanwhile, or if another process is training the cell."""
        start, run_dir = time.monotonic(), cell.run_dir
        metrics, ran, note = final_metrics(run_dir), False, ""
        if metrics is None:
            if self.stop.is_set():
                return Outcome(None, ran, 0.0)
            run_dir.mkdir(parents=True, exist_ok=True)
            with self._device() as env:
                if self.stop.is_set():  # stopped while this cell waited for a GPU
                    return Outcome(None, ran, 0.0)
                if self._trained_elsewhere(cell):
                    return Outcome(None, ran, 0.0)
                lightning = cell.reference is None  # a reference (k-means, GMM) takes no settings
                started = start_attempt(
                    run_dir, self.note if lightning else "", what_it_trains(cell) if lightning else None
                )
                log_start = (run_dir / LOG).stat().st_size if (run_dir / LOG).is_file() else 0
                try:
                    code = self.launch(cell, cell.command(last_checkpoint(run_dir)), run_dir / LOG, env)
                except KeyboardInterrupt:
                    self.stop.set()  # before this worker can take the next cell
                    raise
                finally:
                    end_attempt(run_dir, started)
            ran = True
            metrics = final_metrics(run_dir) if code == 0 else None
            if metrics is None and self.stop.wait(2.0):  # stopped by the bench's own interrupt
                return Outcome(None, ran, time.monotonic() - start)
            if metrics is None and stopped_by_signal(code, run_dir / LOG, log_start):
                # the training process alone was stopped: no row, the next bench resumes it
                print(f"[bench] {cell.name}: stopped before its final test; run the bench again to resume it")
                self.stopped.append(cell.name)
                return Outcome(None, ran, time.monotonic() - start)
            if metrics is None:
                note = f"exit {code}: {last_line(run_dir / LOG)}" if code else "no final test metrics"
        # what --set changed, where it did: recorded by each attempt, also one of an earlier bench
        times = _times(run_dir)
        if not ran and times["running_since"] is not None:  # its last attempt went on after its bench
            if self._trained_elsewhere(cell):  # and is still finishing (its final test): left to it
                return Outcome(None, ran, 0.0)
            times = _close_unended_attempt(run_dir)
            (run_dir / TIMES).write_text(json.dumps(times))
        ours = attempts_note(times.get("sets", [self.note] if ran else [])) if cell.reference is None else ""
        note = "; ".join(n for n in (ours, note) if n)
        row = make_row(cell.fields(), list(cell.columns), metrics, times["seconds"] or None, note)
        self.files[cell.results].append(row, self.bench.ids_of(cell.columns))
        return Outcome(row, ran, time.monotonic() - start, metrics is None)

    def _trained_elsewhere(self, cell: Cell) -> bool:
        pid = training_elsewhere(cell)
        if pid is not None:
            print(f"[bench] {cell.name}: process {pid} is training it already (another bench of this table, "
                  "or the child of a killed one); skipped, a later bench writes its row", flush=True)  # fmt: skip
            self.elsewhere.append(cell.name)
        return pid is not None

    @contextmanager
    def _device(self) -> Iterator[dict[str, str]]:
        """The child's environment (unbuffered output, so that ``log.txt`` is live); with
        ``gpus``, one free GPU as ``CUDA_VISIBLE_DEVICES``; without, and with ``jobs`` > 1, an
        equal share of the CPU cores as ``OMP_NUM_THREADS`` unless the user set it (torch would
        otherwise give each of the cells every core, and they would fight over them)."""
        if self._gpus is None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if self._threads and "OMP_NUM_THREADS" not in env:
                env["OMP_NUM_THREADS"] = self._threads
            yield env
            return
        gpu = self._gpus.get()
        try:
            yield {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": gpu}
        finally:
            self._gpus.put(gpu)

    def run(self, cells: list[Cell]) -> int:
        """Runs the cells, printing a progress line as each ends; returns how many failed.

        On Ctrl-C or SIGTERM the running children are stopped and write no row; their run
        directories resume on the next run.
        """
        t0, n, i, n_failed, spent = time.monotonic(), len(cells), 0, 0, []
        with ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(self.run_cell, cell): cell for cell in cells}
            pending = set(futures)
            try:
                while pending:  # wakes every second, so that a signal is handled promptly
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        row, ran, seconds, failed = future.result()
                        if row is None:
                            continue
                        i = i + 1
                        n_failed += failed
                        spent += [seconds] if ran else []
                        left = (n - i) * sum(spent) / len(spent) / self.jobs if spent else 0.0
                        log = futures[future].run_dir / LOG
                        what = f"failed in {seconds:.0f}s (see {log})" if failed else f"done in {seconds:.0f}s"
                        print(
                            f"[bench] cell {i}/{n} {futures[future].name} {what}; "
                            f"elapsed {_clock(time.monotonic() - t0)}, ~{_clock(left)} remaining",
                            flush=True,
                        )
            except KeyboardInterrupt:
                self.stop.set()
                getattr(self.launch, "terminate", lambda: None)()
                pool.shutdown(cancel_futures=True)
                raise
        return n_failed


def _clock(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the bench as Ctrl-C does: children are stopped, no row is written for them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report(bench: Bench) -> dict[str, Path]:
    """Writes the table, summary and chart of the rows so far of each results file, in the
    table's cell order, and the learning curves of its cells where the table lists ``curves``."""
    written: dict[str, Path] = {}
    for path, columns in bench.results_files().items():
        rows = ResultsFile(path, columns).rows()
        if not rows:
            continue
        ids = bench.ids_of(columns)
        order = {row_key(c.fields(), ids): i for i, c in enumerate(bench.cells()) if c.results == path}
        rows.sort(key=lambda r: order.get(row_key(r, ids), len(order)))
        # every label column of the file, also those only another table sharing it sets (its rows
        # must not be averaged with this table's)
        labels = [c for c in columns if c not in (*CELL_KEYS, *VALUE_COLUMNS)]
        group_by = ["method", *labels, "dataset"]
        paths = write_report(rows, group_by, columns, path, bench.name)
        if bench.curves:
            cells = [c for c in bench.cells() if c.results == path]
            paths.update(write_curves(cells, bench.curves, path, bench.name))
        written.update({f"{path.stem}/{kind}": p for kind, p in paths.items()})
    if not written:
        raise BenchError(f"no results yet in {', '.join(map(str, bench.results_files()))}; run protos bench first")
    return written


def bf16_on_this_cpu(cells: list[Cell]) -> str | None:
    """The CLI's warning where the cells' overrides ask for bf16 on a CPU without bf16 hardware."""
    native = cpu_has_native_bf16()  # once, not per cell
    for cell in cells:
        precisions = [o.partition("=")[2] for o in cell.overrides if o.startswith("--trainer.precision=")]
        if precisions and (problem := check_cpu_bf16(precisions[-1], on_cpu=True, native=native)):
            return problem
    return None


def with_sets(cells: list[Cell], sets: list[str]) -> list[Cell]:
    """The cells with ``KEY=VALUE`` overrides after their own (Lightning cells only)."""
    for item in sets:
        key, eq, _ = item.partition("=")
        if not eq or not key or key.startswith("-"):
            raise BenchError(
                f"--set takes KEY=VALUE with a dotted CLI key, e.g. trainer.precision=32-true; got {item!r}"
            )
    extra = tuple(f"--{item}" for item in sets)
    return [c if c.reference is not None else replace(c, overrides=(*c.overrides, *extra)) for c in cells]


DESCRIPTIONS = {
    "bench": (__doc__ or "").split("\n")[0],
    "report": "``protos report``: a table's Markdown table, summary CSV and chart (mean ± std over seeds) "
    "from its results rows so far, and its learning curves where it lists them.",
}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"protos {command}",
        description=DESCRIPTIONS[command],
        epilog="bench table schema: see lightning_protos/bench/spec.py",
    )
    parser.add_argument("--config", required=True, type=Path, help="bench table, e.g. configs/bench/smoke.yaml")
    parser.add_argument(
        "--results",
        type=Path,
        help="results CSV instead of the table's `results`; an entry's own file NAME goes beside it as STEM_NAME",
    )
    parser.add_argument("--root", type=Path, help="parent of the run directories (default bench_runs)")
    if command == "bench":
        parser.add_argument(
            "--jobs",
            type=int,
            help="cells run at once (default 1, or one per --gpus entry); on CPU each gets its share of the cores",
        )
        parser.add_argument("--gpus", help="comma-separated GPU ids: each cell gets one free GPU")
        parser.add_argument("--report", action="store_true", help="write the tables when the cells are done")
        parser.add_argument("--dry-run", action="store_true", help="check the table and list what would run")
        parser.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a dotted key of every cell after the table's overrides, e.g. trainer.precision=32-true; "
            "noted in the rows it writes (repeatable)",
        )
        parser.add_argument(
            "--only",
            action="append",
            metavar="GLOB",
            help="run only the cells whose name (METHOD[-LABELS]_DATASET_seedN) matches, e.g. 'aecm-random_*' "
            "or '*_seed2' (repeatable; 'vae_*' also matches vae_kl_...: name the data set, 'vae_mnist_*')",
        )
    return parser


def main(argv: list[str] | None = None, launch: Launch | None = None) -> int:
    """``protos bench ...`` or ``protos report ...`` (``argv[0]`` says which).

    Returns the exit code: 0, 1 if a cell failed or has no row yet (stopped, or left to the process
    training it), 2 for bad input, 130 if interrupted.
    ``launch`` replaces the child processes (tests inject a fake).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("bench", "report") else "bench"
    args = _parser(command).parse_args(argv)
    try:
        if command == "report":
            bench = load_bench(args.config, root=args.root, results=args.results)
            for path in report(bench).values():
                print(f"[report] wrote {path}")
            return 0
        gpus = [g for g in (args.gpus or "").split(",") if g.strip()]
        jobs = args.jobs or max(len(gpus), 1)
        if jobs < 1:
            raise BenchError(f"--jobs must be >= 1, got {jobs}")
        bench = load_bench(args.config, root=args.root, results=args.results)
        cells = [c for c in bench.cells() if not args.only or any(fnmatch(c.name, g) for g in args.only)]
        if not cells:
            raise BenchError(f"no cell of {bench.name} matches --only {' '.join(args.only)}")
        cells = with_sets(cells, args.set or [])
        note = f"set {' '.join(args.set)}" if args.set else ""
        runner = Runner(bench, launch or Subprocesses(), jobs, gpus, note)
        check_cells(cells)
        runner.check_settings(cells)
    except BenchError as err:
        print(f"protos {command}: error: {err}", file=sys.stderr)
        return 2
    for problem in bench.unfilled_columns():
        print(f"[bench] warning: {problem}", file=sys.stderr, flush=True)
    if not gpus and (problem := bf16_on_this_cpu(cells)):
        print(f"[bench] warning: {problem} (or --set trainer.precision=32-true)", file=sys.stderr, flush=True)
    todo = runner.pending(cells)
    print(
        f"[bench] {bench.name}: {len(cells)} cells, {len(cells) - len(todo)} in "
        f"{', '.join(map(str, runner.files))}, "
        f"{len(todo)} to run (run dirs in {bench.root / bench.name})",
        flush=True,
    )
    if args.dry_run:
        for cell in todo:
            command = shlex.join(cell.command(last_checkpoint(cell.run_dir)))
            print(f"  {cell.name}: {runner.plan(cell)}\n    {command}")
        return 0
    try:
        with _sigterm_as_interrupt():
            n_failed = runner.run(todo)
    except KeyboardInterrupt:
        print("[bench] interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if n_failed:
        print(
            f"[bench] {n_failed} cell(s) failed: see the note column of {', '.join(map(str, runner.files))}",
            file=sys.stderr,
        )
    if runner.stopped:
        print(
            f"[bench] {len(runner.stopped)} cell(s) stopped before their final test, no row yet "
            f"({', '.join(runner.stopped)}): run the same command again to resume them",
            file=sys.stderr,
        )
    if runner.elsewhere:
        print(
            f"[bench] {len(runner.elsewhere)} cell(s) left to the process training them, no row yet "
            f"({', '.join(runner.elsewhere)}): run the same command again once they end",
            file=sys.stderr,
        )
    if args.report:
        try:
            written = report(bench)
        except BenchError as err:
            print(f"protos {command}: error: {err}", file=sys.stderr)
            return 2
        for path in written.values():
            print(f"[report] wrote {path}")
    return 1 if n_failed or runner.stopped or runner.elsewhere else 0
