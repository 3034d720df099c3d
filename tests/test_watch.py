"""`ragline watch`: file events and object-store polls become ingest jobs in the service database.

The watcher's rules run in-process against the real service database (SQLite) and a real moto S3 server on
loopback, with a stand-in runner that finishes each job it claims at once (nothing is indexed); the slow tests
run real `ragline watch` processes, one beside a real `ragline serve` that runs the jobs it submits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import yaml
from scripted_llm_server import free_port

from ragline.config import Settings, SourceSettings
from ragline.serve.db import Database, Job
from ragline.serve.watch import PathFilter, Watcher, WatchError, diff_listings, list_objects

RAGLINE = [sys.executable, "-m", "ragline"]
HANG_S = 60.0
"""Guards against a hung watcher: outcomes are polled for, never timed."""
SLOW_HANG_S = 240.0
"""The same for real processes, which load the embedding model on a shared machine."""


async def until(check: Callable[[], Awaitable[object]], what: str, hang_s: float = HANG_S) -> object:
    deadline = time.monotonic() + hang_s
    while True:
        if result := await check():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def settings_for(tmp_path: Path, sources: list[dict], **watch: float) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", ingest={"sources": sources},
        watch={"debounce_s": 0.3, "max_delay_s": 5, "job_poll_s": 0.05, "poll_s": 0.2, **watch},
    )


async def finishing_runner(db: Database, stop: asyncio.Event) -> None:
    """Claims every job and finishes it at once, as a runner with nothing to index would."""
    while not stop.is_set():
        job = await db.jobs.claim(60)
        if job is None:
            await asyncio.sleep(0.02)
            continue
        await db.jobs.finish(job.id, "succeeded", report={"new": 0, "changed": 0, "deleted": 0, "unchanged": 0,
                                                          "failed": [], "chunks": 0, "seconds": 0.0},
                             attempt=job.attempts)


class Harness:
    """A Watcher over the real service database in tmp_path, run as a task of the test's loop."""

    def __init__(self, settings: Settings, sources: list[SourceSettings] | None = None):
        self.settings = settings
        self.db = Database.from_settings(settings)  # SQLite in the data folder
        self.messages: list[str] = []
        self.watcher = Watcher(settings, self.db, sources or settings.ingest.sources, None, say=self.messages.append)
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Harness:
        await self.db.migrate()  # before the test reads jobs (the watcher migrates too: a no-op then)
        self.tasks.append(asyncio.create_task(self.watcher.run(self.stop)))
        return self

    def run_jobs(self) -> None:
        self.tasks.append(asyncio.create_task(finishing_runner(self.db, self.stop)))

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        async with asyncio.timeout(HANG_S):
            results = await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.db.close()
        for result in results:
            if isinstance(result, BaseException) and not exc[0]:
                raise result

    async def jobs(self) -> list[Job]:
        return await self.db.jobs.list("default", 200)

    async def said(self, text: str) -> bool:
        return any(text in message for message in self.messages)

    async def settle(self) -> None:
        """Give stray events (none expected) several debounce periods to turn into jobs."""
        await asyncio.sleep(self.settings.watch.debounce_s * 5 + 0.5)
        assert all(job.status == "succeeded" for job in await self.jobs())


def test_path_filter_leaves_out_excludes_secrets_temp_files_and_the_data_folder(tmp_path):
    docs = tmp_path / "docs"
    settings = Settings(data_dir=docs / ".." / "docs" / "index")
    relevant = PathFilter(settings).relevant_path
    root = docs.resolve()
    for kept in ("guide.md", "api/ref.rst", "notes.txt"):
        assert relevant(root, root / kept), kept
    for dropped in (".hidden.md", ".git/HEAD", "api/.#ref.rst", "_static/x.css", "guide.md~", "#guide.md#",
                    "guide.md.swp", "4913", "id_rsa", "keys/server.pem", "index/service.sqlite", "index/ingest.lock",
                    "~$report.docx", "download.part"):
        assert not relevant(root, root / dropped), dropped
    assert not relevant(root, tmp_path / "elsewhere.md")


def test_listing_diff_names_new_changed_and_deleted_objects():
    before = {"a.md": ("e1", 10), "b.md": ("e2", 20), "c.md": ("e3", 30)}
    after = {"a.md": ("e1", 10), "b.md": ("e9", 20), "c.md": ("e3", 31), "d.md": ("e4", 40)}
    changes = diff_listings(before, after)
    assert (changes.new, changes.changed, changes.deleted) == (["d.md"], ["b.md", "c.md"], [])
    gone = diff_listings(after, {"a.md": ("e1", 10)})
    assert gone.deleted == ["b.md", "c.md", "d.md"] and not gone.new and not gone.changed
    assert not diff_listings(before, dict(before))


def test_a_missing_folder_is_refused_with_its_name(tmp_path):
    settings = settings_for(tmp_path, [{"path": str(tmp_path / "nowhere")}])
    with pytest.raises(WatchError, match="nowhere does not exist"):
        Watcher(settings, Database("sqlite+aiosqlite://"), settings.ingest.sources)


def test_start_catches_up_and_a_burst_of_writes_is_one_job(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    settings = settings_for(tmp_path, [{"path": str(docs)}])

    async def scenario() -> None:
        async with Harness(settings) as harness:
            first = (await until(harness.jobs, "the catch-up job"))[0]
            assert (first.kind, first.source, first.content_key) == ("source", "docs", "source:docs")
            harness.run_jobs()
            await until(lambda: harness.said(f"job {first.id} for docs succeeded"), "the catch-up job's outcome")
            for n in range(30):
                with open(docs / f"page{n % 5}.md", "a") as handle:
                    handle.write(f"# Page\n\nLine {n}.\n")
            await until(lambda: _count(harness, 2), "the burst's job")
            await harness.settle()
            jobs = await harness.jobs()
            assert len(jobs) == 2, [job.to_dict() for job in jobs]  # 30 writes: one job
            assert any("page0.md" in message and "submitted" in message for message in harness.messages)

    asyncio.run(scenario())


def test_an_unconfigured_folder_gets_path_jobs_that_only_its_holder_claims(tmp_path):
    """A folder no config lists becomes a "path" job: a server's runner (it holds no paths) leaves it queued, the
    watcher's own runner (it holds the folder) takes it; a configured source's job stays a "source" job."""
    docs, notes = tmp_path / "docs", tmp_path / "notes"
    docs.mkdir()
    notes.mkdir()
    settings = settings_for(tmp_path, [{"path": str(docs)}])
    unconfigured = SourceSettings(path=notes)

    async def scenario() -> None:
        async with Harness(settings, [*settings.ingest.sources, unconfigured]) as harness:
            jobs = await until(lambda: _jobs_at_least(harness, 2), "both catch-up jobs")
            kinds = {job.source: (job.kind, job.content_key) for job in jobs}
            assert kinds == {"docs": ("source", "source:docs"), "notes": ("path", "path:notes")}
            server_claims = await harness.db.jobs.claim(60)
            assert server_claims is not None and server_claims.source == "docs"
            assert await harness.db.jobs.claim(60) is None  # the path job is not a server's to take
            held = await harness.db.jobs.claim(60, [("default", "notes")])
            assert held is not None and (held.kind, held.source) == ("path", "notes")

    asyncio.run(scenario())


async def _jobs_at_least(harness: Harness, n: int) -> list[Job] | None:
    jobs = await harness.jobs()
    return jobs if len(jobs) >= n else None


async def _count(harness: Harness, n: int) -> bool:
    jobs = await harness.jobs()
    return len(jobs) >= n and all(job.status == "succeeded" for job in jobs)


def test_events_on_excluded_files_and_the_data_folder_submit_no_job(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    # the data folder inside the watched one: the index's own writes must never look like changes
    settings = Settings(
        data_dir=docs / "index", ingest={"sources": [{"path": str(docs)}], "exclude": [".*", "drafts"]},
        watch={"debounce_s": 0.3, "max_delay_s": 5, "job_poll_s": 0.05},
    )

    async def scenario() -> None:
        async with Harness(settings) as harness:
            harness.run_jobs()
            await until(lambda: _count(harness, 1), "the catch-up job")
            (docs / "index").mkdir(exist_ok=True)  # it holds the service database already
            (docs / "index" / "store.sqlite").write_text("x")
            (docs / ".guide.md.swp").write_text("x")
            (docs / "guide.md~").write_text("x")
            (docs / "drafts").mkdir()
            (docs / "drafts" / "wip.md").write_text("# WIP\n\nnot yet.\n")
            (docs / ".env").write_text("TOKEN=1")
            (docs / "4913").write_text("")
            await harness.settle()
            assert len(await harness.jobs()) == 1, harness.messages
            (docs / "guide.md").write_text("# Guide\n\nReal content.\n")  # the watcher was listening all along
            await until(lambda: _count(harness, 2), "the job of a real change")

    asyncio.run(scenario())


def test_a_change_while_the_job_runs_is_followed_by_another_job(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    settings = settings_for(tmp_path, [{"path": str(docs), "name": "handbook"}])

    async def scenario() -> None:
        async with Harness(settings) as harness:
            await until(harness.jobs, "the catch-up job")
            running = await harness.db.jobs.claim(60)  # a runner has started it (and may have scanned already)
            assert running is not None and running.source == "handbook"
            (docs / "late.md").write_text("# Late\n\nWritten while the job ran.\n")
            await until(lambda: harness.said(f"while job {running.id} runs"), "the change to meet the running job")
            assert [job.id for job in await harness.jobs()] == [running.id]  # the queue keeps one active job
            await harness.db.jobs.finish(running.id, "succeeded", report={}, attempt=running.attempts)
            jobs = await until(lambda: _newer_than(harness, running), "the follow-up job")
            assert jobs[0].status == "queued" and jobs[0].content_key == "source:handbook"
            assert await harness.said(f"changed while job {running.id} ran")

    asyncio.run(scenario())


async def _newer_than(harness: Harness, job: Job) -> list[Job] | None:
    jobs = await harness.jobs()
    return jobs if len(jobs) == 2 and jobs[1].id == job.id else None


def test_a_change_that_finds_its_job_queued_joins_it(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    settings = settings_for(tmp_path, [{"path": str(docs)}])

    async def scenario() -> None:
        async with Harness(settings) as harness:
            queued = (await until(harness.jobs, "the catch-up job"))[0]
            (docs / "more.md").write_text("# More\n\ntext\n")
            await until(lambda: harness.said(f"job {queued.id} is queued already"), "the change to join the job")
            assert [job.id for job in await harness.jobs()] == [queued.id]
            harness.run_jobs()
            await until(lambda: harness.said(f"job {queued.id} for docs succeeded"), "the job's outcome")
            await harness.settle()
            assert len(await harness.jobs()) == 1  # nothing was missed: no follow-up needed

    asyncio.run(scenario())


# --- object stores (a real S3 API: moto's server on loopback) -------------------------------------------------


@pytest.fixture
def s3(tmp_path):
    """A moto S3 server on loopback with an empty bucket; yields (s3fs filesystem, storage_options, bucket)."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    import s3fs

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
               "region": "us-east-1"}
    fs = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], key="testing", secret="testing",
                           skip_instance_cache=True,
                           use_listings_cache=False)
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"  # moto's state is per test process, not per server
    fs.mkdir(bucket)
    try:
        yield fs, options, bucket
    finally:
        server.stop()


def test_the_object_listing_sees_new_changed_and_deleted_objects(tmp_path, s3):
    fs, options, bucket = s3
    fs.pipe(f"{bucket}/docs/a.md", b"# A\n\nalpha\n")
    fs.pipe(f"{bucket}/docs/.hidden.md", b"# H\n")
    fs.pipe(f"{bucket}/docs/b.md~", b"# editor backup\n")
    settings = settings_for(tmp_path, [{"path": f"s3://{bucket}/docs", "storage_options": options}])
    source = settings.ingest.sources[0]
    before = list_objects(source, settings)
    assert set(before) == {"a.md"}
    fs.pipe(f"{bucket}/docs/b.md", b"# B\n\nbeta\n")
    fs.pipe(f"{bucket}/docs/a.md", b"# A\n\nalpha, rewritten\n")
    after = list_objects(source, settings)
    changes = diff_listings(before, after)
    assert (changes.new, changes.changed, changes.deleted) == (["b.md"], ["a.md"], [])
    fs.rm(f"{bucket}/docs/b.md")
    assert diff_listings(after, list_objects(source, settings)).deleted == ["b.md"]


def test_the_object_store_poller_submits_a_job_per_change(tmp_path, s3):
    fs, options, bucket = s3
    fs.pipe(f"{bucket}/docs/a.md", b"# A\n\nalpha\n")
    settings = settings_for(tmp_path, [{"path": f"s3://{bucket}/docs", "storage_options": options}])

    async def scenario() -> None:
        async with Harness(settings) as harness:
            first = (await until(harness.jobs, "the catch-up job"))[0]
            assert (first.source, first.content_key) == ("docs", "source:docs")
            harness.run_jobs()
            await until(lambda: _count(harness, 1), "the catch-up job's end")
            await asyncio.to_thread(fs.pipe, f"{bucket}/docs/b.md", b"# B\n\nbeta\n")
            await until(lambda: _count(harness, 2), "the job of a new object")
            assert await harness.said("1 new, 0 changed, 0 deleted")
            await asyncio.to_thread(fs.pipe, f"{bucket}/docs/a.md", b"# A\n\nalpha, rewritten\n")
            await until(lambda: _count(harness, 3), "the job of a changed object")
            await asyncio.to_thread(fs.rm, f"{bucket}/docs/a.md")
            await until(lambda: _count(harness, 4), "the job of a deleted object")
            assert await harness.said("0 new, 0 changed, 1 deleted")
            await asyncio.to_thread(fs.pipe, f"{bucket}/docs/.draft.md", b"# hidden\n")
            await harness.settle()
            assert len(await harness.jobs()) == 4

    asyncio.run(scenario())


# --- real processes ---------------------------------------------------------------------------------------------


class Process:
    """A `ragline` process with its output in a file (a pipe nobody reads would fill up and block it)."""

    def __init__(self, config: Path, *args: str):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [*RAGLINE, "--config", str(config), *args], stdout=self.log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the process exited ({self.process.returncode}): {self.output()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it outlasts a generous grace; the exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        return self.process.returncode


def wait_for(check: Callable[[], object], what: str, processes: list[Process], hang_s: float = SLOW_HANG_S) -> object:
    deadline = time.monotonic() + hang_s
    while True:
        for process in processes:
            process.check_alive()
        if result := check():
            return result
        if time.monotonic() > deadline:
            logs = "\n---\n".join(process.output()[-3000:] for process in processes)
            pytest.fail(f"gave up waiting for {what}: {logs}")
        time.sleep(0.2)


def db_jobs(config: Path) -> list[Job]:
    from ragline.config import load_settings

    from sqlalchemy.exc import OperationalError

    settings = load_settings(config)
    if not (settings.data_dir / "service.sqlite").exists():
        return []  # the watcher has not made it yet

    async def read() -> list[Job]:
        db = Database.from_settings(settings)
        try:
            return await db.jobs.list("default", 200)
        except OperationalError:  # being migrated by the watcher right now
            return []
        finally:
            await db.close()

    return asyncio.run(read())


def indexed(data_dir: Path) -> set[str]:
    """The file names the index holds now (a fresh reader each time)."""
    from ragline.app import Ragline

    app = Ragline(Settings(data_dir=data_dir))
    try:
        return {Path(record.source).name for record in app.store.documents() if record.status == "indexed"}
    finally:
        app.close()


def search_sources(data_dir: Path, embedder, query: str) -> list[str]:
    from ragline.app import Ragline
    from ragline.store.base import Scope

    app = Ragline(Settings(data_dir=data_dir))
    app.__dict__["embedder"] = embedder
    try:
        result = app.retriever.search(query, 3, scope=Scope.everything("default"))
        return [str(hit.chunk.metadata.get("source", "")) for hit in result.hits]
    finally:
        app.close()


def all_done(config: Path, count: int) -> list[Job] | None:
    jobs = db_jobs(config)
    return jobs if len(jobs) >= count and all(job.status in ("succeeded", "failed") for job in jobs) else None


@pytest.fixture
def folder_config(tmp_path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "intro.md").write_text("# Intro\n\nThe watcher indexes folders as they change.\n")
    config = tmp_path / "ragline.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "generate": {"llm": {"backend": "extractive"}},
        "serve": {"rate_limits": {"enabled": False}, "job_lease_s": 5},
        "watch": {"debounce_s": 1.0, "max_delay_s": 10, "job_poll_s": 0.2},
    }))
    return config


@pytest.mark.slow
def test_watch_indexes_new_files_takes_a_burst_as_few_jobs_and_drops_deleted_files(folder_config, tmp_path, embedder):
    docs, data = tmp_path / "docs", tmp_path / "data"
    watch = Process(folder_config, "watch", str(docs))  # not a configured source: this process runs its jobs
    try:
        wait_for(lambda: all_done(folder_config, 1), "the catch-up job", [watch])
        assert indexed(data) == {"intro.md"}
        (docs / "lighthouse.md").write_text("# Lighthouse\n\nThe lighthouse keeper polishes the brass lamp at dusk.\n")
        jobs = wait_for(lambda: all_done(folder_config, 2), "the new file's job", [watch])
        assert jobs[0].report["new"] == 1 and (jobs[0].kind, jobs[0].content_key) == ("path", "path:docs")
        assert "lighthouse.md" in search_sources(data, embedder, "who polishes the brass lamp?")[0]

        for n in range(30):  # a burst: 30 writes over 10 files
            with open(docs / f"burst{n % 10}.md", "a") as handle:
                handle.write(f"# Burst {n % 10}\n\nParagraph {n} about burst writes.\n\n")
            time.sleep(0.01)
        wait_for(lambda: indexed(data) >= {f"burst{n}.md" for n in range(10)} and all_done(folder_config, 3),
                 "the burst's files", [watch])
        time.sleep(3)  # room for stray jobs (none expected) to be submitted before they are counted
        burst_jobs = len(wait_for(lambda: all_done(folder_config, 3), "the burst's jobs to end", [watch])) - 2
        assert 1 <= burst_jobs <= 3, f"30 writes made {burst_jobs} jobs"

        (docs / "lighthouse.md").unlink()
        jobs = wait_for(lambda: (found := all_done(folder_config, 3 + burst_jobs)) and found[0].report.get("deleted")
                        and found, "the deletion's job", [watch])
        assert jobs[0].report["deleted"] == 1
        assert "lighthouse.md" not in indexed(data)
        wait_for(lambda: "1 deleted" in watch.output(), "the deletion's outcome on the console", [watch])
        assert "submitted job" in watch.output() and "1 new" in watch.output()
    finally:
        code = watch.stop()
    assert code == 0, watch.output()[-3000:]  # SIGTERM stops it cleanly
    assert "stopped watching" in watch.output()


def test_submit_only_refuses_a_folder_the_server_would_not_know(folder_config, tmp_path):
    refused = subprocess.run([*RAGLINE, "--config", str(folder_config), "watch", "--submit-only", str(tmp_path / "docs")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "not a source of ingest.sources" in refused.stderr and "--submit-only" in refused.stderr


@pytest.mark.slow
def test_watch_submit_only_feeds_the_jobs_of_a_running_server(folder_config, tmp_path):
    docs = tmp_path / "docs"
    settings = yaml.safe_load(folder_config.read_text())
    settings["ingest"] = {"sources": [{"path": str(docs), "name": "handbook"}]}
    folder_config.write_text(yaml.safe_dump(settings))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Process(folder_config, "serve", "--port", str(port))
    watch = Process(folder_config, "watch", "--submit-only", "--source", "handbook")
    client = httpx.Client(base_url=url, timeout=30)

    def jobs() -> list[dict]:
        try:
            response = client.get("/v1/jobs")
        except httpx.HTTPError:
            return []
        return response.json()["items"] if response.status_code == 200 else []

    def finished(count: int) -> list[dict] | None:
        found = jobs()
        return found if len(found) >= count and all(job["status"] in ("succeeded", "failed") for job in found) else None

    try:
        first = wait_for(lambda: finished(1), "the catch-up job, run by the server", [server, watch])
        assert first[0]["source"] == "handbook" and first[0]["status"] == "succeeded", first
        (docs / "tides.md").write_text("# Tides\n\nThe harbour master posts the tide table every Monday.\n")
        latest = wait_for(lambda: finished(2), "the new file's job", [server, watch])[0]
        assert latest["status"] == "succeeded" and latest["report"]["new"] == 1, latest
        hits = client.post("/v1/search", json={"query": "when is the tide table posted?", "k": 3}).json()["hits"]
        assert hits and "tides" in json.dumps(hits[0])
        wait_for(lambda: f"job {latest['id']} for handbook succeeded" in watch.output(),  # it polls the job's outcome
                 "the watcher to report the job's outcome", [server, watch])
    finally:
        client.close()
        watch_code = watch.stop()
        server.stop()
    assert watch_code == 0, watch.output()[-3000:]


@pytest.mark.slow
def test_watch_indexes_an_object_store_prefix_as_it_changes(tmp_path, s3, embedder):
    fs, options, bucket = s3
    fs.pipe(f"{bucket}/kb/ferry.md", b"# Ferry\n\nThe ferry to the island leaves at seven.\n")
    config = tmp_path / "ragline.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "ingest": {"sources": [{"path": f"s3://{bucket}/kb", "storage_options": options}]},
        "watch": {"poll_s": 0.5, "job_poll_s": 0.2},
    }))
    data = tmp_path / "data"
    watch = Process(config, "watch")
    try:
        first = wait_for(lambda: all_done(config, 1), "the catch-up job", [watch])[0]
        assert first.status == "succeeded" and first.report["new"] == 1, first
        fs.pipe(f"{bucket}/kb/lantern.md", b"# Lantern\n\nThe lantern on the pier is lit with whale oil.\n")
        latest = wait_for(lambda: all_done(config, 2), "the new object's job", [watch])[0]
        assert latest.status == "succeeded" and latest.report["new"] == 1, latest
        assert "lantern" in search_sources(data, embedder, "what lights the lantern on the pier?")[0]
        fs.rm(f"{bucket}/kb/ferry.md")
        latest = wait_for(lambda: all_done(config, 3), "the deleted object's job", [watch])[0]
        assert latest.report["deleted"] == 1, latest
        assert indexed(data) == {"lantern.md"}
    finally:
        code = watch.stop()
    assert code == 0, watch.output()[-3000:]
