"""`ragline store migrate --to URL`: copy the index from the configured store to another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragline.app import Ragline
from ragline.cli.common import State, err, out
from ragline.config import STORE_URL_FORMS, ConfigError, Settings, with_store_url
from ragline.store.migrate import MigrationReport, migrate

EXIT_INTERRUPTED = 130

store_cli = typer.Typer(help="The index's store: copy it to another.", no_args_is_help=True)


class MigrationBar:
    """Draws the migration's progress on stderr (a `MigrationProgress`), so JSON on stdout stays clean."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("[bold]migrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[path]}", style="dim"), console=err, transient=True,
        )
        self._task = None

    def __call__(self, done: int, total: int, source: str) -> None:
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("migrate", total=total, path="")
        self._bar.update(self._task, completed=done, path=Path(source).name[-40:])

    def stop(self) -> None:
        self._bar.stop()


def describe(settings: Settings) -> str:
    """Which store and index `settings` name, without the URL's credentials."""
    store = settings.store
    url = store.url.get_secret_value() if store.url else None
    if url is None:
        place = str(settings.data_dir.expanduser().resolve())
    elif "://" in url:
        parts = urlsplit(url)
        place = f"{parts.hostname}:{parts.port or ''}{parts.path}"
    else:  # a Milvus Lite file
        place = str(Path(url).expanduser().resolve())
    name = {"pgvector": f" schema {store.db_schema}", "qdrant": f" collection {store.collection}",
            "milvus": f" collection {store.collection}"}.get(store.backend, "")
    return f"{store.backend} at {place}{name}"


@store_cli.command("migrate")
def migrate_command(
    to: Annotated[str, typer.Option("--to", help=f"the target store: {STORE_URL_FORMS}")],
    force: Annotated[
        bool, typer.Option("--force", help="empty a target that holds an index of another embedding model first; "
                                             "let an empty source empty the target")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Copy the index (chunks, vectors, manifest, access, embedding model) from the configured store to another.

    Documents already in the target as in the source are skipped, so an interrupted migration continues when run
    again; documents in the target that the source lacks are deleted. The target's counts are checked against the
    source's at the end. The source is only read: switch the config to the target when it is done.
    """
    settings = State.settings()
    try:
        target_settings = with_store_url(settings, to)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--to") from None
    source_name, target_name = describe(settings), describe(target_settings)
    if source_name == target_name:
        raise typer.BadParameter(f"names the configured store itself ({escape(source_name)}): give another store",
                                 param_hint="--to")
    app = Ragline(settings)
    bar = MigrationBar()
    try:
        target = app.open_store(target_settings)
        try:
            report = migrate(app.store, target, bar, force)
        finally:
            bar.stop()
            target.close()
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/yellow] the documents copied so far stay in the target; run the same "
                  "command again to continue")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        app.close()
    if json_output:
        print(json.dumps({"source": source_name, "target": target_name, **report.to_dict()}))
    else:
        _print_report(report, source_name, target_name)


def _print_report(report: MigrationReport, source_name: str, target_name: str) -> None:
    table = Table(title="store migration", show_header=False)
    for label, value in [
        ("from", source_name),
        ("to", target_name),
        ("documents", report.documents),
        ("copied", report.copied),
        ("already there (skipped)", report.unchanged),
        ("deleted from the target", len(report.deleted)),
        ("chunks (verified)", report.chunks),
        ("seconds", f"{report.seconds:.1f}"),
    ]:
        table.add_row(label, escape(str(value)))
    out.print(table)
    if report.cleared:
        out.print("[yellow]the target held an index of another embedding model: it was emptied first[/yellow]")
    out.print("the target holds the index now: point store settings at it to use it")
