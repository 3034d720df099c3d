"""What every `ragline` command shares: the consoles, the config file option's state, the retrieval and
filter options and their parsing, and the progress bar of long work."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragline.config import ConfigError, RetrieveSettings, Settings, load_settings, retrieve_options
from ragline.store.base import FilterError, parse_filter_value

# Lines are never soft-wrapped at the terminal width: a path or URL cut in two cannot be
# copied, and a script must be able to parse every line (machine output uses plain print()).
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class State:
    config_file: Path | None = None

    @classmethod
    def settings(cls) -> Settings:
        return load_settings(cls.config_file)


class BarProgress:
    """Draws the indexer's progress on stderr, so JSON on stdout stays clean."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[path]}", style="dim"), console=err, transient=True,
        )
        self._task = None

    def waiting(self, message: str) -> None:
        err.print(f"[dim]{escape(message)}…[/dim]")

    def start(self, total_files: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("ingest", total=total_files, path="")

    def advance(self, path: str) -> None:
        self._bar.update(self._task, advance=1, path=Path(path).name[-40:])

    def stop(self) -> None:
        self._bar.stop()


FILTER_OPTION = typer.Option("--filter", help="metadata filter field=value (repeatable)")
MODE_OPTION = typer.Option("--mode", help="dense, keyword or hybrid (default: retrieve.mode)")
RERANK_OPTION = typer.Option("--rerank", help="none, cross-encoder, http or llm (default: retrieve.rerank.backend)")
TENANT_OPTION = typer.Option("--tenant", help="search the documents of this tenant (all of its groups)")
RETRIEVE_OPTION = typer.Option(
    "--retrieve", help="any retrieval setting for this call, e.g. mmr_lambda=0.7 or transforms.hyde=true (repeatable)"
)


def retrieve_overrides(
    base: RetrieveSettings, mode: str | None, rerank: str | None, items: list[str] | None
) -> RetrieveSettings | None:
    """The config's retrieval settings with this call's `--mode`, `--rerank` and `--retrieve key=value` options."""
    overrides: dict[str, object] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--retrieve")
        overrides[key.strip()] = yaml.safe_load(text) if text.strip() else None
    if mode is not None:
        overrides["mode"] = mode
    if rerank is not None:
        overrides["rerank.backend"] = rerank
    try:
        return retrieve_options(base, overrides) if overrides else None
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--retrieve/--mode/--rerank") from None


def parse_filters(items: list[str] | None, fields: dict[str, str]) -> dict[str, object] | None:
    """`--filter field=value` options as store filters, each value parsed to the field's type
    (`fields`, from `VectorStore.filter_fields()`); a repeated field matches any of its values."""
    values: dict[str, list] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not field=value", param_hint="--filter")
        try:
            values.setdefault(name, []).append(parse_filter_value(name, text, fields))
        except FilterError as exc:
            raise typer.BadParameter(str(exc), param_hint="--filter") from None
    return {name: found[0] if len(found) == 1 else {"$in": found} for name, found in values.items()} or None


