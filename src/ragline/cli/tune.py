"""`ragline tune`, the command line of `evaluate.tune`: parse, draw progress, print the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragline.app import Ragline
from ragline.cli.common import State, err, out
from ragline.evaluate.tune import Target, TuneOptions, TuneReport, figures, tune
from ragline.generate.base import LLMError


class PhaseBars:
    """One progress bar per phase (generate, mine, train, evaluate …), drawn on stderr."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, object] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=done, total=total)


def tune_command(
    target: Annotated[
        Target, typer.Option(help="embedder: fine-tune the embedding model (then `ragline ingest --full`); "
                             "reranker: train a cross-encoder reranker")
    ] = TuneOptions().target,
    questions: Annotated[
        int, typer.Option(min=0, help="synthetic questions the LLM writes (0: heading → section pairs only)")
    ] = 200,
    max_minutes: Annotated[float, typer.Option(min=1, help="wall-time budget of the whole run")] = 60.0,
    dev: Annotated[
        Optional[list[Path]],
        typer.Option("--dev", help="JSONL of {question, source} the model must not get worse on (repeatable)"),
    ] = None,
    negatives: Annotated[int, typer.Option(min=1, max=32, help="hard negatives mined per question")] = 4,
    holdout: Annotated[float, typer.Option(min=0.05, max=0.5, help="share of the pages held out to measure")] = 0.2,
    epochs: Annotated[int, typer.Option(min=1, max=20, help="passes over the training pairs (budget permitting)")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, max=256)] = 16,
    seed: Annotated[int, typer.Option(help="sampling, split and training seed")] = 0,
) -> None:
    """Adapt retrieval to your own corpus (offline, on CPU) and keep the model only if it retrieves better.

    Synthetic questions from the configured LLM (cached, so a rerun resumes) and heading → section
    pairs, hard negatives from keyword and dense search; then the embedding model fine-tuned
    (--target embedder, measured on a re-embedded copy of the index) or a cross-encoder reranker
    initialised from it (--target reranker); measured before/after on held-out pairs and the --dev sets.
    """

    settings = State.settings()
    for path in dev or []:
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="--dev")
    options = TuneOptions(
        target=target, questions=questions, negatives=negatives, holdout=holdout, max_minutes=max_minutes,
        epochs=epochs, batch_size=batch_size, seed=seed, dev_sets=list(dev or []),
    )
    app = Ragline(settings)
    try:
        llm = app.query_llm() if questions else None
        if llm is not None:
            try:
                llm.load()
            except LLMError as exc:
                err.print(f"[yellow]the LLM could not be loaded ({escape(str(exc))}): heading pairs only[/yellow]")
                llm = None
        elif questions:
            err.print("[yellow]no LLM is configured or it could not be loaded: heading pairs only[/yellow]")
        bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        )
        with bar:
            report = tune(app, options, llm, PhaseBars(bar))
    finally:
        app.close()
    _print_report(report, out, err)


def _print_report(report: TuneReport, out, err) -> None:  # type: ignore[no-untyped-def]
    out.print("ragline tune: page hit@5 / MRR@10 (anchor hit@5), before → after")  # lines, not a table: narrow
    for name, result in report.before.items():  # terminals must not cut a figure
        before, after = figures(result), figures(report.after[name])
        out.print(
            f"  {escape(name)} ({before['questions']} questions): "
            f"{before['hit@5']:.3f} / {before['mrr']:.3f} ({before['anchor hit@5']:.3f}) → "
            f"{after['hit@5']:.3f} / {after['mrr']:.3f} ({after['anchor hit@5']:.3f})"
        )
    out.print(
        f"pairs: {report.pairs['synthetic']} synthetic, {report.pairs['headings']} heading; "
        f"{report.training_examples} training examples, {report.steps} steps; "
        + ", ".join(f"{phase} {seconds:.0f}s" for phase, seconds in report.timings.items())
    )
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if report.model_dir is None:
        out.print(f"[yellow]not kept[/yellow] ({escape(report.reason)}): the configuration stays as it is")
        return
    out.print(f"[green]kept[/green] ({escape(report.reason)}): {escape(str(report.model_dir))}")
    out.print("select it in ragline.yaml:")
    if report.target == "embedder":
        print(f"embedder:\n  model: {report.model_dir.resolve()}")
        out.print("then rebuild the index with it (every vector changes): ragline ingest --full")
    else:
        print(f"retrieve:\n  rerank:\n    backend: cross-encoder\n    model: {report.model_dir.resolve()}")
