"""`engine: ray` against a real Ray runtime on 127.0.0.1: the same index as the local engine, incrementally,
after a killed driver, and after a worker node is lost mid-run.

One Ray cluster serves the whole module (`ray.cluster_utils.Cluster`: a head node, to which the node-loss
test adds a worker node and removes it). In-process runs use this process's connection to it; the killed
driver is a `ragline ingest --engine ray --address` subprocess connected to the same cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ragline.app import Ragline
from ragline.cluster.ray_ingest import keep_ray_sockets_short
from ragline.config import Settings, SourceSettings
from ragline.store.base import Scope

# Before Ray is imported (it reads them then; the driver subprocess inherits them): every Ray process on
# loopback, none reporting usage.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
keep_ray_sockets_short()
try:
    import ray
except ImportError:  # the dev extra installs it: a missing Ray is a broken environment, not a reason to skip
    pytest.fail("the Ray engine tests need the ray extra: pip install -e '.[dev]'", pytrace=False)

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "docs_sources"
QUERIES = [
    "how do I install xarray?", "transfer learning with a pretrained model", "module attributes and setup",
    "license terms for redistribution", "topic 7 details about granite",
]
VECTOR_TOLERANCE = 1e-5  # vectors embedded in other batch groupings differ in the last float bits
RUN_DEADLINE_S = 600.0  # a hang guard for the killed driver's run, far beyond its length: not a speed check


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray runtime on 127.0.0.1 for the module; shut down, with every Ray process, at the end."""
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield head
    ray.shutdown()
    head.shutdown()


def write_topics(root: Path, count: int, first: int = 0) -> None:
    """Small markdown files of three sections each: many files, so a run has many writes to interrupt."""
    words = ["granite", "harbor", "lantern", "juniper", "falcon", "cobalt", "meadow", "quartz"]
    for i in range(first, first + count):
        sections = "".join(
            f"## Part {j}\n\nTopic {i} part {j} is about {words[(i + j) % len(words)]} and "
            f"{words[(i * 3 + j) % len(words)]}; it also names item {i * 10 + j}.\n\n"
            for j in range(3)
        )
        (root / f"topic-{i:03d}.md").write_text(f"# Topic {i}\n\n{sections}")


def write_corpus(root: Path) -> Path:
    """The mixed-format fixture docs plus generated pages."""
    shutil.copytree(FIXTURES, root)
    write_topics(root, 24)
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A corpus of the test's own, to edit."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedder) -> tuple[Path, dict]:
    """A corpus that is not edited, and its index by an uninterrupted local run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    corpus = write_corpus(folder / "corpus")
    return corpus, ingest(folder / "local", corpus, embedder, "local")[1]


def make_app(data_dir: Path, embedder, engine: str, **ray_settings) -> Ragline:
    settings = Settings(
        data_dir=data_dir, engine=engine,
        ray={"parse_batch_files": 3, "embed_batch_files": 4, **ray_settings},
    )
    app = Ragline(settings)
    app.__dict__["embedder"] = embedder  # the driver's copy; the Ray actors load their own
    return app


def ingest(data_dir: Path, corpus: Path, embedder, engine: str, progress=None, **ray_settings):
    app = make_app(data_dir, embedder, engine, **ray_settings)
    try:
        report = app.indexer(progress).run([SourceSettings(path=corpus)])
        return report, index_state(app)
    finally:
        app.close()


def index_state(app: Ragline) -> dict:
    """What the index holds, file by file (no timestamps), with each chunk's vector, and the hits of QUERIES."""
    files, vectors = {}, {}
    for record in app.store.documents():
        exported = app.store.export_document(record.doc_id)
        chunks = exported[1] if exported else []
        files[record.source] = (
            record.doc_id, record.status, record.error, record.sha256, record.fingerprint, tuple(record.chunk_ids),
            record.dependencies, record.tenant, tuple(record.groups),
            [(c.chunk_id, c.text, {k: v for k, v in c.metadata.items() if k != "ingested_at"}) for c in chunks],
        )
        if exported and len(chunks):
            vectors[record.source] = exported[2]
    hits = [
        [hit.chunk.chunk_id for hit in app.retriever.search(query, k=5, scope=Scope.everything()).hits]
        for query in QUERIES
    ]
    return {"files": files, "vectors": vectors, "hits": hits}


def assert_same_index(got: dict, expected: dict) -> None:
    assert got["files"] == expected["files"]
    assert got["vectors"].keys() == expected["vectors"].keys()
    for source, vectors in expected["vectors"].items():
        np.testing.assert_allclose(got["vectors"][source], vectors, atol=VECTOR_TOLERANCE, err_msg=source)
    assert got["hits"] == expected["hits"]


def summary(report) -> tuple:
    return (
        sorted(report.new), sorted(report.changed), report.unchanged, sorted(report.deleted), sorted(report.failed),
        sorted(report.skipped), report.unsupported, report.chunks,
    )


def edit_corpus(corpus: Path) -> None:
    """A change, a deletion and an addition, of a fixture page and of generated ones."""
    (corpus / "README.md").write_text((corpus / "README.md").read_text() + "\n\n## Added later\n\nA new closing section.\n")
    (corpus / "topic-003.md").unlink()
    (corpus / "topic-005.md").write_text("# Topic 5, rewritten\n\nNow about quartz harbors only.\n")
    write_topics(corpus, 2, first=100)


def test_same_index_as_the_local_engine_first_and_incrementally(cluster, corpus, tmp_path, embedder):
    local_report, local = ingest(tmp_path / "local", corpus, embedder, "local")
    ray_report, on_ray = ingest(tmp_path / "ray", corpus, embedder, "ray")
    assert local_report.chunks > 0 and local["files"], "the corpus indexed nothing: the comparison would be empty"
    assert summary(ray_report) == summary(local_report)
    assert_same_index(on_ray, local)

    edit_corpus(corpus)
    local_report, local = ingest(tmp_path / "local", corpus, embedder, "local")
    ray_report, on_ray = ingest(tmp_path / "ray", corpus, embedder, "ray")
    assert len(local_report.changed) == 2 and len(local_report.deleted) == 1 and len(local_report.new) == 2
    assert summary(ray_report) == summary(local_report)
    assert_same_index(on_ray, local)


def indexed_files(data_dir: Path) -> int:
    """How many files another process has indexed (or skipped for good) in a local store so far."""
    try:
        with sqlite3.connect(f"file:{data_dir / 'store.sqlite'}?mode=ro", uri=True, timeout=0.05) as db:
            return db.execute("SELECT count(*) FROM documents WHERE status IN ('indexed', 'skipped')").fetchone()[0]
    except sqlite3.Error:  # not created yet, or being written
        return 0


def test_a_killed_driver_rerun_ends_as_an_uninterrupted_run(cluster, uninterrupted, tmp_path, embedder):
    corpus, expected = uninterrupted
    data_dir = tmp_path / "killed"
    env = {
        **os.environ, "RAGLINE_DATA_DIR": str(data_dir),
        "RAGLINE_RAY__PARSE_BATCH_FILES": "2", "RAGLINE_RAY__EMBED_BATCH_FILES": "1",
    }
    command = [
        sys.executable, "-m", "ragline", "ingest", str(corpus), "--engine", "ray", "--address", cluster.address,
        "--json",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + RUN_DEADLINE_S
    while process.poll() is None and indexed_files(data_dir) < 3:
        if time.monotonic() > deadline:  # a hang guard, not a speed check
            process.kill()
            pytest.fail(f"the Ray ingest wrote nothing in {RUN_DEADLINE_S:.0f} s: {process.communicate()[1][-2000:]!r}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    written = indexed_files(data_dir)
    assert process.returncode == -signal.SIGKILL, f"the ingest ended before it was killed: {stderr.decode()[-2000:]}"
    assert 0 < written < len(expected["files"]), "the kill was not mid-run"

    report, rerun = ingest(data_dir, corpus, embedder, "ray")
    assert report.unchanged == written  # what the killed run committed is kept, not redone
    assert_same_index(rerun, expected)


class NodeKiller:
    """Progress that removes the worker node doing the work once a few files are written, and adds another
    (an autoscaler's replacement): Ray must run the lost tasks and actor again there."""

    def __init__(self, cluster, node, after_files: int) -> None:
        self.cluster, self.node, self.after_files = cluster, node, after_files
        self.written = 0
        self.replaced = False

    def waiting(self, message: str) -> None:
        pass

    def start(self, total_files: int) -> None:
        pass

    def advance(self, path: str) -> None:
        self.written += 1
        if self.written == self.after_files:
            self.cluster.remove_node(self.node, allow_graceful=False)
            self.cluster.add_node(num_cpus=2, resources={"ingest_node": 1})
            self.replaced = True


def test_a_worker_node_lost_mid_run_is_replaced_and_the_index_is_complete(cluster, uninterrupted, tmp_path, embedder):
    corpus, expected = uninterrupted
    # Only nodes with the `ingest_node` resource parse and embed: the work is on the node that is removed.
    node = cluster.add_node(num_cpus=2, resources={"ingest_node": 1})
    killer = NodeKiller(cluster, node, after_files=4)
    try:
        report, on_ray = ingest(tmp_path / "ray", corpus, embedder, "ray", killer, resources={"ingest_node": 0.01})
    finally:
        for worker in list(cluster.worker_nodes):
            cluster.remove_node(worker)
    assert killer.replaced, "the run ended before the node was removed"
    assert not report.failed
    assert_same_index(on_ray, expected)
