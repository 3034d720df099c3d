"""The Milvus store: a Milvus server by URL, or Milvus Lite (embedded, one file) for a single machine.

Milvus has no transactions across rows, so the guarantees of the other
stores (store/base.py) are kept by versioned writes. Three collections hold an
index named `<collection>`: `<collection>_chunks` (one row per chunk of one
version of a document: text, metadata, vector, keyword terms, and the
document's tenant and groups), `<collection>_documents` (the manifest: one row
per document naming its current version) and `<collection>_meta` (meta
values, filter field types, the store's id and generation). Every call reads
and writes at consistency level Strong, so a read sees every write before it.

- **Writes** of a document put its new chunks under a new version id (one
  insert), record field types, then switch the document's manifest row to that
  version (a single-row upsert: the commit point), write a new generation,
  and delete the rows of older versions. A kill before the switch leaves the
  old version current and whole; one after it, the new one. `set_access` is a
  write too: it copies the chunks (byte-identical vectors) under the new
  access, so a scope can be a condition on the chunk rows.
- **Reads** never show two versions of a document or a half-written one: a
  search keeps only the hits whose (doc_id, version) the manifest names as
  current, read once after the search for all its lists together, and searches
  deeper (up to Milvus's top-k limit) when that left fewer than asked for. A
  search that overlaps a write of a document may miss that document; Milvus
  reads no two requests as of one moment, unlike PostgreSQL or SQLite.
- **Leftovers** of a killed write (rows of a version that never became current,
  or old rows not yet deleted) are invisible, and deleted by the next write of
  that document (every version older than its own) and by `persist()`
  (versions older than the current one, or unfinished for `LEFTOVER_AGE_S`).
  Writers take turns (`ragline ingest` holds the index's ingest lock): two
  processes writing one document at once could lose one of the writes.
- **Scope and filters** are one boolean expression in the search itself,
  never applied to its results: `tenant == t and array_contains_any(groups,
  [...])` on the chunk rows, and per filtered field `array_contains_any(tags,
  [...])`, where a chunk's `tags` hold `[field, value]` as JSON for each of
  its scalar values and list elements (so a list field matches any element,
  and `2` and `2.0` are one value). Milvus Lite has no expression templates,
  so values are string literals with `\\`, `"` and line breaks escaped
  (`_literal`); field names and value types are checked first
  (`check_filters`).
- **Dense search** is COSINE on a FLAT index in Milvus Lite (exact), HNSW on a
  server. **Keyword search** is Milvus's BM25 function over the code-aware
  terms of `keywords.index_text`, Porter-stemmed before Milvus sees them
  (`keywords.porter_stems`, the local store's FTS5 tokenizer: Milvus Lite's
  analyzer has no stemmer) and split by the `standard` tokenizer, which keeps `read_csv`
  whole. The heading's terms are written `HEADING_WEIGHT` times before the
  body's: BM25's term-frequency saturation makes a heading occurrence weigh
  less than double, but always more than a body one. Milvus computes idf
  itself, so every query term is scored (`keywords.scored_terms` is for FTS5).
  Its BM25 statistics are kept per segment and count deleted rows, and Milvus
  Lite does not compact: keyword scores depend on the history of writes and
  flushes, not only on what the index holds (dense scores do not).
- **Ties** rank by chunk id (store/fusion.py `store_result`, lists read
  `TIE_SLACK` deeper than k); hybrid search fuses the two lists there too.
- **Milvus Lite** (3.x) serves a file from a gRPC server on threads of the
  opening process (no child process) and locks the file: a second process
  opening it fails with a StoreError. Handles of one process share the
  server, which stops when the last of them closes. Rows wait in its write
  buffer, searched by brute force, until `persist()` flushes them. A server
  URL (with `store.api_key` as token) goes through the same code; no Milvus
  server was at hand, so only Milvus Lite is tested.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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

CONSISTENCY = "Strong"
MAX_TOP_K = 16_384
"""Milvus's largest search limit and query window: how deep a search reads when stale rows crowd its top."""
MAX_TEXT = 65_535
"""Milvus's longest VARCHAR, in bytes: the longest chunk text, meta value or filter tag; keyword terms past it are
left out."""
MAX_ID = 4_096
MAX_LIST = 4_096
"""Milvus's longest ARRAY: the most access groups of a document and filter tags of a chunk."""
IN_BATCH = 1_000
"""Ids per `in [...]` expression when looking many up (an expression is parsed on every call)."""
FLUSH_EVERY_ROWS = 5_000
"""Milvus Lite scans unflushed rows by brute force, and every write looks up and deletes rows by expression:
without a flush now and then, a long ingest slows down as it goes (each write scanning all rows before it)."""
LEFTOVER_AGE_S = 600.0
"""A version that is not current and was started this long ago is a killed write's: `persist()` deletes it."""
DUMMY_VECTOR = [1.0, 0.0]
"""Milvus collections need a vector field: manifest and meta rows carry this one."""
RECORD_FIELDS = ("source", "root", "size", "mtime_ns", "sha256", "fingerprint", "status", "error", "updated_at",
                 "dependencies")
CHUNK_FIELDS = ["chunk_id", "doc_id", "version", "position", "text", "metadata"]
COPIED_FIELDS = [*CHUNK_FIELDS, "tags", "keywords", "embedding"]
"""What `set_access` reads of a chunk to write it again under new access (the BM25 field is derived)."""
STORE_KEYS = ("store_id", "generation")
"""Meta rows of the store itself (kind "store"): they survive `clear()` and are not `get_meta` values."""


def _new_version() -> str:
    """A version id that sorts by when its write started (fixed-width hex nanoseconds, then random)."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def _version_age_s(version: str) -> float:
    return (time.time_ns() - int(version[:16], 16)) / 1e9


def _checked_access(doc_id: str, tenant: str, groups: Sequence[str]) -> tuple[str, list[str]]:
    """`checked_access`, and within what Milvus's fields hold (ids of `MAX_ID` bytes, `MAX_LIST` groups)."""
    tenant, groups = checked_access(tenant, groups)
    too_long = [name for name in (doc_id, tenant, *groups) if len(name.encode("utf-8", "surrogatepass")) > MAX_ID]
    if too_long or len(groups) > MAX_LIST:
        problem = f"{too_long[0][:80]!r} is over {MAX_ID} bytes" if too_long else f"{len(groups)} groups"
        raise StoreError(f"cannot store {doc_id[:80]!r} in Milvus: {problem} (it keeps ids of up to {MAX_ID} bytes "
                         f"and up to {MAX_LIST} groups)")
    return tenant, groups


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _literal(value: Any) -> str:
    """A value as a Milvus expression literal: strings double-quoted with `\\`, `"` and line breaks escaped (the
    escapes Milvus Lite and the server both read), so no user value can end the string and add conditions."""
    if isinstance(value, str):
        return f'"{value.translate(_ESCAPES)}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_literal, value)) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"no Milvus literal for {value!r:.80}")


def _tag(name: str, value: Any) -> str:
    """What a chunk's `tags` array holds for one metadata value (and a filter asks for): the field and the value
    as JSON, whole floats written as ints so that `score: 2` and `score: 2.0` are one value."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps([name, value])


def _tags(metadata: dict) -> list[str]:
    """A chunk's filter tags: one per scalar field, one per distinct element of a list field."""
    tags = {
        _tag(name, item)
        for name, value in metadata.items()
        for item in (value if isinstance(value, list) else [value])
        if isinstance(item, (str, int, float)) and not (isinstance(item, float) and not math.isfinite(item))
    }
    return sorted(tag for tag in tags if len(tag.encode("utf-8", "surrogatepass")) <= MAX_TEXT)


def _scope_expr(scope: Scope) -> str:
    """The rows (chunks or manifest) `scope` may read (`Scope.allows`)."""
    if scope.groups is None:
        return f"tenant == {_literal(scope.tenant)}"
    groups = sorted(scope.groups | {EVERYONE})
    return f"tenant == {_literal(scope.tenant)} and array_contains_any(groups, {_literal(groups)})"


def _filter_expr(wanted: dict[str, list]) -> list[str]:
    """One condition per field: a chunk's tags hold one of its values (as itself or as an element of a list)."""
    return [f"array_contains_any(tags, {_literal([_tag(name, value) for value in values])})"
            for name, values in sorted(wanted.items())]


def _joined(conditions: Iterable[str]) -> str:
    return " and ".join(f"({condition})" for condition in conditions)


def _keyword_texts(chunks: Sequence[Chunk]) -> list[str]:
    """What each chunk's BM25 field is given: its heading's stems `HEADING_WEIGHT` times, then its body's."""
    headings = keywords.porter_stems([keywords.index_text(keywords.heading_text(chunk.metadata)) for chunk in chunks])
    bodies = keywords.porter_stems([keywords.index_text(chunk.text) for chunk in chunks])
    texts = []
    for heading, body in zip(headings, bodies):
        text = " ".join(heading * round(keywords.HEADING_WEIGHT) + body)
        encoded = text.encode()
        if len(encoded) > MAX_TEXT:
            text = encoded[:MAX_TEXT].decode(errors="ignore").rsplit(" ", 1)[0]
        texts.append(text)
    return texts


def _record(row: dict, chunk_ids: list[str]) -> DocumentRecord:
    record = row["record"]
    return DocumentRecord(doc_id=row["doc_id"], **{name: record[name] for name in RECORD_FIELDS},
                          tenant=row["tenant"], groups=list(row["groups"]), chunk_ids=chunk_ids)


def _hit_score(distance: float, metric: str) -> float:
    """Higher is better: Milvus Lite gives BM25 scores negated (as distances), a server as they are."""
    return abs(distance) if metric == "BM25" else distance


class _Servers:
    """Milvus Lite servers of this process, one per file, started by the first handle and stopped by the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[str, int] = {}

    def opened(self, path: str) -> None:
        """Count a new handle on `path`; StoreError when another process has the file open (and its lock)."""
        from milvus_lite import DataDirLockedError, MilvusLite

        with self._lock:
            if path not in self._handles:  # this process's server, if any, is shared by its handles
                try:
                    MilvusLite(path).close()
                except DataDirLockedError as exc:
                    raise StoreError(
                        f"the Milvus Lite file {path} is open in another process, and Milvus Lite lets one process "
                        "open a file at a time: stop that process, or use a Milvus server (store.url: http://...)"
                    ) from exc
            self._handles[path] = self._handles.get(path, 0) + 1

    def closed(self, path: str) -> None:
        from milvus_lite.server_manager import server_manager_instance

        with self._lock:
            self._handles[path] -= 1
            if self._handles[path]:
                return
            del self._handles[path]
            server_manager_instance.release_server(path)


_servers = _Servers()


class MilvusStore:
    """Milvus (a server, or Milvus Lite in a file); see the module docstring for what is guaranteed and how."""

    def __init__(self, uri: str, token: str = "", collection: str = "ragline") -> None:
        from pymilvus import MilvusClient

        self.uri = uri
        self.lite = uri.endswith(".db")
        self._chunks, self._documents, self._meta = (f"{collection}_{part}" for part in ("chunks", "documents", "meta"))
        self._lite_path = os.path.abspath(uri) if self.lite else None
        self._closed = False
        self._unflushed_rows = 0
        if self._lite_path:
            Path(self._lite_path).parent.mkdir(parents=True, exist_ok=True)
            _servers.opened(self._lite_path)
        try:
            self._client = MilvusClient(uri=uri, token=token)
            self._create_collections()
        except Exception as exc:
            self._release()
            if isinstance(exc, StoreError):
                raise
            where = f"the Milvus Lite file {uri}" if self.lite else f"Milvus at {uri}"
            raise StoreError(f"cannot open {where}: {exc}; check store.url and store.api_key") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> MilvusStore:
        store = settings.store
        uri = store.url.get_secret_value() if store.url else str(settings.data_dir / "milvus.db")
        if not uri.endswith(".db") and not uri.startswith(("http://", "https://")):
            raise StoreError("store.url for milvus must be an http(s):// server or a Milvus Lite file ending .db, "
                             f"not {uri[:80]!r}")
        return cls(uri, store.api_key.get_secret_value() if store.api_key else "", store.collection)

    def _release(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
        if self._lite_path:
            _servers.closed(self._lite_path)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    # -- collections --------------------------------------------------------

    def _create_collections(self) -> None:
        """The manifest and meta collections (the chunks' waits for the first vectors: it needs their dimension),
        and the store's id."""
        from pymilvus import DataType

        for name, fields in (
            (self._documents, [
                ("doc_id", DataType.VARCHAR, {"max_length": MAX_ID, "is_primary": True}),
                ("version", DataType.VARCHAR, {"max_length": 64}),
                ("tenant", DataType.VARCHAR, {"max_length": MAX_ID}),
                ("groups", DataType.ARRAY, {"element_type": DataType.VARCHAR, "max_capacity": MAX_LIST,
                                            "max_length": MAX_ID}),
                ("chunks", DataType.INT64, {}),
                ("record", DataType.JSON, {}),
            ]),
            (self._meta, [
                ("key", DataType.VARCHAR, {"max_length": MAX_TEXT, "is_primary": True}),
                ("kind", DataType.VARCHAR, {"max_length": 16}),
                ("value", DataType.VARCHAR, {"max_length": MAX_TEXT}),
            ]),
        ):
            if self._client.has_collection(name):
                continue
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            for field_name, data_type, options in fields:
                schema.add_field(field_name, data_type, **options)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=len(DUMMY_VECTOR))
            index = self._client.prepare_index_params()
            index.add_index("dummy", index_type="FLAT", metric_type="L2")
            self._create(name, schema, index)
        for name in (self._documents, self._meta, self._chunks):  # a restarted server starts with all released
            if self._client.has_collection(name):
                self._client.load_collection(name)
        if self._meta_value("store", "store_id") is None:
            self._put_meta("store", "store_id", secrets.token_hex(8))

    def _create(self, name: str, schema: Any, index: Any) -> None:
        """Create, index and load a collection unless another handle just did. The index is not waited for
        (`sync=False`): pymilvus's wait polls every 0.5 s, with a call that Milvus Lite lacks; loading waits."""
        try:
            self._client.create_collection(name, schema=schema, consistency_level=CONSISTENCY)
        except Exception:
            if not self._client.has_collection(name):
                raise
            return
        self._client.create_index(name, index, sync=False)
        self._client.load_collection(name)

    def _chunks_dim(self) -> int | None:
        """The dimension of the chunks' vectors, or None before the first ones (or after `clear()`)."""
        if not self._client.has_collection(self._chunks):
            return None
        fields = self._client.describe_collection(self._chunks)["fields"]
        (embedding,) = [field for field in fields if field["name"] == "embedding"]
        return int(embedding["params"]["dim"])

    def _create_chunks(self, dim: int) -> None:
        from pymilvus import DataType, Function, FunctionType

        schema = self._client.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        for name in ("chunk_id", "doc_id", "tenant"):
            schema.add_field(name, DataType.VARCHAR, max_length=MAX_ID)
        schema.add_field("version", DataType.VARCHAR, max_length=64)
        schema.add_field("position", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_LIST,
                         max_length=MAX_TEXT)
        schema.add_field("groups", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_LIST,
                         max_length=MAX_ID)
        schema.add_field("keywords", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True,
                         analyzer_params={"tokenizer": "standard"})
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["keywords"],
                                     output_field_names=["sparse"]))
        index = self._client.prepare_index_params()
        if self.lite:
            index.add_index("embedding", index_type="FLAT", metric_type="COSINE")
        else:
            index.add_index("embedding", index_type="HNSW", metric_type="COSINE", params={"M": 16,
                                                                                          "efConstruction": 200})
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self._create(self._chunks, schema, index)

    # -- low-level reads ----------------------------------------------------

    def _query(self, collection: str, expr: str, fields: list[str]) -> list[dict]:
        """Every row of `collection` that `expr` matches (one query, or an iterator past Milvus's query window)."""
        rows = self._client.query(collection, filter=expr, output_fields=fields, limit=MAX_TOP_K,
                                  consistency_level=CONSISTENCY)
        if len(rows) < MAX_TOP_K:
            return list(rows)
        iterator = self._client.query_iterator(collection, batch_size=MAX_TOP_K // 4, filter=expr,
                                               output_fields=fields, consistency_level=CONSISTENCY)
        rows = []
        try:
            while batch := iterator.next():
                rows += batch
        finally:
            iterator.close()
        return rows

    def _manifest(self, expr: str) -> dict[str, dict]:
        fields = ["doc_id", "version", "tenant", "groups", "chunks", "record"]
        return {row["doc_id"]: row for row in self._query(self._documents, expr, fields)}

    def _current_versions(self, doc_ids: Iterable[str]) -> dict[str, str]:
        """Each document's current version, as the manifest says now."""
        wanted = sorted(set(doc_ids))
        versions = {}
        for start in range(0, len(wanted), IN_BATCH):
            expr = f"doc_id in {_literal(wanted[start:start + IN_BATCH])}"
            versions.update((row["doc_id"], row["version"]) for row in self._query(self._documents, expr,
                                                                                     ["doc_id", "version"]))
        return versions

    def _current_rows(self, expr: str, fields: list[str]) -> list[dict]:
        """The chunk rows `expr` matches that belong to their document's current version."""
        if self._chunks_dim() is None:
            return []
        rows = self._query(self._chunks, expr, sorted({*fields, "doc_id", "version"}))
        current = self._current_versions(row["doc_id"] for row in rows)
        return [row for row in rows if current.get(row["doc_id"]) == row["version"]]

    def _meta_value(self, kind: str, key: str) -> str | None:
        rows = self._client.query(self._meta, filter=f"key == {_literal(f'{kind}:{key}')}", output_fields=["value"],
                                  consistency_level=CONSISTENCY)
        return rows[0]["value"] if rows else None

    def _put_meta(self, kind: str, key: str, value: str) -> None:
        if len(value.encode()) > MAX_TEXT:
            raise StoreError(f"meta value {key!r} is {len(value.encode())} bytes; Milvus keeps at most {MAX_TEXT}")
        self._client.upsert(self._meta, [{"key": f"{kind}:{key}", "kind": kind, "value": value,
                                          "dummy": DUMMY_VECTOR}])

    # -- writes -------------------------------------------------------------

    def _check_dim(self, dim: int) -> None:
        known = self._chunks_dim()
        if known is None:
            self._create_chunks(dim)
        elif known != dim:
            raise StoreError(
                f"the index holds {known}-d vectors but the embedder gives {dim}-d: rebuild with `ragline ingest --full`"
            )

    def _check_chunk_ids(self, doc_id: str, source: str, chunks: Sequence[Chunk]) -> None:
        """Refuse a chunk id used twice, or by a current version of another document."""
        chunk_ids = [chunk.chunk_id for chunk in chunks]
        if len(set(chunk_ids)) < len(chunk_ids):
            raise StoreError(f"{source}: a chunk id is used twice in one document")
        for chunk_id in chunk_ids:
            if len(chunk_id.encode()) > MAX_ID:
                raise StoreError(f"{source}: chunk id {chunk_id[:80]!r} is longer than {MAX_ID} bytes")
        taken = self._current_rows(f"chunk_id in {_literal(chunk_ids)} and doc_id != {_literal(doc_id)}",
                                   ["chunk_id"]) if chunk_ids else []
        if taken:
            raise StoreError(f"{source}: chunk id {taken[0]['chunk_id']!r} is used by document {taken[0]['doc_id']!r}")

    def _record_fields(self, metadatas: Iterable[dict]) -> None:
        """Widen the recorded type of each filterable field by the values in `metadatas` (before the switch)."""
        known = self.filter_fields()
        changed: dict[str, str] = {}
        for metadata in metadatas:
            for name, value in metadata.items():
                seen = value_type(value)
                current = changed.get(name, known.get(name))
                if seen is not None and seen != current:
                    changed[name] = seen if current is None else merge_types(current, seen)
        for name, type_name in changed.items():
            self._put_meta("field", name, type_name)

    def _insert_rows(self, rows: list[dict]) -> None:
        """A version's chunk rows, in one insert (one request: visible together)."""
        if rows:
            self._client.insert(self._chunks, rows)

    def _switch(self, doc_id: str, version: str, tenant: str, groups: list[str], chunks: int, record: dict) -> None:
        """The commit point of a write: the document's manifest row names `version` (one single-row upsert)."""
        self._client.upsert(self._documents, [{
            "doc_id": doc_id, "version": version, "tenant": tenant, "groups": groups, "chunks": chunks,
            "record": record, "dummy": DUMMY_VECTOR,
        }])
        self._bump()

    def _bump(self) -> None:
        """A new generation: `index_version()` changes (written after the switch it stands for)."""
        self._put_meta("store", "generation", secrets.token_hex(8))

    def _collect(self, doc_id: str, version: str) -> None:
        """Delete the rows of `doc_id`'s versions older than `version`: its previous one and killed writes'."""
        if self._chunks_dim() is not None:
            self._client.delete(self._chunks, filter=f"doc_id == {_literal(doc_id)} and version < {_literal(version)}")

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise StoreError(f"{len(chunks)} chunks but {len(vectors)} vectors for {record.source}")
        vectors = np.asarray(vectors, dtype=np.float32)
        tenant, groups = _checked_access(record.doc_id, record.tenant, record.groups)
        if len(chunks):
            self._check_dim(int(vectors.shape[1]))
        self._check_chunk_ids(record.doc_id, record.source, chunks)
        version = _new_version()
        rows = []
        for position, (chunk, vector, keyword_text) in enumerate(zip(chunks, vectors, _keyword_texts(chunks))):
            if len(chunk.text.encode()) > MAX_TEXT:
                raise StoreError(f"{record.source}: chunk {chunk.chunk_id!r} is over Milvus's {MAX_TEXT} bytes")
            tags = _tags(chunk.metadata)
            if len(tags) > MAX_LIST:
                raise StoreError(f"{record.source}: chunk {chunk.chunk_id!r} has {len(tags)} filterable values; "
                                 f"Milvus keeps at most {MAX_LIST}")
            rows.append({
                "chunk_id": chunk.chunk_id, "doc_id": record.doc_id, "version": version, "position": position,
                "text": chunk.text, "metadata": chunk.metadata, "tags": tags, "tenant": tenant, "groups": groups,
                "keywords": keyword_text, "embedding": vector.tolist(),
            })
        self._insert_rows(rows)
        self._record_fields(chunk.metadata for chunk in chunks)
        stored = {name: getattr(record, name) for name in RECORD_FIELDS}
        stored["updated_at"] = record.updated_at or utc_now()
        self._switch(record.doc_id, version, tenant, groups, len(chunks), stored)
        self._collect(record.doc_id, version)
        self._unflushed_rows += len(rows)
        if self.lite and self._unflushed_rows >= FLUSH_EVERY_ROWS:
            self._client.flush(self._chunks)
            self._unflushed_rows = 0

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        row = self._manifest(f"doc_id == {_literal(doc_id)}").get(doc_id)
        if row is None:
            raise StoreError(f"cannot touch {doc_id!r}: no such document in the manifest")
        row["record"].update(size=size, mtime_ns=mtime_ns)
        self._client.upsert(self._documents, [{**row, "dummy": DUMMY_VECTOR}])

    def set_access(self, doc_id: str, tenant: str, groups: Sequence[str]) -> None:
        """A new version of the document: its chunks copied under the new access (vectors byte for byte)."""
        tenant, groups = _checked_access(doc_id, tenant, groups)
        row = self._manifest(f"doc_id == {_literal(doc_id)}").get(doc_id)
        if row is None:
            raise StoreError(f"cannot set the access of {doc_id!r}: no such document in the manifest")
        version = _new_version()
        copies = []
        if row["chunks"]:
            expr = f"doc_id == {_literal(doc_id)} and version == {_literal(row['version'])}"
            for chunk in self._query(self._chunks, expr, COPIED_FIELDS):
                chunk.pop("pk", None)
                copies.append({**chunk, "version": version, "tenant": tenant, "groups": groups})
        self._insert_rows(copies)
        self._switch(doc_id, version, tenant, groups, row["chunks"], row["record"])
        self._collect(doc_id, version)

    def delete_document(self, doc_id: str) -> None:
        self._client.delete(self._documents, filter=f"doc_id == {_literal(doc_id)}")
        self._bump()
        if self._chunks_dim() is not None:
            self._client.delete(self._chunks, filter=f"doc_id == {_literal(doc_id)}")

    def clear(self) -> None:
        """Remove every chunk (forgetting their dimension), manifest row, field type and meta value."""
        if self._client.has_collection(self._chunks):
            self._client.drop_collection(self._chunks)
        self._client.delete(self._documents, filter='doc_id != ""')
        self._client.delete(self._meta, filter=f'kind != {_literal("store")}')
        self._bump()

    def set_meta(self, key: str, value: str) -> None:
        self._put_meta("meta", key, value)

    def persist(self) -> None:
        """Delete what killed writes left (rows of versions older than their document's current one, and of
        versions that never became current and were started `LEFTOVER_AGE_S` ago), then flush: Milvus Lite
        searches rows still in its write buffer (up to 128 MB) by brute force, ~10x slower than flushed ones.
        Data is durable without it (Milvus's write-ahead log)."""
        if self._chunks_dim() is not None:
            self._collect_leftovers()
        for name in (self._chunks, self._documents, self._meta):
            if self._client.has_collection(name):
                self._client.flush(name)

    def _collect_leftovers(self) -> None:
        current = {doc_id: row["version"] for doc_id, row in self._manifest('doc_id != ""').items()}
        stale = set()
        for row in self._query(self._chunks, 'doc_id != ""', ["doc_id", "version"]):
            doc_id, version = row["doc_id"], row["version"]
            now = current.get(doc_id)
            if version != now and ((now is not None and version < now) or _version_age_s(version) > LEFTOVER_AGE_S):
                stale.add((doc_id, version))
        for doc_id, version in sorted(stale):
            self._client.delete(self._chunks,
                                filter=f"doc_id == {_literal(doc_id)} and version == {_literal(version)}")
        if stale:  # one may be a write killed between its switch and its new generation
            self._bump()
            log.info("deleted %d leftover versions of killed writes", len(stale))

    # -- reads --------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        return self._meta_value("meta", key)

    def filter_fields(self) -> dict[str, str]:
        rows = self._query(self._meta, 'kind == "field"', ["key", "value"])
        return {row["key"][len("field:"):]: row["value"] for row in sorted(rows, key=lambda row: row["key"])}

    def index_version(self) -> str:
        rows = self._client.query(self._meta, filter=f"key in {_literal([f'store:{key}' for key in STORE_KEYS])}",
                                  output_fields=["key", "value"], consistency_level=CONSISTENCY)
        values = {row["key"]: row["value"] for row in rows}
        return f"{values['store:store_id']}-{values.get('store:generation', '0')}"

    def _chunk_ids(self, expr: str) -> dict[str, list[str]]:
        """The chunk ids of the current versions of the documents `expr` matches, in reading order."""
        rows = sorted(self._current_rows(expr, ["chunk_id", "position"]), key=lambda row: row["position"])
        chunk_ids: dict[str, list[str]] = {}
        for row in rows:
            chunk_ids.setdefault(row["doc_id"], []).append(row["chunk_id"])
        return chunk_ids

    def documents(self, scope: Scope | None = None) -> list[DocumentRecord]:
        expr = 'doc_id != ""' if scope is None else _scope_expr(scope)
        manifest = self._manifest(expr)
        chunk_ids = self._chunk_ids(expr)
        rows = sorted(manifest.values(), key=lambda row: (row["record"]["source"], row["doc_id"]))
        return [_record(row, chunk_ids.get(row["doc_id"], [])) for row in rows]

    def document(self, doc_id: str) -> DocumentRecord | None:
        row = self._manifest(f"doc_id == {_literal(doc_id)}").get(doc_id)
        if row is None:
            return None
        return _record(row, [chunk.chunk_id for chunk in self._chunks_of(row)])

    def _chunks_of(self, row: dict, with_vectors: bool = False) -> list[Chunk] | tuple[list[Chunk], np.ndarray]:
        """The chunks of the manifest row's version, in reading order (and their vectors)."""
        expr = f"doc_id == {_literal(row['doc_id'])} and version == {_literal(row['version'])}"
        fields = CHUNK_FIELDS + (["embedding"] if with_vectors else [])
        found = [] if not row["chunks"] or self._chunks_dim() is None else self._query(self._chunks, expr, fields)
        found.sort(key=lambda chunk: chunk["position"])
        chunks = [Chunk(item["chunk_id"], item["doc_id"], item["text"], item["metadata"]) for item in found]
        if not with_vectors:
            return chunks
        dim = self._chunks_dim() or 0
        return chunks, np.array([item["embedding"] for item in found], dtype=np.float32).reshape(len(found), dim)

    def export_document(self, doc_id: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        row = self._manifest(f"doc_id == {_literal(doc_id)}").get(doc_id)
        if row is None:
            return None
        chunks, vectors = self._chunks_of(row, with_vectors=True)
        return _record(row, [chunk.chunk_id for chunk in chunks]), chunks, vectors

    def document_chunks(self, doc_id: str) -> list[Chunk]:
        row = self._manifest(f"doc_id == {_literal(doc_id)}").get(doc_id)
        return [] if row is None else self._chunks_of(row)

    def count(self, filters: Filters | None = None, scope: Scope | None = None) -> int:
        wanted = check_filters(filters, self.filter_fields())
        if any(not values for values in wanted.values()):
            return 0
        if not wanted:  # the manifest counts each current version's chunks
            manifest = self._manifest('doc_id != ""' if scope is None else _scope_expr(scope))
            return sum(row["chunks"] for row in manifest.values())
        conditions = _filter_expr(wanted) + ([] if scope is None else [_scope_expr(scope)])
        return len(self._current_rows(_joined(conditions), ["pk"]))

    def search(self, request: SearchRequest) -> list[Hit]:
        wanted = check_filters(request.filters, self.filter_fields()) if request.filters is not None else {}
        dim = self._chunks_dim()
        if dim is None or any(not values for values in wanted.values()):
            return []
        expr = _joined([_scope_expr(request.scope), *_filter_expr(wanted)])
        depth = request.k + TIE_SLACK
        searches: list[tuple[Any, str, str]] = []  # (data, field, metric) per list
        if request.mode != "keyword":
            query = np.asarray(request.vector, dtype=np.float32).reshape(-1)
            if query.shape[0] != dim:
                raise StoreError(f"query has {query.shape[0]} dims, the index {dim}")
            searches.append((query.tolist(), "embedding", "COSINE"))
        if request.mode != "dense":
            terms = " ".join(keywords.porter_stems([" ".join(keywords.query_terms(request.text))])[0])
            searches.append((terms, "sparse", "BM25"))
        fields = CHUNK_FIELDS + (["embedding"] if request.with_vectors else [])
        lists = self._current_hits(searches, expr, fields, depth)
        return store_result(lists, request.k, request.fusion)

    def _current_hits(self, searches: list[tuple[Any, str, str]], expr: str, fields: list[str],
                      depth: int) -> list[list[Hit]]:
        """Each search's hits of current versions only, checked against one manifest read made after all of them;
        a search whose stale hits left fewer than `depth` is run again deeper (so are the others, for one read)."""
        limits = [depth] * len(searches)
        while True:
            found = [self._search_rows(data, field, metric, expr, fields, limit)
                     for (data, field, metric), limit in zip(searches, limits)]
            current = self._current_versions(row["doc_id"] for rows in found for row, _ in rows)
            kept = [[(row, score) for row, score in rows if current.get(row["doc_id"]) == row["version"]]
                    for rows in found]
            short = [number for number, rows in enumerate(kept)
                     if len(rows) < depth and len(found[number]) == limits[number] < MAX_TOP_K]
            if not short:
                break
            for number in short:
                limits[number] = min(limits[number] * 4, MAX_TOP_K)
        return [[Hit(Chunk(row["chunk_id"], row["doc_id"], row["text"], row["metadata"]), score,
                     np.asarray(row["embedding"], np.float32) if "embedding" in row else None)
                 for row, score in rows] for rows in kept]

    def _search_rows(self, data: Any, field: str, metric: str, expr: str, fields: list[str],
                     limit: int) -> list[tuple[dict, float]]:
        if metric == "BM25" and not data:
            return []
        params: dict[str, Any] = {"metric_type": metric}
        if field == "embedding" and not self.lite:
            params["params"] = {"ef": max(limit, 100)}
        try:
            results = self._client.search(self._chunks, data=[data], anns_field=field, limit=limit, filter=expr,
                                          output_fields=fields, search_params=params, consistency_level=CONSISTENCY)
        except Exception:
            if self._chunks_dim() is None:  # cleared by another handle meanwhile
                return []
            raise
        rows = [(dict(hit["entity"]), _hit_score(hit["distance"], metric)) for hit in results[0]]
        return [(row, score) for row, score in rows if metric != "BM25" or score > 0]
