"""One ingest at a time per index, between real `ragline ingest` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragline.pipeline import ingest_lock

pytestmark = pytest.mark.slow


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "tea.md").write_text("# Tea\n\nGreen tea is steeped at 80 degrees for two minutes.\n")
    (root / "rivers.md").write_text("# Rivers\n\nThe Danube flows through ten countries.\n")
    return root


def ingest(index: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RAGLINE_DATA_DIR": str(index), "COLUMNS": "40"}
    return subprocess.Popen(
        [sys.executable, "-m", "ragline", "ingest", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def test_a_second_ingest_fails_with_one_line_naming_the_index(tmp_path, docs):
    index = tmp_path / "index"
    with ingest_lock(index):  # this test process is the running ingest
        code, out, err = finish(ingest(index, str(docs)))
    assert code == 1
    lines = [line for line in err.splitlines() if "another ingest" in line]
    assert len(lines) == 1 and f"(pid {os.getpid()}) is running on {index}" in lines[0]
    assert "Traceback" not in err


def test_wait_gives_up_at_its_deadline(tmp_path, docs):
    index = tmp_path / "index"
    with ingest_lock(index):
        code, out, err = finish(ingest(index, str(docs), "--wait", "--wait-timeout", "1"))
    assert code == 1
    assert "waiting for another ingest" in err
    assert f"is running on {index} and did not finish within 1 s" in err


def test_concurrent_ingests_queue_and_embed_each_file_once(tmp_path, docs):
    index = tmp_path / "index"
    first, second = ingest(index, str(docs), "--wait", "--json"), ingest(index, str(docs), "--wait", "--json")
    results = [finish(first), finish(second)]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    reports = [json.loads(out) for _, out, _ in results]
    assert sorted(len(report["new"]) for report in reports) == [0, 2]
    assert sorted(report["unchanged"] for report in reports) == [0, 2]
