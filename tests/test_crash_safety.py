"""SIGKILL mid-ingest, re-run, and the index equals that of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings

FILES = 40


def index_state(data_dir: Path) -> dict:
    """Manifest, chunks and vectors, minus the timestamps that differ between runs."""
    db = sqlite3.connect(data_dir / "store.sqlite")
    try:
        docs = sorted(db.execute("SELECT doc_id, source, size, sha256, fingerprint, status, error FROM documents"))
        chunks, vectors = {}, {}
        for chunk_id, doc_id, text, metadata, blob in db.execute(
            "SELECT chunk_id, doc_id, text, metadata, vector FROM chunks"
        ):
            meta = json.loads(metadata)
            meta.pop("ingested_at")
            chunks[chunk_id] = (doc_id, text, json.dumps(meta, sort_keys=True))
            vectors[chunk_id] = np.frombuffer(blob, dtype=np.float32)
        orphans = db.execute("SELECT COUNT(*) FROM chunks WHERE doc_id NOT IN (SELECT doc_id FROM documents)")
        return {"documents": docs, "chunks": chunks, "vectors": vectors, "orphans": orphans.fetchone()[0]}
    finally:
        db.close()


def indexed_files(data_dir: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{data_dir / 'store.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_killed_ingest_resumes_to_the_uninterrupted_state(tmp_path, embedder):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(FILES):
        body = "\n\n".join(f"Topic {i} paragraph {p}: " + f"fact {i}-{p} " * 30 for p in range(6))
        (corpus / f"doc{i:02d}.md").write_text(f"# Document {i}\n\n## Part A\n\n{body}\n\n## Part B\n\nEnd of {i}.\n")
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "RAGLINE_DATA_DIR": str(killed_dir), "RAGLINE_INGEST__EMBED_GROUP_CHUNKS": "4"}
    command = [sys.executable, "-m", "ragline", "ingest", str(corpus)]

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while indexed_files(killed_dir) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = indexed_files(killed_dir)
    assert 3 <= done_at_kill < FILES, "the kill must land mid-run"

    resumed = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert len(report["new"]) == FILES - done_at_kill and report["unchanged"] == done_at_kill

    reference = Ragline(Settings(data_dir=tmp_path / "reference"))
    reference.__dict__["embedder"] = embedder
    reference.indexer().run([SourceSettings(path=corpus)])
    reference.close()

    killed, clean = index_state(killed_dir), index_state(tmp_path / "reference")
    assert killed["orphans"] == 0
    assert killed["documents"] == clean["documents"]
    assert killed["chunks"].keys() == clean["chunks"].keys()
    assert killed["chunks"] == clean["chunks"]
    for chunk_id, vector in killed["vectors"].items():  # batches differ, so floats may differ in the last bits
        assert float(vector @ clean["vectors"][chunk_id]) > 0.9999
