"""Incremental, crash-safe indexing: scan → compare with the manifest → parse in workers → embed → store.

The per-file step (load + chunk) is a pure function run in worker processes
(`ingest.workers`), so a distributed engine can map the same call. Each
file's chunks and manifest row are written in one store transaction, after
its vectors exist, so a run killed at any point leaves every file either
fully indexed in its old or its new version; re-running finishes the job and
ends in the state of an uninterrupted run. One run at a time per index: the
whole run holds `ingest.lock` in the data folder. Each file is stored with
its source's tenant and access groups; when only those change, the file's
access is changed in place (`VectorStore.set_access`), not re-embedded.

Sources are local folders or object-store prefixes (`ingest.sources`: one
`Source` each lists entries with change stamps and reads their bytes). A
document's id is its source's label and its path from the source's root, never
where the source is: the same corpus under another path, on another node or
in a bucket keeps its ids, and a moved source is followed (its manifest rows
are moved without re-embedding where its chunks do not depend on the path).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np

from ragline.config import IngestSettings, SourceSettings, label_clash
from ragline.embed.base import Embedder, EmbedderUnavailable
from ragline.ingest.chunker import Chunker
from ragline.ingest.loaders import loader_for
from ragline.ingest.loaders.base import LoadError, file_stamp
from ragline.ingest.parse import ParseJob, ParseResult
from ragline.ingest.sources import Entry, Source, SourceError, is_under, open_source, relative_in
from ragline.ingest.workers import ParsePool, WorkerError, import_loader_modules
from ragline.locking import hold_exclusive
from ragline.store.base import DocumentRecord, VectorStore
from ragline.types import Chunk, utc_now

PIPELINE_VERSION = "6"
"""Bump when loaders or chunking change what they produce, so every file is re-indexed (6: document ids from
the source's label and relative path; the rows under the old ids are deleted by the run that re-indexes)."""

__all__ = ["PIPELINE_VERSION", "IngestError", "IngestReport", "Indexer", "document_id", "entry_url", "is_under"]

Planned = tuple[SourceSettings, Source, list[Entry]]

LOCK_POLL_S = 0.2


class IngestError(RuntimeError):
    """The run itself cannot go on (as opposed to one bad file, which is reported and skipped)."""


@dataclass(slots=True)
class IngestReport:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    """What was left out of files that were indexed (an include outside the tree, say)."""
    access_changed: list[str] = field(default_factory=list)
    """Unchanged files given their source's new tenant or groups (not re-embedded; counted in `unchanged` too)."""
    unsupported: int = 0
    chunks: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Progress(Protocol):
    """Where the indexer reports how far it has got (the CLI draws a progress bar)."""

    def waiting(self, message: str) -> None:
        """Another ingest holds the index; this one waits for it."""
        ...

    def start(self, total_files: int) -> None: ...

    def advance(self, path: str) -> None: ...


class _Silent:
    def waiting(self, message: str) -> None:
        pass

    def start(self, total_files: int) -> None:
        pass

    def advance(self, path: str) -> None:
        pass


@dataclass(slots=True)
class Candidate:
    """A new or changed file on its way through parsing and embedding to the store."""

    record: DocumentRecord
    is_new: bool
    chunks: list[Chunk] = field(default_factory=list)


def document_id(label: str, relative: str) -> str:
    """A document's identity: its source's label and its posix path from the source's root (printable), so the
    same corpus under another absolute path, on another machine or in an object store keeps its ids."""
    return hashlib.sha256(f"{label}\0{relative}".encode("utf-8", "surrogateescape")).hexdigest()[:20]


def entry_url(source: Source, entry: Entry, url_template: str | None) -> str:
    """The public URL of a file: the template with {path} (relative, no suffix), else its file:// or object URL."""
    if not url_template:
        return source.default_url(entry)
    try:
        bare = PurePosixPath(entry.relative).with_suffix("").as_posix()
    except ValueError:  # a name such as ".."
        bare = entry.relative
    return url_template.replace("{path}", bare)


@contextmanager
def ingest_lock(
    data_dir: Path, wait_s: float | None = None, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the index for one ingest. Another holder makes this fail at once, or wait up to `wait_s`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "ingest.lock", "a+") as handle:

        def running() -> str:
            handle.seek(0)
            holder = handle.read().strip()  # the holder writes its pid once it has the lock
            return f"another ingest{f' (pid {holder})' if holder else ''} is running on {data_dir}"

        announce = None if on_wait is None else lambda: on_wait(f"waiting for {running()} (up to {wait_s:g} s)")
        if not hold_exclusive(handle, wait_s or 0.0, LOCK_POLL_S, announce):
            if wait_s is None:
                raise IngestError(f"{running()}; wait for it to finish, or re-run with --wait")
            raise IngestError(f"{running()} and did not finish within {wait_s:g} s (--wait-timeout)")
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


class Indexer:
    """Keeps a store in step with a set of source folders."""

    def __init__(
        self,
        settings: IngestSettings,
        chunker: Chunker,
        embedder: Embedder,
        store: VectorStore,
        data_dir: Path,
        progress: Progress | None = None,
        wait_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.chunker = chunker
        self.embedder = embedder
        self.store = store
        self.data_dir = data_dir
        self.progress = progress or _Silent()
        self.wait_s = wait_s
        self._pending: list[Candidate] = []
        self._pending_chunks = 0

    def fingerprint(self, settings: SourceSettings, source: Source) -> str:
        """What, besides file content, decides a file's chunks; a change re-indexes the file. Where the source is
        counts only without a url_template (the chunks' file:// or object URLs depend on it), so a moved corpus
        with a template is not embedded again."""
        parts = {
            "pipeline": PIPELINE_VERSION,
            "embedder": self.embedder.name,
            "document_prefix": self.chunker.document_prefix,
            "chunk_tokens": self.chunker.chunk_tokens,
            "overlap_tokens": self.chunker.overlap_tokens,
            "url_template": settings.url_template,
        }
        if not settings.url_template:
            parts["root"] = source.root
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def plan(self, sources: list[SourceSettings]) -> list[Planned]:
        """Open the sources and list their entries; a source that cannot be listed is an error, not a deletion."""
        if clash := label_clash(sources):
            raise IngestError(clash)
        planned = []
        for settings in sources:
            try:
                source = open_source(settings, self.settings)
                entries = list(source.entries())
            except SourceError as exc:
                raise IngestError(str(exc)) from exc
            planned.append((settings, source, entries))
        return planned

    def run(self, sources: list[SourceSettings], full: bool = False, prune_other_roots: bool = False) -> IngestReport:
        """Sync the index with `sources`; `prune_other_roots` also drops files of roots not among them."""
        with ingest_lock(self.data_dir, self.wait_s, self.progress.waiting):
            return self._run(sources, full, prune_other_roots)

    def _run(self, sources: list[SourceSettings], full: bool, prune_other_roots: bool) -> IngestReport:
        started = time.perf_counter()
        report = IngestReport()
        try:
            import_loader_modules(self.settings)
        except WorkerError as exc:
            raise IngestError(str(exc)) from exc
        planned = self.plan(sources)
        self._check_embedder(full)
        self.progress.start(sum(len(found) for _, _, found in planned))
        if full:
            self.store.clear()
        self.store.set_meta("embedder", self.embedder.name)
        manifest = {record.doc_id: record for record in self.store.documents()}
        refuse_takeover(planned, manifest)
        seen: set[str] = set()
        self._index(self._compare(planned, manifest, seen, report), report)
        roots = {source.root for _, source, _ in planned}
        for record in manifest.values():
            if record.doc_id in seen:
                continue
            gone = any(belongs(record, source) for _, source, _ in planned)
            dropped_root = prune_other_roots and record.root not in roots
            if gone or dropped_root:
                self.store.delete_document(record.doc_id)
                report.deleted.append(record.source)
        self.store.persist()
        report.seconds = round(time.perf_counter() - started, 3)
        self.store.set_meta("last_ingest", json.dumps({"at": utc_now(), **report.to_dict()}))
        return report

    def _index(self, jobs: Iterator[tuple[Candidate, ParseJob]], report: IngestReport) -> None:
        """Parse, embed and store the new and changed files: parsing in worker processes, embedding in
        groups of `ingest.embed_group_chunks` chunks (a distributed engine overrides this step only)."""
        try:
            with ParsePool(self.settings, self.chunker) as pool:
                for candidate, result in pool.map(jobs):
                    self._accept(candidate, result, report)
        except WorkerError as exc:
            raise IngestError(str(exc)) from exc
        self._flush(report)

    def _check_embedder(self, full: bool) -> None:
        built_with = self.store.get_meta("embedder")
        if not full and built_with and built_with != self.embedder.name and self.store.count():
            raise IngestError(
                f"the index was built with embedding model {built_with!r}, the config says "
                f"{self.embedder.name!r}: re-run with --full to rebuild it"
            )

    def _compare(
        self,
        planned: list[Planned],
        manifest: dict[str, DocumentRecord],
        seen: set[str],
        report: IngestReport,
    ) -> Iterator[tuple[Candidate, ParseJob]]:
        """Each file that needs parsing, with its job; the others are settled here (unchanged, skipped…)."""
        for settings, source, entries in planned:
            fingerprint = self.fingerprint(settings, source)
            for entry in entries:
                if entry.skipped:
                    report.skipped.append((entry.location, entry.skipped))
                    self.progress.advance(entry.location)
                    continue
                if loader_for(Path(entry.relative)) is None:
                    report.unsupported += 1
                    self.progress.advance(entry.location)
                    continue
                doc_id = document_id(source.label, entry.relative)
                seen.add(doc_id)
                job = self._job(entry, settings, source, doc_id, fingerprint, manifest.get(doc_id), report)
                if job is None:
                    self.progress.advance(entry.location)
                    continue
                yield job

    def _job(
        self,
        entry: Entry,
        settings: SourceSettings,
        source: Source,
        doc_id: str,
        fingerprint: str,
        known: DocumentRecord | None,
        report: IngestReport,
    ) -> tuple[Candidate, ParseJob] | None:
        """The parse job of a new or changed file; None when it is unchanged or cannot be read."""
        if entry.error:
            report.failed.append((entry.location, entry.error))
            return None
        indexed = known is not None and known.status in ("indexed", "skipped") and known.fingerprint == fingerprint
        indexed = indexed and not dependencies_changed(known, source)
        if indexed and (known.size, known.mtime_ns) == (entry.size, entry.version):
            self._unchanged(known, entry, settings, source, report)
            return None
        record = DocumentRecord(
            doc_id=doc_id, source=entry.location, root=source.root, size=entry.size, mtime_ns=entry.version,
            sha256="", fingerprint=fingerprint, tenant=settings.tenant, groups=list(settings.groups),
        )
        try:
            data = source.read(entry, self.settings.max_file_mb)
        except LoadError as exc:
            self._fail(record, str(exc), report)
            return None
        except SourceError as exc:
            raise IngestError(str(exc)) from exc
        record.sha256 = hashlib.sha256(data).hexdigest()
        if indexed and known.sha256 == record.sha256:  # touched, not changed
            self._unchanged(known, entry, settings, source, report, touched=True)
            return None
        url = entry_url(source, entry, settings.url_template)
        root = "" if source.local_root is None else str(source.local_root)  # no includes read without one
        return Candidate(record, is_new=known is None), ParseJob(doc_id, entry.relative, url, data, root=root)

    def _unchanged(
        self, known: DocumentRecord, entry: Entry, settings: SourceSettings, source: Source, report: IngestReport,
        touched: bool = False,
    ) -> None:
        """Settle a file whose content is indexed already: save its new stamp, or where it is now when its source
        moved (its chunks and vectors are kept), and its source's access."""
        if (known.source, known.root) != (entry.location, source.root):
            self._relocate(known, entry, source)
        elif touched:
            self.store.touch_document(known.doc_id, entry.size, entry.version)
        self._sync_access(known, settings, report)
        report.unchanged += 1

    def _relocate(self, known: DocumentRecord, entry: Entry, source: Source) -> None:
        """Rewrite a manifest row with the file's new place, keeping its chunks and vectors (no embedding)."""
        exported = self.store.export_document(known.doc_id)
        if exported is None:
            return
        record, chunks, vectors = exported
        record.source, record.root, record.size, record.mtime_ns = entry.location, source.root, entry.size, entry.version
        self.store.upsert_document(record, chunks, vectors)
        known.source, known.root = entry.location, source.root

    def _sync_access(self, known: DocumentRecord, source: SourceSettings, report: IngestReport) -> None:
        """Give an unchanged file its source's tenant and groups when they changed: access is no part
        of the fingerprint, so who may read a file changes without re-embedding it."""
        if known.tenant != source.tenant or set(known.groups) != set(source.groups):
            self.store.set_access(known.doc_id, source.tenant, source.groups)
            report.access_changed.append(known.source)

    def _accept(self, candidate: Candidate, result: ParseResult, report: IngestReport) -> None:
        """Queue a parsed file for embedding (or record why it failed); embed when the group is full."""
        self.progress.advance(candidate.record.source)
        if not self._settle(candidate, result, report):
            return
        self._pending.append(candidate)
        self._pending_chunks += len(result.chunks)
        if self._pending_chunks >= self.settings.embed_group_chunks:
            self._flush(report)

    def _settle(self, candidate: Candidate, result: ParseResult, report: IngestReport) -> bool:
        """Take a file's parse result: True when its chunks are to be embedded, False when the file was
        recorded as failed or skipped instead."""
        if result.error:
            self._fail(candidate.record, result.error, report)
            return False
        candidate.record.dependencies = result.dependencies
        if result.skipped:  # e.g. a notebook's jupytext twin: kept in the manifest, so it is not parsed again
            record = candidate.record
            record.status, record.error = "skipped", result.skipped
            self.store.upsert_document(record, [], np.zeros((0, self.embedder.dim), dtype=np.float32))
            report.skipped.append((record.source, result.skipped))
            return False
        report.notes.extend((candidate.record.source, note) for note in result.notes)
        candidate.chunks = result.chunks
        return True

    def _fail(self, record: DocumentRecord, reason: str, report: IngestReport) -> None:
        """Record the failure (dropping any chunks of an older version) and go on with the batch."""
        record.status, record.error = "failed", reason
        self.store.upsert_document(record, [], np.zeros((0, self.embedder.dim), dtype=np.float32))
        report.failed.append((record.source, reason))

    def _flush(self, report: IngestReport) -> None:
        """Embed every waiting chunk in one call (the model stays busy), then write file by file."""
        group, self._pending, self._pending_chunks = self._pending, [], 0
        try:
            for candidate, vectors in zip(group, embed_files(self.embedder, [c.chunks for c in group])):
                self._store(candidate, vectors, report)
        except EmbedderUnavailable as exc:
            raise embedder_down(exc) from exc

    def _store(self, candidate: Candidate, vectors: np.ndarray | str, report: IngestReport) -> None:
        """Write an embedded file, its chunks and manifest row in one transaction (or record why it has no vectors)."""
        if isinstance(vectors, str):
            self._fail(candidate.record, vectors, report)
            return
        self.store.upsert_document(candidate.record, candidate.chunks, vectors)
        (report.new if candidate.is_new else report.changed).append(candidate.record.source)
        report.chunks += len(candidate.chunks)


def dependencies_changed(known: DocumentRecord, source: Source) -> bool:
    """Whether a file a page included (or its notebook twin) changed, appeared or went since it was indexed; a page
    with such files, now in a source without a local root, is parsed again (its includes become notes)."""
    if not known.dependencies:
        return False
    if source.local_root is None:
        return True
    return any(file_stamp(source.local_root / path) != stamp for path, stamp in known.dependencies.items())


def belongs(record: DocumentRecord, source: Source) -> bool:
    """Whether a manifest row is a file of the part of `source` being synced (so it is deleted when the file is
    gone): it lies under the source, or lay under another root with the same label (the source moved)."""
    if source.holds(record.source):
        return True
    if record.root == source.root:
        return False
    relative = relative_in(record.source, record.root)
    inside = not source.within or is_under(relative, source.within, "/")
    return inside and document_id(source.label, relative) == record.doc_id


def refuse_takeover(planned: list[Planned], manifest: dict[str, DocumentRecord]) -> None:
    """Refuse a source whose label the index holds from another folder that is still there: two folders of one
    name (projects' `docs`) are two sources, and syncing one must not delete the other's documents. A folder
    that is gone was moved (its documents follow it); an object-store root cannot be checked and is followed."""
    roots = {record.root: record for record in manifest.values()}
    for _, source, _ in planned:
        for root, record in roots.items():
            same_label = document_id(source.label, relative_in(record.source, root)) == record.doc_id
            if root == source.root or not same_label or "://" in root or not os.path.lexists(root):
                continue
            raise IngestError(
                f"the index holds a source called {source.label!r} from {root}, which is still there: give this "
                f"one another name (--name, or `name:` in ingest.sources); if {source.root} replaces it, delete "
                "the old folder first, or rebuild with --full"
            )


def embedder_down(exc: EmbedderUnavailable) -> IngestError:
    """An embedder that is down is no file's fault: the run stops, and a re-run picks up from here."""
    return IngestError(f"{exc}; the files written so far are kept: re-run when it is back")


def embed_files(embedder: Embedder, files: list[list[Chunk]]) -> Iterator[np.ndarray | str]:
    """The vectors of each file's chunks in one call, or why a file has none: a group the embedder rejects
    is halved until the files at fault are found, so one file's error never fails the others.
    `EmbedderUnavailable` (the embedder is down, no file's fault) is raised."""
    if not files:
        return
    texts = [chunk.embed_text for chunks in files for chunk in chunks]
    try:
        vectors = embedder.embed_documents(texts)
    except EmbedderUnavailable:
        raise
    except Exception as exc:  # a remote 400 ("input too long"), a model error on odd input
        if len(files) == 1:
            yield f"embedding failed: {exc}"
            return
        middle = len(files) // 2
        yield from embed_files(embedder, files[:middle])
        yield from embed_files(embedder, files[middle:])
        return
    offset = 0
    for chunks in files:
        yield vectors[offset : offset + len(chunks)]
        offset += len(chunks)
