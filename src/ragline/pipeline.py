"""Incremental, crash-safe indexing: scan → load → chunk → embed → store.

The stages are plain objects over batches, so a distributed engine can map
the same calls. Each file's chunks and manifest row are written in one
store transaction, after its vectors exist, so a run killed at any point
leaves every file either fully indexed in its old or its new version;
re-running finishes the job and ends in the state of an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Protocol

import numpy as np

from ragline.config import IngestSettings, SourceSettings
from ragline.embed.base import Embedder
from ragline.ingest.chunker import Chunker
from ragline.ingest.loaders import loader_for
from ragline.ingest.loaders.base import LoadError
from ragline.store.base import DocumentRecord, VectorStore
from ragline.types import Chunk, Document, utc_now

PIPELINE_VERSION = "2"
"""Bump when loaders or chunking change what they produce, so every file is re-indexed."""


class IngestError(RuntimeError):
    """The run itself cannot go on (as opposed to one bad file, which is reported and skipped)."""


@dataclass(slots=True)
class IngestReport:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unsupported: int = 0
    chunks: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Progress(Protocol):
    """Where the indexer reports how far it has got (the CLI draws a progress bar)."""

    def start(self, total_files: int) -> None: ...

    def advance(self, path: str) -> None: ...


class _Silent:
    def start(self, total_files: int) -> None:
        pass

    def advance(self, path: str) -> None:
        pass


@dataclass(slots=True)
class _Pending:
    """A file loaded and chunked, waiting for its vectors before it is written."""

    record: DocumentRecord
    chunks: list[Chunk]


def document_id(path: Path) -> str:
    return hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:20]


def file_url(path: Path, root: Path, url_template: str | None) -> str:
    """The public URL of a file: the template with {path} (relative, no suffix), else a file:// URI."""
    if not url_template:
        return path.as_uri()
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return url_template.replace("{path}", relative.with_suffix("").as_posix())


def scan(root: Path, exclude: list[str]) -> Iterator[Path]:
    """Files under `root` in a stable order, skipping excluded names and relative paths."""
    if root.is_file():
        yield root
        return

    def excluded(relative: str, name: str) -> bool:
        return any(fnmatch(name, pattern) or fnmatch(relative, pattern) for pattern in exclude)

    for directory, dirnames, filenames in os.walk(root):
        base = Path(directory)
        rel_dir = base.relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames if not excluded(f"{rel_dir}/{d}".lstrip("./"), d))
        for name in sorted(filenames):
            if not excluded(f"{rel_dir}/{name}".lstrip("./"), name):
                yield base / name


def is_under(source: str, root: Path) -> bool:
    return source == str(root) or source.startswith(str(root) + os.sep)


@contextmanager
def ingest_lock(data_dir: Path) -> Iterator[None]:
    """One ingest at a time per index; a second one fails fast instead of interleaving writes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "ingest.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise IngestError(f"another ingest is running on {data_dir}; wait for it to finish") from exc
        yield


class Indexer:
    """Keeps a store in step with a set of source folders."""

    def __init__(
        self,
        settings: IngestSettings,
        chunker: Chunker,
        embedder: Embedder,
        store: VectorStore,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.chunker = chunker
        self.embedder = embedder
        self.store = store
        self.progress = progress or _Silent()
        self._pending: list[_Pending] = []
        self._pending_chunks = 0

    def fingerprint(self, source: SourceSettings) -> str:
        """What, besides file content, decides a file's chunks; a change re-indexes the file."""
        parts = {
            "pipeline": PIPELINE_VERSION,
            "embedder": self.embedder.name,
            "chunk_tokens": self.chunker.chunk_tokens,
            "overlap_tokens": self.chunker.overlap_tokens,
            "url_template": source.url_template,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def plan(self, sources: list[SourceSettings]) -> list[tuple[SourceSettings, Path, list[Path]]]:
        """Resolve the sources and list their files; a missing source is an error, not a deletion."""
        planned = []
        for source in sources:
            root = source.path.expanduser().resolve()
            if not root.exists():
                raise IngestError(f"{source.path} does not exist; check the path (nothing was changed)")
            planned.append((source, root, list(scan(root, self.settings.exclude))))
        return planned

    def run(self, sources: list[SourceSettings], full: bool = False) -> IngestReport:
        started = time.perf_counter()
        report = IngestReport()
        planned = self.plan(sources)
        self._check_embedder(full)
        self.progress.start(sum(len(paths) for _, _, paths in planned))
        if full:
            self.store.clear()
        self.store.set_meta("embedder", self.embedder.name)
        manifest = {record.doc_id: record for record in self.store.documents()}
        for source, root, paths in planned:
            fingerprint = self.fingerprint(source)
            seen = set()
            for path in paths:
                doc_id = document_id(path)
                seen.add(doc_id)
                self._visit(path, root, source, fingerprint, manifest.get(doc_id), report)
                self.progress.advance(str(path))
            for record in manifest.values():
                if record.doc_id not in seen and is_under(record.source, root):
                    self.store.delete_document(record.doc_id)
                    report.deleted.append(record.source)
        self._flush(report)
        self.store.persist()
        report.seconds = round(time.perf_counter() - started, 3)
        self.store.set_meta("last_ingest", json.dumps({"at": utc_now(), **report.to_dict()}))
        return report

    def _check_embedder(self, full: bool) -> None:
        built_with = self.store.get_meta("embedder")
        if not full and built_with and built_with != self.embedder.name and self.store.count():
            raise IngestError(
                f"the index was built with embedding model {built_with!r}, the config says "
                f"{self.embedder.name!r}: re-run with --full to rebuild it"
            )

    def _visit(
        self,
        path: Path,
        root: Path,
        source: SourceSettings,
        fingerprint: str,
        known: DocumentRecord | None,
        report: IngestReport,
    ) -> None:
        found = loader_for(path)
        if found is None:
            report.unsupported += 1
            return
        try:
            stat = path.stat()
        except OSError as exc:
            report.failed.append((str(path), f"cannot read: {exc.strerror}"))
            return
        if (
            known is not None
            and known.status == "indexed"
            and known.size == stat.st_size
            and known.mtime_ns == stat.st_mtime_ns
            and known.fingerprint == fingerprint
        ):
            report.unchanged += 1
            return
        record = DocumentRecord(
            doc_id=document_id(path), source=str(path), root=str(root), size=stat.st_size,
            mtime_ns=stat.st_mtime_ns, sha256="", fingerprint=fingerprint,
        )
        try:
            data = self._read(path, stat.st_size)
            record.sha256 = hashlib.sha256(data).hexdigest()
            if known is not None and known.status == "indexed" and (known.sha256, known.fingerprint) == (
                record.sha256, fingerprint,
            ):
                report.unchanged += 1
                return
            format_name, load = found
            parsed = load(data, path)
            document = Document(
                doc_id=record.doc_id, source=str(path), url=file_url(path, root, source.url_template),
                format=format_name, title=parsed.title, sections=parsed.sections,
            )
            chunks = self.chunker.chunk(document)
            if not chunks:
                raise LoadError("no text to index")
        except LoadError as exc:
            self._fail(record, str(exc), report)
            return
        except Exception as exc:  # a loader library failing on odd input must not end the batch
            self._fail(record, f"{type(exc).__name__}: {exc}", report)
            return
        (report.changed if known is not None else report.new).append(str(path))
        self._pending.append(_Pending(record, chunks))
        self._pending_chunks += len(chunks)
        if self._pending_chunks >= self.settings.embed_group_chunks:
            self._flush(report)

    def _read(self, path: Path, size: int) -> bytes:
        limit = int(self.settings.max_file_mb * 1024 * 1024)
        if size > limit:
            raise LoadError(f"file is {size / 1048576:.1f} MB, over the {self.settings.max_file_mb:g} MB limit (ingest.max_file_mb)")
        if size == 0:
            raise LoadError("empty file")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise LoadError(f"cannot read: {exc.strerror}") from exc

    def _fail(self, record: DocumentRecord, reason: str, report: IngestReport) -> None:
        """Record the failure (dropping any chunks of an older version) and go on with the batch."""
        record.status, record.error = "failed", reason
        self.store.upsert_document(record, [], np.zeros((0, self.embedder.dim), dtype=np.float32))
        report.failed.append((record.source, reason))

    def _flush(self, report: IngestReport) -> None:
        """Embed every waiting chunk in one call (the model stays busy), then write file by file."""
        if not self._pending:
            return
        texts = [chunk.embed_text for item in self._pending for chunk in item.chunks]
        vectors = self.embedder.embed_documents(texts)
        offset = 0
        for item in self._pending:
            count = len(item.chunks)
            self.store.upsert_document(item.record, item.chunks, vectors[offset : offset + count])
            offset += count
            report.chunks += count
        self._pending, self._pending_chunks = [], 0
