"""The `VectorStore` protocol, its `SearchRequest`, the manifest record it keeps per source file, access scopes
and metadata filters.

A store owns both the chunks and the manifest, and replaces a document's
chunks and its manifest row in one transaction: that is what makes ingest
crash-safe (a killed run leaves each file either fully old or fully new).
A search sees one committed state of the store, even while another process
writes. Every document belongs to a tenant and carries access groups; every
search names a `Scope`, which the store applies inside the query, so an
out-of-scope chunk is never ranked, fetched or returned. A store records the
type of each metadata field it can filter on (`filter_fields()`);
`check_filters` validates filters against those types at every edge (store,
API, CLI) and raises `FilterError` (a ValueError) naming the problem and the
known fields. Every store passes tests/store_contract.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ragline.store.fusion import Fusion
from ragline.types import Chunk, Hit

Filters = Mapping[str, Any]
"""Metadata filters: `{"format": "pdf"}` (equals) or `{"source": {"$in": [...]}}` (any of)."""


class StoreError(RuntimeError):
    pass


DEFAULT_TENANT = "default"
EVERYONE = "*"
"""The access group of documents that everyone in their tenant may read."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Who is reading: a tenant and the access groups of the caller (None: every group of the tenant).

    A chunk is in scope when its document belongs to `tenant` and carries
    `EVERYONE` or one of `groups`. Every search names its scope; stores apply
    it inside the query, so nothing out of scope is ever read.
    """

    tenant: str
    groups: frozenset[str] | None

    @classmethod
    def everything(cls, tenant: str = DEFAULT_TENANT) -> Scope:
        """All of a tenant's documents: the operator's view (CLI, evaluation, admins)."""
        return cls(tenant, None)

    def allows(self, tenant: str, groups: Sequence[str]) -> bool:
        if tenant != self.tenant:
            return False
        return self.groups is None or EVERYONE in groups or not self.groups.isdisjoint(groups)


def checked_access(tenant: str, groups: Sequence[str]) -> tuple[str, list[str]]:
    """A document's tenant and its groups as stores keep them (sorted, once each); ValueError for a malformed one."""
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"a document's tenant must be a non-empty string, not {tenant!r:.80}")
    if isinstance(groups, str) or not all(isinstance(group, str) and group for group in groups):
        raise ValueError(f"a document's groups must be a list of non-empty strings, not {groups!r:.80}")
    return tenant, sorted(set(groups))


@dataclass(slots=True)
class DocumentRecord:
    """One source file in the manifest: what was seen on disk and what became of it."""

    doc_id: str
    source: str
    root: str
    size: int
    mtime_ns: int
    sha256: str
    fingerprint: str
    status: str = "indexed"
    error: str = ""
    updated_at: str = ""
    tenant: str = DEFAULT_TENANT
    groups: list[str] = field(default_factory=lambda: [EVERYONE])
    """Who may read it (see `Scope`); changed by `VectorStore.set_access` without re-embedding."""
    dependencies: dict[str, str] = field(default_factory=dict)
    """Other files of its tree the indexed content came from (includes), by path from the root, with their
    size and modification time when read: a change to one of them makes the file changed too."""
    chunk_ids: list[str] = field(default_factory=list)


MAX_IN_VALUES = 500
"""The longest `$in` list a filter may give (each value is one SQL parameter)."""


class FilterError(ValueError):
    """A filter names an unknown field, or gives an operand of the wrong shape or type."""


# Field types, as `VectorStore.filter_fields()` reports them: str, int, float, bool, any (values of
# several types), or list[<one of those>] for a field holding lists, which matches any of its elements.


def value_type(value: Any) -> str | None:
    """The type of a metadata value, or None when it cannot be filtered on (None, dicts, nested lists)."""
    if isinstance(value, list):
        elements = {value_type(item) for item in value if not isinstance(item, list)} - {None}
        return f"list[{_widen(*elements)}]" if elements else None
    if isinstance(value, bool):  # before int: True is an int too
        return "bool"
    for name, python_type in (("int", int), ("float", float), ("str", str)):
        if isinstance(value, python_type):
            return name
    return None


def _widen(*types: str) -> str:
    """One type for values of several: int and float make float, any other mix makes any."""
    if len(set(types)) == 1:
        return types[0]
    return "float" if set(types) <= {"int", "float"} else "any"


def element_type(type_name: str) -> str:
    """The type a filter value must have: the field's own, or its elements' for a list field."""
    return type_name[len("list["):-1] if type_name.startswith("list[") else type_name


def merge_types(known: str, seen: str) -> str:
    """The type of a field that had type `known` and now also holds a value of type `seen`."""
    if known.startswith("list[") and seen.startswith("list["):
        return f"list[{_widen(element_type(known), element_type(seen))}]"
    return "any" if known.startswith("list[") or seen.startswith("list[") else _widen(known, seen)


_ACCEPTED: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "float": (int, float), "any": (str, int, float),
}


def _accepts(element: str, value: Any) -> bool:
    """Whether `value` may be compared with values of type `element` (a float field takes whole numbers)."""
    if isinstance(value, bool):
        return element in ("bool", "any")
    return isinstance(value, _ACCEPTED.get(element, ()))


def _storable(value: Any) -> bool:
    """Whether a store can compare with `value`: 64-bit integers, text without lone surrogates."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def describe_fields(fields: Mapping[str, str]) -> str:
    if not fields:
        return "the index has no filterable fields yet (is it empty? run `ragline ingest`)"
    return "known fields: " + ", ".join(f"{name} ({type_name})" for name, type_name in sorted(fields.items()))


def check_filters(filters: Filters | None, fields: Mapping[str, str]) -> dict[str, list[Any]]:
    """Validate filters against a store's fields (`VectorStore.filter_fields()`).

    Returns each filtered field with the values it may take (any of them);
    raises FilterError naming the problem and the known fields.
    """

    def rejected(problem: str) -> FilterError:
        return FilterError(f"{problem}; {describe_fields(fields)}")

    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise rejected(f"filters must be an object of field: value, not {filters!r:.80}")
    wanted: dict[str, list[Any]] = {}
    for name, condition in filters.items():
        if name not in fields:
            raise rejected(f"unknown filter field {name!r:.80}")
        if isinstance(condition, Mapping):
            if set(condition) != {"$in"}:
                raise rejected(f"filter on {name!r}: give a plain value or {{'$in': [values]}}, not {condition!r:.80}")
            values = condition["$in"]
            if not isinstance(values, (list, tuple)):
                raise rejected(f"filter on {name!r}: '$in' takes a list of values")
            if len(values) > MAX_IN_VALUES:
                raise rejected(f"filter on {name!r}: '$in' lists at most {MAX_IN_VALUES} values, not {len(values)}")
        elif isinstance(condition, (list, tuple)):
            raise rejected(f"filter on {name!r}: a list is not a value; use {{'$in': [...]}} to match any of several")
        else:
            values = [condition]
        element = element_type(fields[name])
        for value in values:
            if not _accepts(element, value):
                raise rejected(f"filter on {name!r} wants {element} values, got {value!r:.80}")
            if not _storable(value):
                raise rejected(f"filter on {name!r}: {value!r:.80} is not a value any field can hold "
                               "(integers are 64-bit, text is valid Unicode)")
        wanted[name] = list(values)
    return wanted


def parse_filter_value(name: str, text: str, fields: Mapping[str, str]) -> Any:
    """The value of a command-line filter (`page=3`) in its field's type; raises FilterError if it has none."""
    if name not in fields:
        raise FilterError(f"unknown filter field {name!r}; {describe_fields(fields)}")
    element = element_type(fields[name])
    try:
        if element == "bool":
            return {"true": True, "false": False}[text.strip().lower()]
        return int(text) if element == "int" else float(text) if element == "float" else text
    except (KeyError, ValueError):
        expected = {"bool": "true or false", "int": "an int", "float": "a float"}[element]
        raise FilterError(f"filter on {name!r} wants {expected}, got {text!r}; {describe_fields(fields)}") from None


SearchMode = Literal["dense", "keyword", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("dense", "keyword", "hybrid")


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """Everything one search needs, so every store implements one call.

    `scope` says who is reading: only chunks of documents it `allows` are
    ranked, whatever `k` is. `dense` ranks by cosine similarity to `vector`;
    `keyword` by BM25 over the terms of `text` (store/keywords.py), the
    heading path weighing more than the body; `hybrid` runs both over the same
    committed state and merges them with `fusion`. `with_vectors` returns each
    hit's embedding (for diversity).
    """

    scope: Scope
    text: str = ""
    vector: np.ndarray | None = None
    mode: SearchMode = "dense"
    filters: Filters | None = None
    k: int = 10
    fusion: Fusion = Fusion()
    with_vectors: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.scope, Scope):
            raise TypeError(f"a search needs a Scope (who is reading), not {self.scope!r:.80}")
        if not isinstance(self.scope.groups, (frozenset, type(None))):
            raise TypeError(f"Scope.groups must be a frozenset or None, not {type(self.scope.groups).__name__}")
        if self.mode not in SEARCH_MODES:
            raise ValueError(f"search mode must be one of {', '.join(SEARCH_MODES)}, not {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.mode != "keyword" and self.vector is None:
            raise ValueError(f"a {self.mode} search needs the query vector")
        if self.mode != "dense" and not self.text.strip():
            raise ValueError(f"a {self.mode} search needs the query text")


@runtime_checkable
class VectorStore(Protocol):
    """Chunks with vectors, searchable by cosine similarity and keywords within a scope, under metadata filters."""

    def upsert_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Replace everything stored for `record.doc_id` (chunks, manifest row and access) atomically."""
        ...

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        """Save a file's new size and mtime when its content is unchanged; its chunks stay as they are.

        Raises StoreError when `doc_id` is not in the manifest.
        """
        ...

    def delete_document(self, doc_id: str) -> None: ...

    def set_access(self, doc_id: str, tenant: str, groups: Sequence[str]) -> None:
        """Change who may read a document (its tenant and access groups) atomically, leaving its chunks and
        vectors as they are; searches see the change from the next one on, and `index_version()` changes.

        Raises StoreError when `doc_id` is not in the manifest, ValueError for an empty tenant or group.
        """
        ...

    def documents(self, scope: Scope | None = None) -> list[DocumentRecord]:
        """The manifest: every source file seen, indexed or failed, with its chunk ids; only those
        `scope` may read when given (None: all of them, for the indexer)."""
        ...

    def document(self, doc_id: str) -> DocumentRecord | None:
        """One manifest row with its chunk ids, or None when the document is unknown."""
        ...

    def export_document(self, doc_id: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        """A document's manifest row, its chunks in reading order and their vectors (one float32 row each, in
        the same order), all from one committed state; None when the document is unknown. What
        `ragline store migrate` copies from one store to another."""
        ...

    def search(self, request: SearchRequest) -> list[Hit]:
        """The `request.k` best chunks for the request among those its scope may read and its filters match,
        as one committed state.

        Raises FilterError for filters that `check_filters` rejects.
        """
        ...

    def document_chunks(self, doc_id: str) -> list[Chunk]:
        """A document's chunks in reading order (for expanding a hit with its neighbours)."""
        ...

    def count(self, filters: Filters | None = None, scope: Scope | None = None) -> int:
        """How many chunks match `filters` among those `scope` may read (None: all; FilterError as in `search`)."""
        ...

    def index_version(self) -> str:
        """An opaque token that changes with every commit that changes chunks or access (keys of answer caches)."""
        ...

    def filter_fields(self) -> dict[str, str]:
        """Each filterable metadata field with its type (str, int, float, bool, any, list[...])."""
        ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def clear(self) -> None:
        """Remove every chunk, manifest row and meta value (a full rebuild)."""
        ...

    def persist(self) -> None:
        """Make the search index fast to reopen; data is already durable after each upsert.

        Safe to kill at any moment and to run in several processes at once:
        what it leaves is either the previous snapshot or the new one, whole.
        """
        ...

    def close(self) -> None: ...
