"""Bench tables: the YAML schema, its checks, and the cells (method x data set x seed) it lists.

A table file (``configs/bench/<table>.yaml``)::

    name: smoke                                   # run dirs: bench_runs/<name>/<cell>/
    results: benchmarks/results/smoke.csv         # one row per finished run, appended as it ends
    columns: [method, dataset, seed, epochs, acc, nmi, ari, seconds]  # `note` is always added last
    seeds: [0, 1]                                 # each passed to seed_everything
    datasets: [digits]                            # names of lightning_protos.data.DATASETS
    overrides: {trainer.max_epochs: 10}           # optional; every Lightning cell (dotted CLI keys)
    curves: [val/mse]                             # optional; TensorBoard scalars drawn per epoch
    methods:
      - {method: cm, config: "configs/cm_{dataset}.yaml", init: random, overrides: {...}}
      - {method: kmeans, reference: kmeans, init: random}

A method entry has ``method`` (a name from the project's RESULTS.md, in ../shared beside the
repository) and either ``config`` (a ``protos fit``
config; ``{dataset}`` and ``{method}`` are filled in, or a mapping from data set to config;
``overrides`` are applied after the
table's) or ``reference`` (``kmeans``: KMeans, n_init=1, ``init`` random or k-means++; ``gmm``:
GaussianMixture, full covariance, ``init`` = sklearn's init_params, default kmeans; both on the
raw flattened features, see ``bench/reference.py``). Any other key (``init``, ``profile``,
``device``) labels the cell: it names the run dir and is a column when listed in ``columns``.
An entry may also send its rows to a results file of its own (``results``, with its own
``columns``), so that one table can join methods whose rows live in different files, and
restrict itself to some of the table's ``datasets`` (a list).
Columns: ``method``, ``dataset``, ``seed``, labels, ``epochs`` (epochs trained), ``seconds``
(wall time of the cell's processes), else a key of ``metrics.json``'s final ``test`` entry
(``acc``, ``nmi``, ``ari``, ``homogeneity``, ``l_sp``, ``n_clusters_used``, ...;
``VALUE_COLUMNS``); any other name stays empty, with a warning before its results file is created.
``curves`` names TensorBoard scalar tags (``val/mse``, ``val/ari``, ``train/loss``, ...) that
``protos report`` reads from each trained cell's run dir and writes per epoch, beside each
results file, to ``<stem>_curves.csv`` and ``<stem>_curves.png`` (see ``bench/report.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from ..errors import ProtosError

# Method names of ../shared/RESULTS.md, so that tables from different methods join.
METHODS = (
    "cm", "aecm", "vaesim", "vaesim_aug", "vae", "vae_kmeans", "protovae", "ae", "vae_kl",
    "infovae", "dec", "idec", "dcn", "dkm", "vade", "gmvae", "kmeans", "gmm",
)  # fmt: skip
# scikit-learn references and the values their ``init`` key may take.
REFERENCES = {
    "kmeans": ("random", "k-means++"),
    "gmm": ("kmeans", "k-means++", "random", "random_from_data"),
}
# how a cell's process names its run directory on its command line (bench/runner.py finds a
# process already training a cell by them)
CHECKPOINT_DIR_FLAG = "--last_checkpoint.dirpath"  # protos fit: RUN_DIR/checkpoints
REFERENCE_DIR_FLAG = "--run-dir"  # bench/reference.py: RUN_DIR
TABLE_KEYS = ("name", "results", "columns", "seeds", "datasets", "overrides", "curves", "methods")
OPTIONAL_KEYS = ("overrides", "curves")
ENTRY_KEYS = {"method", "config", "reference", "overrides", "results", "columns", "datasets"}
CELL_KEYS = ("method", "dataset", "seed")
# Score columns a results file may have, shown x100, and reconstruction errors, shown as they are.
SCORES = ("acc", "nmi", "ari", "homogeneity", "stat_acc", "knn_acc", "linear_acc")
ERRORS = ("train_mse", "test_mse")
METRICS = SCORES + ERRORS
CRITERION = "l_sp"  # label-free model selection: the run with the lowest L_sp (AE-CM paper)
# every other key of metrics.json's test entry (a results column, never shown in the tables)
OTHER_VALUES = ("epoch", "n_clusters_used", "linear_acc_reference", "val_mse", "iterations")
VALUE_COLUMNS = ("epochs", "seconds", "note", CRITERION, *METRICS, *OTHER_VALUES)  # the other columns label a row
SAFE = re.compile(r"[A-Za-z0-9_.+-]+")


class BenchError(ProtosError):
    """A bad bench table; the CLI prints it as one line before any cell runs."""


@dataclass(frozen=True)
class Cell:
    """One run of the table: a method on a data set with a seed, in its own run directory."""

    method: str
    dataset: str
    seed: int
    run_dir: Path
    labels: tuple[tuple[str, str], ...] = ()
    config: Path | None = None
    reference: str | None = None
    overrides: tuple[str, ...] = ()
    results: Path = Path("results.csv")
    columns: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.run_dir.name

    def fields(self) -> dict[str, str]:
        """The values that identify the cell's row: method, data set, seed and labels."""
        return {
            "method": self.method,
            "dataset": self.dataset,
            "seed": str(self.seed),
            **dict(self.labels),
        }

    def command(self, ckpt_path: Path | None = None) -> list[str]:
        """The cell's process: ``protos fit`` (resumed from ``ckpt_path``) or a reference."""
        if self.reference is not None:
            init = dict(self.labels).get("init")
            return [
                sys.executable, "-m", "lightning_protos.bench.reference", self.reference,
                "--dataset", self.dataset, "--seed", str(self.seed), REFERENCE_DIR_FLAG, str(self.run_dir),
                *(["--init", init] if init else []),
            ]  # fmt: skip
        resume = ["--ckpt_path", str(ckpt_path)] if ckpt_path else []
        return [sys.executable, "-m", "lightning_protos.cli", *self.fit_args(), *resume]

    def fit_args(self) -> list[str]:
        """``protos fit`` arguments: config, seed, overrides, then the fixed run directory."""
        return [
            "fit", "--config", str(self.config), "--seed_everything", str(self.seed),
            *self.overrides,
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.save_dir={self.run_dir.parent}",
            "--trainer.logger.name=",
            f"--trainer.logger.version={self.name}",
            f"--checkpoint.dirpath={self.run_dir / 'checkpoints'}",
            f"{CHECKPOINT_DIR_FLAG}={self.run_dir / 'checkpoints'}",
        ]  # fmt: skip


@dataclass
class Bench:
    """A parsed table file (see the module docstring)."""

    name: str
    results: Path
    columns: list[str]
    seeds: list[int]
    datasets: list[str]
    methods: list[dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    curves: list[str] = field(default_factory=list)
    root: Path = Path("bench_runs")

    @property
    def label_keys(self) -> list[str]:
        """Label keys (``init``, ``profile``, ...) of any method entry, in order of appearance."""
        keys = [k for m in self.methods for k in m if k not in ENTRY_KEYS]
        return list(dict.fromkeys(keys))

    def ids_of(self, columns: list[str] | tuple[str, ...]) -> list[str]:
        """The columns among ``columns`` that identify a row's cell: all but the values, also a
        label only another table sharing the file sets (its rows are not this table's)."""
        return [c for c in columns if c not in VALUE_COLUMNS]

    def results_files(self) -> dict[Path, list[str]]:
        """Every results file of the table with its columns (a method entry may name its own)."""
        files: dict[Path, list[str]] = {}
        for cell in self.cells():
            if files.setdefault(cell.results, list(cell.columns)) != list(cell.columns):
                raise BenchError(f"{cell.results}: method entries give it different columns")
        return files

    def unfilled_columns(self) -> list[str]:
        """A warning for each column of a results file not yet written that this table's rows
        leave empty: neither a cell key, a value (``VALUE_COLUMNS``) nor a label of its method
        entries. A misspelt score is one; a label only another table sharing the file sets is
        another. (An existing file's header must equal the columns: ``ResultsFile``.)"""
        labels = self.label_keys
        return [
            f"{path}: column {column!r} is neither a metrics.json value nor a label of this table's "
            f"entries ({', '.join(labels) or 'none'}): empty in its rows (a misspelling, or a label "
            "another table sharing the file sets)"
            for path, columns in self.results_files().items()
            if not has_header(path)
            for column in columns
            if column not in (*CELL_KEYS, *VALUE_COLUMNS, *labels)
        ]

    def cells(self) -> list[Cell]:
        """Every (data set, seed, method) cell, data sets outermost and methods innermost."""
        cells = [
            self._cell(entry, dataset, seed)
            for dataset in self.datasets
            for seed in self.seeds
            for entry in self.methods
            if dataset in entry.get("datasets", [dataset])
        ]
        seen: dict[Any, Cell] = {}
        for cell in cells:
            for key in (cell.name, (cell.results, row_key(cell.fields(), self.ids_of(cell.columns)))):
                if key in seen:
                    raise BenchError(
                        f"cells {seen[key].name} and {cell.name} share a run dir or a results row: "
                        "give their method entries different labels and list them in columns"
                    )
                seen[key] = cell
        return cells

    def _cell(self, entry: dict[str, Any], dataset: str, seed: int) -> Cell:
        labels = tuple((k, str(v)) for k, v in entry.items() if k not in ENTRY_KEYS)
        name = "-".join([entry["method"], *(v for _, v in labels)]) + f"_{dataset}_seed{seed}"
        run_dir = self.root / self.name / name
        sink = {
            "results": Path(entry.get("results", self.results)),
            "columns": tuple(entry.get("columns", self.columns)),
        }
        if "reference" in entry:
            return Cell(entry["method"], dataset, seed, run_dir, labels, reference=entry["reference"], **sink)
        template = entry["config"]
        if isinstance(template, dict):  # one config per data set
            if dataset not in template:
                raise BenchError(f"method {entry['method']!r}: no config for data set {dataset!r} in {template}")
            template = template[dataset]
        try:
            config = Path(str(template).format(dataset=dataset, method=entry["method"]))
        except (KeyError, IndexError) as err:
            raise BenchError(f"config {entry['config']!r}: unknown placeholder {err}") from None
        overrides = {**self.overrides, **entry.get("overrides", {})}
        args = tuple(f"--{k}={cli_value(v)}" for k, v in overrides.items())
        return Cell(entry["method"], dataset, seed, run_dir, labels, config=config, overrides=args, **sink)


def has_header(results: Path) -> bool:
    """Whether a results file was started (an empty file is a new one)."""
    return results.is_file() and results.stat().st_size > 0


def row_key(fields: dict[str, str], id_columns: list[str]) -> tuple[str, ...]:
    """The identity of a results row (or of a cell's ``fields()``)."""
    return tuple(str(fields.get(c, "")) for c in id_columns)


def cli_value(value: Any) -> str:
    """A YAML value as a command-line value: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _fail(where: str, message: str) -> NoReturn:
    raise BenchError(f"{where}: {message}")


def load_bench(path: str | Path, root: str | Path | None = None, results: str | Path | None = None) -> Bench:
    """Reads and checks a table file (names, seeds, columns); data sets and configs are
    checked by :func:`check_cells`. ``root`` and ``results`` replace the defaults."""
    path = Path(path)
    if not path.is_file():
        _fail(str(path), "no such bench table")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BenchError(f"{path}: not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        _fail(str(path), "expected a mapping with name, results, columns, seeds, datasets, methods")
    unknown = set(raw) - set(TABLE_KEYS)
    missing = [k for k in TABLE_KEYS if k not in OPTIONAL_KEYS and k not in raw]
    if unknown:
        _fail(
            str(path),
            f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(TABLE_KEYS)}",
        )
    if missing:
        _fail(str(path), f"missing key(s) {', '.join(missing)}")
    if not isinstance(raw["name"], str) or not SAFE.fullmatch(raw["name"]):
        _fail(str(path), f"name must be a plain word (letters, digits, _ . + -), got {raw['name']!r}")
    _check_results(f"{path}: results", raw["results"])
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        _fail(str(path), "seeds: give a non-empty list of integers")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        _fail(str(path), f"seeds: expected distinct integers, got {seeds}")
    datasets = raw["datasets"]
    if not isinstance(datasets, list) or not datasets or len(set(datasets)) < len(datasets):
        _fail(str(path), "datasets: give a non-empty list of distinct data set names")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        _fail(str(path), "overrides: expected a mapping of dotted keys to values")
    curves = raw.get("curves", [])
    if "curves" in raw and not (isinstance(curves, list) and curves and all(isinstance(t, str) and t for t in curves)):
        _fail(str(path), f"curves: give a non-empty list of TensorBoard scalar tags, e.g. [val/mse], got {curves!r}")
    if len(set(curves)) < len(curves):
        _fail(str(path), f"curves: duplicates in {curves}")
    methods = [_check_entry(path, i, e) for i, e in enumerate(raw["methods"] or [])]
    if results is not None:  # every file of the table moves: an entry's own becomes RESULTS-STEM_NAME
        moved = Path(results)
        methods = [
            {**m, "results": str(moved.with_name(f"{moved.stem}_{Path(m['results']).name}"))} if "results" in m else m
            for m in methods
        ]
    if not methods:
        _fail(str(path), "methods: give at least one method entry")
    for i, entry in enumerate(methods):
        if set(entry.get("datasets", [])) - set(datasets):
            _fail(f"{path}: methods[{i}]", f"datasets {entry['datasets']} are not all among the table's {datasets}")
    columns = _check_columns(str(path), raw["columns"])
    return Bench(
        name=raw["name"],
        results=Path(results if results is not None else raw["results"]),
        columns=columns,
        seeds=seeds,
        datasets=[str(d) for d in datasets],
        methods=methods,
        overrides=overrides,
        curves=curves,
        root=Path(root) if root is not None else Bench.root,
    )


def _check_results(where: str, results: Any) -> None:
    """A table's or an entry's ``results``: a CSV path."""
    if not (isinstance(results, str) and results.endswith(".csv")):
        _fail(where, f"give a .csv path, e.g. benchmarks/results/NAME.csv, got {results!r}")


def _check_columns(where: str, columns: Any) -> list[str]:
    """A results file's columns: the cell keys included, no duplicates, ``note`` last."""
    columns = [str(c) for c in columns or []]
    for needed in CELL_KEYS:
        if needed not in columns:
            _fail(where, f"columns must include {needed!r}")
    if len(set(columns)) < len(columns):
        _fail(where, f"columns: duplicates in {columns}")
    return [c for c in columns if c != "note"] + ["note"]


def _check_entry(path: Path, i: int, entry: Any) -> dict[str, Any]:
    where = f"{path}: methods[{i}]"
    if not isinstance(entry, dict) or "method" not in entry:
        _fail(where, "expected a mapping with a 'method' key")
    method = entry["method"]
    if method not in METHODS:
        _fail(where, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if ("config" in entry) == ("reference" in entry):
        _fail(
            where,
            f"method {method!r}: give either 'config' (protos config) or 'reference' (kmeans, gmm)",
        )
    if not isinstance(entry.get("overrides", {}), dict):
        _fail(where, "overrides: expected a mapping of dotted keys to values")
    for key, value in ((k, v) for k, v in entry.items() if k not in ENTRY_KEYS):  # the labels
        if key in CELL_KEYS or key in VALUE_COLUMNS:
            _fail(where, f"{key!r} is not a label: the bench fills that column (an entry's data sets: datasets: [...])")
        if isinstance(value, bool) or not SAFE.fullmatch(str(value)):
            _fail(where, f"label {key}: {value!r} must be a plain word (letters, digits, _ . + -)")
    if "reference" in entry:
        ref = entry["reference"]
        if ref not in REFERENCES:
            _fail(where, f"unknown reference {ref!r}; choose one of {', '.join(REFERENCES)}")
        if ref != method:
            _fail(where, f"method {method!r} with reference {ref!r}: its rows would name {method} what {ref} computed")
        if "overrides" in entry:
            _fail(where, f"reference {ref!r} takes no overrides")
        if "init" in entry and entry["init"] not in REFERENCES[ref]:
            _fail(where, f"{ref} init {entry['init']!r}: choose one of {', '.join(REFERENCES[ref])}")
    entry = dict(entry)
    if "datasets" in entry and not (isinstance(entry["datasets"], list) and entry["datasets"]):
        _fail(where, "datasets: give a non-empty list of the table's data sets")
    if "results" in entry:
        _check_results(f"{where}.results", entry["results"])
    if "columns" in entry:
        entry["columns"] = _check_columns(where, entry["columns"])
    return entry


def check_cells(cells: list[Cell]) -> None:
    """Fails with a one-line :class:`BenchError` unless every cell can start: its data set is
    registered, its config exists, parses with its overrides, and trains on that data set."""
    from ..data import DATASETS

    checked: set[tuple[Any, ...]] = set()
    for cell in cells:
        if cell.dataset not in DATASETS:
            raise BenchError(f"unknown data set {cell.dataset!r}; choose one of {', '.join(DATASETS)}")
        if cell.config is None:
            continue
        if not cell.config.is_file():
            raise BenchError(f"cell {cell.name}: config file {cell.config} not found")
        if (cell.config, cell.overrides, cell.dataset) in checked:
            continue
        checked.add((cell.config, cell.overrides, cell.dataset))
        data_class = _parse_fit_args(cell)
        expected = DATASETS[cell.dataset]
        if not (isinstance(data_class, type) and issubclass(data_class, expected)):
            raise BenchError(
                f"cell {cell.name}: {cell.config} trains on "
                f"{getattr(data_class, '__name__', data_class)}, not on {cell.dataset}"
            )


class _Parsed(Exception):
    """Raised once ``ProtosCLI`` has parsed and validated its arguments."""


def _parse_fit_args(cell: Cell) -> Any:
    """Parses the cell's ``protos fit`` arguments with the CLI's own parser, without building
    anything; returns the data class, or raises BenchError naming the first bad override."""
    from ..cli import ProtosCLI, one_line

    class _ParseOnly(ProtosCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            raise _Parsed(self.config["fit"]["data"]["class_path"])

    def parse(args: list[str]) -> tuple[Any, str]:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                _ParseOnly(args=args)
            except _Parsed as parsed:
                return parsed.args[0], ""
            except SystemExit as exit_:
                return None, err.getvalue() or f"exit {exit_.code}"
            except Exception as exc:
                return None, str(exc)
        return None, "did not parse"

    args = cell.fit_args()
    class_path, message = parse(args)
    if message:
        base = [a for a in args if a not in cell.overrides]
        culprit = "the config itself"
        if not parse(base)[1]:
            for n in range(1, len(cell.overrides) + 1):
                if parse(base + list(cell.overrides[:n]))[1]:
                    culprit = f"override {cell.overrides[n - 1].removeprefix('--')}"
                    break
        reason = (one_line(message) or message.strip())[:300]
        raise BenchError(f"cell {cell.name}: {culprit} rejected by {cell.config}: {reason}")
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name, class_path)
