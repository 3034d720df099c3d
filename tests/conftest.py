"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

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
