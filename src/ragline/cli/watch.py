"""`ragline watch`: submit ingest jobs when sources change (file events on folders, polling of object stores)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ragline.cli.common import State, err, out
from ragline.config import ConfigError, Settings, SourceSettings

THREAD_JOIN_S = 5.0
"""How long, once stopped, to wait for this process's running ingest to notice before leaving it to its lease."""


def _resolve_sources(
    settings: Settings, paths: list[str], names: list[str], submit_only: bool
) -> tuple[list[SourceSettings], list[SourceSettings]]:
    """The sources to watch, and those of them that are not configured (their "path" jobs are run by this
    process's runner only).

    A PATH (or URL) that is a configured source, or lies inside one, watches that source; another one becomes a
    source of its own, as with `ragline ingest PATH`.
    """
    from ragline.config import is_url
    from ragline.ingest.sources import explicit_source, location_of

    configured = settings.ingest.sources
    chosen: list[SourceSettings] = []
    extra: list[SourceSettings] = []
    for name in names:
        found = [source for source in configured if source.label == name]
        if not found:
            known = ", ".join(sorted({source.label for source in configured})) or "none"
            raise typer.BadParameter(f"no source named {name!r} in ingest.sources (configured: {known})",
                                     param_hint="--source")
        chosen += found
    for text in paths:
        if not is_url(text) and not Path(text).expanduser().exists():
            raise typer.BadParameter(f"{text} does not exist", param_hint="PATH")
        given = explicit_source(text, None, configured)
        where = location_of(given)
        match = [source for source in configured if location_of(source) == where]
        if match:
            chosen += match
            continue
        if submit_only:
            raise ConfigError(
                f"{text} is not a source of ingest.sources, and with --submit-only a server runs the jobs: it would "
                "not know it. Add it to the config's ingest.sources (and restart the server), or drop --submit-only "
                "to index it from this process"
            )
        if any(other.label == given.label for other in (*configured, *extra)):
            raise ConfigError(
                f"{text} would be called {given.label!r}, the name of another source; add it to ingest.sources with "
                "a `name:` of its own"
            )
        extra.append(given)
        chosen.append(given)
    if not paths and not names:
        chosen = list(configured)
    unique: dict[tuple[str, str], SourceSettings] = {}
    for source in chosen:
        unique.setdefault((source.tenant, source.label), source)
    if not unique:
        raise ConfigError("nothing to watch: give PATH arguments or --source NAME, or set ingest.sources in the config")
    return list(unique.values()), extra


def _say(message: str) -> None:
    out.print(f"[dim]{datetime.now():%H:%M:%S}[/dim] {escape(message)}")


def watch_command(
    paths: Annotated[
        Optional[list[str]],
        typer.Argument(help="folders or object-store URLs (s3://bucket/prefix) to watch (default: all ingest.sources)"),
    ] = None,
    source: Annotated[
        Optional[list[str]], typer.Option("--source", help="a source of ingest.sources by name (repeatable)")
    ] = None,
    submit_only: Annotated[
        bool,
        typer.Option("--submit-only", help="only submit jobs: a `ragline serve` on the same database runs them "
                     "(PATHs must then be configured sources)"),
    ] = False,
    debounce: Annotated[
        Optional[float], typer.Option("--debounce", min=0.01, help="seconds of quiet before a job (default: watch.debounce_s)")
    ] = None,
    poll: Annotated[
        Optional[float], typer.Option("--poll", min=0.1, help="seconds between object-store listings (default: watch.poll_s)")
    ] = None,
) -> None:
    """Watch sources and submit an ingest job whenever one changes; the jobs show in the service's `GET /v1/jobs`.

    Folders are watched through file events, debounced (a burst of writes is one job), with ingest.exclude,
    secrets, editor temp files (watch.ignore) and the data folder left out; object stores are listed every
    watch.poll_s and compared by ETag and size. Every source gets one job at the start, for changes made while
    nothing watched. Jobs run in this process unless --submit-only. Stop with Ctrl-C or SIGTERM: a job being
    indexed is left to its lease and resumed by the next runner.
    """
    from ragline.app import Ragline
    from ragline.serve.db import DatabaseError
    from ragline.serve.watch import Watcher, WatchError

    settings = State.settings()
    if debounce is not None or poll is not None:
        changes = {"debounce_s": debounce or settings.watch.debounce_s, "poll_s": poll or settings.watch.poll_s}
        changes["max_delay_s"] = max(settings.watch.max_delay_s, changes["debounce_s"])
        settings = settings.model_copy(update={"watch": settings.watch.model_copy(update=changes)})
    sources, extra = _resolve_sources(settings, paths or [], source or [], submit_only)
    if extra:
        names = ", ".join(item.label for item in extra)
        err.print(f"[yellow]not in ingest.sources:[/yellow] {escape(names)}: indexed by this process only "
                  "(servers on the same database leave their jobs to it; add them to the config to share them)")
    app = Ragline(settings)
    runner = None if submit_only else app.job_runner_with_paths(extra)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            watcher = Watcher(settings, app.database, sources, runner, say=_say)
            await watcher.run(stop)
        finally:
            await app.database.close()

    try:
        asyncio.run(main())
    except (DatabaseError, WatchError) as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        app.close()
        raise typer.Exit(1) from None
    _say("stopped watching")
    deadline = time.monotonic() + THREAD_JOIN_S
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        # an ingest job is still running in a worker thread: leave it to its lease (the next runner resumes it,
        # and the index is crash-safe) instead of waiting for it to finish
        _say("a running job was left to its lease: the next runner resumes it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    app.close()
