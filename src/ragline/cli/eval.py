"""`ragline eval`, the command line of the evaluate package: parse, draw progress, print figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragline.app import Ragline
from ragline.cli.common import State, err, out, retrieve_overrides
from ragline.config import SourceSettings
from ragline.evaluate.records import EvalInputError, read_lines, read_questions

eval_cli = typer.Typer(help="Measure retrieval and answers on question sets; sweep settings; price tokens.",
                       no_args_is_help=True)

RESULTS_OPTION = typer.Option(
    "--results", help="per-question JSONL, appended and resumed (default: <data_dir>/eval/<questions>.<kind>.jsonl)"
)
RETRIEVE_OPTION = typer.Option(
    "--retrieve", help="a retrieval setting for this run, e.g. mode=keyword or rerank.backend=llm (repeatable)"
)
JSON_OPTION = typer.Option("--json", help="print the figures as JSON")


class QuestionBar:
    """The progress of an evaluation on stderr (so JSON on stdout stays clean); resumed questions start it."""

    def __init__(self, label: str) -> None:

        self._bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> QuestionBar:
        self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()

    def start(self, total: int, done: int) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task("questions", total=total, completed=done)

    def advance(self, n: int = 1) -> None:
        self._bar.update(self._task, advance=n)


def _results_path(results: Path | None, data_dir: Path, questions: Path, kind: str) -> Path:
    return results or data_dir / "eval" / f"{questions.stem}.{kind}.jsonl"


def _figures_table(title: str, columns: dict[str, dict[str, Any]]) -> Table:
    """One row per figure, one column per level (page, anchor): narrow enough for any terminal."""
    table = Table(title=title)
    table.add_column("", overflow="fold")
    for name in columns:
        table.add_column(name, justify="right", overflow="fold")
    for figure in next(iter(columns.values())):
        cells = (columns[name][figure] for name in columns)
        table.add_row(figure, *(f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in cells))
    return table


@eval_cli.command("retrieval")
def retrieval_command(
    questions: Annotated[Path, typer.Argument(help='JSONL of {"question", "source": "URL[#anchor]"}')],
    results: Annotated[Optional[Path], RESULTS_OPTION] = None,
    retrieve: Annotated[Optional[list[str]], RETRIEVE_OPTION] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="questions searched per batch")] = 16,
    json_output: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Hit@1/3/5/7/10, MRR and nDCG@10 of the gold page and section among the top 10 passages."""
    from ragline.evaluate.retrieval import evaluate_retrieval

    settings = State.settings()
    items = read_questions(questions, required=("question", "source"))
    options = retrieve_overrides(settings.retrieve, None, None, retrieve)
    app = Ragline(settings)
    try:
        with QuestionBar("retrieval") as bar:
            report = evaluate_retrieval(
                app, items, _results_path(results, settings.data_dir, questions, "retrieval"),
                options=options, batch_size=batch_size, progress=bar,
            )
    finally:
        app.close()
    if json_output:
        print(json.dumps(report.to_dict()))
        return
    title = f"{questions.name}: {report.questions} questions (config {report.config})"
    out.print(_figures_table(title, {"page": report.page, "anchor": report.anchor}))
    out.print(f"per question: {escape(str(report.results))}")


@eval_cli.command("generate-questions")
def generate_questions_command(
    output: Annotated[Path, typer.Argument(help="JSONL to write: {question, source, chunk_id} per line")],
    n: Annotated[int, typer.Option("-n", min=1, max=100_000, help="questions wanted")] = 50,
    seed: Annotated[int, typer.Option(help="which chunks are drawn")] = 0,
) -> None:
    """Synthetic questions from the index, written by the configured LLM in users' words and filtered.

    Replies are cached beside OUTPUT, so an interrupted run resumes without asking again.
    """
    from ragline.evaluate.synthetic import generate_questions
    from ragline.evaluate.tune import load_chunks
    from ragline.generate.base import LLMError

    settings = State.settings()
    app = Ragline(settings)
    try:
        chunks = load_chunks(app.store)
        if not chunks:
            raise EvalInputError("the index is empty: run `ragline ingest` first")
        llm = app.query_llm()
        if llm is None:
            raise LLMError("generating questions needs an LLM: set generate.llm (the extractive answerer cannot)")
        bar = Progress(TextColumn("[bold]questions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=err, transient=True)
        with bar:
            task = bar.add_task("questions", total=n)
            found = generate_questions(
                chunks, llm, n, seed=seed, cache=output.with_name(output.name + ".cache"),
                progress=lambda accepted, wanted: bar.update(task, completed=accepted),
            )
    finally:
        app.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in found), encoding="utf-8")
    out.print(f"{len(found)} questions (of {n} wanted) written to {escape(str(output))}")


@eval_cli.command("answers")
def answers_command(
    questions: Annotated[Path, typer.Argument(help='JSONL of {"question", "reference_answer"?, "source"?}')],
    results: Annotated[Optional[Path], RESULTS_OPTION] = None,
    retrieve: Annotated[Optional[list[str]], RETRIEVE_OPTION] = None,
    json_output: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Answer each question, then an LLM judge grades correctness (1–5, against the reference),
    relevance (1–5) and whether each cited claim is supported by its passages (judge: settings)."""
    from ragline.evaluate.answers import evaluate_answers, judge_from_settings

    settings = State.settings()
    items = read_questions(questions)
    options = retrieve_overrides(settings.retrieve, None, None, retrieve)
    judge = judge_from_settings(settings)
    app = Ragline(settings)
    try:
        with QuestionBar("answers") as bar:
            report = evaluate_answers(
                app, items, judge, _results_path(results, settings.data_dir, questions, "answers"),
                options=options, progress=bar,
            )
    finally:
        app.close()
    if json_output:
        print(json.dumps(report.to_dict()))
        return
    title = f"{questions.name}: {report.questions} answers judged by {judge.llm.name} (config {report.config})"
    out.print(_figures_table(title, {"answers": {k: "n/a" if v is None else v for k, v in report.figures.items()}}))
    out.print(f"per question: {escape(str(report.results))}")


@eval_cli.command("sweep")
def sweep_command(
    questions: Annotated[Path, typer.Argument(help='JSONL of {"question", "source"}')],
    out_dir: Annotated[Path, typer.Option("--out", help="where indexes, runs, results.csv/.md and plots go")],
    grid: Annotated[Optional[Path], typer.Option(help="YAML grid: settings path → list of values")] = None,
    param: Annotated[
        Optional[list[str]], typer.Option("--param", help="path=value[,value…], e.g. retrieve.mode=dense,hybrid (repeatable)")
    ] = None,
    source: Annotated[
        Optional[list[Path]], typer.Option("--source", help="folder to index (default: ingest.sources; repeatable)")
    ] = None,
    url_template: Annotated[Optional[str], typer.Option(help="public URL of each --source file")] = None,
) -> None:
    """Measure retrieval over a grid of chunking and retrieval settings: results.csv, results.md, one PNG per parameter.

    Chunking (chunker.*) and embedder.* values get one index each under --out, reused; a rerun skips
    finished points and resumes an interrupted one.
    """
    from ragline.evaluate.sweep import parse_param, read_grid, run_sweep

    settings = State.settings()
    items = read_questions(questions, required=("question", "source"))
    values = read_grid(grid) if grid else {}
    values.update(parse_param(text) for text in param or [])
    if not values:
        raise typer.BadParameter("give a --grid file or --param options")
    sources = [SourceSettings(path=path, url_template=url_template) for path in source or []] or settings.ingest.sources
    if not sources:
        raise EvalInputError("nothing to index: give --source folders or set ingest.sources in the config")
    with QuestionBar("sweep point") as bar:
        rows = run_sweep(settings, sources, items, values, out_dir, progress=bar,
                         notify=lambda message: err.print(f"[dim]{escape(message)}[/dim]"))
    out.print(f"{len(rows)} points: results.md, results.csv and plots in {escape(str(out_dir))}")
    out.print((out_dir / "results.md").read_text(encoding="utf-8"), markup=False, highlight=False)


@eval_cli.command("cost")
def cost_command(
    results: Annotated[Path, typer.Argument(help="a results file of `ragline eval answers`")],
    prices: Annotated[Path, typer.Option(help="YAML/JSON: model → {input, output} dollars per 1M tokens")],
    json_output: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Tokens per answer and dollars per answer and in total, per model (answers and judge apart)."""
    from ragline.evaluate.cost import cost_report, read_prices

    rows = cost_report(read_lines(results), read_prices(prices))
    if json_output:
        print(json.dumps([row.to_dict() for row in rows]))
        return
    out.print(f"cost of {escape(results.name)}")
    for row in rows:  # one small table per model: readable in any terminal width
        dollars = ("n/a", "n/a") if row.usd_total is None else (f"{row.usd_per_answer:.6f}", f"{row.usd_total:.4f}")
        table = Table(title=f"{escape(row.role)}: {escape(row.model)}", show_header=False)
        table.add_column("", overflow="fold")
        table.add_column("", justify="right", overflow="fold")
        for name, value in zip(
            ("answers", "prompt tokens", "completion tokens", "$ per answer", "$ total"),
            (str(row.answers), f"{row.prompt_tokens:.0f}", f"{row.completion_tokens:.0f}", *dollars),
        ):
            table.add_row(name, value)
        out.print(table)
    for row in rows:
        if row.usd_total is None:
            err.print(f"[yellow]{escape(row.model)} is not in {escape(str(prices))}: add it to price it[/yellow]")
