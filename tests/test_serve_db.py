"""The service database on real SQLite and real PostgreSQL: migrations, keys, jobs, chats, answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import text

from ragline.serve.db import Base, Database, DatabaseError

T = TypeVar("T")


def with_database(url: str, scenario: Callable[[Database], Awaitable[T]]) -> T:
    """Run `scenario` on a migrated database, closing it afterwards."""

    async def run() -> T:
        database = Database(url)
        try:
            await database.migrate()
            return await scenario(database)
        finally:
            await database.close()

    return asyncio.run(run())


async def rows(database: Database, query: str) -> list[tuple[Any, ...]]:
    async with database._engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(text(query))]


# --- migrations --------------------------------------------------------------------------------------------------


def test_migrate_twice_keeps_data_and_the_version(service_database_url):
    async def scenario(database: Database) -> None:
        key, _ = await database.keys.create("acme", ["eng"])
        await database.migrate()
        assert await rows(database, "SELECT version_num FROM alembic_version") == [("0001",)]
        assert [found.id for found in await database.keys.list("acme")] == [key.id]

    with_database(service_database_url, scenario)


def test_migrations_create_exactly_the_models_schema(service_database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def differences(connection) -> list:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)

    async def scenario(database: Database) -> None:
        async with database._engine.connect() as connection:
            assert await connection.run_sync(differences) == []

    with_database(service_database_url, scenario)


def test_concurrent_migrations_in_one_process(service_database_url):
    async def scenario() -> None:
        first, second = Database(service_database_url), Database(service_database_url)
        try:
            await asyncio.gather(first.migrate(), second.migrate())
            key, token = await first.keys.create("acme", [])
            assert await second.keys.verify(token) == key
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def test_concurrent_migrations_in_two_processes(service_database_url, tmp_path: Path):
    # Each process waits until both are up, then migrates: the two upgrades overlap.
    script = textwrap.dedent("""
        import asyncio, sys, time
        from pathlib import Path
        from ragline.serve.db import Database
        url, barrier, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
        (barrier / me).touch()
        deadline = time.monotonic() + 60
        while len(list(barrier.iterdir())) < 2:
            if time.monotonic() > deadline:
                sys.exit("the other process never started")
            time.sleep(0.01)
        async def main():
            database = Database(url)
            await database.migrate()
            await database.keys.create("acme", [], name=me)
            await database.close()
        asyncio.run(main())
    """)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen([sys.executable, "-c", script, service_database_url, str(barrier), name],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("first", "second")
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr

    async def scenario(database: Database) -> None:
        assert await rows(database, "SELECT version_num FROM alembic_version") == [("0001",)]
        assert sorted(key.name for key in await database.keys.list()) == ["first", "second"]

    with_database(service_database_url, scenario)


def test_unreachable_database_fails_with_its_url():
    database = Database("postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/nowhere")

    async def scenario() -> None:
        try:
            with pytest.raises(DatabaseError, match="could not migrate the service database .*127.0.0.1:1/nowhere"):
                await database.migrate()
            with pytest.raises(DatabaseError, match="does not answer") as failure:
                await database.ping()
            assert "hunter2" not in str(failure.value)
        finally:
            await database.close()

    asyncio.run(scenario())


def test_default_database_is_sqlite_in_the_data_folder(tmp_path: Path):
    from ragline.config import Settings

    database = Database.from_settings(Settings(data_dir=tmp_path / "data"))
    assert database.backend == "sqlite"
    with_database(database.url, lambda migrated: migrated.ping())
    assert (tmp_path / "data" / "service.sqlite").is_file()


def test_ping_answers(service_database_url):
    with_database(service_database_url, lambda database: database.ping())


# --- API keys ----------------------------------------------------------------------------------------------------


def test_keys_create_verify_revoke_and_list_per_tenant(service_database_url):
    async def scenario(database: Database) -> None:
        key, token = await database.keys.create("acme", ["ops", "eng", "eng"], name="ci bot")
        admin, admin_token = await database.keys.create("acme", [], admin=True)
        other, other_token = await database.keys.create("globex", ["eng"])
        assert token.startswith(f"rl_{key.id}_") and key.groups == ["eng", "ops"] and not key.admin
        assert key.created_at.tzinfo is UTC and key.revoked_at is None

        assert await database.keys.verify(token) == key
        assert (await database.keys.verify(admin_token)).admin
        assert (await database.keys.verify(other_token)).tenant == "globex"
        for forged in (token[:-1] + ("A" if token[-1] != "A" else "B"), f"rl_{key.id}_" + "x" * 43,
                       "rl_nothex_secret", "", token + " "):
            assert await database.keys.verify(forged) is None

        assert [found.id for found in await database.keys.list("acme")] == [key.id, admin.id]
        assert [found.id for found in await database.keys.list("globex")] == [other.id]
        assert {found.id for found in await database.keys.list()} == {key.id, admin.id, other.id}

        assert await database.keys.revoke(key.id) is True
        assert await database.keys.verify(token) is None
        assert await database.keys.revoke(key.id) is False
        assert await database.keys.revoke("0123456789abcdef") is False
        revoked = (await database.keys.list("acme"))[0]
        assert revoked.id == key.id and revoked.revoked_at is not None
        assert await database.keys.verify(admin_token) == admin
        json.dumps(revoked.to_dict())

    with_database(service_database_url, scenario)


def test_keys_are_stored_as_hashes_only(service_database_url):
    async def scenario(database: Database) -> None:
        _, token = await database.keys.create("acme", ["eng"])
        secret = token.split("_", 2)[2]  # rl_<id>_<secret>; the secret itself may hold "_"
        stored = await rows(database, "SELECT * FROM api_keys")
        assert len(stored) == 1
        assert not any(secret in str(value) for value in stored[0])
        assert hashlib.sha256(token.encode()).hexdigest() in stored[0]

    with_database(service_database_url, scenario)


# --- jobs --------------------------------------------------------------------------------------------------------


def test_submit_is_idempotent_per_tenant_and_content(service_database_url):
    async def scenario(database: Database) -> None:
        job, created = await database.jobs.submit("acme", "upload", "/uploads/a.pdf", "sha:1", ["eng"], "a.pdf")
        assert created and job.status == "queued" and job.attempts == 0 and job.filename == "a.pdf"
        again, created_again = await database.jobs.submit("acme", "upload", "/uploads/a2.pdf", "sha:1", ["eng"])
        assert again == job and not created_again
        other, created_other = await database.jobs.submit("globex", "upload", "/uploads/a.pdf", "sha:1", ["eng"])
        assert created_other and other.id != job.id
        assert await database.jobs.get("acme", job.id) == job
        assert await database.jobs.get("globex", job.id) is None
        assert [found.id for found in await database.jobs.list("globex")] == [other.id]
        json.dumps(job.to_dict())

    with_database(service_database_url, scenario)


def test_concurrent_submits_of_one_content_make_one_job(service_database_url):
    async def scenario(database: Database) -> None:
        second = Database(service_database_url)  # its own connections, as another server process has
        try:
            submits = [(database if n % 2 else second).jobs.submit("acme", "source", "docs/", "tree:9", ["*"])
                       for n in range(10)]
            results = await asyncio.gather(*submits)
        finally:
            await second.close()
        assert len({job.id for job, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert len(await database.jobs.list("acme")) == 1

    with_database(service_database_url, scenario)


def test_two_claimers_never_take_the_same_job(service_database_url):
    async def scenario(database: Database) -> None:
        submitted = [(await database.jobs.submit("acme", "upload", f"f{n}", f"sha:{n}", ["*"]))[0] for n in range(6)]
        other = Database(service_database_url)
        try:
            claims = await asyncio.gather(*[(database if n % 2 else other).jobs.claim(3600) for n in range(8)])
        finally:
            await other.close()
        claimed = [job for job in claims if job is not None]
        assert sorted(job.id for job in claimed) == sorted(job.id for job in submitted)
        assert all(job.status == "running" and job.attempts == 1 for job in claimed)
        assert await database.jobs.claim(3600) is None

    with_database(service_database_url, scenario)


def test_claim_takes_the_oldest_queued_job_first(service_database_url):
    async def scenario(database: Database) -> None:
        first, _ = await database.jobs.submit("acme", "upload", "a", "sha:a", ["*"])
        second, _ = await database.jobs.submit("globex", "upload", "b", "sha:b", ["*"])
        assert (await database.jobs.claim(60)).id == first.id
        assert (await database.jobs.claim(60)).id == second.id

    with_database(service_database_url, scenario)


def test_path_jobs_are_claimed_only_by_a_claimer_that_holds_the_path(service_database_url):
    """A watcher's unconfigured folder ("path" job) is never taken by a server, which could not index it."""
    async def scenario(database: Database) -> None:
        path_job, _ = await database.jobs.submit("acme", "path", "notes", "path:notes", ["*"])
        upload, _ = await database.jobs.submit("acme", "upload", "a", "sha:a", ["*"])
        assert (await database.jobs.claim(60)).id == upload.id  # the older path job is passed over
        assert await database.jobs.claim(60) is None
        assert await database.jobs.claim(60, [("globex", "notes"), ("acme", "other")]) is None
        held = await database.jobs.claim(0, [("acme", "notes")])
        assert held.id == path_job.id and held.status == "running"
        assert await database.jobs.claim(60) is None  # its lease ran out, still not a server's to take
        assert (await database.jobs.claim(60, [("acme", "notes")])).attempts == 2

    with_database(service_database_url, scenario)


def test_an_expired_lease_is_claimed_again_and_heartbeats_keep_it(service_database_url):
    async def scenario(database: Database) -> None:
        job, _ = await database.jobs.submit("acme", "upload", "a", "sha:a", ["*"])
        crashed = await database.jobs.claim(0)  # a holder that never heartbeats: its lease is over at once
        assert crashed.id == job.id and crashed.attempts == 1
        reclaimed = await database.jobs.claim(0)
        assert reclaimed.id == job.id and reclaimed.attempts == 2 and reclaimed.status == "running"
        assert await database.jobs.heartbeat(job.id, 3600) is True
        assert await database.jobs.claim(3600) is None
        # the first holder comes back (it had stalled, not died): its claim is gone, the second one's is not
        assert await database.jobs.heartbeat(job.id, 3600, attempt=crashed.attempts) is False
        assert await database.jobs.finish(job.id, "failed", error="stale", attempt=crashed.attempts) is None
        assert (await database.jobs.get("acme", job.id)).status == "running"
        assert await database.jobs.heartbeat(job.id, 3600, attempt=reclaimed.attempts) is True
        done = await database.jobs.finish(job.id, "succeeded", attempt=reclaimed.attempts)
        assert done.status == "succeeded"

    with_database(service_database_url, scenario)


def test_finish_records_the_outcome_and_frees_the_content(service_database_url):
    async def scenario(database: Database) -> None:
        job, _ = await database.jobs.submit("acme", "upload", "a", "sha:a", ["eng"])
        await database.jobs.claim(60)
        done = await database.jobs.finish(job.id, "succeeded", report={"chunks": 3}, doc_id="doc-1")
        assert done.status == "succeeded" and done.report == {"chunks": 3} and done.doc_id == "doc-1"
        assert await database.jobs.heartbeat(job.id, 60) is False
        assert await database.jobs.claim(60) is None

        again, created = await database.jobs.submit("acme", "upload", "a", "sha:a", ["eng"])
        assert created and again.id != job.id
        assert (await database.jobs.latest("acme", "sha:a")).id == again.id
        assert await database.jobs.latest("globex", "sha:a") is None
        assert (await database.jobs.get("acme", job.id)).status == "succeeded"
        failed = await database.jobs.finish(again.id, "failed", error="unreadable PDF")
        assert failed.status == "failed" and failed.error == "unreadable PDF"
        assert [found.id for found in await database.jobs.list("acme", limit=1)] == [again.id]
        assert [found.id for found in await database.jobs.list("acme", limit=1, offset=1)] == [job.id]
        assert await database.jobs.finish("no-such-job", "failed") is None
        with pytest.raises(ValueError, match="succeeded or failed"):
            await database.jobs.finish(job.id, "queued")  # type: ignore[arg-type]

    with_database(service_database_url, scenario)


# --- chats, answers, feedback --------------------------------------------------------------------------------


def test_chat_sessions_belong_to_one_subject_of_one_tenant(service_database_url):
    async def scenario(database: Database) -> None:
        chats = database.chats
        mine = await chats.create_session("acme", "jwt:ann", "pricing")
        await chats.create_session("acme", "jwt:bob", "bob's")
        assert await chats.get_session("acme", "jwt:ann", mine.id) == mine
        assert await chats.get_session("acme", "jwt:bob", mine.id) is None
        assert await chats.get_session("globex", "jwt:ann", mine.id) is None
        assert [found.id for found in await chats.list_sessions("acme", "jwt:ann")] == [mine.id]
        assert await chats.list_sessions("globex", "jwt:ann") == []
        assert await chats.delete_session("acme", "jwt:bob", mine.id) is False
        assert await chats.delete_session("globex", "jwt:ann", mine.id) is False
        assert await chats.get_session("acme", "jwt:ann", mine.id) == mine

    with_database(service_database_url, scenario)


def test_messages_are_kept_in_order_and_go_with_their_session(service_database_url):
    async def scenario(database: Database) -> None:
        chats = database.chats
        session = await chats.create_session("acme", "key:1", "t")
        older = await chats.create_session("acme", "key:1", "older")
        answer_id = await database.answers.record("acme", "key:1", "q2", {"text": "a2"}, session.id)
        for n, role in enumerate(["user", "assistant", "user", "assistant"]):
            await chats.add_message(session.id, role, f"m{n}", answer_id if n == 3 else None)
        assert [m.content for m in await chats.messages(session.id)] == ["m0", "m1", "m2", "m3"]
        assert [m.content for m in await chats.messages(session.id, limit=2)] == ["m2", "m3"]
        assert (await chats.messages(session.id))[3].answer_id == answer_id
        # the session with the newest message is listed first
        await chats.add_message(older.id, "user", "hello")
        assert [found.id for found in await chats.list_sessions("acme", "key:1")] == [older.id, session.id]
        assert [found.id for found in await chats.list_sessions("acme", "key:1", limit=1, offset=1)] == [session.id]
        with pytest.raises(LookupError, match="no chat session"):
            await chats.add_message("missing", "user", "x")

        assert await chats.delete_session("acme", "key:1", session.id) is True
        assert await chats.messages(session.id) == []
        assert (await database.answers.get("acme", answer_id)).session_id is None

    with_database(service_database_url, scenario)


def test_feedback_only_on_answers_of_the_callers_tenant(service_database_url):
    async def scenario(database: Database) -> None:
        answers = database.answers
        answer_id = await answers.record("acme", "key:1", "what is X?", {"text": "X is Y", "citations": [1]})
        stored = await answers.get("acme", answer_id)
        assert stored.question == "what is X?" and stored.answer == {"text": "X is Y", "citations": [1]}
        assert await answers.get("globex", answer_id) is None
        assert await answers.add_feedback("globex", "key:2", answer_id, 1, "sneaky") is None
        assert await answers.add_feedback("acme", "key:1", "missing", 1, "") is None
        feedback = await answers.add_feedback("acme", "key:1", answer_id, -1, "wrong citation")
        assert feedback.rating == -1 and feedback.answer_id == answer_id and feedback.tenant == "acme"
        assert await answers.list_feedback("acme") == [feedback]
        assert await answers.list_feedback("globex") == []
        json.dumps(stored.to_dict())
        json.dumps(feedback.to_dict())

    with_database(service_database_url, scenario)


def test_prune_deletes_only_what_is_past_its_retention(service_database_url):
    """Finished jobs and answers older than their retention go (feedback with its answer, a chat message keeps its
    text); queued and running jobs, newer rows and settings of None are kept."""

    async def age(database: Database, table: str, column: str, row_id: str, days: float) -> None:
        async with database._writer.connect() as connection, connection.begin():
            when = await connection.scalar(text(f"SELECT {column} FROM {table} WHERE id = :id"), {"id": row_id})
            if isinstance(when, str):  # SQLite keeps text
                when = datetime.fromisoformat(when)
            await connection.execute(
                text(f"UPDATE {table} SET {column} = :when WHERE id = :id"),
                {"when": when - timedelta(days=days), "id": row_id},
            )

    async def scenario(database: Database) -> None:
        jobs = database.jobs
        old_done, _ = await jobs.submit("acme", "source", "docs", "source:docs", ["*"])
        await jobs.claim(30)
        await jobs.finish(old_done.id, "succeeded", report={})
        new_done, _ = await jobs.submit("acme", "source", "docs", "source:docs", ["*"])
        await jobs.claim(30)
        await jobs.finish(new_done.id, "failed", error="x")
        old_queued, _ = await jobs.submit("acme", "upload", "u", "upload:1", ["*"])
        for job_id in (old_done.id, old_queued.id):
            await age(database, "jobs", "updated_at", job_id, 40)

        answers, chats = database.answers, database.chats
        session = await chats.create_session("acme", "key:1", "t")
        old_answer = await answers.record("acme", "key:1", "old?", {"text": "old"}, session.id)
        await chats.add_message(session.id, "assistant", "old", old_answer)
        await answers.add_feedback("acme", "key:1", old_answer, 1)
        new_answer = await answers.record("acme", "key:1", "new?", {"text": "new"})
        kept_feedback = await answers.add_feedback("acme", "key:1", new_answer, -1)
        await age(database, "answers", "created_at", old_answer, 400)

        assert await database.prune(None, None) == {}
        assert await database.prune(30, 365) == {"jobs": 1, "answers": 1}
        assert {job.id for job in await jobs.list("acme")} == {new_done.id, old_queued.id}
        assert await answers.get("acme", old_answer) is None
        assert await answers.list_feedback("acme") == [kept_feedback]
        assert [(m.content, m.answer_id) for m in await chats.messages(session.id)] == [("old", None)]
        assert await database.prune(30, 365) == {"jobs": 0, "answers": 0}

    with_database(service_database_url, scenario)
