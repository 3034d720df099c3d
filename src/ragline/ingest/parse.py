"""The per-file step of ingest: bytes in, chunks (or the reason there are none) out.

`parse_file` is pure — it writes nothing and reads no file but those a docs page
includes, inside its ingest root — so it runs the same in a local worker process
(see `workers`) or on a distributed engine that sees the source folder.
Content that must never be parsed is refused first: private keys, and zip
files (DOCX) whose directory promises more than the limits allow.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ragline.config import IngestSettings
from ragline.ingest.chunker import Chunker
from ragline.ingest.loaders import LoadContext, LoadError, SkipFile, loader_for, run_loader
from ragline.ingest.loaders.base import refuse_private_key
from ragline.types import Chunk, Document

_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True, slots=True)
class ParseJob:
    """One file to parse. `source` is its path relative to its ingest root (`root`): what citations show.

    Without a root, the includes of docs pages are not resolved.
    """

    doc_id: str
    source: str
    url: str
    data: bytes
    root: str = ""


@dataclass(slots=True)
class ParseResult:
    """The chunks of a file, or `error`: why it cannot be indexed, in words a user can act on.

    `notes` say what was left out of a file that is indexed (an include that was not read);
    `skipped` why a readable file is deliberately not indexed (a notebook's jupytext twin).
    """

    chunks: list[Chunk] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    dependencies: dict[str, str] = field(default_factory=dict)
    """Other files of the tree the result depends on (includes, a notebook's twin), with their `file_stamp`."""


def parse_file(job: ParseJob, settings: IngestSettings, chunker: Chunker) -> ParseResult:
    """Load and chunk one file; any failure becomes the result's `error`, never an exception."""
    context = LoadContext(
        Path(job.root) if job.root else None, tuple(settings.exclude_secrets), int(settings.max_file_mb * 1024 * 1024),
    )
    try:
        refuse_private_key(job.data)
        check_archive(job.data, settings)
        found = loader_for(Path(job.source))
        if found is None:
            raise LoadError("unsupported file type")
        format_name, load = found
        parsed = run_loader(load, job.data, Path(job.source), context)
        document = Document(
            doc_id=job.doc_id, source=job.source, url=job.url, format=format_name,
            title=parsed.title, sections=parsed.sections,
        )
        chunks = chunker.chunk(document)
        if not chunks:
            raise LoadError("no text to index")
    except SkipFile as exc:
        return ParseResult(skipped=str(exc), dependencies=context.looked_at)
    except LoadError as exc:
        return ParseResult(error=str(exc))
    except MemoryError:
        return ParseResult(error=f"parsing needed more memory than ingest.file_memory_mb ({settings.file_memory_mb} MB)")
    except Exception as exc:  # a loader library failing on odd input must not end the batch
        return ParseResult(error=f"{type(exc).__name__}: {exc}")
    return ParseResult(chunks, notes=parsed.notes, dependencies=context.looked_at)


def check_archive(data: bytes, settings: IngestSettings) -> None:
    """Refuse a zip file (DOCX and the like) that would inflate past the limits, judged from its directory.

    Reading a member never yields more than the size its directory entry
    declares, so the directory alone bounds what parsing can inflate.
    """
    if not data.startswith(_ZIP_MAGIC):
        return
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise LoadError(f"damaged zip container: {exc}") from exc
    unzipped = sum(member.file_size for member in members)
    if unzipped > settings.max_unzipped_mb * 1024 * 1024:
        raise LoadError(
            f"unzips to {unzipped / 1048576:.0f} MB, over the {settings.max_unzipped_mb:g} MB limit "
            "(ingest.max_unzipped_mb)"
        )
    ratio = unzipped / max(len(data), 1)
    if ratio > settings.max_zip_ratio:
        raise LoadError(
            f"compressed {ratio:.0f}:1, over the {settings.max_zip_ratio:g}:1 limit (ingest.max_zip_ratio): "
            "a zip bomb?"
        )
