"""SIGKILL `ragline ingest` at many moments, re-run it, and search as if it had never been killed.

Rounds over one index: a fresh ingest, then re-ingests after files were
edited, deleted and added. In each round the ingest process is killed again
and again — after a random number of writes (after random delays for a store
that cannot be watched while it is written), and, for the local store, the
moment a new snapshot file appears under <data_dir>/index/ — then run to
completion. What the store holds (read through the store protocol) must then
equal, and the search results for fixed queries (read through a freshly
opened store; the local one loads the snapshot) must be those of an
uninterrupted run over the same files.

The suite runs against each store of CRASH_STORES: another store is one
more entry there (see `CrashStore`).

The ingest processes embed through the OpenAI-compatible backend, served on
loopback from this test process's copy of the default model: the vectors are
the real model's, and each of the ~60 processes starts in a second or two
instead of importing torch and sentence-transformers (8 s of CPU) every time.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from crash_harness import (
    CommitWatcher, CrashTally, IndexVersionCommits, KillPlan, RunOutcome, SqliteCommits, run_ingest,
)
from scripted_llm_server import Reply, ScriptedLLMServer
from ragline.app import Ragline
from ragline.config import RetrieveSettings, Settings, SourceSettings, StoreSettings
from ragline.store.base import Scope

SEED = int(os.environ.get("CRASH_SUITE_SEED", "6"))
FILES = 36
SECTIONS = 4  # each section fits one chunk, so every file has SECTIONS chunks
MIN_KILLS = 50  # of the local store; CrashStore.min_kills for each store
EVERYTHING = Scope.everything()
MIN_ROUNDS = 3  # of the local store: a fresh ingest, then two re-ingests of a changed corpus
MAX_ROUNDS = 8
K = 10
SCORE_TOLERANCE = 1e-5  # vectors embedded in other batch groupings differ in the last float bits

WORDS = """
amber anchor archive arrow aspen atlas aurora badger basalt beacon birch bison bramble breeze
bronze cactus canal canyon cedar cellar chalk citadel clover cobalt comet copper coral crater
cypress delta desert dolphin dune eagle ember falcon fern fjord flint forge fossil fountain
garnet geyser glacier granite grove harbor hazel heron hollow indigo island ivory jade jasper
juniper kelp kestrel lagoon lantern larch lava ledger lemon lichen lighthouse lily lynx maple
marble marsh meadow mesa meteor mill mint monsoon moss nebula nickel oasis obsidian ochre olive
onyx orchard osprey otter oxbow pebble pepper pine plateau plum prairie quarry quartz quill
raven reef ridge river saffron salmon sapphire sequoia shale sierra silver slate sparrow spruce
summit swamp tannery thistle thunder tide timber topaz tundra valley velvet violet walnut
willow wolf yarrow zephyr
""".split()
VERBS = "guards carries measures follows shelters repairs charts crosses feeds warms hides lifts".split()

QUERIES = [
    "the amber lighthouse guards the harbor",
    "copper forge near the canyon",
    "a heron follows the river through the marsh",
    "glacier and fjord charts",
    "sapphire and topaz in the quarry",
    "orchard of plum and walnut trees",
    "the wolf crosses the tundra at night",
    "volcanic basalt and obsidian near lava",
    "salmon and otter in the lagoon",
    "a meteor over the desert mesa",
    "cedar timber for the mill",
    "indigo velvet and saffron",
]


def sentence(rng: random.Random) -> str:
    words = rng.sample(WORDS, 5)
    return f"The {words[0]} {rng.choice(VERBS)} the {words[1]} near the {words[2]} and the {words[3]} {words[4]}."


class Corpus:
    """Markdown files of SECTIONS one-chunk sections, changed between runs with a seeded RNG.

    Deletions and additions are balanced and edits keep each file's section
    count, so the index keeps its size: a snapshot torn between an old and a
    new version then has the right length, and only its content can tell.
    """

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.files: dict[str, list[tuple[str, str]]] = {}
        self.created = 0
        root.mkdir(parents=True)

    def _section(self) -> tuple[str, str]:
        return " ".join(self.rng.sample(WORDS, 3)).title(), " ".join(sentence(self.rng) for _ in range(3))

    def _write(self, name: str) -> None:
        body = "\n\n".join(f"## {heading}\n\n{text}" for heading, text in self.files[name])
        (self.root / name).write_text(f"# {name[:-3].replace('-', ' ').title()}\n\n{body}\n")

    def add(self, count: int) -> None:
        for _ in range(count):
            name = f"doc-{self.created:03d}.md"
            self.created += 1
            self.files[name] = [self._section() for _ in range(SECTIONS)]
            self._write(name)

    def change(self, tally: CrashTally, edit: int, delete: int) -> int:
        """Edit some files (one section or all), delete some, add as many; returns the files touched."""
        names = self.rng.sample(sorted(self.files), edit + delete)
        for name in names[:edit]:
            sections = self.files[name]
            for index in self.rng.sample(range(SECTIONS), self.rng.choice([1, SECTIONS])):
                sections[index] = self._section()
            self._write(name)
        for name in names[edit:]:
            del self.files[name]
            (self.root / name).unlink()
        self.add(delete)
        tally.files_edited += edit
        tally.files_deleted += delete
        tally.files_added += delete
        return edit + 2 * delete


@dataclass(frozen=True)
class CrashStore:
    """A store the suite runs against: how it names an index, and how an ingest into it is watched."""

    name: str
    store_settings: Callable[[str], StoreSettings]
    """The store settings of the index called that (an index name: lowercase letters, digits and _)."""
    commits: Callable[[Settings], CommitWatcher] | None
    """A watcher of the index's commits, opened before each run; None: the store cannot be watched while
    another process writes it, and runs are killed after random delays."""
    snapshots: bool
    """Whether the store persists a snapshot under <data_dir>/index/ (runs are killed while it is written)."""
    min_kills: int
    min_rounds: int = 2
    """A fresh ingest and a re-ingest of a changed corpus: the server stores take two rounds (their kills are
    aimed as the local store's are, and each round costs a minute of the suite), the local store MIN_ROUNDS."""
    compared_mode: str = "hybrid"
    """The search mode whose results must equal an uninterrupted run's."""

    def settings(self, root: Path, index: str) -> Settings:
        return Settings(data_dir=root / index, store=self.store_settings(index),
                        retrieve=RetrieveSettings(mode=self.compared_mode))


def local_store(request: pytest.FixtureRequest) -> Iterator[CrashStore]:
    yield CrashStore(
        "local", lambda index: StoreSettings(), lambda settings: SqliteCommits(settings.data_dir / "store.sqlite"),
        snapshots=True, min_kills=MIN_KILLS, min_rounds=MIN_ROUNDS,
    )


def pgvector_store(request: pytest.FixtureRequest) -> Iterator[CrashStore]:
    """Indexes in schemas of the session's PostgreSQL server (tests/conftest.py), dropped afterwards."""
    import psycopg

    url = request.getfixturevalue("pgvector_url")
    prefix = f"crash_{uuid.uuid4().hex[:8]}"
    yield CrashStore(
        "pgvector", lambda index: StoreSettings(backend="pgvector", url=url, db_schema=f"{prefix}_{index}"),
        lambda settings: IndexVersionCommits(lambda: Ragline(settings).store), snapshots=False, min_kills=12,
    )
    with psycopg.connect(url, autocommit=True) as conn:
        made = conn.execute("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", (prefix,)).fetchall()
        for (schema,) in made:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def qdrant_store(request: pytest.FixtureRequest) -> Iterator[CrashStore]:
    """Qdrant's local mode under each index's data folder: one process at a time, so kills come after delays."""
    yield CrashStore("qdrant", lambda index: StoreSettings(backend="qdrant"), None, snapshots=False, min_kills=12)


def milvus_store(request: pytest.FixtureRequest) -> Iterator[CrashStore]:
    """Milvus Lite in each index's data folder: one process at a time, so kills come after delays.

    Dense results are compared: Milvus keeps BM25 statistics per segment and counts deleted rows in them, so its
    keyword scores depend on the history of writes and flushes (a re-ingest without kills differs from a fresh
    index too), not only on what the index holds.
    """
    yield CrashStore("milvus", lambda index: StoreSettings(backend="milvus"), None, snapshots=False, min_kills=12,
                     compared_mode="dense")


CRASH_STORES: dict[str, Callable[[pytest.FixtureRequest], Iterator[CrashStore]]] = {
    "local": local_store,
    "pgvector": pgvector_store,
    "qdrant": qdrant_store,
    "milvus": milvus_store,
}


@pytest.fixture(params=list(CRASH_STORES))
def crash_store(request) -> Iterator[CrashStore]:
    yield from CRASH_STORES[request.param](request)


def store_env(settings: Settings) -> dict[str, str]:
    """The environment that gives an ingest process these settings' data_dir and store (`RAGLINE_STORE__*`)."""
    env = {"RAGLINE_DATA_DIR": str(settings.data_dir)}
    for name, value in settings.store.model_dump(exclude_defaults=True).items():
        env[f"RAGLINE_STORE__{name.upper()}"] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return env


def index_state(settings: Settings) -> dict:
    """Manifest, chunks and vectors as the store gives them (`documents()`, `export_document`), minus the
    timestamps that differ between runs."""
    app = Ragline(settings)
    try:
        records = app.store.documents()
        docs = sorted(
            (r.doc_id, r.source, r.size, r.sha256, r.fingerprint, r.status, r.error, tuple(r.chunk_ids))
            for r in records
        )
        chunks, vectors = {}, {}
        for record in records:
            _, doc_chunks, doc_vectors = app.store.export_document(record.doc_id)
            for chunk, vector in zip(doc_chunks, doc_vectors, strict=True):
                meta = dict(chunk.metadata)
                meta.pop("ingested_at")
                chunks[chunk.chunk_id] = (chunk.doc_id, chunk.text, json.dumps(meta, sort_keys=True))
                vectors[chunk.chunk_id] = vector
        orphans = app.store.count() - sum(len(record.chunk_ids) for record in records)
        return {"documents": docs, "chunks": chunks, "vectors": vectors, "orphans": orphans}
    finally:
        app.close()


def search_results(settings: Settings, embedder) -> list[list[tuple[str, float]]]:
    """(chunk id, score) of the top K+1 hits per query, through a freshly opened store (it loads the snapshot)."""
    app = Ragline(settings)
    app.__dict__["embedder"] = embedder
    try:
        results = app.retriever.search_many(QUERIES, K + 1, scope=EVERYTHING)
        return [[(hit.chunk.chunk_id, hit.score) for hit in result.hits] for result in results]
    finally:
        app.close()


def assert_same_hits(got: list[tuple[str, float]], want: list[tuple[str, float]], what: str) -> None:
    """The same top K chunk ids in the same order, with the same scores.

    Scores may differ by SCORE_TOLERANCE: the killed runs embedded their
    chunks in other batch groupings than the reference, which changes the
    last float bits. For the same reason two hits whose reference scores
    are that close (a tie, never seen in this corpus so far) may trade places;
    the (K+1)-th hit is fetched so that a tie at the K-th place is seen.
    """
    assert len(want) == K + 1 and len(got) == K + 1, what
    for place in range(K):
        tied = {cid for cid, score in want if abs(score - want[place][1]) <= SCORE_TOLERANCE}
        assert got[place][0] in tied, f"{what}: place {place + 1} is {got[place][0]}, not {want[place][0]}"
        assert abs(got[place][1] - want[place][1]) <= SCORE_TOLERANCE, (
            f"{what}: place {place + 1}: {got[place]} != {want[place]}"
        )


def assert_same_as_uninterrupted(killed: Settings, reference: Settings, corpus: Corpus, embedder, label: str) -> None:
    app = Ragline(reference)
    app.__dict__["embedder"] = embedder
    app.indexer().run([SourceSettings(path=corpus.root)])
    app.close()

    got, clean = index_state(killed), index_state(reference)
    assert got["orphans"] == 0, label
    assert got["documents"] == clean["documents"], label
    assert got["chunks"] == clean["chunks"], label
    for chunk_id, vector in got["vectors"].items():
        assert float(vector @ clean["vectors"][chunk_id]) > 0.9999, f"{label}: stored vector of {chunk_id}"

    # The stores match an uninterrupted run; what is left to differ is the index that searches read.
    got_hits, want_hits = search_results(killed, embedder), search_results(reference, embedder)
    for query, got_query, want_query in zip(QUERIES, got_hits, want_hits):
        assert_same_hits(got_query, want_query, f"{label}: search {query!r}, killed runs vs an uninterrupted one")


@pytest.fixture(scope="module")
def embedding_server(embedder) -> Iterator[dict[str, str]]:
    """An OpenAI-compatible /v1/embeddings server with the default model; the settings that reach it.

    The model name, size and input limit are those of the local backend, so
    the killed runs chunk and fingerprint every file as the in-process reference run does.
    """
    one_at_a_time = threading.Lock()  # a killed client's request may still be embedding

    def embed(body: dict) -> Reply:
        with one_at_a_time:
            vectors = embedder.embed_documents(body["input"])
        return Reply(200, {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]})

    with ScriptedLLMServer(fallback=embed) as server:
        yield {
            "RAGLINE_EMBEDDER__BACKEND": "openai",
            "RAGLINE_EMBEDDER__BASE_URL": server.url,
            "RAGLINE_EMBEDDER__MODEL": embedder.name,
            "RAGLINE_EMBEDDER__DIMENSIONS": str(embedder.dim),
            "RAGLINE_EMBEDDER__MAX_TOKENS": str(embedder.max_tokens),
        }


class Ingests:
    """Runs `ragline ingest` on one index, killing runs as planned, and keeps the tally."""

    def __init__(
        self, corpus: Corpus, crash_store: CrashStore, settings: Settings, tally: CrashTally,
        embedder_env: dict[str, str],
    ) -> None:
        self.command = [sys.executable, "-m", "ragline", "ingest", str(corpus.root)]
        self.env = {
            **os.environ, **embedder_env, **store_env(settings), "RAGLINE_INGEST__EMBED_GROUP_CHUNKS": "4",
        }
        self.crash_store, self.settings, self.tally = crash_store, settings, tally
        self.last_killed = False
        self.snapshot_entries = 3
        """How many new entries under index/ a whole run makes, as last seen: where a snapshot kill can aim."""
        self.run_seconds = 5.0
        """How long a whole run took, as last seen: the range of delay kills."""

    def run(self, plan: KillPlan | None = None, json_report: bool = False) -> RunOutcome:
        watch = self.crash_store.commits
        outcome = run_ingest(
            self.command + ["--json"] * json_report, self.env, plan, watch(self.settings) if watch else None,
            self.settings.data_dir / "index" if self.crash_store.snapshots else None,
        )
        tally = self.tally
        tally.runs += 1
        tally.resumed_runs += self.last_killed
        self.last_killed = outcome.killed
        if outcome.killed:
            tally.kills += 1
            tally.kills_by_trigger[plan.trigger] = tally.kills_by_trigger.get(plan.trigger, 0) + 1
            tally.kills_during_snapshot += outcome.snapshot_entries_seen > 0
        else:
            tally.finished_before_the_kill += plan is not None
            self.snapshot_entries = outcome.snapshot_entries_seen or self.snapshot_entries
            self.run_seconds = outcome.seconds
        return outcome

    def write_kill(self, rng: random.Random, remaining: int) -> KillPlan:
        """After a random number of commits (within what the round still has to write) plus up to 100 ms; for a
        store that cannot be watched, after a random part of a whole run's time.

        A store without snapshot kills aims within the first third of what is left, so that its rounds hold
        several kills before the writes run out.
        """
        if self.crash_store.commits is None:
            return KillPlan("delay", 0, rng.uniform(0, self.run_seconds))
        reach = remaining - 1 if self.crash_store.snapshots else remaining // 3
        return KillPlan("commits", rng.randint(1, max(1, reach)), rng.uniform(0, 0.1))

    def crash_round(self, rng: random.Random, writes: int, churn: Callable[[], int] | None) -> None:
        """Kill runs until the round's kills are spent or a run finishes first.

        First while it writes (`write_kill`), then, for a store with
        snapshots, the moment the n-th new entry appears under index/ (n
        random, within what a whole run writes there) plus, half the time, a
        random delay of up to 2 ms.
        """
        remaining = writes + 2  # + each run's own meta writes
        for _ in range(rng.randint(7, 10)):
            outcome = self.run(self.write_kill(rng, remaining))
            if not outcome.killed:
                break
            remaining = max(1, remaining - outcome.commits_seen)
            if churn is not None:  # files change again between two killed runs, once a round
                remaining += churn()
                churn = None
        if not self.crash_store.snapshots:
            return
        for _ in range(rng.randint(7, 9)):
            delay = rng.choice([0.0, rng.uniform(0, 0.002)])
            outcome = self.run(KillPlan("snapshot", rng.randint(1, self.snapshot_entries), delay))
            if not outcome.killed and not outcome.snapshot_entries_seen:
                break  # that run wrote no snapshot: nothing left to aim at this round


@pytest.mark.slow
def test_killed_ingests_resume_to_the_search_results_of_an_uninterrupted_run(
    tmp_path, embedder, embedding_server, crash_store,
):
    rng = random.Random(SEED)
    tally = CrashTally()
    corpus = Corpus(tmp_path / "corpus", rng)
    corpus.add(FILES)
    killed = crash_store.settings(tmp_path, "killed")
    ingests = Ingests(corpus, crash_store, killed, tally, embedding_server)

    while tally.rounds < crash_store.min_rounds or (tally.kills < crash_store.min_kills and tally.rounds < MAX_ROUNDS):
        label = f"{crash_store.name} store, round {tally.rounds} (seed {SEED})"
        if tally.rounds == 0:
            ingests.crash_round(rng, FILES, churn=None)
        else:
            writes = corpus.change(tally, edit=6, delete=4)
            ingests.crash_round(rng, writes, churn=lambda: corpus.change(tally, edit=2, delete=1))

        finished = ingests.run(json_report=True)
        assert finished.report["failed"] == [], label
        report = ingests.run(json_report=True).report
        assert (report["new"], report["changed"], report["deleted"], report["failed"]) == ([], [], [], []), (
            f"{label}: a second resumed run found work left: {report}"
        )
        assert report["unchanged"] == len(corpus.files), label

        reference = crash_store.settings(tmp_path, f"reference_{tally.rounds}")
        assert_same_as_uninterrupted(killed, reference, corpus, embedder, label)
        tally.queries_compared += len(QUERIES)
        tally.rounds += 1
        print(f"\n{label}: {tally}")

    print(f"\ncrash suite, {crash_store.name} store (seed {SEED}): {tally}")
    assert tally.kills >= crash_store.min_kills
    if crash_store.snapshots:
        assert tally.kills_during_snapshot > 0
