"""Copy an index from one store to another (`ragline store migrate`), resumably, through the store protocol.

Each document goes over whole: its manifest row, chunks and vectors as one
committed state of the source (`export_document`), written as one atomic
`upsert_document` to the target, which derives its keyword entries from the
chunk text as any upsert does. A migration that is killed or interrupted
leaves every target document either absent, old or complete, so running it
again continues: documents whose manifest row and chunk ids already equal
the source's are skipped, others rewritten, and target documents the source
lacks deleted (first, so that a chunk id that moved between documents is
free again). The meta keys that describe the index ("embedder",
"last_ingest") go over too. At the end the target's documents, each
document's chunk count and the total (`count()`) are checked against the
source; a difference raises MigrationError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ragline.store.base import StoreError, VectorStore

SHOWN_PROBLEMS = 3
"""How many documents a verification failure names per kind of difference."""

MigrationProgress = Callable[[int, int, str], None]
"""Called with (documents done, documents in all, the source of the last one) before the first and after each."""


class MigrationError(StoreError):
    """The target cannot take the source's index, or does not hold it after copying."""


@dataclass(slots=True)
class MigrationReport:
    documents: int = 0
    """Documents in the source (indexed and failed)."""
    copied: int = 0
    """Written to the target: new there, or different from the source's."""
    unchanged: int = 0
    """Already in the target as in the source (copied by an earlier, interrupted run)."""
    deleted: list[str] = field(default_factory=list)
    """Sources of the target's documents that the source does not hold, removed."""
    chunks: int = 0
    """Chunks in the target at the end, equal to the source's."""
    cleared: bool = False
    """The target was of another embedding model and was emptied first (with `force` when it held chunks)."""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def migrate(
    source: VectorStore, target: VectorStore, progress: MigrationProgress | None = None, force: bool = False,
) -> MigrationReport:
    """Make `target` hold what `source` holds; see the module's docstring.

    Raises MigrationError when the target holds chunks of another embedding
    model (unless `force`: then it is emptied first), when an empty source
    would empty a target that holds documents (unless `force`), or, at the
    end, when the counts differ. The source is only read.
    """
    started = time.perf_counter()
    report = MigrationReport()
    records = source.documents()
    in_target = {record.doc_id: record for record in target.documents()}
    if not records and in_target and not force:
        raise MigrationError(
            f"the source holds no documents and the target {len(in_target)}: migrating would empty the target. "
            "Check that the store settings name the index to copy from (`ragline status`); pass --force to "
            "empty the target anyway"
        )
    embedder = source.get_meta("embedder")
    target_embedder = target.get_meta("embedder")
    if embedder and target_embedder and target_embedder != embedder:
        if target.count() and not force:
            raise MigrationError(
                f"the target holds an index of embedding model {target_embedder!r}, the source is of {embedder!r}: "
                "migrating would mix their vectors; pass --force to empty the target and copy the source over it"
            )
        target.clear()  # its vectors, and the dimension it expects, are of the other model
        report.cleared, in_target = True, {}
    if embedder:
        target.set_meta("embedder", embedder)  # first: a resumed run must find the same model there

    wanted = {record.doc_id for record in records}
    for doc_id, record in in_target.items():
        if doc_id not in wanted:
            target.delete_document(doc_id)
            report.deleted.append(record.source)

    report.documents = len(records)
    if progress is not None:
        progress(0, len(records), "")
    for done, record in enumerate(records, 1):
        if in_target.get(record.doc_id) == record:
            report.unchanged += 1
        else:
            exported = source.export_document(record.doc_id)
            if exported is None:
                raise MigrationError(
                    f"{record.source} left the source during the migration: stop ingests into the source, "
                    "then run the migration again (it continues where it stopped)"
                )
            target.upsert_document(*exported)
            report.copied += 1
        if progress is not None:
            progress(done, len(records), record.source)

    last_ingest = source.get_meta("last_ingest")
    if last_ingest is not None:
        target.set_meta("last_ingest", last_ingest)
    target.persist()
    report.chunks = verify(source, target)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def verify(source: VectorStore, target: VectorStore) -> int:
    """Check that the target holds the source's documents with as many chunks each, and as many chunks in
    all (`count()`); returns that count, or raises MigrationError naming the differences."""
    want = {record.doc_id: record for record in source.documents()}
    got = {record.doc_id: record for record in target.documents()}
    want_total, got_total = source.count(), target.count()
    missing = [want[doc_id].source for doc_id in sorted(want.keys() - got.keys())]
    extra = [got[doc_id].source for doc_id in sorted(got.keys() - want.keys())]
    differing = [
        f"{want[doc_id].source}: {len(want[doc_id].chunk_ids)} chunks in the source, "
        f"{len(got[doc_id].chunk_ids)} in the target"
        for doc_id in sorted(want.keys() & got.keys())
        if len(want[doc_id].chunk_ids) != len(got[doc_id].chunk_ids)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} documents missing ({_some(missing)})")
    if extra:
        problems.append(f"{len(extra)} documents the source does not hold ({_some(extra)})")
    if differing:
        problems.append(f"{len(differing)} documents with other chunk counts ({_some(differing)})")
    if got_total != want_total:
        problems.append(f"{got_total} chunks in all where the source counts {want_total}")
    if problems:
        raise MigrationError(
            "the target does not match the source after copying: " + "; ".join(problems) + ". Run the migration "
            "again to repair it; if this persists, something else writes to the source or the target (an ingest?): "
            "stop it first"
        )
    return got_total


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_PROBLEMS])
    return shown + (", …" if len(items) > SHOWN_PROBLEMS else "")
