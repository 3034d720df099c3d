"""The production store: PostgreSQL with pgvector, one schema per index, shared by any number of processes.

PostgreSQL holds everything: the manifest, access, filter field types,
and each chunk with its vector (an HNSW index, cosine) and its keyword
vector (a tsvector with a GIN index). It keeps the guarantees of the
embedded store (store/local.py):

- **Writes** are one transaction per document (chunks, keyword vectors,
  field types, access and manifest row together): a kill leaves each document
  fully old or fully new. A write that changes chunks or access first bumps
  `generation` in `meta`; that row's lock makes writers take turns.
- **Reads** are one REPEATABLE READ, READ ONLY transaction per call: a
  search's field types, both its lists and their rows come from one committed
  state, whatever other processes commit meanwhile. `index_version()` is the
  store's id and its generation.
- **Scope and filters** are conditions in the SQL of the dense and the
  keyword query alike, never applied to results afterwards: a scope reads
  `access` (tenant, group, doc_id), a filter matches `metadata` by jsonb
  containment (a list field by any of its elements) on a GIN index. A scope
  that allows every chunk adds no condition (checked once per generation).
- **Dense search** ranks by cosine similarity. Unrestricted, it walks the
  HNSW graph (`ef_search`). Restricted, it first counts the chunks allowed
  (once per generation, scope and filters): up to `exact_search_rows` are
  ranked exactly; more walk the graph with pgvector's iterative scan. A
  graph walk that returns fewer rows than the restriction allows is redone
  exactly, so every chunk a scope may read can be found.
- **Keyword search** scores the informative terms of the query
  (store/keywords.py `scored_terms`, counted once per generation) BM25-like:
  the sum over terms of idf × tf / (tf + 1), a heading occurrence counting
  `HEADING_WEIGHT` times a body one (`ts_rank_cd` with normalisation 32).
  Terms are those of `keywords.index_text`, stemmed by the text search
  configuration `<schema>.ragline` (English Snowball, no stop words);
  underscores are written as hyphens so that the parser keeps `read_csv`
  whole instead of splitting it.
- **Ties** rank by chunk id, as in the local store; hybrid search fuses both
  lists with store/fusion.py.
- `persist()` has nothing to do (a commit is durable); `clear()` empties
  everything but the store's id and generation.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ragline.config import Settings
from ragline.store import keywords
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
from ragline.types import Chunk, Hit, utc_now

log = logging.getLogger(__name__)

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SCHEMA_LOCK = "ragline.store.pgvector schema"
"""Advisory lock key (hashed) taken while creating the extension and a schema's tables."""
HNSW_MAX_DIMS = 2000
"""pgvector's HNSW index takes `vector` columns up to this many dimensions; wider ones are searched exactly."""
MAX_EF_SEARCH = 1000
RANK_WEIGHTS = [0.1, 0.2, 1.0 / keywords.HEADING_WEIGHT, 1.0]
"""`ts_rank_cd`'s weights of D, C, B (the body) and A (the heading); it takes none above 1, hence the body's
1 / keywords.HEADING_WEIGHT. Nothing is labelled C or D."""
MAX_MEMOISED = 64
"""How many (generation, scope, filters) → allowed-chunk counts a handle keeps, least recently used dropped first."""
INTERNAL_META = ("generation", "store_id", "schema_version")
"""Meta keys that belong to the store itself and survive `clear()`."""
DOCUMENT_COLUMNS = (
    "doc_id, source, root, size, mtime_ns, sha256, fingerprint, status, error, updated_at, dependencies, tenant, groups"
)


def _schema_statements(schema: str) -> list[str]:
    """The tables of one index, created if missing; `embedding` gets its dimension with the first vectors."""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {schema}",
        f"CREATE TABLE IF NOT EXISTS {schema}.meta (key text PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.documents (
            doc_id text PRIMARY KEY, source text NOT NULL, root text NOT NULL, size bigint NOT NULL,
            mtime_ns bigint NOT NULL, sha256 text NOT NULL, fingerprint text NOT NULL, status text NOT NULL,
            error text NOT NULL DEFAULT '', updated_at text NOT NULL, dependencies jsonb NOT NULL DEFAULT '{{}}',
            tenant text NOT NULL, groups jsonb NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS documents_tenant ON {schema}.documents (tenant)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.access (
            tenant text NOT NULL, grp text NOT NULL,
            doc_id text NOT NULL REFERENCES {schema}.documents (doc_id) ON DELETE CASCADE,
            PRIMARY KEY (tenant, grp, doc_id))""",
        f"CREATE INDEX IF NOT EXISTS access_doc ON {schema}.access (doc_id)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.chunks (
            seq bigserial PRIMARY KEY, chunk_id text NOT NULL UNIQUE,
            doc_id text NOT NULL REFERENCES {schema}.documents (doc_id) ON DELETE CASCADE,
            text text NOT NULL, metadata jsonb NOT NULL, embedding vector NOT NULL, keywords tsvector NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS chunks_doc ON {schema}.chunks (doc_id, seq)",
        f"CREATE INDEX IF NOT EXISTS chunks_metadata ON {schema}.chunks USING gin (metadata jsonb_path_ops)",
        f"CREATE INDEX IF NOT EXISTS chunks_keywords ON {schema}.chunks USING gin (keywords)",
        f"CREATE TABLE IF NOT EXISTS {schema}.fields (name text PRIMARY KEY, type text NOT NULL)",
    ]


def _text_search_statements(schema: str) -> list[str]:
    """The keyword configuration: English stems without stop words (queries drop their own, see keywords.py)."""
    return [
        f"CREATE TEXT SEARCH DICTIONARY {schema}.ragline_stem (TEMPLATE = snowball, Language = english)",
        f"CREATE TEXT SEARCH CONFIGURATION {schema}.ragline (PARSER = default)",
        f"ALTER TEXT SEARCH CONFIGURATION {schema}.ragline ADD MAPPING FOR "
        f"asciiword, word, numword, asciihword, hword, numhword WITH {schema}.ragline_stem",
        f"ALTER TEXT SEARCH CONFIGURATION {schema}.ragline ADD MAPPING FOR "
        "int, uint, float, sfloat, version WITH simple",
    ]


DENSE_APPROXIMATE = (
    "SELECT c.seq, 1 - (c.embedding <=> %(query)s::vector) AS score FROM chunks c {where} "
    "ORDER BY c.embedding <=> %(query)s::vector LIMIT %(depth)s"
)
"""The HNSW walk: only an ORDER BY on the distance operator itself can use the index."""
DENSE_EXACT = (
    "SELECT c.seq, 1 - (c.embedding <=> %(query)s::vector) AS score FROM chunks c {where} "
    'ORDER BY score DESC, c.chunk_id COLLATE "C" LIMIT %(depth)s'
)
"""The exact ranking: ordering by the score (not the distance operator) keeps the planner off the graph."""


def dense_sql(conditions: Sequence[str], exact: bool) -> str:
    """The dense query over the chunks (alias `c`) that all `conditions` allow."""
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return (DENSE_EXACT if exact else DENSE_APPROXIMATE).format(where=where)


def _hyphenated(index_text: str) -> str:
    """Terms as the text search parser must see them: `read-csv` stays one word, `read_csv` would split."""
    return index_text.replace("_", "-")


def _vector_text(vector: np.ndarray) -> str:
    """A vector as pgvector reads it; `repr` of each float32 value round-trips exactly."""
    return "[" + ",".join(map(repr, np.asarray(vector, dtype=np.float32).reshape(-1).tolist())) + "]"



def _record(row: Sequence, chunk_ids: list[str]) -> DocumentRecord:
    """A manifest row (the columns of DOCUMENT_COLUMNS, in order) as a DocumentRecord."""
    *fields, dependencies, tenant, groups = row
    return DocumentRecord(*fields, tenant=tenant, groups=list(groups), dependencies=dict(dependencies),
                          chunk_ids=chunk_ids)


def _scope_sql(scope: Scope) -> tuple[str, dict[str, Any]]:
    """A query for the ids of the documents `scope` may read (`Scope.allows`), answered from indexes."""
    if scope.groups is None:
        return "SELECT doc_id FROM documents WHERE tenant = %(scope_tenant)s", {"scope_tenant": scope.tenant}
    return "SELECT doc_id FROM access WHERE tenant = %(scope_tenant)s AND grp = ANY(%(scope_groups)s)", {
        "scope_tenant": scope.tenant, "scope_groups": sorted(scope.groups | {EVERYONE}),
    }


def _filter_conditions(wanted: dict[str, list]) -> tuple[list[str], dict[str, Any]]:
    """One condition per field: its metadata holds one of the values, as itself or as an element of a list."""
    conditions, params = [], {}
    for number, (name, values) in enumerate(sorted(wanted.items())):
        conditions.append(f"c.metadata @> ANY(%(filter{number})s::jsonb[])")
        params[f"filter{number}"] = [Jsonb({name: shape}) for value in values for shape in (value, [value])]
    return conditions, params


@dataclass
class _Restriction:
    """What a search may read: SQL conditions on the chunks (alias `c`) with their parameters."""

    conditions: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    key: tuple = ()
    """(scope, filters) as far as they restrict anything: the memo key of the allowed-chunk count."""

    @property
    def sql(self) -> str:
        return "".join(f" AND {condition}" for condition in self.conditions)


def _describe(url: str) -> str:
    """Where a URL points, without its password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparseable store.url"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PgVectorStore:
    """PostgreSQL + pgvector; any number of processes read and write one index (a schema) side by side."""

    def __init__(
        self, url: str, db_schema: str = "ragline", pool_size: int = 4, connect_timeout_s: float = 10.0,
        ef_search: int = 100, exact_search_rows: int = 20_000,
    ) -> None:
        if not SCHEMA_NAME.match(db_schema):
            raise ValueError(f"store.db_schema must be a lowercase SQL identifier, not {db_schema!r:.80}")
        self.schema = db_schema
        self._ef_search = min(ef_search, MAX_EF_SEARCH)
        self._exact_search_rows = exact_search_rows
        self._text_config = f"{db_schema}.ragline"
        self._memo_lock = threading.Lock()
        self._memo_generation = -1
        self._counts: OrderedDict[tuple, int] = OrderedDict()
        """(scope, filters) or ("all",) -> chunks allowed, at generation `_memo_generation`."""
        self._term_counts: dict[str, tuple[int, int | None]] = {}
        """tsquery -> (chunks matching it, the cap it was counted up to), at generation `_memo_generation`."""
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, name=f"ragline-{db_schema}",
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout_s))},
            configure=self._configure, timeout=connect_timeout_s,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreError(
                f"cannot connect to PostgreSQL at {_describe(url)} within {connect_timeout_s:g}s: check store.url "
                "and that the server is up and accepts this user"
            ) from exc
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> PgVectorStore:
        store = settings.store
        if not store.url:
            raise StoreError("store.backend pgvector needs store.url: a postgresql:// URL")
        return cls(store.url.get_secret_value(), store.db_schema, store.pool_size, store.connect_timeout_s, store.ef_search,
                   store.exact_search_rows)

    def _configure(self, conn: psycopg.Connection) -> None:
        """Put the index's schema first on the search path, keeping where the server finds `vector`."""
        conn.execute("SELECT set_config('search_path', %s || ', ' || current_setting('search_path'), false)",
                     (self.schema,))

    def _create_schema(self) -> None:
        """Create the extension, tables and keyword configuration if missing, one process at a time."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (SCHEMA_LOCK,))
            if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise StoreError(
                        "the pgvector extension is not installed and this user may not install it: ask a "
                        "superuser to run `CREATE EXTENSION vector` in this database"
                    ) from exc
            for statement in _schema_statements(self.schema):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('generation', '0'), ('store_id', %s), ('schema_version', '1') "
                "ON CONFLICT (key) DO NOTHING",
                (uuid.uuid4().hex[:16],),
            )
            configured = conn.execute(
                "SELECT 1 FROM pg_ts_config WHERE cfgname = 'ragline' AND cfgnamespace = %s::regnamespace",
                (self.schema,),
            ).fetchone()
            if configured is None:
                for statement in _text_search_statements(self.schema):
                    conn.execute(statement)

    # -- writes -------------------------------------------------------------

    @contextmanager
    def _writing(self, changes_chunks: bool = True) -> Iterator[psycopg.Connection]:
        """One write transaction; one that changes chunks or access bumps the generation first (and so takes
        the writers' turn: the lock on that row is held until commit)."""
        with self._pool.connection() as conn, conn.transaction():
            if changes_chunks:
                conn.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation'")
            yield conn

    def _check_dim(self, conn: psycopg.Connection, dim: int) -> None:
        """The first vectors fix the column's dimension and build the HNSW index; later ones must match."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        if row is not None:
            if int(row[0]) != dim:
                raise StoreError(
                    f"the index holds {row[0]}-d vectors but the embedder gives {dim}-d: rebuild with "
                    "`ragline ingest --full`"
                )
            return
        conn.execute(f"ALTER TABLE chunks ALTER COLUMN embedding TYPE vector({dim})")
        if dim <= HNSW_MAX_DIMS:
            conn.execute(
                "CREATE INDEX IF NOT EXISTS chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops)"
            )
        else:
            log.warning("%d-d vectors are more than pgvector's HNSW index takes (%d): dense search scans every "
                        "allowed chunk", dim, HNSW_MAX_DIMS)
        conn.execute("INSERT INTO meta(key, value) VALUES ('dim', %s)", (str(dim),))

    def _record_fields(self, conn: psycopg.Connection, metadatas: Iterable[dict]) -> None:
        """Widen the recorded type of each filterable field by the values in `metadatas`."""
        known = dict(conn.execute("SELECT name, type FROM fields").fetchall())
        changed: dict[str, str] = {}
        for metadata in metadatas:
            for name, value in metadata.items():
                seen = value_type(value)
                current = changed.get(name, known.get(name))
                if seen is not None and seen != current:
                    changed[name] = seen if current is None else merge_types(current, seen)
        if changed:
            conn.cursor().executemany(
                "INSERT INTO fields(name, type) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type",
                list(changed.items()),
            )

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise StoreError(f"{len(chunks)} chunks but {len(vectors)} vectors for {record.source}")
        vectors = np.asarray(vectors, dtype=np.float32)
        tenant, groups = checked_access(record.tenant, record.groups)
        with self._writing() as conn:
            if len(chunks):
                self._check_dim(conn, int(vectors.shape[1]))
            conn.execute("DELETE FROM chunks WHERE doc_id = %s", (record.doc_id,))
            conn.execute("DELETE FROM access WHERE doc_id = %s", (record.doc_id,))
            conn.execute(
                f"INSERT INTO documents({DOCUMENT_COLUMNS}) VALUES ({', '.join(['%s'] * 13)}) "
                "ON CONFLICT (doc_id) DO UPDATE SET source = EXCLUDED.source, root = EXCLUDED.root, "
                "size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, sha256 = EXCLUDED.sha256, "
                "fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, error = EXCLUDED.error, "
                "updated_at = EXCLUDED.updated_at, dependencies = EXCLUDED.dependencies, tenant = EXCLUDED.tenant, "
                "groups = EXCLUDED.groups",
                (
                    record.doc_id, record.source, record.root, record.size, record.mtime_ns, record.sha256,
                    record.fingerprint, record.status, record.error, record.updated_at or utc_now(),
                    Jsonb(record.dependencies), tenant, Jsonb(groups),
                ),
            )
            cursor = conn.cursor()
            cursor.executemany(
                "INSERT INTO access(tenant, grp, doc_id) VALUES (%s, %s, %s)",
                [(tenant, group, record.doc_id) for group in groups],
            )
            try:
                cursor.executemany(
                    "INSERT INTO chunks(chunk_id, doc_id, text, metadata, embedding, keywords) VALUES "
                    f"(%s, %s, %s, %s, %s::vector, setweight(to_tsvector('{self._text_config}', %s), 'A') || "
                    f"setweight(to_tsvector('{self._text_config}', %s), 'B'))",
                    [
                        (
                            chunk.chunk_id, chunk.doc_id, chunk.text, Jsonb(chunk.metadata), _vector_text(vector),
                            _hyphenated(keywords.index_text(keywords.heading_text(chunk.metadata))),
                            _hyphenated(keywords.index_text(chunk.text)),
                        )
                        for chunk, vector in zip(chunks, vectors)
                    ],
                )
            except psycopg.errors.UniqueViolation as exc:
                raise StoreError(
                    f"{record.source}: a chunk id is used twice or by another document ({exc.diag.message_detail})"
                ) from exc
            self._record_fields(conn, (chunk.metadata for chunk in chunks))

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        with self._writing(changes_chunks=False) as conn:
            updated = conn.execute(
                "UPDATE documents SET size = %s, mtime_ns = %s WHERE doc_id = %s", (size, mtime_ns, doc_id)
            ).rowcount
            if not updated:
                raise StoreError(f"cannot touch {doc_id!r}: no such document in the manifest")

    def set_access(self, doc_id: str, tenant: str, groups: Sequence[str]) -> None:
        tenant, groups = checked_access(tenant, groups)
        with self._writing() as conn:
            updated = conn.execute(
                "UPDATE documents SET tenant = %s, groups = %s WHERE doc_id = %s", (tenant, Jsonb(groups), doc_id)
            ).rowcount
            if not updated:
                raise StoreError(f"cannot set the access of {doc_id!r}: no such document in the manifest")
            conn.execute("DELETE FROM access WHERE doc_id = %s", (doc_id,))
            conn.cursor().executemany(
                "INSERT INTO access(tenant, grp, doc_id) VALUES (%s, %s, %s)",
                [(tenant, group, doc_id) for group in groups],
            )

    def delete_document(self, doc_id: str) -> None:
        with self._writing() as conn:
            conn.execute("DELETE FROM chunks WHERE doc_id = %s", (doc_id,))
            conn.execute("DELETE FROM access WHERE doc_id = %s", (doc_id,))
            conn.execute("DELETE FROM documents WHERE doc_id = %s", (doc_id,))

    def clear(self) -> None:
        """Empty the index (DELETE, so that a reader's open snapshot stays whole) and forget its dimension."""
        with self._writing() as conn:
            for table in ("chunks", "access", "documents", "fields"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM meta WHERE key <> ALL(%s)", (list(INTERNAL_META),))
            conn.execute("DROP INDEX IF EXISTS chunks_embedding")
            conn.execute("ALTER TABLE chunks ALTER COLUMN embedding TYPE vector")

    def set_meta(self, key: str, value: str) -> None:
        with self._writing(changes_chunks=False) as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, value),
            )

    def persist(self) -> None:
        """Nothing to do: every write is durable once committed, and readers need no snapshot."""

    # -- reads --------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection]:
        """One read transaction: every statement inside sees the same committed state."""
        with self._pool.connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            except BaseException:
                if not conn.closed:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def filter_fields(self) -> dict[str, str]:
        with self._pool.connection() as conn:
            return self._fields(conn)

    @staticmethod
    def _fields(conn: psycopg.Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT name, type FROM fields ORDER BY name").fetchall())

    def index_version(self) -> str:
        with self._pool.connection() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('store_id', 'generation')").fetchall())
        return f"{meta['store_id']}-{meta['generation']}"

    def documents(self, scope: Scope | None = None) -> list[DocumentRecord]:
        where, params = "", {}
        if scope is not None:
            readable, params = _scope_sql(scope)
            where = f" WHERE doc_id IN ({readable})"
        with self._reading() as conn:
            rows = conn.execute(
                f'SELECT {DOCUMENT_COLUMNS} FROM documents{where} ORDER BY source COLLATE "C", doc_id COLLATE "C"',
                params,
            ).fetchall()
            chunk_ids: dict[str, list[str]] = {}
            for doc_id, chunk_id in conn.execute(f"SELECT doc_id, chunk_id FROM chunks{where} ORDER BY seq", params):
                chunk_ids.setdefault(doc_id, []).append(chunk_id)
        return [_record(row, chunk_ids.get(row[0], [])) for row in rows]

    def document(self, doc_id: str) -> DocumentRecord | None:
        with self._reading() as conn:
            row = conn.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE doc_id = %s", (doc_id,)).fetchone()
            chunk_ids = [cid for (cid,) in conn.execute(
                "SELECT chunk_id FROM chunks WHERE doc_id = %s ORDER BY seq", (doc_id,)
            )]
        return None if row is None else _record(row, chunk_ids)

    def export_document(self, doc_id: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        with self._reading() as conn:
            row = conn.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE doc_id = %s", (doc_id,)).fetchone()
            rows = conn.execute(
                "SELECT chunk_id, doc_id, text, metadata, embedding::real[] FROM chunks WHERE doc_id = %s ORDER BY seq",
                (doc_id,),
            ).fetchall()
        if row is None:
            return None
        chunks = [Chunk(chunk_id, did, text, metadata) for chunk_id, did, text, metadata, _ in rows]
        vectors = np.array([embedding for *_, embedding in rows], dtype=np.float32).reshape(len(rows), -1 if rows else 0)
        return _record(row, [chunk.chunk_id for chunk in chunks]), chunks, vectors

    def document_chunks(self, doc_id: str) -> list[Chunk]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT chunk_id, doc_id, text, metadata FROM chunks WHERE doc_id = %s ORDER BY seq", (doc_id,)
            ).fetchall()
        return [Chunk(chunk_id, did, text, metadata) for chunk_id, did, text, metadata in rows]

    def count(self, filters: Filters | None = None, scope: Scope | None = None) -> int:
        with self._reading() as conn:
            conditions, params = _filter_conditions(check_filters(filters, self._fields(conn)))
            if scope is not None:
                readable, scope_params = _scope_sql(scope)
                conditions.append(f"c.doc_id IN ({readable})")
                params.update(scope_params)
            where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
            return int(conn.execute(f"SELECT count(*) FROM chunks c{where}", params).fetchone()[0])

    def _memoised_count(self, conn: psycopg.Connection, generation: int, key: tuple, sql: str,
                        params: dict[str, Any]) -> int:
        """`SELECT count(*)` of a restriction, counted once per generation (one committed state)."""
        with self._memo_lock:
            if self._memo_generation != generation:
                self._memo_generation, self._term_counts = generation, {}
                self._counts.clear()
            if key in self._counts:
                self._counts.move_to_end(key)
                return self._counts[key]
        counted = int(conn.execute(sql, params).fetchone()[0])
        with self._memo_lock:
            if self._memo_generation == generation:
                self._counts[key] = counted
                if len(self._counts) > MAX_MEMOISED:
                    self._counts.popitem(last=False)
        return counted

    def _restriction(self, conn: psycopg.Connection, generation: int, total: int, scope: Scope,
                     wanted: dict[str, list]) -> _Restriction:
        """The conditions of `scope` and `wanted`; a scope that allows every chunk adds none."""
        restriction = _Restriction()
        readable, scope_params = _scope_sql(scope)
        in_scope = self._memoised_count(
            conn, generation, ("scope", scope), f"SELECT count(*) FROM chunks c WHERE c.doc_id IN ({readable})",
            scope_params,
        )
        if in_scope < total:
            restriction.conditions.append(f"c.doc_id IN ({readable})")
            restriction.params.update(scope_params)
            restriction.key += (scope,)
        conditions, params = _filter_conditions(wanted)
        restriction.conditions += conditions
        restriction.params.update(params)
        if wanted:
            restriction.key += (tuple((name, repr(values)) for name, values in sorted(wanted.items())),)
        return restriction

    def search(self, request: SearchRequest) -> list[Hit]:
        with self._reading() as conn:
            wanted = check_filters(request.filters, self._fields(conn)) if request.filters is not None else {}
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('generation', 'dim')").fetchall())
            generation = int(meta["generation"])
            total = self._memoised_count(conn, generation, ("all",), "SELECT count(*) FROM chunks c", {})
            if total == 0:
                return []
            restriction = self._restriction(conn, generation, total, request.scope, wanted)
            depth = request.k + TIE_SLACK
            ranked = []
            if request.mode != "keyword":
                dim = int(meta["dim"])
                ranked.append(self._dense(conn, request.vector, dim, depth, generation, total, restriction))
            if request.mode != "dense":
                ranked.append(self._keyword(conn, request.text, depth, generation, total, restriction))
            seqs = sorted({seq for rows in ranked for seq, _ in rows})
            vector_column = ", c.embedding::real[]" if request.with_vectors else ""
            found = conn.execute(
                f"SELECT c.seq, c.chunk_id, c.doc_id, c.text, c.metadata{vector_column} FROM chunks c "
                "WHERE c.seq = ANY(%s)",
                (seqs,),
            ).fetchall()
        chunks = {row[0]: Chunk(row[1], row[2], row[3], row[4]) for row in found}
        vectors = {row[0]: np.asarray(row[5], np.float32) for row in found} if request.with_vectors else {}
        lists = [[Hit(chunks[seq], float(score), vectors.get(seq)) for seq, score in rows] for rows in ranked]
        return store_result(lists, request.k, request.fusion)

    def _dense(self, conn: psycopg.Connection, vector: np.ndarray, dim: int, depth: int, generation: int,
               total: int, restriction: _Restriction) -> list[tuple[int, float]]:
        """The `depth` best (seq, cosine) among the chunks `restriction` allows: by the HNSW graph when they are
        many, exactly when they are few or the graph walk came back short."""
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != dim:
            raise StoreError(f"query has {query.shape[0]} dims, the index {dim}")
        params = {**restriction.params, "query": _vector_text(query), "depth": depth}
        allowed = total
        if restriction.conditions:
            allowed = self._memoised_count(
                conn, generation, restriction.key,
                f"SELECT count(*) FROM chunks c WHERE {' AND '.join(restriction.conditions)}", restriction.params,
            )
            if allowed == 0:
                return []
        few = bool(restriction.conditions) and allowed <= self._exact_search_rows
        if dim <= HNSW_MAX_DIMS and not few:
            conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                (str(min(max(self._ef_search, depth), MAX_EF_SEARCH)),),
            )
            rows = conn.execute(dense_sql(restriction.conditions, exact=False), params).fetchall()
            if len(rows) >= min(depth, allowed):
                return rows
            log.info("the HNSW walk found %d of %d allowed chunks: ranking them exactly", len(rows), allowed)
        return conn.execute(dense_sql(restriction.conditions, exact=True), params).fetchall()

    def _keyword(self, conn: psycopg.Connection, text: str, depth: int, generation: int, total: int,
                 restriction: _Restriction) -> list[tuple[int, float]]:
        """BM25-like scores of the chunks `restriction` allows that hold one of the query's scored terms."""
        terms = [_hyphenated(term) for term in keywords.query_terms(text)]
        if not terms:
            return []
        queries = conn.execute(
            f"SELECT plainto_tsquery('{self._text_config}', term)::text FROM unnest(%s::text[]) WITH ORDINALITY "
            "AS t(term, place) ORDER BY place",
            (terms,),
        ).fetchall()
        distinct = list(dict.fromkeys(query for (query,) in queries if query))
        scored = self._scored_queries(conn, generation, total, distinct)
        if not scored:
            return []
        params: dict[str, Any] = {**restriction.params, "depth": depth,
                                  "weights": RANK_WEIGHTS,
                                  "any": " | ".join(f"({query})" for query, _ in scored)}
        parts = []
        for number, (query, count) in enumerate(scored):
            params[f"term{number}"], params[f"idf{number}"] = query, math.log(1 + (total - count + 0.5) / (count + 0.5))
            parts.append(
                f"%(idf{number})s * ts_rank_cd(%(weights)s::real[], c.keywords, %(term{number})s::tsquery, 32)"
            )
        return conn.execute(
            f"SELECT c.seq, ({' + '.join(parts)}) AS score FROM chunks c "
            f"WHERE c.keywords @@ %(any)s::tsquery{restriction.sql} "
            'ORDER BY score DESC, c.chunk_id COLLATE "C" LIMIT %(depth)s',
            params,
        ).fetchall()

    def _scored_queries(self, conn: psycopg.Connection, generation: int, total: int,
                        queries: list[str]) -> list[tuple[str, int]]:
        """The term queries worth scoring (see keywords.scored_terms), with how many chunks match each."""
        cutoff = keywords.common_cutoff(total)
        cap = None if total <= cutoff else cutoff + 1
        counts = {query: self._term_count(conn, generation, query, cap) for query in queries}
        if cap is not None and not any(0 < count <= cutoff for count in counts.values()):
            counts = {query: self._term_count(conn, generation, query, None) for query in queries}
        return [(query, counts[query]) for query in keywords.scored_terms(queries, counts, cutoff)]

    def _term_count(self, conn: psycopg.Connection, generation: int, query: str, cap: int | None) -> int:
        """How many chunks match `query` (or `cap`, if at least that many), counted once per generation."""
        with self._memo_lock:
            if self._memo_generation != generation:
                self._memo_generation, self._term_counts = generation, {}
                self._counts.clear()
            if len(self._term_counts) > keywords.MAX_COUNTED_TERMS:
                self._term_counts = {}
            count, counted_to = self._term_counts.get(query, (None, None))
        if count is None or (cap is None and counted_to is not None and count >= counted_to):
            count = int(conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM chunks WHERE keywords @@ %s::tsquery LIMIT %s) matching",
                (query, cap),
            ).fetchone()[0])
            with self._memo_lock:
                if self._memo_generation == generation:
                    self._term_counts[query] = (count, cap)
        return count if cap is None else min(count, cap)

    def close(self) -> None:
        self._pool.close()
