"""Tables from a bench's results rows: mean ± std over seeds, best run, L_sp-selected run.

Pure functions on rows (``dict[str, str]`` as read from the results CSV), then writers of
``<stem>_table.md`` (scores x100, as the papers print them), ``<stem>_summary.csv``
(fractions) and ``<stem>_chart.png`` (bars with ±1 std error bars) beside the CSV; for a table
with ``curves``, ``<stem>_curves.csv`` and ``<stem>_curves.png``: those TensorBoard scalars of
each trained cell per epoch, read from its run dir.
"""

from __future__ import annotations

import bisect
import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .spec import CRITERION, ERRORS, METRICS, SCORES, Cell, row_key

CURVE_KEYS = ("tag", "epoch", "value")  # columns of <stem>_curves.csv after the cell's fields


@dataclass
class Summary:
    """The runs of one (method, labels, data set) group.

    ``mean``/``std`` are over the runs that finished (``std`` is the sample std, ddof=1,
    ``None`` for a single run); ``best`` is the best row by :func:`best_by` (the highest ARI
    where the file has ARI) and ``selected`` the row with the lowest ``l_sp`` (``None`` where
    no run has one).
    """

    group: dict[str, str]
    n: int
    n_failed: int
    mean: dict[str, float]
    std: dict[str, float | None]
    best: dict[str, str] | None
    selected: dict[str, str] | None
    seconds: float | None


def value(row: dict[str, str], column: str) -> float | None:
    """The row's number in ``column``, or ``None`` where it is empty, absent or not finite (a
    run's NaN score neither wins nor averages)."""
    text = row.get(column) or ""
    number = float(text) if text.strip() else math.nan
    return number if math.isfinite(number) else None


def failed(row: dict[str, str], metrics: tuple[str, ...] | list[str] = METRICS) -> bool:
    """A failed run has none of the metrics."""
    return all(value(row, m) is None for m in metrics)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; ``None`` for fewer than two values).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pick(rows: list[dict[str, str]], column: str, highest: bool) -> dict[str, str] | None:
    """The first row with the highest (or lowest) value in ``column``; ``None`` if none has one."""
    scored = [(v, i) for i, r in enumerate(rows) if (v := value(r, column)) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda t: (t[0], -t[1])) if highest else min(scored)
    return rows[best[1]]


def best_by(metrics: list[str]) -> tuple[str, bool]:
    """The column that picks the best run and whether higher is better: ARI where there is one,
    else the first score (e.g. kNN accuracy), else the first error (lowest).

    >>> best_by(["stat_acc", "knn_acc"]), best_by(["test_mse"])
    (('stat_acc', True), ('test_mse', False))
    """
    if "ari" in metrics:
        return "ari", True
    scores = [m for m in metrics if m not in ERRORS]
    return (scores[0], True) if scores else (metrics[0] if metrics else "ari", False)


def summarize(rows: list[dict[str, str]], group_by: list[str], metrics: list[str]) -> list[Summary]:
    """One :class:`Summary` per distinct ``group_by`` values, in order of first appearance."""
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(c, "") for c in group_by), []).append(row)
    summaries = []
    for key, members in groups.items():
        ok = [r for r in members if not failed(r, metrics)]
        mean: dict[str, float] = {}
        std: dict[str, float | None] = {}
        for m in metrics:
            values = [v for r in ok if (v := value(r, m)) is not None]
            if values:
                mean[m], std[m] = mean_std(values)
        seconds = [v for r in ok if (v := value(r, "seconds")) is not None]
        summaries.append(
            Summary(
                group=dict(zip(group_by, key, strict=True)),
                n=len(ok),
                n_failed=len(members) - len(ok),
                mean=mean,
                std=std,
                best=pick(ok, *best_by(metrics)),
                selected=pick(ok, CRITERION, highest=False),
                seconds=statistics.fmean(seconds) if seconds else None,
            )
        )
    return summaries


def _pct(x: float | None, metric: str = "acc") -> str:
    """A score x100 with one decimal; an error (MSE) as it is, to 3 significant digits."""
    if x is None:
        return "–"
    return f"{x:.3g}" if metric in ERRORS else f"{100 * x:.1f}"


def _run(row: dict[str, str] | None, metrics: list[str]) -> str:
    if row is None:
        return "–"
    return " / ".join(_pct(value(row, m), m) for m in metrics) + f" (seed {row.get('seed', '?')})"


def markdown_table(summaries: list[Summary], metrics: list[str], with_criterion: bool, title: str) -> str:
    """The papers' table: mean ± std x100 per metric, best run, L_sp-selected run, seconds."""
    names = [m.upper() for m in metrics]
    keys = list(summaries[0].group) if summaries else []
    column, highest = best_by(metrics)
    head = [*keys, "runs", *names, f"best run ({'max' if highest else 'min'} {column.upper()}): {' / '.join(names)}"]
    if with_criterion:
        head.append(f"min L_sp run: {' / '.join(names)}")
    head.append("seconds")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        runs = str(s.n) + (f" (+{s.n_failed} failed)" if s.n_failed else "")
        scores = [
            "–" if m not in s.mean else _pct(s.mean[m], m) + ("" if s.std[m] is None else f" ± {_pct(s.std[m], m)}")
            for m in metrics
        ]
        cells = [*s.group.values(), runs, *scores, _run(s.best, metrics)]
        if with_criterion:
            cells.append(_run(s.selected, metrics))
        cells.append("–" if s.seconds is None else f"{s.seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_rows(summaries: list[Summary], metrics: list[str], with_criterion: bool) -> list[dict[str, object]]:
    """The summary as flat rows (fractions, not x100) for ``<stem>_summary.csv``."""
    rows = []
    for s in summaries:
        row: dict[str, object] = {**s.group, "n": s.n, "n_failed": s.n_failed}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = s.mean.get(m), s.std.get(m)
        picks = [("best", s.best)] + ([("lsp", s.selected)] if with_criterion else [])
        for prefix, run in picks:
            row[f"{prefix}_seed"] = None if run is None else run.get("seed")
            for m in [*metrics, *([CRITERION] if with_criterion else [])]:
                row[f"{prefix}_{m}"] = None if run is None else value(run, m)
        row["seconds_mean"] = s.seconds
        rows.append(row)
    return rows


def plot_chart(summaries: list[Summary], metrics: list[str], path: Path, name: str) -> None:
    """Bars of the mean (x100) per metric with ±1 std error bars, one panel per data set."""
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(s.group.get("dataset", "") for s in summaries))
    fig = Figure(figsize=(max(4.0, 2.2 * len(summaries) / max(len(datasets), 1) + 2), 3.6 * len(datasets)))
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    width = 0.8 / len(metrics)
    for ax, dataset in zip(axes, datasets, strict=True):
        group = [s for s in summaries if s.group.get("dataset", "") == dataset]
        labels = ["-".join(v for k, v in s.group.items() if k != "dataset" and v) for s in group]
        for j, m in enumerate(metrics):
            heights = [100 * s.mean.get(m, 0.0) for s in group]
            errors = [100 * (s.std.get(m) or 0.0) for s in group]
            xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(group))]
            ax.bar(xs, heights, width, yerr=errors, capsize=3, label=m.upper())
        ax.set_xticks(range(len(group)), labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score x100")
        ax.set_title(f"{name}: {dataset} (mean ± std over seeds)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # beside the bars, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(v: object) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def report_paths(results: Path) -> dict[str, Path]:
    """Where the table, summary CSV and chart of ``results`` go: beside it, named by its stem."""
    return {
        kind: results.with_name(f"{results.stem}_{kind}.{ext}")
        for kind, ext in (("table", "md"), ("summary", "csv"), ("chart", "png"))
    }


def write_report(
    rows: list[dict[str, str]], group_by: list[str], columns: list[str], results: Path, name: str
) -> dict[str, Path]:
    """Writes the Markdown table, summary CSV and chart of ``rows``; returns their paths."""
    metrics = [m for m in columns if m in METRICS]
    scale = "scores x100, MSE as is" if set(metrics) & set(ERRORS) else "x100"
    title = f"{name}: mean ± std over seeds ({scale}), from {results.name}"
    with_criterion = CRITERION in columns
    summaries = summarize(rows, group_by, metrics)
    paths = report_paths(results)
    paths["table"].write_text(markdown_table(summaries, metrics, with_criterion, title))
    flat = summary_rows(summaries, metrics, with_criterion)
    with open(paths["summary"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else group_by)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in flat)
    scores = [m for m in metrics if m in SCORES]
    if scores:
        plot_chart(summaries, scores, paths["chart"], name)
    else:
        del paths["chart"]
    return paths


def read_curves(run_dir: Path, tags: list[str]) -> dict[str, dict[int, float]]:
    """Each of ``tags`` found in the run dir's TensorBoard event files, as ``{epoch: value}``.

    The epoch is Lightning's ``epoch`` scalar (0-based; logged with every ``self.log`` call) at
    the value's step, or for a value logged mid-epoch the first one after it; the last value of
    an epoch, and of a step logged twice (a resumed run), wins. Raises LookupError (why) where
    the run dir or the ``epoch`` scalar is missing.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir():
        raise LookupError(f"no run dir {run_dir}")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    found = events.Tags()["scalars"]
    if "epoch" not in found:
        raise LookupError(f"no TensorBoard 'epoch' scalar in {run_dir}")
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ["epoch", *tags] if tag in found}
    steps = sorted(scalars.pop("epoch").items())

    def epoch_at(step: int) -> int:
        return int(steps[min(bisect.bisect_left(steps, (step,)), len(steps) - 1)][1])

    return {tag: {epoch_at(s): v for s, v in sorted(values.items())} for tag, values in scalars.items()}


def curve_rows(cells: list[Cell], tags: list[str]) -> list[dict[str, str]]:
    """One row per trained cell, tag and epoch (the cell's fields, ``tag``, ``epoch``, ``value``);
    a cell without a run dir or events is skipped with a one-line message."""
    rows = []
    for cell in cells:
        if cell.reference is not None:
            continue  # scikit-learn references train no epochs
        try:
            curves = read_curves(cell.run_dir, tags)
        except LookupError as err:
            print(f"[report] curves: skipped {cell.name}: {err}", flush=True)
            continue
        if missing := [t for t in tags if t not in curves]:
            print(f"[report] curves: {cell.name} logged no {', '.join(missing)}", flush=True)
        for tag, values in curves.items():
            rows += [{**cell.fields(), "tag": tag, "epoch": str(e), "value": f"{v:.6g}"} for e, v in values.items()]
    return rows


def plot_curves(rows: list[dict[str, str]], path: Path, name: str) -> None:
    """One panel per (tag, data set), x = epoch: a line per method and labels, the mean over
    seeds with a min-max band where there are several; log y for MSE tags."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    tags = list(dict.fromkeys(r["tag"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = Figure(figsize=(6.4 * len(datasets), 4.2 * len(tags)))
    axes = fig.subplots(len(tags), len(datasets), squeeze=False)
    for i, tag in enumerate(tags):
        for j, dataset in enumerate(datasets):
            ax = axes[i, j]
            lines: dict[str, dict[int, list[float]]] = {}
            for r in rows:
                if (r["tag"], r["dataset"]) == (tag, dataset):
                    label = "-".join(v for k, v in r.items() if k not in ("dataset", "seed", *CURVE_KEYS) and v)
                    lines.setdefault(label, {}).setdefault(int(r["epoch"]), []).append(float(r["value"]))
            title = f"{name}: {tag} on {dataset}"
            for label, by_epoch in lines.items():
                epochs = sorted(by_epoch)
                values = [by_epoch[e] for e in epochs]
                (line,) = ax.plot(epochs, [statistics.fmean(v) for v in values], marker=".", label=label)
                if any(len(v) > 1 for v in values):
                    low, high = [min(v) for v in values], [max(v) for v in values]
                    ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
                    title = f"{name}: {tag} on {dataset}\n(mean over seeds, band: min to max)"
            if "mse" in tag.lower() and lines:
                ax.set_yscale("log")
            ax.set_xlabel("epoch (Lightning's, from 0)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no ticks between epochs
            ax.set_ylabel(tag)
            ax.set_title(title)
            if lines:
                ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_curves(cells: list[Cell], tags: list[str], results: Path, name: str) -> dict[str, Path]:
    """Writes ``<stem>_curves.csv`` and ``<stem>_curves.png`` of ``cells`` beside ``results``;
    returns their paths. Rows already in the CSV are replaced only by the cells whose run dirs
    were read now: those of another table sharing the results file, and those of cells whose run
    dirs are gone (a report on another machine, a cleaned ``bench_runs``), are kept. Nothing is
    written while there is no row at all."""
    paths = {"curves": results.with_name(f"{results.stem}_curves.csv")}
    paths["curves_chart"] = paths["curves"].with_suffix(".png")
    old: list[dict[str, str]] = []
    old_columns: list[str] = []
    if paths["curves"].is_file():
        with open(paths["curves"], newline="") as f:
            reader = csv.DictReader(f)
            old, old_columns = list(reader), list(reader.fieldnames or [])
    labels = dict.fromkeys([*(k for c in cells for k, _ in c.labels), *old_columns])
    ids = ["method", *(k for k in labels if k not in ("method", "dataset", "seed", *CURVE_KEYS)), "dataset", "seed"]
    new = curve_rows(cells, tags)
    read = {row_key(r, ids) for r in new}
    rows = [r for r in old if row_key(r, ids) not in read] + new
    if not rows:
        return {}
    with open(paths["curves"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*ids, *CURVE_KEYS])
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, paths["curves_chart"], name)
    return paths
