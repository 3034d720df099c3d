"""A grid of settings, each point measured with `evaluate_retrieval`: CSV, Markdown table, one plot per parameter.

A grid maps dotted settings paths to lists of values, from YAML
(`retrieve.mode: [dense, hybrid]`, or nested: `retrieve: {fusion: {dense_weight: [0.5, 1]}}`)
or CLI options (`retrieve.mode=dense,hybrid`). `chunker.*` and `embedder.*`
values change the index, so each combination of them gets its own data dir
under `<out>/indexes/`, built once and reused (incrementally) on reruns;
`retrieve.*` values are per-request options on that index. Finished points
are recorded in `<out>/points.jsonl` and skipped on reruns; a point cut
short resumes question by question from its `<out>/runs/<point>.jsonl`.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings
from ragline.evaluate.metrics import KS
from ragline.evaluate.records import EvalInputError, Progress, config_hash, read_lines
from ragline.evaluate.retrieval import evaluate_retrieval

Grid = dict[str, list[Any]]
SECTIONS = ("chunker", "embedder", "retrieve")
INDEX_SECTIONS = ("chunker", "embedder")
METRICS = [*(f"hit@{k}" for k in KS), "mrr", "ndcg@10"]
TABLE_COLUMNS = ["page hit@1", "page hit@5", "page hit@7", "page mrr", "page ndcg@10", "anchor hit@5", "anchor mrr"]
PLOTTED = ("page hit@5", "page mrr")


def _flatten(tree: dict[str, Any], prefix: str = "") -> Grid:
    grid: Grid = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            grid.update(_flatten(value, f"{path}."))
        else:
            grid[path] = value if isinstance(value, list) else [value]
    return grid


def read_grid(path: Path) -> Grid:
    """A grid from YAML: dotted or nested keys, each a value or a list of values."""
    if not path.is_file():
        raise EvalInputError(f"grid file {path} does not exist")
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(tree, dict):
        raise EvalInputError(f"grid file {path} must map settings paths to lists, e.g. retrieve.mode: [dense, hybrid]")
    return _flatten(tree)


def parse_param(text: str) -> tuple[str, list[Any]]:
    """`retrieve.mode=dense,hybrid` → ("retrieve.mode", ["dense", "hybrid"]), each value read as YAML."""
    path, sep, values = text.partition("=")
    if not sep or not path.strip() or not values.strip():
        raise EvalInputError(f"{text!r} is not path=value[,value…], e.g. retrieve.mode=dense,hybrid")
    return path.strip(), [yaml.safe_load(value) for value in values.split(",")]


def check_grid(grid: Grid, settings: Settings) -> None:
    """Every path must be a setting of a section the sweep can vary."""
    dump = settings.model_dump()
    for path, values in grid.items():
        section, *rest = path.split(".")
        node: Any = dump
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise EvalInputError(f"grid: {path!r} is not a setting (see `ragline config show`)")
            node = node[part]
        if section not in SECTIONS or not rest:
            raise EvalInputError(f"grid: {path!r} cannot be swept; sweep settings under {', '.join(SECTIONS)}")
        if not values:
            raise EvalInputError(f"grid: {path!r} has no values")


def point_settings(settings: Settings, point: dict[str, Any], data_dir: Path) -> Settings:
    """The settings with the point's values set and the given data dir."""
    data = settings.model_dump()
    for path, value in point.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    data["data_dir"] = data_dir
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise EvalInputError(f"grid point {point} is not valid: {exc}") from None


@dataclass(slots=True)
class _Point:
    id: str
    values: dict[str, Any]
    settings: Settings
    index: str


def _plan(settings: Settings, grid: Grid, questions: Sequence[dict[str, Any]], out: Path) -> list[_Point]:
    """The grid's points in order; a point's id covers all its settings and the question set."""
    questions_id = config_hash({"questions": [[q["question"], q["source"]] for q in questions]})
    points = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        index_values = {path: value for path, value in values.items() if path.split(".")[0] in INDEX_SECTIONS}
        index = config_hash(index_values)
        config = point_settings(settings, values, out / "indexes" / index)
        point_id = config_hash({"settings": config.model_dump(mode="json", exclude={"data_dir"}), "questions": questions_id})
        points.append(_Point(point_id, values, config, index))
    return points


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{path}={value}" for path, value in values.items()) or "base settings"


def run_sweep(
    settings: Settings,
    sources: Sequence[SourceSettings],
    questions: Sequence[dict[str, Any]],
    grid: Grid,
    out: Path,
    *,
    progress: Progress | None = None,
    notify: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Measure every grid point not yet finished in `out`, then write results.csv, results.md and the plots.

    Returns one row per point in grid order: its values and its page and anchor figures.
    """
    check_grid(grid, settings)
    out.mkdir(parents=True, exist_ok=True)
    points = _plan(settings, grid, questions, out)
    finished_log = out / "points.jsonl"
    finished = {line["point"]: line for line in read_lines(finished_log)} if finished_log.is_file() else {}
    by_index: dict[str, list[_Point]] = {}
    for point in points:
        if point.id not in finished:
            by_index.setdefault(point.index, []).append(point)
    for todo in by_index.values():
        app = Ragline(todo[0].settings)
        try:
            index_values = {p: v for p, v in todo[0].values.items() if p.split(".")[0] in INDEX_SECTIONS}
            notify(f"indexing with {_describe(index_values)} into {app.settings.data_dir}")
            app.indexer().run(list(sources))
            for point in todo:
                notify(f"point {point.id}: {_describe(point.values)}")
                report = evaluate_retrieval(
                    app, questions, out / "runs" / f"{point.id}.jsonl", options=point.settings.retrieve,
                    progress=progress,
                )
                line = {"point": point.id, "questions": report.questions}
                for level, figures in (("page", report.page), ("anchor", report.anchor)):
                    line.update({f"{level} {name}": figures[name] for name in METRICS})
                with finished_log.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line) + "\n")
                finished[point.id] = line
        finally:
            app.close()
    rows = [{"point": point.id, **point.values, **finished[point.id]} for point in points]
    write_tables(rows, out)
    plot_parameters(rows, grid, out)
    return rows


def write_tables(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """results.csv (every figure) and results.md (the main ones)."""
    columns = list(rows[0])
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    params = columns[1:columns.index("questions")]
    header = [*params, *TABLE_COLUMNS]
    lines = [
        f"Sweep over {rows[0]['questions']} questions; page = the gold page among the passages, "
        "anchor = the gold section.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row[column]) for column in header) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_parameters(rows: Sequence[dict[str, Any]], grid: Grid, out: Path) -> list[Path]:
    """One PNG per parameter with several values: page hit@5 and MRR of every point (dots) and their
    mean at each value (line), so the effect of one parameter shows across the others."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    for path, values in grid.items():
        if len(values) < 2:
            continue
        labels = [str(value) for value in values]
        figure, axes = pyplot.subplots(figsize=(6, 4))
        for metric, colour in zip(PLOTTED, ("tab:blue", "tab:orange")):
            xs = [labels.index(str(row[path])) for row in rows]
            axes.scatter(xs, [row[metric] for row in rows], color=colour, alpha=0.35, s=18)
            means = [
                sum(row[metric] for row in rows if str(row[path]) == label)
                / max(1, sum(str(row[path]) == label for row in rows))
                for label in labels
            ]
            axes.plot(range(len(labels)), means, marker="o", color=colour, label=f"{metric} (mean)")
        axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel(path)
        axes.set_xlim(-0.5, len(labels) - 0.5)
        axes.set_ylim(0, 1.05)
        axes.set_title(f"{' and '.join(PLOTTED)} vs {path}")
        axes.legend(loc="lower right")
        figure.tight_layout()
        target = out / f"{path}.png"
        figure.savefig(target, dpi=100)
        pyplot.close(figure)
        written.append(target)
    return written
