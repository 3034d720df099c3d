"""The search matrix saved on disk, so that a store reopens without reading every vector from SQLite.

Layout of the snapshot folder (`<data_dir>/index/`):

    CURRENT              JSON: the current snapshot's folder and what it must hold
    snap-<gen>-<hex>/    one immutable snapshot: seqs.npy and vectors.npy
    persist.lock         held while a snapshot is written: writers take turns

A snapshot is written whole into a new folder and fsync'd, and only then made
current by atomically replacing CURRENT (fsync'd too). A kill at any moment
leaves CURRENT naming a complete snapshot, old or new. The loader still
checks the shapes, the row count and a sha256 of both arrays against
CURRENT, and anything off means no snapshot: the store then rebuilds its
matrix from SQLite. The next write removes superseded folders and the
half-written ones of killed writers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragline.locking import hold_exclusive
from ragline.store.base import StoreError

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
LOCK = "persist.lock"
LOCK_TIMEOUT_S = 120.0
LEGACY_FILES = {"seqs.npy", "vectors.npy", "generation", ".seqs.npy.tmp", ".vectors.npy.tmp", ".generation.tmp"}
"""The single-folder layout of earlier versions, removed on the first write."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The store's vectors at one generation: row i of `matrix` is the vector of chunk `seqs[i]`.

    `tombstone` is the id of the last deletion it reflects; `seqs` is strictly increasing.
    """

    store_id: str
    generation: int
    tombstone: int
    seqs: np.ndarray
    matrix: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])


def checksum(seqs: np.ndarray, matrix: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(seqs, dtype=np.int64).data)
    digest.update(np.ascontiguousarray(matrix, dtype=np.float32).data)
    return digest.hexdigest()


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
        name = pointer["snapshot"]
        if not name.startswith("snap-") or Path(name).name != name:
            raise ValueError(f"{name!r} is not a snapshot folder")
        seqs = np.load(folder / name / "seqs.npy")
        matrix = np.load(folder / name / "vectors.npy", mmap_mode="r")
        shape = (pointer["rows"], pointer["dim"])
        if seqs.dtype != np.int64 or matrix.dtype != np.float32 or seqs.shape != shape[:1] or matrix.shape != shape:
            raise ValueError(f"arrays of {seqs.shape} {seqs.dtype} and {matrix.shape} {matrix.dtype}, expected {shape}")
        if len(seqs) > 1 and not bool(np.all(np.diff(seqs) > 0)):
            raise ValueError("its seqs are not increasing")
        if checksum(seqs, matrix) != pointer["sha256"]:
            raise ValueError("its checksum does not match")
        return Snapshot(pointer["store_id"], int(pointer["generation"]), int(pointer["tombstone"]), seqs, matrix)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the search snapshot in %s: %s; rebuilding it from the database", folder, exc)
        return None


def write(folder: Path, snapshot: Snapshot) -> None:
    """Save `snapshot` and make it current in one atomic step, unless a newer one is already current."""
    folder.mkdir(parents=True, exist_ok=True)
    with _persist_lock(folder):
        current = _read_pointer(folder)
        if current.get("store_id") == snapshot.store_id and current.get("generation", -1) > snapshot.generation:
            return
        name = f"snap-{snapshot.generation:012d}-{secrets.token_hex(4)}"
        (folder / name).mkdir()
        for file_name, array in (("seqs.npy", snapshot.seqs), ("vectors.npy", snapshot.matrix)):
            with open(folder / name / file_name, "wb") as handle:
                np.save(handle, array)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_folder(folder / name)
        pointer = {
            "snapshot": name, "store_id": snapshot.store_id, "generation": snapshot.generation,
            "tombstone": snapshot.tombstone, "rows": len(snapshot.seqs), "dim": snapshot.dim,
            "sha256": checksum(snapshot.seqs, snapshot.matrix),
        }
        staged = folder / f"{CURRENT}.tmp"
        with open(staged, "w") as handle:
            json.dump(pointer, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, folder / CURRENT)
        _fsync_folder(folder)
        _remove_all_but(folder, name)


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
