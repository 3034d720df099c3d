"""The Qdrant store: a Qdrant server by URL, or the client's local mode in a folder (`data_dir/qdrant`).

Two collections per index: `<collection>_chunks` (each chunk with its
dense vector, its keyword vector and its payload) and `<collection>_documents`
(the manifest: one point per document, plus the field types and the meta
values, so that a reopened store knows them). Qdrant has no transaction
across points, so the guarantees of store/local.py are kept another way:

- **Versioned writes.** A document's chunks are written under a new version
  id (point ids are uuid5 of doc id, version and chunk id), then its
  manifest point, one atomic point write, switches to that version, then the
  old version's points are deleted. Before the new points are written, the
  manifest point lists the new version as `stale`; the switch lists the old
  one there instead. `set_access` writes the same chunks (byte-identical
  vectors) under a new version with the new access, and `delete_document`
  makes the manifest point a tombstone before deleting the points. A kill at
  any step leaves each document fully old or fully new; its leftovers are the
  `stale` versions, deleted by the next write of that document and by
  `persist()` (which also deletes points that no manifest point owns, as a
  killed `clear()` leaves them).
- **Reads** never see two versions of a document, nor a half-written one:
  every chunk query excludes the stale versions inside its filter, and the
  hits are checked against the manifest's current version of their document
  (a list that came back full and lost hits to the check is read deeper).
  `generation` (a meta point) is odd while a writer switches versions or
  marks one stale: a read that saw it change (or odd) starts over, so all its
  queries come from one state (a generation that stays odd is a killed
  writer's, and is read as it is). `index_version()` is the store's id and
  that generation, which every change of chunks or access moves.
- **Scope and filters** are conditions of the Qdrant query itself (payload
  filter), never applied to results afterwards: each chunk carries its
  document's tenant and groups, and `tags` (one JSON `[field, value]` per
  scalar and per list element, numbers written alike whether int or float),
  so a filter is one `match any` per field and a list field matches any of its
  elements. Field types are recorded before a write's points (widened only).
- **Dense search** is Qdrant's dot product over the vectors exactly as given:
  the cosine, for the unit vectors every embedder produces (as in
  store/local.py); `export_document` returns them bit for bit (Qdrant's
  cosine distance would renormalise them on write).
- **Keyword search** is BM25 over sparse vectors: the terms of
  `keywords.index_text` (code-aware), Porter-stemmed as the local store's
  FTS5 stems them (`keywords.porter_stems`), each an id by a stable hash (blake2b, 32 bits); a chunk's value
  for a term is BM25's saturated term frequency (k1 1.2, b 0.75 against a
  fixed average length, so that stored values never go stale), a heading
  occurrence counting `HEADING_WEIGHT` times a body one; Qdrant multiplies
  it by the idf it keeps itself (`Modifier.IDF`, ln(1 + (N - n + 0.5) /
  (n + 0.5)) over the points that have a keyword vector). Local mode honours
  the modifier (checked in tests/test_store_qdrant.py against that formula)
  and counts live points only; a server counts deleted points until it
  optimises its sparse index. Both count a killed write's leftovers until
  they are collected.
  A query scores its informative terms (`keywords.scored_terms`), counted
  per generation from the chunks' `terms` payload.
- **Ties** rank by chunk id (store/fusion.py `store_result`, lists read
  `TIE_SLACK` deeper than k).

Local mode (no `store.url`) keeps everything in a SQLite file under the
folder and holds an exclusive lock on it: one process at a time. Store
handles of that process share one client, so they see each other's writes at
once; a second process gets a StoreError saying what to do. Local mode is
Python over every point: each query evaluates its filter point by point, and
the client commits each point written in a SQLite transaction of its own
(4-13 ms each here), so it suits small indexes. A server (`http://…`, with
`store.api_key`) takes the same code path and serves any number of reading
processes; writes and `persist()` assume one writing process at a time (as
ingest's lock gives for one data_dir): two writers could interleave their
generation steps and collect each other's unswitched points. Only local mode
is tested here (no server is installed in this workplace). Durability: every
write waits for Qdrant to apply it (local mode writes through to its file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models

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

DENSE = "dense"
SPARSE = "keywords"
POINT_NAMESPACE = uuid.UUID("6f1c2d7e-3b8a-5e49-9a61-0c4b7d2e8f15")
"""Namespace of every point id (uuid5): Qdrant takes unsigned ints or UUIDs only."""
BM25_K1 = 1.2
BM25_B = 0.75
AVERAGE_TERMS = 200.0
"""The chunk length (index terms, headings weighted) BM25's length normalisation compares with: about that of a
chunk of the default model's 256 tokens once identifiers add their parts. Fixed, so stored values never go stale."""
WRITE_BATCH = 256
"""Points per upsert request."""
SCROLL_PAGE = 1_000
READ_ATTEMPTS = 20
"""How many times a read starts over because a writer switched versions meanwhile, before it fails."""
WRITER_WAIT_S = 2.0
"""How long a read waits for an odd generation (a writer mid-switch) to move before reading it as a killed one's."""
INTERNAL_META = ("generation", "store_id")
"""Meta values that belong to the store itself and survive `clear()`."""
RECORD_FIELDS = ("doc_id", "source", "root", "size", "mtime_ns", "sha256", "fingerprint", "status", "error",
                 "updated_at", "tenant", "groups", "dependencies", "chunk_ids")

T = TypeVar("T")


def _point_id(*parts: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, "\x1f".join(parts)))


def _document_id(doc_id: str) -> str:
    return _point_id("document", doc_id)


def _meta_id(key: str) -> str:
    return _point_id("meta", key)


FIELDS_ID = _point_id("fields")

def term_id(term: str) -> int:
    """A stemmed term's sparse index: a stable 32-bit hash (Python's `hash` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=4).digest(), "little")


def keyword_vector(text: str, metadata: dict) -> tuple[list[int], list[float]]:
    """A chunk's sparse vector: BM25's saturated frequency of each term, heading occurrences weighing more."""
    heading, body = keywords.porter_stems([keywords.index_text(keywords.heading_text(metadata)),
                                           keywords.index_text(text)])
    frequencies: Counter[int] = Counter()
    for term in heading:
        frequencies[term_id(term)] += keywords.HEADING_WEIGHT
    for term in body:
        frequencies[term_id(term)] += 1.0
    length = sum(frequencies.values())
    norm = BM25_K1 * (1 - BM25_B + BM25_B * length / AVERAGE_TERMS)
    indices = sorted(frequencies)
    return indices, [frequencies[i] * (BM25_K1 + 1) / (frequencies[i] + norm) for i in indices]


def query_term_ids(text: str) -> list[int]:
    """The distinct term ids of a query, in query order (stop words left out by `keywords.query_terms`)."""
    stems = keywords.porter_stems([" ".join(keywords.query_terms(text))])[0]
    return list(dict.fromkeys(term_id(term) for term in stems))


def _comparable(value: Any) -> Any:
    """A filterable value as tags hold it: a whole float as an int (a filter for 2 matches 2.0, as in SQL)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def tag(name: str, value: Any) -> str:
    return json.dumps([name, _comparable(value)])


def _tags(metadata: dict) -> list[str]:
    """One tag per scalar field and per element of a list field, repeats once."""
    found: dict[str, None] = {}
    for name, value in metadata.items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, list) and value_type(item) is not None:
                found[tag(name, item)] = None
    return list(found)


def _scope_conditions(scope: Scope | None) -> list[models.Condition]:
    """The payload conditions of `Scope.allows`, on chunks and manifest points alike."""
    if scope is None:
        return []
    tenant = models.FieldCondition(key="tenant", match=models.MatchValue(value=scope.tenant))
    conditions: list[models.Condition] = [tenant]
    if scope.groups is not None:
        groups = sorted(scope.groups | {EVERYONE})
        conditions.append(models.FieldCondition(key="groups", match=models.MatchAny(any=groups)))
    return conditions


def _chunk_filter(scope: Scope | None, wanted: dict[str, list], stale: Sequence[str]) -> models.Filter:
    """Chunks `scope` may read (None: all) that `wanted` matches, no stale version among them."""
    must = _scope_conditions(scope) + [
        models.FieldCondition(key="tags", match=models.MatchAny(any=[tag(name, value) for value in values]))
        for name, values in sorted(wanted.items())
    ]
    must_not = [models.FieldCondition(key="version", match=models.MatchAny(any=list(stale)))] if stale else []
    return models.Filter(must=must or None, must_not=must_not or None)


def _record(payload: dict) -> DocumentRecord:
    return DocumentRecord(**{name: payload[name] for name in RECORD_FIELDS})


def _chunk(payload: dict) -> Chunk:
    return Chunk(payload["chunk_id"], payload["doc_id"], payload["text"], payload["metadata"])


class _SharedClient:
    """One local-mode client per folder in this process (its lock admits one), shared by the store handles."""

    def __init__(self, client: QdrantClient) -> None:
        self.client = client
        self.lock = threading.RLock()
        self.handles = 0


_LOCAL_CLIENTS: dict[Path, _SharedClient] = {}
_LOCAL_CLIENTS_LOCK = threading.Lock()


def _open_local(path: Path) -> _SharedClient:
    with _LOCAL_CLIENTS_LOCK:
        shared = _LOCAL_CLIENTS.get(path)
        if shared is None:
            path.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=str(path))
            except RuntimeError as exc:
                if "already accessed" not in str(exc):
                    raise
                raise StoreError(
                    f"the Qdrant folder {path} is open in another process (local mode locks it for one process): "
                    "stop that process (a running `ragline serve` or ingest) first, or run a Qdrant server and set "
                    "store.url so that several processes can share the index"
                ) from exc
            shared = _LOCAL_CLIENTS[path] = _SharedClient(client)
        shared.handles += 1
        return shared


def _close_local(path: Path) -> None:
    with _LOCAL_CLIENTS_LOCK:
        shared = _LOCAL_CLIENTS[path]
        shared.handles -= 1
        if shared.handles == 0:
            del _LOCAL_CLIENTS[path]
            shared.client.close()


class QdrantStore:
    """Qdrant (server or local mode); versioned writes make each document's replacement atomic to readers."""

    def __init__(self, collection: str = "ragline", path: Path | None = None, url: str | None = None,
                 api_key: str | None = None) -> None:
        if (path is None) == (url is None):
            raise ValueError("a QdrantStore needs either a folder (local mode) or a server url")
        self.chunks_collection = f"{collection}_chunks"
        self.documents_collection = f"{collection}_documents"
        self._path = None if path is None else path.resolve()
        if self._path is not None:
            shared = _open_local(self._path)
            self._client, self._lock = shared.client, shared.lock
        else:
            self._client = QdrantClient(url=url, api_key=api_key)
            self._lock = threading.RLock()
        self._counts_generation = -1
        self._total = 0
        """Current chunks at generation `_counts_generation`."""
        self._term_counts: dict[int, int] = {}
        """term id -> current chunks holding it, at generation `_counts_generation`."""
        try:
            self._create_collections()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> QdrantStore:
        store = settings.store
        api_key = store.api_key.get_secret_value() if store.api_key else None
        if store.url:
            return cls(store.collection, url=store.url.get_secret_value(), api_key=api_key)
        return cls(store.collection, path=settings.data_dir / "qdrant")

    @property
    def _local(self) -> bool:
        return self._path is not None

    def _create_collections(self) -> None:
        with self._lock:
            if not self._client.collection_exists(self.documents_collection):
                self._client.create_collection(self.documents_collection, vectors_config={})
                if not self._local:
                    for name in ("kind", "tenant", "groups", "stale"):
                        self._client.create_payload_index(self.documents_collection, name,
                                                          models.PayloadSchemaType.KEYWORD)
            if self._get_meta("store_id") is None:
                self._put_meta("store_id", uuid.uuid4().hex[:16])
                self._put_meta("generation", "0")
            elif self._local and self._generation() % 2:  # a killed writer's; this process alone writes here
                self._put_meta("generation", str(self._generation() + 1))

    def _create_chunks_collection(self, dim: int) -> None:
        self._client.create_collection(
            self.chunks_collection,
            vectors_config={DENSE: models.VectorParams(size=dim, distance=models.Distance.DOT)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        if not self._local:  # local mode scans payloads and ignores indexes
            for name in ("doc_id", "version", "chunk_id", "tenant", "groups", "tags"):
                self._client.create_payload_index(self.chunks_collection, name, models.PayloadSchemaType.KEYWORD)
            self._client.create_payload_index(self.chunks_collection, "terms", models.PayloadSchemaType.INTEGER)

    # -- manifest points ------------------------------------------------------

    def _get_meta(self, key: str) -> str | None:
        points = self._client.retrieve(self.documents_collection, [_meta_id(key)], with_payload=True)
        return points[0].payload["value"] if points else None

    def _put_meta(self, key: str, value: str) -> None:
        self._client.upsert(self.documents_collection, [
            models.PointStruct(id=_meta_id(key), vector={}, payload={"kind": "meta", "key": key, "value": value}),
        ], wait=True)

    def _generation(self) -> int:
        return int(self._get_meta("generation") or 0)

    def _manifest(self, doc_id: str) -> dict | None:
        """A document's manifest point (live or not), or None."""
        points = self._client.retrieve(self.documents_collection, [_document_id(doc_id)], with_payload=True)
        return points[0].payload if points else None

    def _put_manifest(self, payload: dict) -> None:
        self._client.upsert(self.documents_collection, [
            models.PointStruct(id=_document_id(payload["doc_id"]), vector={}, payload={"kind": "document", **payload}),
        ], wait=True)

    def _stale_versions(self) -> list[str]:
        """Every version whose points may exist but are not a document's current ones."""
        owning = models.Filter(
            must=[models.FieldCondition(key="kind", match=models.MatchValue(value="document"))],
            must_not=[models.IsEmptyCondition(is_empty=models.PayloadField(key="stale"))],
        )
        return sorted({version for payload in self._scroll(self.documents_collection, owning, ["stale"])
                       for version in payload["stale"]})

    def _scroll_points(self, collection: str, scroll_filter: models.Filter | None, fields: Sequence[str] | bool = True,
                       vectors: Sequence[str] | bool = False) -> Iterator[models.Record]:
        """Every point matching the filter, page by page."""
        offset = None
        while True:
            points, offset = self._client.scroll(
                collection, scroll_filter=scroll_filter, limit=SCROLL_PAGE, offset=offset,
                with_payload=fields if isinstance(fields, bool) else list(fields), with_vectors=vectors,
            )
            yield from points
            if offset is None:
                return

    def _scroll(self, collection: str, scroll_filter: models.Filter | None, fields: Sequence[str]) -> Iterator[dict]:
        """The payload (`fields` of it) of every point matching the filter."""
        return (point.payload for point in self._scroll_points(collection, scroll_filter, fields))

    def _dim(self) -> int | None:
        dim = self._get_meta("dim")
        return None if dim is None else int(dim)

    # -- writes ---------------------------------------------------------------

    @contextmanager
    def _switching(self) -> Iterator[None]:
        """The generation odd while a writer changes what readers must see, then even and one step further."""
        generation = self._generation()
        self._put_meta("generation", str(generation + 1 + generation % 2))
        yield
        self._put_meta("generation", str(generation + 2 + generation % 2))

    def _check_dim(self, dim: int) -> None:
        """The first vectors fix the dimension (and create the chunk collection); later ones must match."""
        known = self._dim()
        if known is None:
            if self._client.collection_exists(self.chunks_collection):  # a kill came before the dimension was saved
                self._client.delete_collection(self.chunks_collection)
            self._create_chunks_collection(dim)
            self._put_meta("dim", str(dim))
        elif known != dim:
            raise StoreError(
                f"the index holds {known}-d vectors but the embedder gives {dim}-d: rebuild with "
                "`ragline ingest --full`"
            )

    def _check_chunk_ids(self, doc_id: str, chunk_ids: list[str]) -> None:
        """Refuse chunk ids given twice, or held by another document's current version."""
        repeated = [chunk_id for chunk_id, times in Counter(chunk_ids).items() if times > 1]
        if repeated:
            raise StoreError(f"{doc_id}: chunk id {repeated[0]!r} is used twice; chunk ids must be unique")
        if not chunk_ids or self._dim() is None:
            return
        others = models.Filter(
            must=[models.FieldCondition(key="chunk_id", match=models.MatchAny(any=chunk_ids))],
            must_not=[models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc_id))],
        )
        for payload in self._scroll(self.chunks_collection, others, ["doc_id", "version", "chunk_id"]):
            owner = self._manifest(payload["doc_id"])
            if owner is not None and owner.get("version") == payload["version"]:
                raise StoreError(f"{doc_id}: chunk id {payload['chunk_id']!r} is already used by document "
                                 f"{payload['doc_id']!r}; chunk ids must be unique")

    def _record_fields(self, metadatas: Iterable[dict]) -> None:
        """Widen the recorded type of each filterable field by the values in `metadatas`."""
        known = self._fields()
        changed = dict(known)
        for metadata in metadatas:
            for name, value in metadata.items():
                seen = value_type(value)
                current = changed.get(name)
                if seen is not None and seen != current:
                    changed[name] = seen if current is None else merge_types(current, seen)
        if changed != known:
            self._client.upsert(self.documents_collection, [
                models.PointStruct(id=FIELDS_ID, vector={}, payload={"kind": "fields", "types": changed}),
            ], wait=True)

    def _mark_stale(self, doc_id: str, manifest: dict | None, version: str) -> dict:
        """List `version` as stale in the manifest point before any of its points is written."""
        manifest = manifest or {"doc_id": doc_id, "live": False, "version": None, "stale": []}
        manifest = {**manifest, "stale": sorted({*manifest["stale"], version})}
        with self._switching():
            self._put_manifest(manifest)
        return manifest

    def _write_points(self, doc_id: str, version: str, tenant: str, groups: list[str],
                      points: Sequence[tuple[Chunk, list[float], models.SparseVector | None]]) -> None:
        """A version's points, each with its document's access; invisible to readers until the switch."""
        structs = []
        for position, (chunk, dense, sparse) in enumerate(points):
            vector: dict[str, Any] = {DENSE: dense}
            if sparse is not None and len(sparse.indices):
                vector[SPARSE] = sparse
            structs.append(models.PointStruct(
                id=_point_id(doc_id, version, chunk.chunk_id), vector=vector,
                payload={
                    "doc_id": doc_id, "version": version, "chunk_id": chunk.chunk_id, "position": position,
                    "text": chunk.text, "metadata": chunk.metadata, "tenant": tenant, "groups": groups,
                    "tags": _tags(chunk.metadata), "terms": [] if sparse is None else list(sparse.indices),
                },
            ))
        for start in range(0, len(structs), WRITE_BATCH):
            self._client.upsert(self.chunks_collection, structs[start:start + WRITE_BATCH], wait=True)

    def _switch(self, manifest: dict) -> None:
        """Make `manifest` (its `version`, or none: a tombstone) the document's current state, in one point write;
        the version it replaces becomes stale."""
        old = self._manifest(manifest["doc_id"]) or {"version": None, "stale": []}
        stale = set(old["stale"]) | ({old["version"]} if old["version"] else set())
        manifest = {**manifest, "stale": sorted(stale - {manifest["version"]})}
        with self._switching():
            self._put_manifest(manifest)

    def _collect(self, doc_id: str) -> None:
        """Delete the points of every version of `doc_id` but its current one, then forget its stale versions."""
        manifest = self._manifest(doc_id)
        current = manifest.get("version") if manifest else None
        if self._dim() is not None:
            leftovers = models.Filter(
                must=[models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc_id))],
                must_not=[models.FieldCondition(key="version", match=models.MatchValue(value=current))] if current
                else None,
            )
            self._client.delete(self.chunks_collection, models.FilterSelector(filter=leftovers), wait=True)
        if manifest is None:
            return
        if manifest["live"]:
            if manifest["stale"]:
                self._client.set_payload(self.documents_collection, {"stale": []}, [_document_id(doc_id)], wait=True)
        else:
            self._client.delete(self.documents_collection, models.PointIdsList(points=[_document_id(doc_id)]),
                                wait=True)

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise StoreError(f"{len(chunks)} chunks but {len(vectors)} vectors for {record.source}")
        vectors = np.asarray(vectors, dtype=np.float32)
        tenant, groups = checked_access(record.tenant, record.groups)
        chunk_ids = [chunk.chunk_id for chunk in chunks]
        points = []
        for chunk, dense in zip(chunks, vectors.tolist()):
            indices, values = keyword_vector(chunk.text, chunk.metadata)
            points.append((chunk, dense, models.SparseVector(indices=indices, values=values)))
        with self._lock:
            if len(chunks):
                self._check_dim(int(vectors.shape[1]))
            self._check_chunk_ids(record.doc_id, chunk_ids)
            self._record_fields(chunk.metadata for chunk in chunks)
            version = uuid.uuid4().hex[:16]
            self._mark_stale(record.doc_id, self._manifest(record.doc_id), version)
            self._write_points(record.doc_id, version, tenant, groups, points)
            self._switch({
                "doc_id": record.doc_id, "source": record.source, "root": record.root, "size": record.size,
                "mtime_ns": record.mtime_ns, "sha256": record.sha256, "fingerprint": record.fingerprint,
                "status": record.status, "error": record.error, "updated_at": record.updated_at or utc_now(),
                "dependencies": dict(record.dependencies), "tenant": tenant, "groups": groups,
                "chunk_ids": chunk_ids, "live": True, "version": version,
            })
            self._collect(record.doc_id)

    def _live_manifest(self, doc_id: str, action: str) -> dict:
        manifest = self._manifest(doc_id)
        if manifest is None or not manifest["live"]:
            raise StoreError(f"cannot {action} {doc_id!r}: no such document in the manifest")
        return manifest

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        with self._lock:
            self._live_manifest(doc_id, "touch")
            self._client.set_payload(self.documents_collection, {"size": size, "mtime_ns": mtime_ns},
                                     [_document_id(doc_id)], wait=True)

    def set_access(self, doc_id: str, tenant: str, groups: Sequence[str]) -> None:
        """The document's points written again under a new version with the new access (vectors as stored)."""
        tenant, groups = checked_access(tenant, groups)
        with self._lock:
            manifest = self._live_manifest(doc_id, "set the access of")
            stored = self._version_points(doc_id, manifest["version"], vectors=True) if manifest["chunk_ids"] else []
            points = [(_chunk(point.payload), point.vector[DENSE], point.vector.get(SPARSE)) for point in stored]
            version = uuid.uuid4().hex[:16]
            manifest = self._mark_stale(doc_id, manifest, version)
            self._write_points(doc_id, version, tenant, groups, points)
            self._switch({**manifest, "tenant": tenant, "groups": groups, "version": version})
            self._collect(doc_id)

    def delete_document(self, doc_id: str) -> None:
        with self._lock:
            manifest = self._manifest(doc_id)
            if manifest is not None:
                self._switch({"doc_id": doc_id, "live": False, "version": None, "stale": []})
            self._collect(doc_id)

    def clear(self) -> None:
        """Forget the dimension, delete the chunk collection, then every manifest point but the store's id and
        generation (a clear killed midway leaves nothing a reader or the next write trips over; rerun it)."""
        with self._lock, self._switching():
            self._client.delete(self.documents_collection, models.PointIdsList(points=[_meta_id("dim")]), wait=True)
            if self._client.collection_exists(self.chunks_collection):
                self._client.delete_collection(self.chunks_collection)
            internal = models.Filter(must_not=[models.HasIdCondition(has_id=[_meta_id(key) for key in INTERNAL_META])])
            self._client.delete(self.documents_collection, models.FilterSelector(filter=internal), wait=True)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._put_meta(key, value)

    def persist(self) -> None:
        """Collect what killed writes left: stale versions, tombstones, and points no manifest point owns (a killed
        clear()); the data itself is durable already."""
        with self._lock:
            manifests = list(self._scroll(self.documents_collection, models.Filter(
                must=[models.FieldCondition(key="kind", match=models.MatchValue(value="document"))],
            ), ["doc_id", "version", "stale"]))
            current = {manifest["doc_id"]: manifest["version"] for manifest in manifests}
            untidy = {manifest["doc_id"] for manifest in manifests if manifest["stale"] or manifest["version"] is None}
            if self._dim() is not None:
                untidy |= {payload["doc_id"] for payload in self._scroll(self.chunks_collection, None,
                                                                         ["doc_id", "version"])
                           if current.get(payload["doc_id"]) != payload["version"]}
            for doc_id in sorted(untidy):
                self._collect(doc_id)

    # -- reads ----------------------------------------------------------------

    def _reading(self) -> Any:
        """Local mode: the shared client's lock (its in-memory collections are not thread-safe); a server: none."""
        return self._lock if self._local else nullcontext()

    def _settled_generation(self) -> int:
        """The generation, once no writer is mid-switch (or, past WRITER_WAIT_S, a killed one's odd value)."""
        deadline = time.monotonic() + WRITER_WAIT_S
        generation = self._generation()
        while generation % 2 and not self._local:
            if time.monotonic() >= deadline:
                log.warning("generation %d stayed odd for %.1fs: reading the index as a killed writer left it (the "
                            "next write or persist() collects its leftovers)", generation, WRITER_WAIT_S)
                break
            time.sleep(0.01)
            generation = self._generation()
        return generation

    def _consistent(self, read: Callable[[int], T]) -> T:
        """`read(generation)` run until no writer switched a version while it ran: one state throughout."""
        with self._reading():
            for _ in range(READ_ATTEMPTS):
                generation = self._settled_generation()
                result = read(generation)
                if self._generation() == generation:
                    return result
        raise StoreError(f"the index changed under {READ_ATTEMPTS} reads in a row: a writer is switching documents "
                         "faster than this read can finish; retry")

    def get_meta(self, key: str) -> str | None:
        with self._reading():
            return self._get_meta(key)

    def _fields(self) -> dict[str, str]:
        points = self._client.retrieve(self.documents_collection, [FIELDS_ID], with_payload=True)
        return dict(sorted(points[0].payload["types"].items())) if points else {}

    def filter_fields(self) -> dict[str, str]:
        with self._reading():
            return self._fields()

    def index_version(self) -> str:
        with self._reading():
            return f"{self._get_meta('store_id')}-{self._generation()}"

    def documents(self, scope: Scope | None = None) -> list[DocumentRecord]:
        live = models.Filter(must=[
            models.FieldCondition(key="kind", match=models.MatchValue(value="document")),
            models.FieldCondition(key="live", match=models.MatchValue(value=True)),
            *_scope_conditions(scope),
        ])
        records = self._consistent(lambda _: [_record(payload) for payload in self._scroll(
            self.documents_collection, live, list(RECORD_FIELDS))])
        return sorted(records, key=lambda record: (record.source, record.doc_id))

    def document(self, doc_id: str) -> DocumentRecord | None:
        with self._reading():
            manifest = self._manifest(doc_id)
        return _record(manifest) if manifest and manifest["live"] else None

    def _version_points(self, doc_id: str, version: str, vectors: bool) -> list[models.Record]:
        """A version's points in reading order."""
        of_version = models.Filter(must=[
            models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc_id)),
            models.FieldCondition(key="version", match=models.MatchValue(value=version)),
        ])
        wanted_vectors = [DENSE, SPARSE] if vectors else False
        points = list(self._scroll_points(self.chunks_collection, of_version, vectors=wanted_vectors))
        return sorted(points, key=lambda point: point.payload["position"])

    def _current_points(self, doc_id: str, vectors: bool) -> tuple[dict, list[models.Record]] | None:
        manifest = self._manifest(doc_id)
        if manifest is None or not manifest["live"]:
            return None
        points = self._version_points(doc_id, manifest["version"], vectors) if manifest["chunk_ids"] else []
        return manifest, points

    def export_document(self, doc_id: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        found = self._consistent(lambda _: self._current_points(doc_id, vectors=True))
        if found is None:
            return None
        manifest, points = found
        chunks = [_chunk(point.payload) for point in points]
        dim = len(points[0].vector[DENSE]) if points else self._dim() or 0
        matrix = np.array([point.vector[DENSE] for point in points], dtype=np.float32).reshape(len(points), dim)
        return _record(manifest), chunks, matrix

    def document_chunks(self, doc_id: str) -> list[Chunk]:
        found = self._consistent(lambda _: self._current_points(doc_id, vectors=False))
        return [] if found is None else [_chunk(point.payload) for point in found[1]]

    def count(self, filters: Filters | None = None, scope: Scope | None = None) -> int:
        def counted(_: int) -> int:
            wanted = check_filters(filters, self._fields())
            if self._dim() is None or any(not values for values in wanted.values()):
                return 0
            chunk_filter = _chunk_filter(scope, wanted, self._stale_versions())
            return self._client.count(self.chunks_collection, count_filter=chunk_filter, exact=True).count

        return self._consistent(counted)

    def search(self, request: SearchRequest) -> list[Hit]:
        lists = self._consistent(lambda generation: self._ranked(request, generation))
        return store_result(lists, request.k, request.fusion)

    def _ranked(self, request: SearchRequest, generation: int) -> list[list[Hit]]:
        """The request's lists (dense, keyword or both), each `k + TIE_SLACK` deep, all as of `generation`."""
        wanted = check_filters(request.filters, self._fields()) if request.filters is not None else {}
        dim = self._dim()
        lists: list[list[Hit]] = [[] for _ in range(1 if request.mode != "hybrid" else 2)]
        if dim is None or any(not values for values in wanted.values()):
            return lists
        chunk_filter = _chunk_filter(request.scope, wanted, self._stale_versions())
        versions: dict[str, str | None] = {}
        depth = request.k + TIE_SLACK
        ranked = []
        if request.mode != "keyword":
            query = np.asarray(request.vector, dtype=np.float32).reshape(-1)
            if query.shape[0] != dim:
                raise StoreError(f"query has {query.shape[0]} dims, the index {dim}")
            ranked.append(self._query(query.tolist(), DENSE, chunk_filter, depth, request.with_vectors, versions))
        if request.mode != "dense":
            terms = self._scored_term_ids(query_term_ids(request.text), chunk_filter, generation)
            sparse = models.SparseVector(indices=terms, values=[1.0] * len(terms))
            ranked.append(self._query(sparse, SPARSE, chunk_filter, depth, request.with_vectors, versions)
                          if terms else [])
        return ranked

    def _query(self, query: Any, using: str, chunk_filter: models.Filter, depth: int, with_vectors: bool,
               versions: dict[str, str | None]) -> list[Hit]:
        """The `depth` best current chunks for one query: a hit of a version that is not its document's current
        one (a write under way) is dropped, and a list that lost hits that way is read deeper."""
        limit = depth
        while True:
            points = self._client.query_points(
                self.chunks_collection, query=query, using=using, query_filter=chunk_filter, limit=limit,
                with_payload=True, with_vectors=[DENSE] if with_vectors else False,
            ).points
            unknown = sorted({point.payload["doc_id"] for point in points} - set(versions))
            if unknown:
                found = self._client.retrieve(self.documents_collection, [_document_id(d) for d in unknown],
                                              with_payload=["doc_id", "version"])
                versions.update(dict.fromkeys(unknown))
                versions.update({point.payload["doc_id"]: point.payload["version"] for point in found})
            hits = [
                Hit(_chunk(point.payload), float(point.score),
                    np.asarray(point.vector[DENSE], np.float32) if with_vectors else None)
                for point in points if versions[point.payload["doc_id"]] == point.payload["version"]
            ]
            if len(points) < limit or len(hits) >= depth:
                return hits
            limit *= 2

    def _scored_term_ids(self, terms: list[int], chunk_filter: models.Filter, generation: int) -> list[int]:
        """`terms` less the common ones (see store/keywords.py); an index no larger than the cutoff keeps all."""
        if not terms:
            return []
        current = chunk_filter.must_not  # no stale version
        if self._counts_generation != generation or len(self._term_counts) > keywords.MAX_COUNTED_TERMS:
            total = self._client.count(self.chunks_collection, count_filter=models.Filter(must_not=current),
                                       exact=True).count
            self._term_counts, self._total, self._counts_generation = {}, total, generation
        counts, cutoff = self._term_counts, keywords.common_cutoff(self._total)
        if self._total <= cutoff:
            return terms
        for term in terms:
            if term not in counts:
                holding = models.Filter(must=[models.FieldCondition(key="terms", match=models.MatchValue(value=term))],
                                        must_not=current)
                counts[term] = self._client.count(self.chunks_collection, count_filter=holding, exact=True).count
        return keywords.scored_terms(terms, counts, cutoff)

    def close(self) -> None:
        if self._path is None:
            self._client.close()
        elif self._client is not None:
            self._client = None  # type: ignore[assignment]
            _close_local(self._path)
