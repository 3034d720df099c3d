"""Ingest jobs: uploads stored by content, and a runner that indexes them from the database's queue.

A job is a row in the service database before any work starts, so nothing
is lost when the server stops: the runner claims a job with a lease and
renews it while indexing; a server killed mid-job stops renewing, and the
next runner (after a restart, or another worker process) claims the job again
once the lease has run out. Indexing is crash-safe and incremental, so the
second run ends in the state of an uninterrupted one. Several runners may
claim jobs at once; the index's ingest lock makes them take turns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from anyio import to_thread

from ragline.config import Settings, SourceSettings
from ragline.pipeline import IngestReport, document_id
from ragline.serve.readiness import without_host_paths

if TYPE_CHECKING:
    from ragline.app import Ragline
    from ragline.serve.db import Database, Job
    from ragline.serve.observability import Metrics

log = logging.getLogger(__name__)

UPLOADS = "uploads"
INGEST_WAIT_S = 3600.0
"""How long a job waits for another ingest of the same index (the CLI's, another worker's) to finish."""
IDLE_POLL_S = 2.0
"""How often an idle runner looks for jobs another process queued (its own submissions wake it at once)."""
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


class UploadError(ValueError):
    """An upload that is refused (type, size, empty); the message says what is allowed."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class StoredUpload:
    """An uploaded file in the data folder, named by its content (the client's name only as the file name)."""

    relative: str
    """Its path under the data folder, e.g. uploads/<tenant>/<sha256>/<groups>/guide.pdf."""
    path: Path
    sha256: str
    filename: str
    doc_id: str


def safe_filename(name: str, suffix_fallback: str = "") -> str:
    """The last part of a client's file name, with only plain characters kept (never a path)."""
    base = Path(name.replace("\\", "/")).name
    cleaned = _UNSAFE_NAME.sub("_", base).strip(" .")[:120]
    return cleaned or f"document{suffix_fallback}"


def upload_folder(data_dir: Path, tenant: str) -> Path:
    """A tenant's upload folder: named by a hash, so no tenant name becomes a path."""
    return data_dir / UPLOADS / hashlib.sha256(tenant.encode()).hexdigest()[:16]


async def store_upload(
    data_dir: Path, tenant: str, groups: list[str], filename: str, chunks: AsyncIterator[bytes], max_bytes: int,
    suffixes: list[str],
) -> StoredUpload:
    """Write an upload under the data folder by its content hash, checking type and size as the bytes arrive.

    Its place is <tenant>/<content hash>/<groups hash>/<name>, which is its
    document's identity: the same bytes, name and groups again are the same
    document; shared with other groups, another one (so an upload never
    changes who may read a document already there: that is an admin's PATCH).

    The file is written to a temporary name and moved into place in one step,
    so a reader (or a job resumed after a crash) never sees half a file.
    """
    suffix = Path(filename).suffix.lower()
    if suffix not in suffixes:
        raise UploadError(
            415, "unsupported_type",
            f"files of type {suffix or '(no suffix)'!r} are not accepted; upload one of: {', '.join(suffixes)}",
        )
    folder = upload_folder(data_dir, tenant)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    handle, name = tempfile.mkstemp(dir=folder, prefix=".upload-")
    partial = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadError(
                        413, "too_large", f"the file is over the {max_bytes / 1048576:g} MB upload limit (serve.limits.max_upload_mb)"
                    )
                digest.update(chunk)
                await to_thread.run_sync(out.write, chunk)
        if size == 0:
            raise UploadError(422, "empty_file", "the uploaded file is empty")
        sha = digest.hexdigest()
        name = safe_filename(filename, suffix)
        if Path(name).suffix.lower() != suffix:
            name += suffix
        shared_with = hashlib.sha256(",".join(sorted(groups)).encode()).hexdigest()[:12]
        target = folder / sha / shared_with / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    relative = target.relative_to(data_dir).as_posix()
    return StoredUpload(relative=relative, path=target, sha256=sha, filename=name, doc_id=upload_document_id(relative))


def upload_document_id(relative: str) -> str:
    """An upload's document id: its source is named by its path under the data folder (its tenant, content and
    groups: unique per upload, and the same on every machine that shares the data folder)."""
    return document_id(relative, PurePosixPath(relative).name)


def upload_source(data_dir: Path, relative: str, tenant: str, groups: list[str]) -> SourceSettings:
    """The source an upload is indexed as: the one file, named by its path under the data folder."""
    return SourceSettings(
        path=(data_dir / relative).resolve(), name=relative, tenant=tenant, groups=groups,
        url_template=f"/v1/documents/{upload_document_id(relative)}",
    )


def remove_upload(data_dir: Path, tenant: str, source_root: str) -> None:
    """Delete an uploaded file, when `source_root` (a manifest root: the file itself) is one of the tenant's
    uploads, and the folders it leaves empty."""
    folder = upload_folder(data_dir, tenant).resolve()
    root = Path(source_root)
    if not root.is_relative_to(folder) or root == folder:
        return
    shutil.rmtree(root.parent, ignore_errors=True)
    with suppress(OSError):  # the content's folder, unless another group set still has a copy
        root.parent.parent.rmdir()


def public_report(report: IngestReport) -> dict[str, Any]:
    """What a job reports to its client: counts and the reasons of failures, with no host paths."""
    return {
        "new": len(report.new),
        "changed": len(report.changed),
        "unchanged": report.unchanged,
        "deleted": len(report.deleted),
        "failed": [{"file": Path(source).name, "reason": without_host_paths(reason)} for source, reason in report.failed],
        "skipped": len(report.skipped),
        "chunks": report.chunks,
        "seconds": report.seconds,
    }


class JobRunner:
    """Claims queued (or abandoned) jobs from the database and indexes them, one at a time per process; "path"
    jobs only of `paths`, the unconfigured folders a watcher in this process was given (no other runner knows
    them)."""

    def __init__(
        self, ragline: Ragline, db: Database, metrics: Metrics | None = None, paths: Sequence[SourceSettings] = ()
    ) -> None:
        self.ragline = ragline
        self.db = db
        self.metrics = metrics
        self.paths = {(source.tenant, source.label): source for source in paths}
        self.settings: Settings = ragline.settings
        self.lease_s = self.settings.serve.job_lease_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="ragline-jobs")

    async def stop(self) -> None:
        """Stop claiming; a job being indexed is left to its lease, and resumed by the next runner."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def nudge(self) -> None:
        """A job was just queued here: look now instead of at the next poll."""
        self._wake.set()

    async def _run_forever(self) -> None:
        while True:
            try:
                job = await self.db.jobs.claim(self.lease_s, self.paths.keys())
            except Exception:  # the database is down: /readyz says so; try again later
                log.warning("could not claim ingest jobs", exc_info=True)
                job = None
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                except TimeoutError:
                    pass
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        beating = asyncio.create_task(self._heartbeat(job))
        try:
            report, doc_id = await to_thread.run_sync(self._index, job, abandon_on_cancel=True)
        except asyncio.CancelledError:
            raise  # shutting down: the lease runs out and the job is resumed
        except Exception as exc:
            log.warning("ingest job %s failed", job.id, exc_info=True)
            await self.db.jobs.finish(
                job.id, "failed", error=without_host_paths(str(exc)) or type(exc).__name__, attempt=job.attempts
            )
            return
        finally:
            beating.cancel()
        failed = bool(report["failed"]) and job.kind == "upload"
        await self.db.jobs.finish(
            job.id, "failed" if failed else "succeeded", report=report,
            error=report["failed"][0]["reason"] if failed else "", doc_id=doc_id, attempt=job.attempts,
        )

    async def _heartbeat(self, job: Job) -> None:
        """Renew the lease while indexing; a claim lost (this server stalled past its lease) is logged: the
        later claim owns the job's outcome, and indexing twice ends in the same index."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.db.jobs.heartbeat(job.id, self.lease_s, attempt=job.attempts):
                    log.warning("job %s was claimed again after its lease ran out", job.id)
                    return
            except Exception:
                log.warning("could not renew the lease of job %s", job.id, exc_info=True)

    def _index(self, job: Job) -> tuple[dict[str, Any], str | None]:
        """Index the job's upload, configured source or watched path (a worker thread)."""
        source, doc_id = self._source(job)
        report = self.ragline.indexer(wait_s=INGEST_WAIT_S).run([source])
        if self.metrics is not None:
            for outcome, files in (("new", report.new), ("changed", report.changed), ("deleted", report.deleted)):
                self.metrics.ingest_documents.labels(outcome=outcome).inc(len(files))
            self.metrics.ingest_documents.labels(outcome="failed").inc(len(report.failed))
            self.metrics.ingest_documents.labels(outcome="unchanged").inc(report.unchanged)
        return public_report(report), doc_id

    def _source(self, job: Job) -> tuple[SourceSettings, str | None]:
        if job.kind == "upload":
            source = upload_source(self.settings.data_dir, job.source, job.tenant, list(job.groups))
            if not source.local_path.is_file():
                raise FileNotFoundError("the uploaded file is gone (deleted while the job waited); upload it again")
            return source, upload_document_id(job.source)
        if job.kind == "path":
            if (path := self.paths.get((job.tenant, job.source))) is None:  # claimed only when held: a bug
                raise LookupError(f"this runner does not hold the watched path {job.source!r}")
            return path, None
        for source in self.settings.ingest.sources:
            if source.label == job.source and source.tenant == job.tenant:
                return source, None
        raise LookupError(f"no source named {job.source!r} in this server's config (ingest.sources)")
