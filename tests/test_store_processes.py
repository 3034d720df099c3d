"""Real processes on one `LocalStore`: readers beside writers, and writers killed at random moments.

Every chunk's vector is derived from its text (`store_contract.text_vector`),
so a hit paired with the wrong vector shows as a score that is not
query·vector(text). Run as a script, this file is the worker the tests start:
`python test_store_processes.py ROLE DATA_DIR SEED [STOP_FILE]`.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from store_contract import dense, pairing_errors, put_texts

from ragline.store.base import EVERYONE, Scope
from ragline.store.local import LocalStore

DIM = 32
DOCS = 12
WRITES = 300
KILLS = 50
WORKER_DEADLINE_S = 300
OWNERS = [("t1", [EVERYONE]), ("t1", ["eng"]), ("t1", ["eng", "ops"]), ("t2", ["eng"]), ("t2", [])]
"""Who may read a written document: its (tenant, groups), drawn at random and kept in its chunks' metadata."""
SCOPES = [Scope("t1", frozenset({"eng"})), Scope("t1", frozenset()), Scope("t1", None), Scope("t2", frozenset({"ops"}))]


def random_write(store: LocalStore, rng: np.random.Generator, version: int) -> str:
    """Replace a random document with 0 to 6 new chunks, or delete it."""
    doc = f"d{rng.integers(DOCS)}"
    if rng.random() < 0.2:
        store.delete_document(doc)
        return f"delete {doc}"
    tenant, groups = OWNERS[rng.integers(len(OWNERS))]
    texts = [f"{doc} v{version} c{i}" for i in range(int(rng.integers(0, 7)))]
    put_texts(store, doc, texts, DIM, owner=(tenant, groups), tenant=tenant, groups=groups)
    return f"replace {doc}"


def random_query(rng: np.random.Generator) -> tuple[np.ndarray, int, dict | None, Scope]:
    query = rng.standard_normal(DIM).astype(np.float32)
    wanted = sorted({f"d{i}" for i in rng.integers(DOCS, size=3)})
    filters = {"title": {"$in": wanted}} if rng.random() < 0.3 else None
    return query / np.linalg.norm(query), int(rng.integers(1, 12)), filters, SCOPES[rng.integers(len(SCOPES))]


def search_errors(store: LocalStore, rng: np.random.Generator) -> list[str]:
    """One random search; what was wrong with its answer."""
    query, k, filters, scope = random_query(rng)
    hits = store.search(dense(query, k, filters, scope))
    errors = pairing_errors(hits, query, k)
    meta = [hit.chunk.metadata for hit in hits]  # the owner each chunk was written with, in the same commit
    errors += [f"{m['title']} of {m['tenant']} {m['groups']} is outside {scope}" for m in meta
               if not scope.allows(m["tenant"], m["groups"])]
    if filters:
        allowed = filters["title"]["$in"]
        errors += [f"{h.chunk.doc_id} is outside the filter {filters}" for h in hits if h.chunk.doc_id not in allowed]
    return errors


def seed_store(data_dir: Path) -> None:
    store = LocalStore(data_dir)
    rng = np.random.default_rng(0)
    for doc in range(DOCS):
        tenant, groups = OWNERS[doc % len(OWNERS)]
        texts = [f"d{doc} v0 c{i}" for i in range(int(rng.integers(1, 7)))]
        put_texts(store, f"d{doc}", texts, DIM, owner=(tenant, groups), tenant=tenant, groups=groups)
    store.persist()
    store.close()


def run_worker(role: str, data_dir: Path, seed: int, stop_file: Path | None) -> None:
    rng = np.random.default_rng(seed)
    store = LocalStore(data_dir)
    deadline = time.monotonic() + WORKER_DEADLINE_S
    if role == "reader":
        # One long-lived handle refreshing incrementally, and now and then a fresh one loading the snapshot.
        searches, errors, wrong = 0, [], []
        print("ready", flush=True)
        while not stop_file.exists() and time.monotonic() < deadline:
            fresh = searches % 25 == 0
            handle = LocalStore(data_dir) if fresh else store
            try:
                wrong += search_errors(handle, rng)
            except Exception as exc:  # every error is a finding: report it, keep searching
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                if fresh:
                    handle.close()
            searches += 1
        print(json.dumps({"searches": searches, "errors": errors[:20], "wrong": wrong[:20]}))
    elif role == "writer":
        persists = 0
        for version in range(1, WRITES + 1):
            random_write(store, rng, seed * 100_000 + version)
            if rng.random() < 0.1:
                store.persist()
                persists += 1
        print(json.dumps({"writes": WRITES, "persists": persists}))
    elif role == "crasher":  # writes and persists until it is killed, saying what it is doing
        for version in range(1, 1_000_000):
            print(random_write(store, rng, seed * 1_000_000 + version), flush=True)
            if rng.random() < 0.5:
                print("persist", flush=True)
                store.persist()
                print("persisted", flush=True)
            if time.monotonic() > deadline:
                break
    store.close()


def start_worker(role: str, data_dir: Path, seed: int, stop_file: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, __file__, role, str(data_dir), str(seed)] + ([str(stop_file)] if stop_file else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reference_hits(data_dir: Path, scratch: Path, queries: list) -> list[list[tuple[str, float]]]:
    """The answers of a store rebuilt from a copy of the database alone, without any snapshot."""
    folder = scratch / "reference"
    folder.mkdir(parents=True)
    source, copy = sqlite3.connect(data_dir / "store.sqlite"), sqlite3.connect(folder / "store.sqlite")
    source.backup(copy)
    source.close(), copy.close()
    rebuilt = LocalStore(folder)
    try:
        return [[(h.chunk.chunk_id, h.score) for h in rebuilt.search(dense(q, k, f, s))] for q, k, f, s in queries]
    finally:
        rebuilt.close()


def assert_store_answers_right(data_dir: Path, scratch: Path, rng: np.random.Generator, searches: int = 20) -> None:
    """Every search pairs right and equals the search of a store rebuilt from the database alone."""
    queries = [random_query(rng) for _ in range(searches)]
    store = LocalStore(data_dir)
    try:
        answers = [store.search(dense(q, k, f, s)) for q, k, f, s in queries]
    finally:
        store.close()
    for (query, k, _, scope), hits in zip(queries, answers):
        assert pairing_errors(hits, query, k) == []
        assert all(scope.allows(h.chunk.metadata["tenant"], h.chunk.metadata["groups"]) for h in hits)
    expected = reference_hits(data_dir, scratch, queries)
    for hits, reference in zip(answers, expected):
        assert [h.chunk.chunk_id for h in hits] == [chunk_id for chunk_id, _ in reference]
        assert np.allclose([h.score for h in hits], [score for _, score in reference], atol=1e-6)


@pytest.mark.slow
def test_a_reader_beside_a_writer_process_never_errs_nor_pairs_wrong(tmp_path):
    data_dir, stop_file = tmp_path / "data", tmp_path / "stop"
    seed_store(data_dir)
    reader = start_worker("reader", data_dir, 1, stop_file)
    try:
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
        writer = start_worker("writer", data_dir, 2)
        written, writer_errors = writer.communicate(timeout=WORKER_DEADLINE_S)
        assert writer.returncode == 0, writer_errors
    finally:
        stop_file.touch()
        read, reader_errors = reader.communicate(timeout=WORKER_DEADLINE_S)
    assert reader.returncode == 0, reader_errors
    figures = {**json.loads(read.splitlines()[-1]), **json.loads(written.splitlines()[-1])}
    print("reader beside writer:", json.dumps(figures))
    assert figures["errors"] == [] and figures["wrong"] == []
    assert figures["searches"] > 0
    assert_store_answers_right(data_dir, tmp_path, np.random.default_rng(3))


@pytest.mark.slow
def test_two_writer_processes_persisting_at_once_leave_a_right_snapshot(tmp_path, caplog):
    data_dir = tmp_path / "data"
    seed_store(data_dir)
    writers = [start_worker("writer", data_dir, seed) for seed in (4, 5)]
    for writer in writers:
        _, errors = writer.communicate(timeout=WORKER_DEADLINE_S)
        assert writer.returncode == 0, errors
    with caplog.at_level("WARNING", logger="ragline.store"):
        assert_store_answers_right(data_dir, tmp_path, np.random.default_rng(6))
    assert not [r for r in caplog.records if "snapshot" in r.getMessage()]


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_leaves_a_store_that_answers_right(tmp_path):
    data_dir = tmp_path / "data"
    seed_store(data_dir)
    rng = np.random.default_rng(7)
    killed_in = {"persist": 0, "write": 0}
    for kill in range(KILLS):
        crasher = start_worker("crasher", data_dir, 100 + kill)
        lines = [crasher.stdout.readline().strip() for _ in range(int(rng.integers(1, 30)))]
        crasher.send_signal(signal.SIGKILL)
        rest, errors = crasher.communicate(timeout=WORKER_DEADLINE_S)
        assert crasher.returncode == -signal.SIGKILL, errors
        said = [line for line in lines + rest.splitlines() if line]
        killed_in["persist" if said and said[-1] == "persist" else "write"] += 1
        assert_store_answers_right(data_dir, tmp_path / f"kill{kill}", rng, searches=5)
    store = LocalStore(data_dir)
    store.persist()
    store.close()
    assert_store_answers_right(data_dir, tmp_path / "final", rng)
    assert len(list((data_dir / "index").rglob("vectors.npy"))) == 1
    print("kills survived:", json.dumps(killed_in))
    assert killed_in["persist"] > 0


if __name__ == "__main__":
    run_worker(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) > 4 else None)
