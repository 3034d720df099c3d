"""The embedded default store: SQLite for chunks, metadata and manifest; a memory-mapped snapshot with an HNSW
graph for dense search.

SQLite (WAL) is the source of truth. Its vectors are mirrored for search in
two parts: the last snapshot (store/snapshot.py: float32 vectors and, for an
index of at least `Tuning.ann_min_chunks` chunks, an HNSW graph over int8
codes, store/ann.py), memory-mapped so that processes share one page-cache
copy, and the rows committed after it (the delta), held in memory. A dense
search walks the graph for candidates, rescores them exactly against the
float32 vectors, scans the delta exactly and merges both by exact score; a
smaller index, or one without a graph yet, is scanned exactly (~8 ms at
100k×384). What is guaranteed:

- **Writes** are one transaction per document (chunks, filter tags, field
  types and manifest row together): a kill leaves each document fully old or
  fully new. Writers in several processes take turns (SQLite's write lock).
- **Reads** see one committed state. A search checks its filters, refreshes
  the mirror, filters and fetches its rows inside one read transaction (WAL
  snapshot isolation), so another process committing meanwhile is invisible
  to it until its next search. Threads search side by side: each reads on a
  connection of its own (the opening thread on `_db`, which writes share
  under `_lock`), and the mirror is an immutable object replaced whole on
  refresh. A search whose read transaction is older than the mirror another
  thread has just made reads again, so it still sees one state.
- **Refreshes read only what changed.** Rows are never updated in place and
  seqs are never reused, so a reader reads rows with `seq >` the last one it
  mirrors into the delta, and deletions from `tombstones` (filled by a
  trigger) after the last tombstone it applied, masking deleted snapshot rows
  (the graph never returns them) and dropping deleted delta rows. `generation`,
  bumped by every commit that changes the chunks or who may read them, tells
  it when there is anything to read; `index_version()` is the store's id and
  its generation. `persist()` drops the tombstones its snapshot covers; a
  reader that had not applied them yet compares its seqs with the table once
  instead.
- **Snapshots** (store/snapshot.py) are switched to atomically and verified
  on load; a snapshot that is damaged, newer than the reader's view or of
  another database is ignored and the mirror rebuilt from SQLite; a damaged
  graph alone is ignored (its rows are scanned exactly) and built again by
  the next `persist()`. `persist()` extends the last graph by the delta
  rather than rebuilding it (see its docstring). A reader that sees a newer
  snapshot loads and verifies it in the background, then starts its next
  refresh from it, so its delta stays small.
- **Filters** are checked against the type of each field, recorded on upsert
  in `fields` (widened when values of another type arrive, forgotten only by
  `clear()`). The seqs a filter lets through are read from the tag index
  inside the search's read transaction, memoised per (generation, filters)
  like a scope's. A filtered or scoped dense search that allows at most
  `Tuning.exact_rows` snapshot rows scans exactly those; a wider one walks
  the graph restricted to them (a faiss ID selector) and falls back to the
  exact scan if the graph finds too few. Either way nothing outside them is
  returned.
- **Access** is per document: its tenant and groups live in `documents`, and
  `access` (tenant, group, doc_id) answers which documents a scope may read.
  Both are written in the document's transaction, or changed together by
  `set_access` (which bumps `generation`, never touching chunks or vectors).
  A search reads the seqs its scope allows inside its read transaction,
  memoised per (generation, scope), and intersects them with its filters
  before the dense search; the keyword query checks each match's document
  against the scope in SQL. A scope that allows every chunk restricts
  nothing. The snapshot holds vectors only, so access is always as of the
  reader's committed state.
- **Keyword search** is SQLite FTS5 (BM25) over the code-aware terms of
  store/keywords.py, in a table keyed by the chunk's seq, written in the same
  transaction as the chunk and emptied by a trigger when the chunk goes: it
  can never disagree with the vectors. A query scores only its informative
  terms (store/keywords.py `scored_terms`); how many chunks hold each term is
  counted once per generation. A hybrid search reads both lists in the same
  read transaction, the dense search on a worker thread while SQLite answers
  the keyword query (both release the GIL; the worker reads only the
  immutable mirror), and fuses them (store/fusion.py).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ragline.config import Settings, StoreSettings
from ragline.store import ann, keywords, snapshot
from ragline.store.base import (
    EVERYONE,
    DocumentRecord,
    Filters,
    Scope,
    SearchRequest,
    StoreError,
    check_filters,
    checked_access,
    merge_types,
    value_type,
)
from ragline.store.fusion import TIE_SLACK, store_result
from ragline.store.snapshot import Snapshot
from ragline.types import Chunk, Hit, utc_now

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
"""2 → 3 added the keyword index (filled from the chunks on upgrade); 4 → 5 per-document access (every
document of an older index belongs to the default tenant and is readable by everyone in it)."""
BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another process's write lock before failing."""
REBUILD_DEAD_SHARE = 0.2
"""`persist()` builds the graph anew (leaving dead rows out) once more than this share of its rows are dead."""
READ_BATCH_ROWS = 10_000
MAX_MEMOISED_SCOPES = 16
"""How many (generation, scope) → readable seqs a handle keeps, least recently used dropped first."""
MAX_MEMOISED_FILTERS = 16
MAX_MEMOISED_FILTER_ROWS = 100_000
"""How many (generation, filters) → matching seqs a handle keeps (reading 10k seqs from SQLite takes ~8 ms),
each of at most this many seqs (a broad filter is read each time rather than held)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    root TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    dependencies TEXT NOT NULL DEFAULT '{}',
    tenant TEXT NOT NULL DEFAULT 'default',
    groups TEXT NOT NULL DEFAULT '["*"]'
);
CREATE TABLE IF NOT EXISTS access (
    tenant TEXT NOT NULL,
    grp TEXT NOT NULL,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    PRIMARY KEY (tenant, grp, doc_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS access_doc ON access(doc_id);
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE TABLE IF NOT EXISTS tags (
    field TEXT NOT NULL,
    value,
    seq INTEGER NOT NULL REFERENCES chunks(seq) ON DELETE CASCADE,
    PRIMARY KEY (field, value, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_seq ON tags(seq);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS chunks_tombstone AFTER DELETE ON chunks
BEGIN
    INSERT INTO tombstones(seq) VALUES (old.seq);
END;
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(heading, body, tokenize="porter unicode61 tokenchars '_'");
CREATE TRIGGER IF NOT EXISTS chunks_unindex AFTER DELETE ON chunks
BEGIN
    DELETE FROM chunks_fts WHERE rowid = old.seq;
END;
CREATE TABLE IF NOT EXISTS fields (name TEXT PRIMARY KEY, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', '0');
INSERT OR IGNORE INTO meta(key, value) VALUES ('store_id', lower(hex(randomblob(8))));
INSERT OR IGNORE INTO meta(key, value) VALUES ('tombstone_floor', '0');
"""
ADDED_DOCUMENT_COLUMNS = {
    "dependencies": "TEXT NOT NULL DEFAULT '{}'",
    "tenant": "TEXT NOT NULL DEFAULT 'default'",
    "groups": "TEXT NOT NULL DEFAULT '[\"*\"]'",
}
"""Columns of `documents` that an older database lacks (`ALTER TABLE` adds them with these defaults)."""
DOCUMENT_COLUMNS = (
    "doc_id, source, root, size, mtime_ns, sha256, fingerprint, status, error, updated_at, dependencies, tenant, groups"
)
INTERNAL_META = ("generation", "store_id", "tombstone_floor")
"""Meta keys that belong to the store itself and survive `clear()`."""


def _tags(seq: int, metadata: dict) -> Iterator[tuple[str, object, int]]:
    """Index rows for filtering: one per scalar field, one per element of a list field."""
    for name, value in metadata.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, int, float)):
                yield name, item, seq


def _filter_sql(wanted: dict[str, list]) -> tuple[str, list]:
    """A query for the seqs of matching chunks, answered from the tag index, not by a table scan.

    Conditions on different fields must all hold; a list-valued field
    matches when any of its elements is among the wanted values.
    """
    selects, params = [], []
    for name, values in wanted.items():
        selects.append(f"SELECT seq FROM tags WHERE field = ? AND value IN ({','.join('?' * len(values))})")
        params += [name, *values]
    return " INTERSECT ".join(selects) or "SELECT seq FROM chunks", params


def _readable_docs_sql(scope: Scope) -> tuple[str, list]:
    """A query for the ids of the documents `scope` may read (`Scope.allows`), answered from indexes."""
    if scope.groups is None:
        return "SELECT doc_id FROM documents WHERE tenant = ?", [scope.tenant]
    groups = sorted(scope.groups | {EVERYONE})
    return f"SELECT doc_id FROM access WHERE tenant = ? AND grp IN ({','.join('?' * len(groups))})", [
        scope.tenant, *groups,
    ]



def _record(row: Sequence, chunk_ids: list[str]) -> DocumentRecord:
    """A manifest row (the columns of DOCUMENT_COLUMNS, in order) as a DocumentRecord."""
    *fields, dependencies, tenant, groups = row
    return DocumentRecord(
        *fields, tenant=tenant, groups=json.loads(groups), dependencies=json.loads(dependencies), chunk_ids=chunk_ids,
    )


def _keyword_row(seq: int, text: str, metadata: dict) -> tuple[int, str, str]:
    return seq, keywords.index_text(keywords.heading_text(metadata)), keywords.index_text(text)


def _fields(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT name, type FROM fields ORDER BY name"))


@contextmanager
def _read_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN")
    try:
        yield db
    finally:
        if db.in_transaction:
            db.execute("COMMIT")


def _rows_after(db: sqlite3.Connection, last_seq: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The seqs and vectors of the chunks after `last_seq`, read in batches into arrays of the final size (a
    store opened without a snapshot holds its vectors once, not three times, while it reads them)."""
    count = db.execute("SELECT COUNT(*) FROM chunks WHERE seq > ?", (last_seq,)).fetchone()[0]
    seqs, matrix = np.empty(count, np.int64), np.empty((count, dim), np.float32)
    cursor = db.execute("SELECT seq, vector FROM chunks WHERE seq > ? ORDER BY seq", (last_seq,))
    at = 0
    while batch := cursor.fetchmany(READ_BATCH_ROWS):
        seqs[at:at + len(batch)] = [seq for seq, _ in batch]
        matrix[at:at + len(batch)] = np.frombuffer(b"".join(blob for _, blob in batch), np.float32).reshape(-1, dim)
        at += len(batch)
    return seqs, matrix


def _int_column(rows: Iterable[tuple[int]]) -> np.ndarray:
    return np.fromiter((value for (value,) in rows), dtype=np.int64)


def _positions(seqs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The rows of the sorted `seqs` that hold one of `wanted` (in any order, repeats allowed), ascending."""
    if not len(seqs):
        return np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(seqs, wanted), len(seqs) - 1)
    return np.unique(at[seqs[at] == wanted])


@dataclass(frozen=True, slots=True)
class Tuning:
    """When the local store walks its HNSW graph instead of scanning, and how it builds it (see
    `StoreSettings.local_*`, which also gives the defaults)."""

    ann_min_chunks: int
    ann_connectivity: int
    ann_ef_construction: int
    ann_ef_search: int
    exact_rows: int

    @classmethod
    def of(cls, settings: StoreSettings | None = None, **changes: int) -> Tuning:
        settings = settings or StoreSettings()
        return replace(cls(
            settings.local_ann_min_chunks, settings.local_ann_connectivity, settings.local_ann_ef_construction,
            settings.local_ann_ef_search, settings.local_exact_rows,
        ), **changes)


@dataclass(frozen=True, slots=True)
class Mirror:
    """What searches read at one generation, never changed once made (a refresh makes a new one).

    `base` is the last snapshot (memory-mapped, with its graph if any), `live` which of its rows still hold a
    chunk (None: all; `live_bits` the same packed for faiss), `delta_*` the rows committed after it, in memory
    and searched exactly; `rows` counts the live chunks, `tombstone` is the last deletion applied.
    """

    generation: int
    tombstone: int
    base: Snapshot
    live: np.ndarray | None
    live_bits: np.ndarray | None
    delta_seqs: np.ndarray
    delta_matrix: np.ndarray
    rows: int

    @classmethod
    def of(cls, base: Snapshot) -> Mirror:
        """A mirror of just `base` (its dead rows masked)."""
        live = None
        if len(base.dead):
            live = np.ones(len(base.seqs), bool)
            live[base.dead] = False
        return cls.made(base.generation, base.tombstone, base, live, base.seqs[:0], base.matrix[:0])

    @classmethod
    def made(cls, generation: int, tombstone: int, base: Snapshot, live: np.ndarray | None,
             delta_seqs: np.ndarray, delta_matrix: np.ndarray) -> Mirror:
        live = None if live is None or live.all() else live
        bits = None if live is None else ann.bitmap(live)
        rows = (len(base.seqs) if live is None else int(live.sum())) + len(delta_seqs)
        return cls(generation, tombstone, base, live, bits, delta_seqs, delta_matrix, rows)

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def last_seq(self) -> int:
        seqs = self.delta_seqs if len(self.delta_seqs) else self.base.seqs
        return int(seqs[-1]) if len(seqs) else 0

    def vectors(self, seqs: np.ndarray) -> np.ndarray:
        """The float32 vectors of chunks `seqs` (all held by this mirror)."""
        in_delta = np.isin(seqs, self.delta_seqs)
        found = np.empty((len(seqs), self.dim), np.float32)
        found[~in_delta] = self.base.matrix[np.searchsorted(self.base.seqs, seqs[~in_delta])]
        found[in_delta] = self.delta_matrix[np.searchsorted(self.delta_seqs, seqs[in_delta])]
        return found


def _best(seqs: np.ndarray, matrix: np.ndarray, query: np.ndarray, depth: int,
          rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best (seqs, exact cosine scores), best first, among `rows` of `matrix` (None: all)."""
    if rows is None:
        scores = matrix @ query
    else:
        few = 2 * len(rows) < len(seqs)  # gathering the rows costs about twice scanning them
        scores = matrix[rows] @ query if few else (matrix @ query)[rows]
    k = min(depth, len(scores))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top])]
    return seqs[top if rows is None else rows[top]], scores[top]


def _dense(mirror: Mirror, vector: np.ndarray, depth: int, allowed: np.ndarray | None,
           tuning: Tuning) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best (seqs, cosine scores), best first, among the `allowed` seqs (None: all live chunks):
    the snapshot's rows through its graph or exactly, the rows after it exactly, the candidates of both
    merged by their exact scores."""
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    if query.shape[0] != mirror.dim:
        raise StoreError(f"query has {query.shape[0]} dims, the index {mirror.dim}")
    base = mirror.base
    if allowed is None:
        found, delta_rows = _graph_best(mirror, query, depth, None, tuning), None
        if found is None:
            found = _best(base.seqs, base.matrix, query, depth, None if mirror.live is None else np.flatnonzero(mirror.live))
    else:
        base_rows, delta_rows = _positions(base.seqs, allowed), _positions(mirror.delta_seqs, allowed)
        found = _graph_best(mirror, query, depth, base_rows, tuning) if len(base_rows) > tuning.exact_rows else None
        if found is None:
            found = _best(base.seqs, base.matrix, query, depth, base_rows)
    after = _best(mirror.delta_seqs, mirror.delta_matrix, query, depth, delta_rows)
    seqs, scores = np.concatenate([found[0], after[0]]), np.concatenate([found[1], after[1]])
    top = np.argsort(-scores, kind="stable")[:depth]
    return seqs[top], scores[top]


def _graph_best(mirror: Mirror, query: np.ndarray, depth: int, rows: np.ndarray | None,
                tuning: Tuning) -> tuple[np.ndarray, np.ndarray] | None:
    """The best of the snapshot's `rows` (None: every live one) found through its graph and rescored exactly;
    None when it has no graph, the index is too small for one, or the graph finds fewer than `depth` of the
    rows it may give (the caller then scans them exactly)."""
    graph = mirror.base.graph
    if graph is None or mirror.rows < tuning.ann_min_chunks:
        return None
    if rows is None:
        bits, available = mirror.live_bits, mirror.rows - len(mirror.delta_seqs)
    else:
        allowed = np.zeros(len(mirror.base.seqs), bool)
        allowed[rows] = True
        bits, available = ann.bitmap(allowed), len(rows)
    count = max(depth, tuning.ann_ef_search)
    candidates = np.sort(ann.candidates(graph, query, count, tuning.ann_ef_search, bits))
    if len(candidates) < min(depth, available):
        return None
    return _best(mirror.base.seqs, mirror.base.matrix, query, depth, candidates)


class LocalStore:
    """SQLite + memory-mapped snapshot (HNSW graph above `tuning.ann_min_chunks`); safe for writer and reader
    processes side by side, and for threads searching at once."""

    def __init__(self, data_dir: Path, tuning: Tuning | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "store.sqlite"
        self.tuning = tuning or Tuning.of()
        self._snapshot_dir = data_dir / "index"
        self._lock = threading.RLock()
        """Guards `_db`: every write, and the reads of the thread that opened the store."""
        self._owner = threading.get_ident()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self._create_schema()
        self._thread = threading.local()
        """Each other thread's own read connection: searches on several threads never wait for each other."""
        self._connections = [self._db]
        self._mirror: Mirror | None = None
        """What the newest state this handle read looks like to a search; replaced whole, never changed in place."""
        self._refresh_lock = threading.Lock()
        self._memo_lock = threading.Lock()
        """Guards the memos below (held only to read or store an entry)."""
        self._adopted: Snapshot | None = None
        """A newer snapshot, loaded and verified, for the next refresh to start from."""
        self._loading: str | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragline-snapshot")
        self._term_counts: dict[str, tuple[int, int | None]] = {}
        """term -> (chunks holding it, the cap it was counted up to) at generation `_counts_generation`."""
        self._counts_generation = -1
        self._readable_seqs: OrderedDict[tuple[int, Scope], np.ndarray | None] = OrderedDict()
        """(generation, scope) -> the seqs that scope may read (None: all), least recently used first."""
        self._matching_seqs: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        """(generation, filters as JSON) -> the seqs they let through, least recently used first."""
        self._dense_worker = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ragline-dense")

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStore:
        return cls(settings.data_dir, Tuning.of(settings.store))

    def _create_schema(self) -> None:
        """Create the tables, or bring a database of an earlier version up to date (learning its field types)."""
        with self._lock:
            try:
                self._db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}")
                version = self._db.execute("PRAGMA user_version").fetchone()[0]  # read under the write lock
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(documents)")}
                for name, definition in ADDED_DOCUMENT_COLUMNS.items():  # columns of versions after 3
                    if name not in columns:
                        self._db.execute(f"ALTER TABLE documents ADD COLUMN {name} {definition}")
                self._db.execute("CREATE INDEX IF NOT EXISTS documents_tenant ON documents(tenant)")
                metadata = (json.loads(text) for (text,) in self._db.execute("SELECT metadata FROM chunks"))
                self._record_fields(self._db, metadata)
                if version < 3:  # (re)build the keyword index from the chunks
                    self._db.execute("DELETE FROM chunks_fts")
                    rows = self._db.execute("SELECT seq, text, metadata FROM chunks").fetchall()
                    self._db.executemany(
                        "INSERT INTO chunks_fts(rowid, heading, body) VALUES (?, ?, ?)",
                        (_keyword_row(seq, text, json.loads(meta)) for seq, text, meta in rows),
                    )
                if version < 5:  # the access rows of each document's (default) tenant and groups
                    self._db.execute(
                        "INSERT OR IGNORE INTO access(tenant, grp, doc_id) "
                        "SELECT documents.tenant, json_each.value, documents.doc_id FROM documents, "
                        "json_each(documents.groups)"
                    )
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- writes -------------------------------------------------------------

    @contextmanager
    def _transaction(self, changes_chunks: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                if changes_chunks:
                    self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _check_dim(self, db: sqlite3.Connection, vectors: np.ndarray) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        dim = int(vectors.shape[1])
        if row is None:
            db.execute("INSERT INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
        elif int(row[0]) != dim:
            raise StoreError(
                f"the index holds {row[0]}-d vectors but the embedder gives {dim}-d: rebuild with `ragline ingest --full`"
            )

    def _record_fields(self, db: sqlite3.Connection, metadatas: Iterable[dict]) -> None:
        """Widen the recorded type of each filterable field by the values in `metadatas`."""
        known = dict(db.execute("SELECT name, type FROM fields"))
        changed: dict[str, str] = {}
        for metadata in metadatas:
            for name, value in metadata.items():
                seen = value_type(value)
                current = changed.get(name, known.get(name))
                if seen is not None and seen != current:
                    changed[name] = seen if current is None else merge_types(current, seen)
        db.executemany("INSERT OR REPLACE INTO fields(name, type) VALUES (?, ?)", changed.items())

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise StoreError(f"{len(chunks)} chunks but {len(vectors)} vectors for {record.source}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        tenant, groups = checked_access(record.tenant, record.groups)
        with self._transaction() as db:
            if len(chunks):
                self._check_dim(db, vectors)
            db.execute("DELETE FROM chunks WHERE doc_id = ?", (record.doc_id,))
            db.execute("DELETE FROM access WHERE doc_id = ?", (record.doc_id,))
            db.execute(
                f"INSERT OR REPLACE INTO documents({DOCUMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.doc_id, record.source, record.root, record.size, record.mtime_ns,
                    record.sha256, record.fingerprint, record.status, record.error, record.updated_at or utc_now(),
                    json.dumps(record.dependencies, sort_keys=True), tenant, json.dumps(groups),
                ),
            )
            db.executemany(
                "INSERT INTO access(tenant, grp, doc_id) VALUES (?, ?, ?)",
                ((tenant, group, record.doc_id) for group in groups),
            )
            db.executemany(
                "INSERT INTO chunks(chunk_id, doc_id, text, metadata, vector) VALUES (?, ?, ?, ?, ?)",
                (
                    (chunk.chunk_id, chunk.doc_id, chunk.text, json.dumps(chunk.metadata), vector.tobytes())
                    for chunk, vector in zip(chunks, vectors)
                ),
            )
            seqs = dict(db.execute("SELECT chunk_id, seq FROM chunks WHERE doc_id = ?", (record.doc_id,)))
            db.executemany(
                "INSERT OR IGNORE INTO tags(field, value, seq) VALUES (?, ?, ?)",  # a list may repeat a value
                (tag for chunk in chunks for tag in _tags(seqs[chunk.chunk_id], chunk.metadata)),
            )
            db.executemany(
                "INSERT INTO chunks_fts(rowid, heading, body) VALUES (?, ?, ?)",
                (_keyword_row(seqs[chunk.chunk_id], chunk.text, chunk.metadata) for chunk in chunks),
            )
            self._record_fields(db, (chunk.metadata for chunk in chunks))

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        with self._transaction(changes_chunks=False) as db:
            updated = db.execute(
                "UPDATE documents SET size = ?, mtime_ns = ? WHERE doc_id = ?", (size, mtime_ns, doc_id)
            ).rowcount
            if not updated:
                raise StoreError(f"cannot touch {doc_id!r}: no such document in the manifest")

    def set_access(self, doc_id: str, tenant: str, groups: Sequence[str]) -> None:
        tenant, groups = checked_access(tenant, groups)
        with self._transaction() as db:  # a new generation: readers recompute what each scope may read
            updated = db.execute(
                "UPDATE documents SET tenant = ?, groups = ? WHERE doc_id = ?", (tenant, json.dumps(groups), doc_id)
            ).rowcount
            if not updated:
                raise StoreError(f"cannot set the access of {doc_id!r}: no such document in the manifest")
            db.execute("DELETE FROM access WHERE doc_id = ?", (doc_id,))
            db.executemany(
                "INSERT INTO access(tenant, grp, doc_id) VALUES (?, ?, ?)",
                ((tenant, group, doc_id) for group in groups),
            )

    def delete_document(self, doc_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            db.execute("DELETE FROM access WHERE doc_id = ?", (doc_id,))
            db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))

    def clear(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM tags")
            db.execute("DELETE FROM chunks")
            db.execute("DELETE FROM access")
            db.execute("DELETE FROM documents")
            db.execute("DELETE FROM fields")
            db.execute(f"DELETE FROM meta WHERE key NOT IN ({','.join('?' * len(INTERNAL_META))})", INTERNAL_META)

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction(changes_chunks=False) as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- reads --------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every statement inside sees the same committed state. The opening thread
        reads on `_db` (under `_lock`), any other on a connection of its own, without a lock."""
        if threading.get_ident() == self._owner:
            with self._lock, _read_transaction(self._db) as db:
                yield db
        else:
            with _read_transaction(self._thread_db()) as db:
                yield db

    def _thread_db(self) -> sqlite3.Connection:
        db = getattr(self._thread, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            self._thread.db = db
            with self._memo_lock:
                self._connections.append(db)
        return db

    def get_meta(self, key: str) -> str | None:
        with self._reading() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def filter_fields(self) -> dict[str, str]:
        with self._reading() as db:
            return _fields(db)

    def index_version(self) -> str:
        with self._reading() as db:
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('store_id', 'generation')"))
        return f"{meta['store_id']}-{meta['generation']}"

    def documents(self, scope: Scope | None = None) -> list[DocumentRecord]:
        where, params = "", []
        if scope is not None:
            readable, params = _readable_docs_sql(scope)
            where = f" WHERE doc_id IN ({readable})"
        with self._reading() as db:
            rows = db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents{where} ORDER BY source", params).fetchall()
            chunk_ids: dict[str, list[str]] = {}
            for doc_id, cid in db.execute(f"SELECT doc_id, chunk_id FROM chunks{where} ORDER BY seq", params):
                chunk_ids.setdefault(doc_id, []).append(cid)
        return [_record(row, chunk_ids.get(row[0], [])) for row in rows]

    def document(self, doc_id: str) -> DocumentRecord | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
            chunks = db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ? ORDER BY seq", (doc_id,))
            chunk_ids = [cid for (cid,) in chunks]
        return None if row is None else _record(row, chunk_ids)

    def export_document(self, doc_id: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
            rows = db.execute(
                "SELECT chunk_id, doc_id, text, metadata, vector FROM chunks WHERE doc_id = ? ORDER BY seq", (doc_id,)
            ).fetchall()
            dim = db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        if row is None:
            return None
        chunks = [Chunk(cid, did, text, json.loads(meta)) for cid, did, text, meta, _ in rows]
        vectors = np.frombuffer(b"".join(blob for *_, blob in rows), dtype=np.float32)
        return _record(row, [chunk.chunk_id for chunk in chunks]), chunks, vectors.reshape(len(rows), int(dim[0]) if dim else 0)

    def count(self, filters: Filters | None = None, scope: Scope | None = None) -> int:
        with self._reading() as db:
            query, params = _filter_sql(check_filters(filters, _fields(db)))
            if scope is not None:
                readable, readable_params = _readable_docs_sql(scope)
                query += f" INTERSECT SELECT seq FROM chunks WHERE doc_id IN ({readable})"
                params += readable_params
            return int(db.execute(f"SELECT COUNT(*) FROM ({query})", params).fetchone()[0])

    def _readable(self, db: sqlite3.Connection, mirror: Mirror, scope: Scope) -> np.ndarray | None:
        """The seqs `scope` may read in the open read transaction, ascending (None: every chunk), memoised
        per (generation, scope): a generation is one committed state of both chunks and access."""
        key = (mirror.generation, scope)
        with self._memo_lock:
            if key in self._readable_seqs:
                self._readable_seqs.move_to_end(key)
                return self._readable_seqs[key]
        readable, params = _readable_docs_sql(scope)
        seqs = np.sort(_int_column(db.execute(f"SELECT seq FROM chunks WHERE doc_id IN ({readable})", params)))
        found = None if len(seqs) == mirror.rows else seqs  # the mirror holds every chunk of this state
        with self._memo_lock:
            self._readable_seqs[key] = found
            if len(self._readable_seqs) > MAX_MEMOISED_SCOPES:
                self._readable_seqs.popitem(last=False)
        return found

    def _matching(self, db: sqlite3.Connection, generation: int, wanted: dict[str, list]) -> np.ndarray:
        """The seqs `wanted` lets through in the open read transaction, ascending, memoised per generation."""
        key = (generation, json.dumps(wanted, sort_keys=True))
        with self._memo_lock:
            if key in self._matching_seqs:
                self._matching_seqs.move_to_end(key)
                return self._matching_seqs[key]
        seqs = np.sort(_int_column(db.execute(*_filter_sql(wanted))))
        if len(seqs) <= MAX_MEMOISED_FILTER_ROWS:
            with self._memo_lock:
                self._matching_seqs[key] = seqs
                if len(self._matching_seqs) > MAX_MEMOISED_FILTERS:
                    self._matching_seqs.popitem(last=False)
        return seqs

    def _refresh(self, db: sqlite3.Connection) -> Mirror | None:
        """The mirror of the open read transaction's state, reading only what changed since the last one; None
        when another thread has already moved the mirror past that state (the caller reads again, later)."""
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('dim', ?, ?, ?)", INTERNAL_META))
        generation, store_id = int(meta["generation"]), meta["store_id"]
        current = self._mirror
        if current is not None and current.generation == generation and not self._adoptable(generation):
            return current
        with self._refresh_lock:
            current = self._mirror
            if current is not None and current.generation > generation:
                return None
            if current is not None and current.generation == generation and not self._adoptable(generation):
                return current
            mirror = self._refreshed(db, current, store_id, generation, int(meta.get("dim", 0)),
                                     int(meta["tombstone_floor"]))
            self._mirror = mirror
            self._watch_snapshot(mirror)
            return mirror

    def _adoptable(self, generation: int) -> bool:
        adopted = self._adopted
        return adopted is not None and adopted.generation <= generation

    def _refreshed(self, db: sqlite3.Connection, current: Mirror | None, store_id: str, generation: int, dim: int,
                   floor: int) -> Mirror:
        start = current
        adopted, self._adopted = self._adopted, None
        if adopted is not None and (current is None or adopted.generation > current.base.generation):
            start = Mirror.of(adopted) if self._trusted(adopted, store_id, generation) else current
            if adopted.generation > generation:
                self._adopted = adopted  # for a later state
        if start is None:
            saved = self._trusted(snapshot.load(self._snapshot_dir), store_id, generation)
            start = Mirror.of(saved) if saved is not None else None
        if start is None or start.dim != dim:  # nothing to start from, or cleared and refilled by another model
            start = Mirror.of(snapshot.empty(store_id, floor, dim))

        base, live = start.base, start.live
        delta_seqs, delta_matrix = start.delta_seqs, start.delta_matrix
        if start.tombstone < floor:  # the tombstones it lacks were compacted away: compare with the table
            existing = _int_column(db.execute("SELECT seq FROM chunks"))
            gone = np.setdiff1d(np.concatenate([base.seqs, delta_seqs]), existing)
        else:
            gone = _int_column(db.execute("SELECT seq FROM tombstones WHERE id > ?", (start.tombstone,)))
        if len(gone):
            dead = np.isin(base.seqs, gone)
            if dead.any():
                live = ~dead if live is None else live & ~dead
            keep = ~np.isin(delta_seqs, gone)
            delta_seqs, delta_matrix = delta_seqs[keep], delta_matrix[keep]
        added_seqs, added = _rows_after(db, start.last_seq, dim)
        if len(added_seqs):
            delta_seqs, delta_matrix = np.concatenate([delta_seqs, added_seqs]), np.concatenate([delta_matrix, added])
        tombstone = db.execute("SELECT MAX(id) FROM tombstones").fetchone()[0] or 0
        return Mirror.made(generation, max(tombstone, floor), base, live, delta_seqs, delta_matrix)

    def _watch_snapshot(self, mirror: Mirror) -> None:
        """Load a snapshot newer than the mirror's base in the background (verifying it reads every file), for a
        later refresh to start from: its graph then covers the rows this handle searched exactly."""
        name = snapshot.current_name(self._snapshot_dir)
        based_on = mirror.base.folder.name if mirror.base.folder is not None else None
        if name is None or name == based_on or name == self._loading:
            return
        self._loading = name

        self._loader.submit(lambda: self._offer(snapshot.load(self._snapshot_dir)))

    def _offer(self, loaded: Snapshot | None) -> None:
        """Give a loaded snapshot to the next refresh to start from."""
        with self._refresh_lock:
            self._adopted = loaded

    @staticmethod
    def _trusted(saved: Snapshot | None, store_id: str, generation: int) -> Snapshot | None:
        """A loaded snapshot if it can be the start of this database's refresh; rows are never updated in place,
        so any earlier state of the same database is."""
        if saved is None:
            return None
        problem = (
            "it belongs to another database" if saved.store_id != store_id
            else "it is newer than this reader's view of the database" if saved.generation > generation
            else None
        )
        if problem:
            log.info("not starting from the search snapshot: %s; reading the vectors from the database", problem)
            return None
        return saved

    def _read_mirror(self) -> Mirror:
        while True:
            with self._reading() as db:
                mirror = self._refresh(db)
            if mirror is not None:
                return mirror

    def persist(self) -> None:
        """Snapshot the mirror (see store/snapshot.py), then drop the tombstones it covers.

        Above `tuning.ann_min_chunks` the snapshot carries an HNSW graph: the last one extended by the rows
        added since, or built anew when there was none, when more than REBUILD_DEAD_SHARE of its rows are
        dead or when the new rows outnumber the old (so building costs O(n log n) over the index's growth).
        Below it, and on a rebuild, dead rows are left out.
        """
        mirror = self._read_mirror()
        base = mirror.base
        wants_graph = mirror.rows >= self.tuning.ann_min_chunks and mirror.rows > 0
        if base.folder is not None and base.generation == mirror.generation and (base.graph is not None) == wants_graph:
            return  # the current snapshot is this very state
        dead = np.zeros(0, np.int64) if mirror.live is None else np.flatnonzero(~mirror.live)
        seqs = np.concatenate([base.seqs, mirror.delta_seqs])
        blocks = [base.matrix, mirror.delta_matrix]
        graph = self._extended_graph(mirror, dead) if wants_graph else None
        if graph is None and len(dead):  # a new graph, or none: the dead rows are left out
            keep = np.flatnonzero(mirror.live)
            seqs = np.concatenate([base.seqs[keep], mirror.delta_seqs])
            blocks, dead = [base.matrix[keep], mirror.delta_matrix], dead[:0]
        if wants_graph and graph is None:
            graph = ann.build(blocks, self.tuning.ann_connectivity, self.tuning.ann_ef_construction)
        snapshot.write(self._snapshot_dir, base.store_id, mirror.generation, mirror.tombstone, seqs, blocks, dead,
                       graph)
        with self._transaction(changes_chunks=False) as db:
            db.execute("DELETE FROM tombstones WHERE id <= ?", (mirror.tombstone,))
            db.execute(
                "UPDATE meta SET value = max(CAST(value AS INTEGER), ?) WHERE key = 'tombstone_floor'",
                (mirror.tombstone,),
            )
        self._offer(snapshot.load(self._snapshot_dir))

    def _extended_graph(self, mirror: Mirror, dead: np.ndarray) -> Any:
        """The base snapshot's graph read privately and extended by the rows after it; None when it must be built
        anew (see `persist`)."""
        base = mirror.base
        if base.graph is None or base.folder is None or len(dead) > REBUILD_DEAD_SHARE * len(base.seqs):
            return None
        if len(mirror.delta_seqs) > len(base.seqs):
            return None
        try:
            graph = ann.open_private(base.folder / snapshot.GRAPH)
        except (OSError, RuntimeError) as exc:  # removed by a newer persist in another process, say
            log.info("building the search graph anew: %s", exc)
            return None
        ann.extend(graph, mirror.delta_matrix)
        return graph

    def search(self, request: SearchRequest) -> list[Hit]:
        while True:
            with self._reading() as db:
                found = self._search(db, request)
            if found is not None:
                return found

    def _search(self, db: sqlite3.Connection, request: SearchRequest) -> list[Hit] | None:
        """The search in the open read transaction; None when its state is older than the mirror (read again)."""
        wanted = check_filters(request.filters, _fields(db)) if request.filters is not None else {}
        mirror = self._refresh(db)
        if mirror is None:
            return None
        if not mirror.rows:
            return []
        allowed = readable = self._readable(db, mirror, request.scope)
        if readable is not None and not len(readable):
            return []
        if wanted:
            matching = self._matching(db, mirror.generation, wanted)
            allowed = matching if readable is None else np.intersect1d(readable, matching)
        scope = None if readable is None else request.scope
        ranked = self._ranked(db, mirror, request, allowed, wanted, scope)
        listed = ",".join(map(str, {int(seq) for seqs, _ in ranked for seq in seqs}))
        rows = db.execute(f"SELECT seq, chunk_id, doc_id, text, metadata FROM chunks WHERE seq IN ({listed})").fetchall()
        chunks = {row[0]: Chunk(row[1], row[2], row[3], json.loads(row[4])) for row in rows}
        lists = []
        for seqs, scores in ranked:
            vectors = mirror.vectors(seqs) if request.with_vectors else [None] * len(seqs)
            lists.append([
                Hit(chunks[seq], float(score), vector)
                for seq, score, vector in zip(seqs.tolist(), scores.tolist(), vectors)
                if seq in chunks
            ])
        return store_result(lists, request.k, request.fusion)

    def _ranked(
        self, db: sqlite3.Connection, mirror: Mirror, request: SearchRequest, allowed: np.ndarray | None,
        wanted: dict[str, list], scope: Scope | None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The request's lists, (seqs, scores) best first: dense, keyword or both (computed side by side).

        `allowed` holds the seqs both the scope and the filters let through (None: all), for the dense scan;
        the keyword query applies `wanted` and `scope` (None: it restricts nothing) itself.
        """
        depth = request.k + TIE_SLACK
        if request.mode == "dense":
            return [_dense(mirror, request.vector, depth, allowed, self.tuning)]
        if request.mode == "keyword":
            return [self._keyword(db, mirror, request.text, depth, wanted, scope)]
        dense = self._dense_worker.submit(_dense, mirror, request.vector, depth, allowed, self.tuning)
        try:
            keyword = self._keyword(db, mirror, request.text, depth, wanted, scope)
        finally:
            wait([dense])  # a failed keyword query still leaves no scan running past the search
        return [dense.result(), keyword]

    def _keyword(
        self, db: sqlite3.Connection, mirror: Mirror, text: str, depth: int, wanted: dict[str, list],
        scope: Scope | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """BM25's best among the chunks `scope` may read (None: all) and `wanted` lets through (FTS5 gives
        lower-is-better scores; they are negated so that higher is better)."""
        match = keywords.fts_query(self._scored_terms(db, mirror, keywords.query_terms(text)))
        if match is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        where = "chunks_fts MATCH ?"
        params: list = [keywords.HEADING_WEIGHT, match]
        if wanted:
            filter_sql, filter_params = _filter_sql(wanted)
            where += f" AND +rowid IN ({filter_sql})"  # unary +: MATCH drives, the filter only checks
            params += filter_params
        if scope is not None:  # each match's document looked up by seq: the cost follows the matches, not the scope
            readable, readable_params = _readable_docs_sql(scope)
            where += f" AND (SELECT doc_id FROM chunks WHERE seq = chunks_fts.rowid) IN ({readable})"
            params += readable_params
        rows = db.execute(
            f"SELECT rowid, -bm25(chunks_fts, ?, 1.0) AS score FROM chunks_fts WHERE {where} "
            "ORDER BY score DESC LIMIT ?",
            [*params, depth],
        ).fetchall()
        return np.array([seq for seq, _ in rows], np.int64), np.array([score for _, score in rows], np.float32)

    def _scored_terms(self, db: sqlite3.Connection, mirror: Mirror, terms: list[str]) -> list[str]:
        """`terms` less the common ones (see store/keywords.py); an index no larger than the cutoff keeps all."""
        cutoff = keywords.common_cutoff(mirror.rows)
        if mirror.rows <= cutoff:
            return terms
        counts = {term: self._count(db, mirror.generation, term, cutoff + 1) for term in terms}
        if not any(0 < count <= cutoff for count in counts.values()):  # the rarest is wanted: count exactly
            counts = {term: self._count(db, mirror.generation, term, None) for term in terms}
        return keywords.scored_terms(terms, counts, cutoff)

    def _count(self, db: sqlite3.Connection, generation: int, term: str, cap: int | None) -> int:
        """How many chunks hold `term` (or `cap`, if at least that many), counted once per generation.

        Counting stops at `cap`, so that a common term costs no more to count than a rare one.
        """
        with self._memo_lock:
            if self._counts_generation < generation or len(self._term_counts) > keywords.MAX_COUNTED_TERMS:
                self._term_counts, self._counts_generation = {}, generation
            memo = self._term_counts if self._counts_generation == generation else {}  # an older state's own
            count, counted_to = memo.get(term, (None, None))
        if count is None or (cap is None and counted_to is not None and count >= counted_to):
            count = db.execute(
                "SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)",
                (keywords.phrase(term), -1 if cap is None else cap),
            ).fetchone()[0]
            with self._memo_lock:
                if self._counts_generation == generation:
                    self._term_counts[term] = (count, cap)
        return count if cap is None else min(count, cap)

    def document_chunks(self, doc_id: str) -> list[Chunk]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT chunk_id, doc_id, text, metadata FROM chunks WHERE doc_id = ? ORDER BY seq", (doc_id,)
            ).fetchall()
        return [Chunk(cid, did, text, json.loads(meta)) for cid, did, text, meta in rows]

    def close(self) -> None:
        with self._lock:
            self._dense_worker.shutdown()
            self._loader.shutdown()
            for db in self._connections:
                db.close()
