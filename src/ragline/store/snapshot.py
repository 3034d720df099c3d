"""The search index saved on disk: vectors, row ids and HNSW graph, so that a store reopens without reading
every vector from SQLite or rebuilding its graph.

Layout of the snapshot folder (`<data_dir>/index/`):

    CURRENT              JSON: the current snapshot's folder and what it must hold (a sha256 of each file)
    snap-<gen>-<hex>/    one immutable snapshot: seqs.npy, vectors.npy, dead.npy and, for a large
                         index, graph.faiss (store/ann.py) over the same rows
    persist.lock         held while a snapshot is written: writers take turns

Row i of vectors.npy is the vector of chunk seqs[i]; dead.npy lists the
rows whose chunks were deleted before it was written (kept so that the
graph's positions stay right until the next rebuild compacts them away).
A snapshot is written whole into a new folder and fsync'd, and only then made
current by atomically replacing CURRENT (fsync'd too). A kill at any moment
leaves CURRENT naming a complete snapshot, old or new. The loader still
checks every file's sha256 (read from the file, so that the mapped pages
are only those searches touch), the shapes and the row count against
CURRENT: damaged arrays mean no snapshot (the store then rebuilds from
SQLite); a damaged graph alone means a snapshot without one (searched
exactly until the next `persist()` builds it again). Vectors and graph are
memory-mapped: processes on one index share one page-cache copy. The next
write removes superseded folders and the half-written ones of killed writers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragline.locking import hold_exclusive
from ragline.store import ann
from ragline.store.base import StoreError

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
LOCK = "persist.lock"
LOCK_TIMEOUT_S = 120.0
FORMAT = 2
"""1 → 2: a sha256 per file, dead rows and the HNSW graph; a snapshot of format 1 is ignored and rewritten."""
GRAPH = "graph.faiss"
ARRAYS = ("seqs.npy", "vectors.npy", "dead.npy")
LEGACY_FILES = {"seqs.npy", "vectors.npy", "generation", ".seqs.npy.tmp", ".vectors.npy.tmp", ".generation.tmp"}
"""The single-folder layout of earlier versions, removed on the first write."""
WRITE_BLOCK_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The store's vectors at one generation: row i of `matrix` is the vector of chunk `seqs[i]`.

    `tombstone` is the id of the last deletion it reflects; `seqs` is strictly increasing; `dead` holds the
    (ascending) rows deleted before it was written; `graph` (None: none) is an HNSW graph over all rows,
    and `folder` where it was loaded from (None: not saved).
    """

    store_id: str
    generation: int
    tombstone: int
    seqs: np.ndarray
    matrix: np.ndarray
    dead: np.ndarray
    graph: Any = None
    folder: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])


def empty(store_id: str, tombstone: int, dim: int) -> Snapshot:
    return Snapshot(store_id, -1, tombstone, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def current_name(folder: Path) -> str | None:
    """The folder name of the current snapshot (cheap: tells a reader whether there is a newer one to load)."""
    name = _read_pointer(folder).get("snapshot")
    return name if isinstance(name, str) else None


def load(folder: Path) -> Snapshot | None:
    """The current snapshot, memory-mapped and verified; None (with the reason logged) when there is none to trust."""
    try:
        pointer = json.loads((folder / CURRENT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the search snapshot in %s: %s; rebuilding it from the database", folder, exc)
        return None
    try:
        if pointer.get("format") != FORMAT:
            raise ValueError(f"it is of format {pointer.get('format', 1)}, this version reads {FORMAT}")
        name = pointer["snapshot"]
        if not name.startswith("snap-") or Path(name).name != name:
            raise ValueError(f"{name!r} is not a snapshot folder")
        here = folder / name
        for file_name in ARRAYS:
            if _file_sha256(here / file_name) != pointer["files"][file_name]:
                raise ValueError(f"the checksum of {file_name} does not match")
        seqs, dead = np.load(here / "seqs.npy"), np.load(here / "dead.npy")
        matrix = np.load(here / "vectors.npy", mmap_mode="r")
        shape = (pointer["rows"], pointer["dim"])
        if seqs.dtype != np.int64 or matrix.dtype != np.float32 or seqs.shape != shape[:1] or matrix.shape != shape:
            raise ValueError(f"arrays of {seqs.shape} {seqs.dtype} and {matrix.shape} {matrix.dtype}, expected {shape}")
        if len(seqs) > 1 and not bool(np.all(np.diff(seqs) > 0)):
            raise ValueError("its seqs are not increasing")
        if dead.dtype != np.int64 or (len(dead) and (dead.min() < 0 or dead.max() >= len(seqs))):
            raise ValueError("its dead rows are not rows of it")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the search snapshot in %s: %s; rebuilding it from the database", folder, exc)
        return None
    graph = _load_graph(here, pointer, len(seqs)) if GRAPH in pointer["files"] else None
    return Snapshot(pointer["store_id"], int(pointer["generation"]), int(pointer["tombstone"]), seqs, matrix, dead,
                    graph, here)


def _load_graph(here: Path, pointer: dict, rows: int) -> Any:
    """The snapshot's graph, memory-mapped, or None when it cannot be trusted (its rows are searched exactly)."""
    try:
        if _file_sha256(here / GRAPH) != pointer["files"][GRAPH]:
            raise ValueError("its checksum does not match")
        graph = ann.open_mapped(here / GRAPH)
        if graph.ntotal != rows:
            raise ValueError(f"it holds {graph.ntotal} rows, the snapshot {rows}")
        return graph
    except (OSError, ValueError, RuntimeError) as exc:  # faiss reports a malformed file as RuntimeError
        log.warning("ignoring the search graph in %s: %s; searching exactly until persist() rebuilds it", here, exc)
        return None


def write(folder: Path, store_id: str, generation: int, tombstone: int, seqs: np.ndarray,
          blocks: Sequence[np.ndarray], dead: np.ndarray, graph: Any) -> None:
    """Save a snapshot and make it current in one atomic step, unless a newer one is already current.

    The vectors are the rows of `blocks` in order (a memory-mapped block is copied a slice at a time);
    `graph` (None: none) must cover exactly those rows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows, dim = len(seqs), int(blocks[0].shape[1])
    with _persist_lock(folder):
        current = _read_pointer(folder)
        if current.get("store_id") == store_id and current.get("generation", -1) > generation:
            return
        name = f"snap-{generation:012d}-{secrets.token_hex(4)}"
        here = folder / name
        here.mkdir()
        for file_name, array in (("seqs.npy", seqs), ("dead.npy", dead)):
            with open(here / file_name, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array, dtype=np.int64))
                handle.flush()
                os.fsync(handle.fileno())
        _write_vectors(here / "vectors.npy", rows, dim, blocks)
        files = {file_name: _file_sha256(here / file_name) for file_name in ARRAYS}
        if graph is not None:
            ann.save(graph, here / GRAPH)
            files[GRAPH] = _file_sha256(here / GRAPH)
        _fsync_folder(here)
        pointer = {
            "format": FORMAT, "snapshot": name, "store_id": store_id, "generation": generation,
            "tombstone": tombstone, "rows": rows, "dim": dim, "files": files,
        }
        staged = folder / f"{CURRENT}.tmp"
        with open(staged, "w") as handle:
            json.dump(pointer, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, folder / CURRENT)
        _fsync_folder(folder)
        _remove_all_but(folder, name)


def _write_vectors(path: Path, rows: int, dim: int, blocks: Sequence[np.ndarray]) -> None:
    """vectors.npy from `blocks`, streamed, so that writing never holds a second copy of the matrix in memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    at = 0
    for block in blocks:
        for start in range(0, len(block), WRITE_BLOCK_ROWS):
            part = block[start:start + WRITE_BLOCK_ROWS]
            out[at:at + len(part)] = part
            at += len(part)
    if at != rows:
        raise StoreError(f"a snapshot of {rows} rows was given {at} vectors")
    out.flush()
    del out
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _read_pointer(folder: Path) -> dict:
    try:
        pointer = json.loads((folder / CURRENT).read_text())
        return pointer if isinstance(pointer, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def _persist_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the snapshot folder, waited for up to LOCK_TIMEOUT_S."""
    with open(folder / LOCK, "w") as handle:
        if not hold_exclusive(handle, LOCK_TIMEOUT_S, poll_s=0.05):
            raise StoreError(
                f"another process has been writing a snapshot in {folder} for {LOCK_TIMEOUT_S:.0f} s; "
                "the data is saved, re-run to refresh the snapshot"
            )
        yield


def _fsync_folder(folder: Path) -> None:
    """Make a folder's new entries durable (a rename is only as durable as its folder)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_all_but(folder: Path, keep: str) -> None:
    """Remove superseded and half-written snapshots; a reader that mapped one keeps its pages until it lets go."""
    for entry in folder.iterdir():
        if entry.name == keep:
            continue
        if entry.name.startswith("snap-") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name in LEGACY_FILES:
            entry.unlink(missing_ok=True)
