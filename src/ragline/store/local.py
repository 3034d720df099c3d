"""The embedded default store: SQLite for chunks, metadata and manifest, NumPy for exact search.

SQLite (WAL) is the source of truth and gives one transaction per file.
The vectors are mirrored into a float32 matrix for brute-force cosine
search, which is exact, honours any filter, and takes ~20 ms at 100k×384.
A `generation` counter, bumped by every write, tells a reader (another
process, or the API while an ingest runs) when to refresh its matrix; the
refresh reads only the rows it does not have yet.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ragline.config import Settings
from ragline.store.base import DocumentRecord, Filters, StoreError, check_filters
from ragline.types import Chunk, Hit, utc_now

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
    updated_at TEXT NOT NULL
);
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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', '0');
INSERT OR IGNORE INTO meta(key, value) VALUES ('store_id', lower(hex(randomblob(8))));
"""


def _tags(seq: int, metadata: dict) -> Iterator[tuple[str, object, int]]:
    """Index rows for filtering: one per scalar field, one per element of a list field."""
    for name, value in metadata.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, int, float)):
                yield name, item, seq


def _filter_sql(filters: Filters | None) -> tuple[str, list]:
    """A query for the seqs of matching chunks, answered from the tag index, not by a table scan.

    Conditions on different fields must all hold; a list-valued field
    matches when any of its elements is among the wanted values.
    """
    selects, params = [], []
    for name, (op, operand) in check_filters(filters).items():
        values = operand if op == "in" else [operand]
        selects.append(f"SELECT seq FROM tags WHERE field = ? AND value IN ({','.join('?' * len(values))})")
        params += [name, *values]
    return " INTERSECT ".join(selects) or "SELECT seq FROM chunks", params


class LocalStore:
    """SQLite + in-memory matrix; safe for one writer process and many readers."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "store.sqlite"
        self._snapshot_dir = data_dir / "index"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._generation = -1
        self._seqs = np.zeros(0, dtype=np.int64)
        self._matrix: np.ndarray | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStore:
        return cls(settings.data_dir)

    # -- writes -------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
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

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise StoreError(f"{len(chunks)} chunks but {len(vectors)} vectors for {record.source}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._transaction() as db:
            if len(chunks):
                self._check_dim(db, vectors)
            db.execute("DELETE FROM chunks WHERE doc_id = ?", (record.doc_id,))
            db.execute(
                "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.doc_id, record.source, record.root, record.size, record.mtime_ns,
                    record.sha256, record.fingerprint, record.status, record.error, record.updated_at or utc_now(),
                ),
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

    def delete_document(self, doc_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))

    def clear(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM tags")
            db.execute("DELETE FROM chunks")
            db.execute("DELETE FROM documents")
            db.execute("DELETE FROM meta WHERE key NOT IN ('generation', 'store_id')")

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- reads --------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def documents(self) -> list[DocumentRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM documents ORDER BY source").fetchall()
            chunk_ids: dict[str, list[str]] = {}
            for doc_id, cid in self._db.execute("SELECT doc_id, chunk_id FROM chunks ORDER BY seq"):
                chunk_ids.setdefault(doc_id, []).append(cid)
        return [DocumentRecord(*row, chunk_ids=chunk_ids.get(row[0], [])) for row in rows]

    def count(self, filters: Filters | None = None) -> int:
        query, params = _filter_sql(filters)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM ({query})", params).fetchone()[0])

    def _refresh(self) -> None:
        """Bring the matrix up to date with the database, reading only rows it lacks."""
        generation = int(self.get_meta("generation") or 0)
        if generation == self._generation:
            return
        if self._matrix is None:
            self._load_snapshot()
        if generation != self._generation:
            seqs = np.fromiter((s for (s,) in self._db.execute("SELECT seq FROM chunks ORDER BY seq")), dtype=np.int64)
            keep = np.isin(self._seqs, seqs)
            new = np.setdiff1d(seqs, self._seqs, assume_unique=True)
            matrix = self._matrix[keep] if self._matrix is not None else None
            if len(new):
                rows = self._db.execute(
                    f"SELECT vector FROM chunks WHERE seq IN ({','.join(map(str, new.tolist()))}) ORDER BY seq"
                )
                added = np.frombuffer(b"".join(blob for (blob,) in rows), dtype=np.float32).reshape(len(new), -1)
                matrix = added if matrix is None or not len(matrix) else np.concatenate([matrix, added])
            self._seqs = np.concatenate([self._seqs[keep], new])
            self._matrix = matrix
            self._generation = generation

    def _snapshot_tag(self) -> str:
        return f"{self.get_meta('store_id')} {self._generation}"

    def _load_snapshot(self) -> None:
        """Start from the last persisted matrix of this same database, if any.

        Rows are never updated in place (a changed document gets new rows)
        and sequence numbers are never reused, so an older snapshot is a
        valid starting point for the incremental refresh.
        """
        try:
            store_id, generation = (self._snapshot_dir / "generation").read_text().split()
            if store_id != self.get_meta("store_id"):
                return
            seqs = np.load(self._snapshot_dir / "seqs.npy")
            matrix = np.load(self._snapshot_dir / "vectors.npy", mmap_mode="r")
        except (OSError, ValueError):
            return
        if len(seqs) == len(matrix):
            self._seqs, self._matrix, self._generation = seqs, matrix, int(generation)

    def persist(self) -> None:
        with self._lock:
            self._refresh()
            if self._matrix is None:
                return
            self._snapshot_dir.mkdir(exist_ok=True)
            for name, array in (("seqs.npy", self._seqs), ("vectors.npy", self._matrix)):
                tmp = self._snapshot_dir / f".{name}.tmp"
                with open(tmp, "wb") as handle:
                    np.save(handle, array)
                tmp.replace(self._snapshot_dir / name)
            (self._snapshot_dir / ".generation.tmp").write_text(self._snapshot_tag())
            (self._snapshot_dir / ".generation.tmp").replace(self._snapshot_dir / "generation")

    def search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[Hit]:
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._lock:
            self._refresh()
            if self._matrix is None or not len(self._matrix):
                return []
            if query.shape[0] != self._matrix.shape[1]:
                raise StoreError(f"query has {query.shape[0]} dims, the index {self._matrix.shape[1]}")
            scores = self._matrix @ query
            if filters:
                query_sql, params = _filter_sql(filters)
                allowed = np.fromiter((s for (s,) in self._db.execute(query_sql, params)), dtype=np.int64)
                scores = np.where(np.isin(self._seqs, allowed), scores, -np.inf)
            k = min(k, len(scores))
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
            top = top[np.isfinite(scores[top])]
            if not len(top):
                return []
            wanted = self._seqs[top].tolist()
            rows = self._db.execute(
                f"SELECT seq, chunk_id, doc_id, text, metadata FROM chunks WHERE seq IN ({','.join(map(str, wanted))})"
            ).fetchall()
        by_seq = {row[0]: row for row in rows}
        return [
            Hit(Chunk(row[1], row[2], row[3], json.loads(row[4])), float(scores[i]))
            for i, seq in zip(top.tolist(), wanted)
            if (row := by_seq.get(seq)) is not None
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
