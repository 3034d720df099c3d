"""The embedded default store: SQLite for chunks, metadata and manifest, NumPy for exact search.

SQLite (WAL) is the source of truth. Its vectors are mirrored into a float32
matrix for brute-force cosine search, which is exact, honours any filter,
and takes ~8 ms at 100k×384 (a filter scans only the rows it allows when
they are fewer than half). What is guaranteed:

- **Writes** are one transaction per document (chunks, filter tags, field
  types and manifest row together): a kill leaves each document fully old or
  fully new. Writers in several processes take turns (SQLite's write lock).
- **Reads** see one committed state. A search checks its filters, refreshes
  the mirror, filters and fetches its rows inside one read transaction (WAL
  snapshot isolation), so another process committing meanwhile is invisible
  to it until its next search.
- **Refreshes read only what changed.** Rows are never updated in place and
  seqs are never reused, so a reader reads rows with `seq >` the last one it
  mirrors, and deletions from `tombstones` (filled by a trigger) after the
  last tombstone it applied. `generation`, bumped by every commit that
  changes the chunks or who may read them, tells it when there is anything
  to read; `index_version()` is the store's id and its generation.
  `persist()` drops the tombstones its snapshot covers; a reader that had
  not applied them yet compares its seqs with the table once instead.
- **Snapshots** (store/snapshot.py) are switched to atomically and verified
  on load; a snapshot that is damaged, newer than the reader's view or of
  another database is ignored and the matrix rebuilt from SQLite.
- **Filters** are checked against the type of each field, recorded on upsert
  in `fields` (widened when values of another type arrive, forgotten only by
  `clear()`).
- **Access** is per document: its tenant and groups live in `documents`, and
  `access` (tenant, group, doc_id) answers which documents a scope may read.
  Both are written in the document's transaction, or changed together by
  `set_access` (which bumps `generation`, never touching chunks or vectors).
  A search reads the seqs its scope allows inside its read transaction,
  memoised per (generation, scope), and intersects them with its filters
  before the dense scan; the keyword query checks each match's document
  against the scope in SQL. A scope that allows every chunk restricts
  nothing. The snapshot holds vectors only, so access is always as of the
  reader's committed state.
- **Keyword search** is SQLite FTS5 (BM25) over the code-aware terms of
  store/keywords.py, in a table keyed by the chunk's seq, written in the same
  transaction as the chunk and emptied by a trigger when the chunk goes: it
  can never disagree with the vectors. A query scores only its informative
  terms (store/keywords.py `scored_terms`); how many chunks hold each term is
  counted once per generation. A hybrid search reads both lists in the same
  read transaction, the dense scan on a worker thread while SQLite answers
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
from pathlib import Path

import numpy as np

from ragline.config import Settings
from ragline.store import keywords, snapshot
from ragline.store.base import (
    EVERYONE,
    DocumentRecord,
    Filters,
    Scope,
    SearchRequest,
    StoreError,
    check_filters,
    merge_types,
    value_type,
)
from ragline.store.fusion import fuse
from ragline.store.snapshot import Snapshot
from ragline.types import Chunk, Hit, utc_now

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
"""2 → 3 added the keyword index (filled from the chunks on upgrade); 4 → 5 per-document access (every
document of an older index belongs to the default tenant and is readable by everyone in it)."""
TIE_SLACK = 32
TIE_DIGITS = 6
"""Equal scores (the same text twice; float noise in the 7th digit) rank by chunk id, not by where rows happen
to lie, so a rebuilt or resumed index answers exactly like an uninterrupted one: each list is read TIE_SLACK
deeper than k, ordered by (score to TIE_DIGITS significant digits, chunk id), then cut."""
HEADING_WEIGHT = 2.0
"""BM25 weight of a chunk's title and heading path against its body (1.0): a heading names the topic."""
BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another process's write lock before failing."""
MAX_COUNTED_TERMS = 50_000
"""The per-generation memo of term counts is emptied past this many terms (a long run of distinct queries)."""
MAX_MEMOISED_SCOPES = 16
"""How many (generation, scope) → readable seqs a handle keeps, least recently used dropped first."""

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


def _access(tenant: str, groups: Sequence[str]) -> tuple[str, list[str]]:
    """A document's tenant and its groups as stored (sorted, once each); ValueError for a malformed one."""
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"a document's tenant must be a non-empty string, not {tenant!r:.80}")
    if isinstance(groups, str) or not all(isinstance(group, str) and group for group in groups):
        raise ValueError(f"a document's groups must be a list of non-empty strings, not {groups!r:.80}")
    return tenant, sorted(set(groups))


def _record(row: Sequence, chunk_ids: list[str]) -> DocumentRecord:
    """A manifest row (the columns of DOCUMENT_COLUMNS, in order) as a DocumentRecord."""
    *fields, dependencies, tenant, groups = row
    return DocumentRecord(
        *fields, tenant=tenant, groups=json.loads(groups), dependencies=json.loads(dependencies), chunk_ids=chunk_ids,
    )


def _keyword_row(seq: int, text: str, metadata: dict) -> tuple[int, str, str]:
    heading = " ".join(metadata.get("heading_path") or ()) or str(metadata.get("title", ""))
    return seq, keywords.index_text(heading), keywords.index_text(text)


def _int_column(rows: Iterable[tuple[int]]) -> np.ndarray:
    return np.fromiter((value for (value,) in rows), dtype=np.int64)


def _positions(seqs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The rows of the sorted, non-empty `seqs` that hold one of `wanted` (in any order, repeats allowed), ascending."""
    at = np.minimum(np.searchsorted(seqs, wanted), len(seqs) - 1)
    return np.unique(at[seqs[at] == wanted])


def _dense(mirror: Snapshot, vector: np.ndarray, depth: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best (seqs, cosine scores), best first, among the `allowed` seqs (None: all)."""
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    if query.shape[0] != mirror.dim:
        raise StoreError(f"query has {query.shape[0]} dims, the index {mirror.dim}")
    if allowed is None:
        rows, scores = None, mirror.matrix @ query
    else:
        rows = _positions(mirror.seqs, allowed)
        few = 2 * len(rows) < len(mirror.seqs)  # gathering the rows costs about twice scanning them
        scores = mirror.matrix[rows] @ query if few else (mirror.matrix @ query)[rows]
    k = min(depth, len(scores))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top])]
    return mirror.seqs[top if rows is None else rows[top]], scores[top]


class LocalStore:
    """SQLite + in-memory matrix; safe for writer and reader processes side by side."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "store.sqlite"
        self._snapshot_dir = data_dir / "index"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self._create_schema()
        self._mirror: Snapshot | None = None
        """The matrix of the last state this handle read; replaced whole, never changed in place."""
        self._term_counts: dict[str, tuple[int, int | None]] = {}
        """term -> (chunks holding it, the cap it was counted up to) at generation `_counts_generation`."""
        self._counts_generation = -1
        self._readable_seqs: OrderedDict[tuple[int, Scope], np.ndarray | None] = OrderedDict()
        """(generation, scope) -> the seqs that scope may read (None: all), least recently used first."""
        self._dense_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragline-dense")

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStore:
        return cls(settings.data_dir)

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
        tenant, groups = _access(record.tenant, record.groups)
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
        tenant, groups = _access(tenant, groups)
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
        """One read transaction: every statement inside sees the same committed state."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def filter_fields(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT name, type FROM fields ORDER BY name"))

    def index_version(self) -> str:
        with self._lock:
            meta = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN ('store_id', 'generation')"))
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

    def count(self, filters: Filters | None = None, scope: Scope | None = None) -> int:
        with self._reading() as db:
            query, params = _filter_sql(check_filters(filters, self.filter_fields()))
            if scope is not None:
                readable, readable_params = _readable_docs_sql(scope)
                query += f" INTERSECT SELECT seq FROM chunks WHERE doc_id IN ({readable})"
                params += readable_params
            return int(db.execute(f"SELECT COUNT(*) FROM ({query})", params).fetchone()[0])

    def _readable(self, db: sqlite3.Connection, mirror: Snapshot, scope: Scope) -> np.ndarray | None:
        """The seqs `scope` may read in the open read transaction, ascending (None: every chunk), memoised
        per (generation, scope): a generation is one committed state of both chunks and access."""
        key = (mirror.generation, scope)
        if key in self._readable_seqs:
            self._readable_seqs.move_to_end(key)
            return self._readable_seqs[key]
        readable, params = _readable_docs_sql(scope)
        seqs = np.sort(_int_column(db.execute(f"SELECT seq FROM chunks WHERE doc_id IN ({readable})", params)))
        every = len(seqs) == len(mirror.seqs)  # the mirror holds every chunk of this state
        self._readable_seqs[key] = None if every else seqs
        if len(self._readable_seqs) > MAX_MEMOISED_SCOPES:
            self._readable_seqs.popitem(last=False)
        return self._readable_seqs[key]

    def _refresh(self, db: sqlite3.Connection) -> Snapshot:
        """Bring the mirror up to the state of the open read transaction, reading only what changed."""
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('dim', ?, ?, ?)", INTERNAL_META))
        generation, store_id = int(meta["generation"]), meta["store_id"]
        if self._mirror is not None and self._mirror.generation == generation:
            return self._mirror
        dim, floor = int(meta.get("dim", 0)), int(meta["tombstone_floor"])
        mirror = self._mirror or self._trusted(snapshot.load(self._snapshot_dir), store_id, generation)
        if mirror is None or mirror.dim != dim:  # nothing to start from, or cleared and refilled by another model
            mirror = Snapshot(store_id, -1, floor, np.zeros(0, np.int64), np.zeros((0, dim), np.float32))

        keep = np.ones(len(mirror.seqs), dtype=bool)
        if len(mirror.seqs) and mirror.tombstone < floor:  # the tombstones it lacks were compacted away
            keep = np.isin(mirror.seqs, _int_column(db.execute("SELECT seq FROM chunks")))
        elif len(mirror.seqs):
            gone = _int_column(db.execute("SELECT seq FROM tombstones WHERE id > ?", (mirror.tombstone,)))
            keep = ~np.isin(mirror.seqs, gone)
        last_seq = int(mirror.seqs[-1]) if len(mirror.seqs) else 0
        rows = db.execute("SELECT seq, vector FROM chunks WHERE seq > ? ORDER BY seq", (last_seq,)).fetchall()
        tombstone = db.execute("SELECT MAX(id) FROM tombstones").fetchone()[0] or 0

        seqs, matrix = mirror.seqs, mirror.matrix
        if not keep.all():
            seqs, matrix = seqs[keep], matrix[keep]
        if rows:
            added = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim)
            seqs = np.concatenate([seqs, np.array([seq for seq, _ in rows], dtype=np.int64)])
            matrix = np.concatenate([matrix, added])
        self._mirror = Snapshot(store_id, generation, max(tombstone, floor), seqs, matrix)
        return self._mirror

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

    def persist(self) -> None:
        """Snapshot the mirror (see store/snapshot.py), then drop the tombstones it covers."""
        with self._reading() as db:
            mirror = self._refresh(db)
        snapshot.write(self._snapshot_dir, mirror)
        with self._transaction(changes_chunks=False) as db:
            db.execute("DELETE FROM tombstones WHERE id <= ?", (mirror.tombstone,))
            db.execute(
                "UPDATE meta SET value = max(CAST(value AS INTEGER), ?) WHERE key = 'tombstone_floor'",
                (mirror.tombstone,),
            )

    def search(self, request: SearchRequest) -> list[Hit]:
        with self._reading() as db:
            wanted = check_filters(request.filters, self.filter_fields()) if request.filters is not None else {}
            mirror = self._refresh(db)
            if not len(mirror.seqs):
                return []
            allowed = readable = self._readable(db, mirror, request.scope)
            if readable is not None and not len(readable):
                return []
            if wanted:
                matching = _int_column(db.execute(*_filter_sql(wanted)))
                allowed = matching if readable is None else np.intersect1d(readable, matching)
            scope = None if readable is None else request.scope
            ranked = self._ranked(db, mirror, request, allowed, wanted, scope)
            listed = ",".join(map(str, {int(seq) for seqs, _ in ranked for seq in seqs}))
            rows = db.execute(
                f"SELECT seq, chunk_id, doc_id, text, metadata FROM chunks WHERE seq IN ({listed})"
            ).fetchall()
        chunks = {row[0]: Chunk(row[1], row[2], row[3], json.loads(row[4])) for row in rows}
        lists = []
        for seqs, scores in ranked:
            vectors = mirror.matrix[np.searchsorted(mirror.seqs, seqs)] if request.with_vectors else [None] * len(seqs)
            hits = [
                Hit(chunks[seq], float(score), vector)
                for seq, score, vector in zip(seqs.tolist(), scores.tolist(), vectors)
                if seq in chunks
            ]
            hits.sort(key=lambda hit: (-float(f"{hit.score:.{TIE_DIGITS}g}"), hit.chunk.chunk_id))
            lists.append(hits[: request.k])
        if len(lists) == 1:
            return lists[0]
        fusion = request.fusion
        weights = (fusion.dense_weight, fusion.keyword_weight)
        return fuse(lists, weights, fusion.method, fusion.rrf_k, request.k)

    def _ranked(
        self, db: sqlite3.Connection, mirror: Snapshot, request: SearchRequest, allowed: np.ndarray | None,
        wanted: dict[str, list], scope: Scope | None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The request's lists, (seqs, scores) best first: dense, keyword or both (computed side by side).

        `allowed` holds the seqs both the scope and the filters let through (None: all), for the dense scan;
        the keyword query applies `wanted` and `scope` (None: it restricts nothing) itself.
        """
        depth = request.k + TIE_SLACK
        if request.mode == "dense":
            return [_dense(mirror, request.vector, depth, allowed)]
        if request.mode == "keyword":
            return [self._keyword(db, mirror, request.text, depth, wanted, scope)]
        dense = self._dense_worker.submit(_dense, mirror, request.vector, depth, allowed)
        try:
            keyword = self._keyword(db, mirror, request.text, depth, wanted, scope)
        finally:
            wait([dense])  # a failed keyword query still leaves no scan running past the search
        return [dense.result(), keyword]

    def _keyword(
        self, db: sqlite3.Connection, mirror: Snapshot, text: str, depth: int, wanted: dict[str, list],
        scope: Scope | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """BM25's best among the chunks `scope` may read (None: all) and `wanted` lets through (FTS5 gives
        lower-is-better scores; they are negated so that higher is better)."""
        match = keywords.fts_query(self._scored_terms(db, mirror, keywords.query_terms(text)))
        if match is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        where = "chunks_fts MATCH ?"
        params: list = [HEADING_WEIGHT, match]
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

    def _scored_terms(self, db: sqlite3.Connection, mirror: Snapshot, terms: list[str]) -> list[str]:
        """`terms` less the common ones (see store/keywords.py); an index no larger than the cutoff keeps all."""
        cutoff = keywords.common_cutoff(len(mirror.seqs))
        if len(mirror.seqs) <= cutoff:
            return terms
        counts = {term: self._count(db, mirror.generation, term, cutoff + 1) for term in terms}
        if not any(0 < count <= cutoff for count in counts.values()):  # the rarest is wanted: count exactly
            counts = {term: self._count(db, mirror.generation, term, None) for term in terms}
        return keywords.scored_terms(terms, counts, cutoff)

    def _count(self, db: sqlite3.Connection, generation: int, term: str, cap: int | None) -> int:
        """How many chunks hold `term` (or `cap`, if at least that many), counted once per generation.

        Counting stops at `cap`, so that a common term costs no more to count than a rare one.
        """
        if self._counts_generation != generation or len(self._term_counts) > MAX_COUNTED_TERMS:
            self._term_counts, self._counts_generation = {}, generation
        count, counted_to = self._term_counts.get(term, (None, None))
        if count is None or (cap is None and counted_to is not None and count >= counted_to):
            count = db.execute(
                "SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)",
                (keywords.phrase(term), -1 if cap is None else cap),
            ).fetchone()[0]
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
            self._db.close()
