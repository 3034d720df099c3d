"""Event-driven ingestion: watch sources and submit ingest jobs to the service database when they change.

A folder is watched through file events (`watchfiles`); an object-store
source (`s3://bucket/prefix` and the like, through fsspec) is listed every
`watch.poll_s` and compared with the previous listing (ETag and size). Events
on excluded files (`ingest.exclude`, secrets, editor temp files in
`watch.ignore`) and inside the data folder are dropped; the rest are debounced
(`watch.debounce_s` of quiet, at most `watch.max_delay_s`), so a burst of
writes submits one job.

Jobs are the service's "source" jobs (`source:<label>`), so `GET /v1/jobs`
shows them and any runner of the same database may run them. The queue keeps
one active job per source: a change that finds its source's job still queued
joins it (the job has not scanned yet), and one that finds it running marks the
source dirty: another job is submitted when that one ends, because the running
ingest may have scanned before the change. On start every source gets one job,
for the changes made while nothing watched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyio import to_thread

from ragline.config import Settings, SourceSettings
from ragline.ingest.scan import first_match
from ragline.serve.db import FINAL_STATUSES, JobKind

if TYPE_CHECKING:
    from ragline.serve.db import Database, Job
    from ragline.serve.jobs import JobRunner

log = logging.getLogger(__name__)

SUBMIT_RETRY_S = 5.0
"""How long a source waits after a submit that failed (the database did not answer) before the next try."""
READY_WAIT_S = 120.0
"""Longest the first listing of every object-store source may take before the catch-up jobs go in anyway."""
MAX_REASONS = 3

Listing = dict[str, tuple[str, int]]
"""An object store's listing: key (relative to the source's prefix) → (change stamp: the ETag, size)."""


class WatchError(ValueError):
    """A source that cannot be watched (a folder that does not exist, an unknown name); the message says why."""


def source_url(source: SourceSettings) -> str | None:
    """The URL of an object-store source (`s3://bucket/prefix`), None for a local folder or file."""
    return str(source.path) if source.is_remote else None


@dataclass(frozen=True, slots=True)
class ListingChanges:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.new or self.changed or self.deleted)

    def summary(self) -> str:
        return f"{len(self.new)} new, {len(self.changed)} changed, {len(self.deleted)} deleted"


def diff_listings(before: Mapping[str, tuple[str, int]], after: Mapping[str, tuple[str, int]]) -> ListingChanges:
    """Objects that appeared, changed (another ETag or size) or went between two listings."""
    return ListingChanges(
        new=sorted(key for key in after if key not in before),
        changed=sorted(key for key, stamp in after.items() if key in before and before[key] != stamp),
        deleted=sorted(key for key in before if key not in after),
    )


class PathFilter:
    """Which paths of a source matter to its index: not excluded (`ingest.exclude`, directories included), not a
    secret, not an editor temp file (`watch.ignore`), not inside the data folder."""

    def __init__(self, settings: Settings) -> None:
        self.exclude = settings.ingest.exclude
        self.secrets = settings.ingest.exclude_secrets
        self.ignore = settings.watch.ignore
        self.data_dir = settings.data_dir.expanduser().resolve()

    def relevant(self, relative: str) -> bool:
        """`relative`: a posix path from the source's root."""
        parts = [part for part in relative.split("/") if part not in ("", ".")]
        for depth, name in enumerate(parts, 1):
            prefix = "/".join(parts[:depth])
            if any(first_match(prefix, name, patterns) for patterns in (self.exclude, self.secrets, self.ignore)):
                return False
        return True

    def relevant_path(self, root: Path, path: Path) -> bool:
        """A file event's path under a watched root (a folder, or a single file)."""
        if path == self.data_dir or self.data_dir in path.parents:
            return False
        if path == root:  # the folder itself (gone, say), or the one file a source names
            return True
        if root not in path.parents:
            return False
        return self.relevant(path.relative_to(root).as_posix())


def list_objects(source: SourceSettings, settings: Settings) -> Listing:
    """An object-store source's listing as the indexer sees it (excludes and secrets applied), with each object's
    change stamp (its ETag) and size, less the temp files of `watch.ignore`; SourceError when it cannot be listed."""
    from ragline.ingest.sources import list_entries

    keep = PathFilter(settings).relevant
    return {
        entry.relative: (entry.stamp, entry.size) for entry in list_entries(source, settings.ingest)
        if not entry.skipped and keep(entry.relative)
    }


@dataclass
class _Watched:
    """A watched source and where its changes stand."""

    source: SourceSettings
    url: str | None
    root: Path | None
    kind: JobKind
    """"source" when ingest.sources lists it (any runner can index it), else "path" (only this process's runner)."""
    due: float | None = None
    """When to submit its job (monotonic); None: nothing to submit."""
    first_change: float | None = None
    reasons: list[str] = field(default_factory=list)
    job: Job | None = None
    """Its active job (queued or running) as last seen, watched until it ends."""
    dirty: bool = False
    """A change arrived while `job` was running: another job follows it."""

    @property
    def label(self) -> str:
        return self.source.label


def _describe(changes: set[tuple[Any, str]], folder: Path) -> str:
    """File events in words: `b.md added, c.txt modified and 3 more`."""
    kinds: dict[str, str] = {}
    for change, path in changes:
        kinds[Path(path).relative_to(folder).as_posix()] = getattr(change, "name", str(change))
    names = sorted(kinds)
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return ", ".join(f"{name} {kinds[name]}" for name in names[:2]) + more


def _outcome(job: Job) -> str:
    if job.status == "failed":
        return f"failed: {job.error or 'no reason given'}"
    report = job.report or {}
    failed = report.get("failed") or []
    text = (
        f"{report.get('new', 0)} new, {report.get('changed', 0)} changed, {report.get('deleted', 0)} deleted, "
        f"{report.get('unchanged', 0)} unchanged, {len(failed)} failed files, {report.get('chunks', 0)} chunks "
        f"in {float(report.get('seconds') or 0):.1f} s"
    )
    return f"succeeded: {text}" + "".join(f"; {item['file']}: {item['reason']}" for item in failed[:3])


class Watcher:
    """Watches sources and submits their ingest jobs; `runner` (optional) runs them in this process."""

    def __init__(
        self, settings: Settings, db: Database, sources: Sequence[SourceSettings], runner: JobRunner | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if not sources:
            raise WatchError("nothing to watch: give PATH arguments or set ingest.sources in the config")
        self.settings = settings
        self.watch = settings.watch
        self.db = db
        self.runner = runner
        self.say = say or log.info
        self.filter = PathFilter(settings)
        self.sources: list[_Watched] = []
        configured = {(source.tenant, source.label) for source in settings.ingest.sources}
        for source in sources:
            url = source_url(source)
            root = None if url else source.local_path.expanduser().resolve()
            if root is not None and not root.exists():
                raise WatchError(f"{source.path} does not exist; check the path of source {source.label!r}")
            kind: JobKind = "source" if (source.tenant, source.label) in configured else "path"
            self.sources.append(_Watched(source, url, root, kind))
        self.submitted = 0
        """Jobs this watcher created (not those it found active already)."""
        self._wake = asyncio.Event()

    # --- changes -----------------------------------------------------------------------------------------------

    def changed(self, watched: _Watched, reason: str, now: float | None = None) -> None:
        """Note a change of a source: its job goes in after the quiet time (at once with `now`)."""
        at = time.monotonic()
        if watched.first_change is None:
            watched.first_change = at
        due = now if now is not None else min(at + self.watch.debounce_s, watched.first_change + self.watch.max_delay_s)
        watched.due = due
        if len(watched.reasons) < MAX_REASONS:
            watched.reasons.append(reason)
        elif len(watched.reasons) == MAX_REASONS:
            watched.reasons.append("…")
        self._wake.set()

    async def _watch_folder(self, watched: _Watched, stop: asyncio.Event) -> None:
        from watchfiles import awatch

        root = watched.root
        assert root is not None
        folder = root.is_dir()
        target = root if folder else root.parent

        def keep(_change: object, path: str) -> bool:
            return self.filter.relevant_path(root, Path(path))

        while not stop.is_set():
            try:
                async for changes in awatch(
                    target, watch_filter=keep, stop_event=stop, recursive=folder, debounce=400, step=50,
                    rust_timeout=1000,
                ):
                    self.changed(watched, _describe(changes, target))
            except Exception as exc:  # the folder went (or was replaced): watch it again once it is back
                log.warning("watching %s failed: %s", target, exc)
                self.say(f"watching {target} failed ({exc}); trying again in {self.watch.poll_s:g} s")
                try:
                    await asyncio.wait_for(stop.wait(), self.watch.poll_s)
                except TimeoutError:
                    pass

    async def _poll_objects(self, watched: _Watched, stop: asyncio.Event, ready: asyncio.Event) -> None:
        try:
            await self._poll_forever(watched, stop, ready)
        finally:
            ready.set()

    async def _poll_forever(self, watched: _Watched, stop: asyncio.Event, ready: asyncio.Event) -> None:
        url = watched.url
        previous: Listing | None = None
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.watch.timeout_s):
                    listing = await to_thread.run_sync(
                        list_objects, watched.source, self.settings, abandon_on_cancel=True
                    )
            except Exception as exc:
                reason = str(exc) or f"no answer within {self.watch.timeout_s:g} s"
                log.warning("listing %s failed: %s", url, reason)
                self.say(f"could not list {url} ({reason}); trying again in {self.watch.poll_s:g} s")
            else:
                if previous is not None and (changes := diff_listings(previous, listing)):
                    self.say(f"{url}: {changes.summary()} object(s)")
                    self.changed(watched, changes.summary(), now=time.monotonic())  # a poll is its own debounce
                previous = listing
            ready.set()
            try:
                await asyncio.wait_for(stop.wait(), self.watch.poll_s)
            except TimeoutError:
                pass

    # --- jobs --------------------------------------------------------------------------------------------------

    async def _submit(self, watched: _Watched) -> None:
        source = watched.source
        try:
            async with asyncio.timeout(self.watch.timeout_s):
                job, created = await self.db.jobs.submit(
                    source.tenant, watched.kind, source.label, f"{watched.kind}:{source.label}", source.groups
                )
        except Exception as exc:
            reason = str(exc) or f"no answer within {self.watch.timeout_s:g} s"
            log.warning("submitting a job for %s failed: %s", source.label, reason)
            self.say(f"could not submit a job for {source.label} ({reason}); trying again in {SUBMIT_RETRY_S:g} s")
            watched.due = time.monotonic() + SUBMIT_RETRY_S
            return
        why = "; ".join(watched.reasons) or "changed"
        watched.due = watched.first_change = None
        watched.reasons = []
        watched.job = job
        if created:
            self.submitted += 1
            self.say(f"submitted job {job.id} for {source.label} ({why})")
            if self.runner is not None:
                self.runner.nudge()
        elif job.status == "queued":
            self.say(f"{source.label}: {why}; job {job.id} is queued already and will see it")
        else:
            watched.dirty = True
            self.say(f"{source.label}: {why} while job {job.id} runs; another job follows when it ends")

    async def _check(self, watched: _Watched) -> None:
        seen = watched.job
        assert seen is not None
        try:
            async with asyncio.timeout(self.watch.timeout_s):
                job = await self.db.jobs.get(watched.source.tenant, seen.id)
        except Exception as exc:
            log.warning("looking up job %s failed: %s", seen.id, exc)
            return
        if job is None:  # gone from the database: nothing to wait for
            watched.job = None
        elif job.status in FINAL_STATUSES:
            watched.job = None
            self.say(f"job {job.id} for {watched.label} {_outcome(job)}")
            if watched.dirty:
                watched.dirty = False
                self.changed(watched, f"changed while job {job.id} ran", now=time.monotonic())
        else:
            if job.status == "running" and seen.status != "running":
                self.say(f"job {job.id} for {watched.label} is running")
            watched.job = job

    # --- the loop ----------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until `stop` is set. A job being indexed by this process's runner is then left to its lease
        (the next runner resumes it)."""
        await self.db.migrate()
        if self.runner is not None:
            self.runner.start()
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        tasks: list[asyncio.Task[None]] = []
        ready: list[asyncio.Event] = []
        try:
            for watched in self.sources:
                if watched.url is None:
                    tasks.append(asyncio.create_task(self._watch_folder(watched, stop)))
                else:
                    ready.append(asyncio.Event())
                    tasks.append(asyncio.create_task(self._poll_objects(watched, stop, ready[-1])))
            for watched in self.sources:
                where = watched.url or str(watched.root)
                self.say(f"watching {watched.label} ({where}, tenant {watched.source.tenant})")
            # the first listings are the baselines: taken before the catch-up jobs, whose scans come later
            try:
                async with asyncio.timeout(READY_WAIT_S):
                    await asyncio.gather(*(event.wait() for event in ready))
            except TimeoutError:
                self.say(f"the first listing of an object store took over {READY_WAIT_S:g} s; going on without it")
            for watched in self.sources:
                self.changed(watched, "catching up with changes made while not watching", now=time.monotonic())
            next_check = time.monotonic()
            while not stop.is_set():
                self._wake.clear()
                now = time.monotonic()
                for watched in self.sources:
                    if watched.due is not None and watched.due <= now and not watched.dirty:
                        await self._submit(watched)
                if time.monotonic() >= next_check:
                    for watched in self.sources:
                        if watched.job is not None:
                            await self._check(watched)
                    next_check = time.monotonic() + self.watch.job_poll_s
                waits = [next_check] + [w.due for w in self.sources if w.due is not None and not w.dirty]
                timeout = max(0.0, min(waits) - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            stop.set()
            for task in (*tasks, stopping):
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)
            if self.runner is not None:
                await self.runner.stop()
