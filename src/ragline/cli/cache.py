"""`ragline cache warm FILE`: answer a list of questions ahead of time into the service's Redis answer cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragline.cli.common import State, err, out
from ragline.config import ConfigError
from ragline.store.base import DEFAULT_TENANT

cache_cli = typer.Typer(help="The service's answer cache.", no_args_is_help=True)


def read_questions(path: Path) -> list[str]:
    """One question per line, or JSONL with a "question" field (blank lines and # comments skipped)."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a file with one question per line (or JSONL)")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line)["question"]).strip()
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{number}: a JSON line needs a \"question\" field") from None
        questions.append(line)
    return questions


@cache_cli.command("warm")
def warm(
    file: Annotated[Path, typer.Argument(help="questions: one per line, or JSONL with a question field")],
    tenant: Annotated[str, typer.Option(help="the tenant whose callers will ask them")] = DEFAULT_TENANT,
    groups: Annotated[
        Optional[str],
        typer.Option(help="the callers' groups, comma separated (default: the tenant's admins, who read all)"),
    ] = None,
) -> None:
    """Answer each question as a caller of that tenant and groups would be answered, into the shared cache.

    Cached answers are keyed by tenant, groups and index version: warm after an
    ingest, for each group set your users have.
    """
    from ragline.app import Ragline
    from ragline.serve.identity import Principal
    from ragline.serve.readiness import Readiness
    from ragline.serve.service import Service

    settings = State.settings()
    if not settings.serve.redis_url:
        raise ConfigError("warming needs the shared cache: set serve.redis_url (the in-process cache lives in the server)")
    if not settings.serve.cache.enabled:
        raise ConfigError("serve.cache.enabled is false: nothing would read what is warmed")
    questions = read_questions(file)
    group_set = frozenset(g.strip() for g in groups.split(",") if g.strip()) if groups is not None else None
    principal = Principal(tenant, group_set, "cache-warm", group_set is None, "none")
    ragline = Ragline(settings)
    service = Service.build(ragline, Readiness([], settings.serve.busy_retry_after_s))

    async def run() -> tuple[int, int, list[str]]:
        warmed = already = 0
        failures: list[str] = []
        bar = Progress(TextColumn("[bold]warming"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                       transient=True)
        with bar:
            task = bar.add_task("warm", total=len(questions))
            for question in questions:
                final: dict = {}
                async for event in service.answer_events(question, principal, k=None, filters=None, options=None):
                    final = event
                if final.get("type") == "error":
                    failures.append(f"{question[:60]}: {final['message']}")
                elif final.get("note"):
                    failures.append(f"{question[:60]}: answers with a note are not cached ({final['note'][:120]})")
                elif final.get("cached"):
                    already += 1
                else:
                    warmed += 1
                bar.advance(task)
        for close in (service.cache.close, service.limiter.close, service.db.close):
            await close()
        return warmed, already, failures

    try:
        warmed, already, failures = asyncio.run(run())
    finally:
        ragline.close()
    out.print(f"{warmed} answers cached, {already} were already; scope: tenant {escape(tenant)}, "
              f"groups {escape(','.join(sorted(group_set))) if group_set is not None else 'all'}")
    for failure in failures:
        err.print(f"[yellow]not cached:[/yellow] {escape(failure)}")
    if failures:
        raise typer.Exit(1)
