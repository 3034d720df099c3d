"""The service database: API keys, ingest jobs, chat sessions, answers and their feedback.

SQLite in the data folder by default (WAL mode, so several server processes share it),
PostgreSQL by URL (`serve.database_url`). Repositories hand out frozen records, never ORM
objects, and every read names its tenant, so one tenant's rows are never read for another.
The schema is made by the Alembic migrations in `migrations/`, run by `Database.migrate()`.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import (
    JSON, Boolean, DateTime, Dialect, ForeignKey, Index, Integer, String, Text, TypeDecorator, and_, delete, event,
    or_, select, text, update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

if TYPE_CHECKING:
    from ragline.config import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_S = 10.0
"""Opening a connection (PostgreSQL) and waiting for SQLite's write lock (busy timeout)."""
PING_TIMEOUT_S = 2.0
MIGRATE_TIMEOUT_S = 120.0
MIGRATION_LOCK_KEY = 0x7261676C696E65  # "ragline": the PostgreSQL advisory lock that serialises migrations
SUBMIT_TRIES = 3
_WRITE = "ragline_write"
"""Execution option of the writing engine: on SQLite its transactions start with BEGIN IMMEDIATE."""

JobKind = Literal["upload", "source", "path"]
"""upload: a file sent to the API; source: a source of ingest.sources; path: a folder or URL a watcher was given
that no config lists, claimed only by a runner that holds it (`JobRepository.claim(paths=...)`)."""
JobStatus = Literal["queued", "running", "succeeded", "failed"]
FINAL_STATUSES = ("succeeded", "failed")
MessageRole = Literal["user", "assistant"]

TOKEN_PREFIX = "rl_"
_TOKEN = re.compile(r"rl_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})")


class DatabaseError(RuntimeError):
    """The service database cannot be reached or migrated."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_key_token(token: str) -> str | None:
    """The key id of a well-formed API key token (`rl_<id>_<secret>`), None for anything else."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


# --- records ---------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True)
class _Record:
    def to_dict(self) -> dict[str, Any]:
        return {field.name: _json_safe(getattr(self, field.name)) for field in fields(self)}


@dataclass(frozen=True)
class ApiKey(_Record):
    id: str
    tenant: str
    groups: list[str]
    admin: bool
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Job(_Record):
    id: str
    tenant: str
    kind: JobKind
    source: str
    filename: str
    content_key: str
    groups: list[str]
    status: JobStatus
    attempts: int
    report: dict[str, Any] | None
    error: str
    doc_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ChatSession(_Record):
    id: str
    tenant: str
    subject: str
    title: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ChatMessage(_Record):
    id: int
    session_id: str
    role: MessageRole
    content: str
    answer_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class StoredAnswer(_Record):
    id: str
    tenant: str
    subject: str
    session_id: str | None
    question: str
    answer: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Feedback(_Record):
    id: str
    answer_id: str
    tenant: str
    subject: str
    rating: int
    comment: str
    created_at: datetime


# --- tables ----------------------------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend: SQLite keeps no zone, so it stores naive UTC and gets UTC back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value}: the service database stores aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant", "tenant"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    groups: Mapped[list[str]] = mapped_column(JSON)
    admin: Mapped[bool] = mapped_column(Boolean)
    name: Mapped[str] = mapped_column(String)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    def record(self) -> ApiKey:
        return ApiKey(self.id, self.tenant, list(self.groups), self.admin, self.name, self.created_at,
                      self.revoked_at)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # One queued or running job per content: `active` is NULL once finished, and NULLs never collide.
        Index("uq_jobs_active_content", "tenant", "content_key", "active", unique=True),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(String)
    content_key: Mapped[str] = mapped_column(String)
    groups: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str] = mapped_column(Text)
    doc_id: Mapped[str | None] = mapped_column(String)
    lease_until: Mapped[datetime | None]
    active: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    def record(self) -> Job:
        return Job(
            self.id, self.tenant, self.kind, self.source, self.filename, self.content_key,  # type: ignore[arg-type]
            list(self.groups), self.status, self.attempts, self.report, self.error,  # type: ignore[arg-type]
            self.doc_id, self.created_at, self.updated_at,
        )


class ChatSessionRow(Base):
    __tablename__ = "chat_sessions"
    __table_args__ = (Index("ix_chat_sessions_owner", "tenant", "subject", "updated_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    subject: Mapped[str] = mapped_column(String)
    title: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    def record(self) -> ChatSession:
        return ChatSession(self.id, self.tenant, self.subject, self.title, self.created_at, self.updated_at)


class AnswerRow(Base):
    __tablename__ = "answers"
    __table_args__ = (
        Index("ix_answers_tenant_created", "tenant", "created_at"),
        Index("ix_answers_session", "session_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    subject: Mapped[str] = mapped_column(String)
    session_id: Mapped[str | None] = mapped_column(ForeignKey("chat_sessions.id", ondelete="SET NULL"))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]

    def record(self) -> StoredAnswer:
        return StoredAnswer(self.id, self.tenant, self.subject, self.session_id, self.question, self.answer,
                            self.created_at)


class ChatMessageRow(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (Index("ix_chat_messages_session", "session_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    answer_id: Mapped[str | None] = mapped_column(ForeignKey("answers.id", ondelete="SET NULL"))
    created_at: Mapped[datetime]

    def record(self) -> ChatMessage:
        return ChatMessage(self.id, self.session_id, self.role, self.content,  # type: ignore[arg-type]
                           self.answer_id, self.created_at)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    __table_args__ = (
        Index("ix_feedback_tenant_created", "tenant", "created_at"),
        Index("ix_feedback_answer", "answer_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    answer_id: Mapped[str] = mapped_column(ForeignKey("answers.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String)
    subject: Mapped[str] = mapped_column(String)
    rating: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]

    def record(self) -> Feedback:
        return Feedback(self.id, self.answer_id, self.tenant, self.subject, self.rating, self.comment,
                        self.created_at)


# --- repositories ----------------------------------------------------------------------------------------------

Sessions = async_sessionmaker[AsyncSession]


class _Repository:
    def __init__(self, reads: Sessions, writes: Sessions) -> None:
        self._reads = reads
        self._writes = writes


class KeyRepository(_Repository):
    """API keys: the token (`rl_<id>_<secret>`) is shown once at creation; only its SHA-256 is kept."""

    async def create(
        self, tenant: str, groups: Sequence[str], admin: bool = False, name: str = ""
    ) -> tuple[ApiKey, str]:
        if not tenant:
            raise ValueError("an API key needs a tenant")
        key_id = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        row = ApiKeyRow(id=key_id, tenant=tenant, groups=sorted(set(groups)), admin=admin, name=name,
                        token_hash=_digest(token), created_at=utcnow(), revoked_at=None)
        async with self._writes() as session, session.begin():
            session.add(row)
        return row.record(), token

    async def list(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        """Every key (revoked ones too), oldest first; `tenant` None: all tenants (the operator's view)."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        async with self._reads() as session:
            return [row.record() for row in await session.scalars(query)]

    async def revoke(self, key_id: str) -> bool:
        """False when no key has this id or it was revoked already."""
        async with self._writes() as session, session.begin():
            result = await session.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=utcnow()).execution_options(synchronize_session=False)
            )
        return result.rowcount == 1  # type: ignore[attr-defined]

    async def verify(self, token: str) -> ApiKey | None:
        """The key of a token; None when it is malformed, unknown or revoked."""
        key_id = parse_key_token(token)
        if key_id is None:
            return None
        async with self._reads() as session:
            row = await session.get(ApiKeyRow, key_id)
        if row is None or not hmac.compare_digest(_digest(token), row.token_hash) or row.revoked_at is not None:
            return None
        return row.record()


class JobRepository(_Repository):
    """Ingest jobs, claimed by any server process under a lease; a crashed holder's lease runs out and
    the job is claimed again."""

    async def submit(
        self, tenant: str, kind: JobKind, source: str, content_key: str, groups: Sequence[str], filename: str = ""
    ) -> tuple[Job, bool]:
        """Queue a job, or return the queued or running one of the same content (`created` False)."""
        for _ in range(SUBMIT_TRIES):
            now = utcnow()
            try:
                async with self._writes() as session, session.begin():
                    existing = await session.scalar(
                        select(JobRow).where(JobRow.tenant == tenant, JobRow.content_key == content_key,
                                             JobRow.active.is_(True))
                    )
                    if existing is not None:
                        return existing.record(), False
                    row = JobRow(
                        id=_new_id(), tenant=tenant, kind=kind, source=source, filename=filename,
                        content_key=content_key, groups=list(groups), status="queued", attempts=0, report=None,
                        error="", doc_id=None, lease_until=None, active=True, created_at=now, updated_at=now,
                    )
                    session.add(row)
            except IntegrityError:
                continue  # a concurrent submit of the same content committed first: the next try returns its job
            return row.record(), True
        raise DatabaseError(f"could not queue job for content {content_key}: concurrent submits kept colliding")

    async def get(self, tenant: str, job_id: str) -> Job | None:
        async with self._reads() as session:
            row = await session.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.tenant == tenant))
        return row.record() if row else None

    async def list(self, tenant: str, limit: int = 50, offset: int = 0) -> builtins.list[Job]:
        """Newest first."""
        query = (select(JobRow).where(JobRow.tenant == tenant)
                 .order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit).offset(offset))
        async with self._reads() as session:
            return [row.record() for row in await session.scalars(query)]

    async def latest(self, tenant: str, content_key: str) -> Job | None:
        """The newest job of this content, whatever its status."""
        query = (select(JobRow).where(JobRow.tenant == tenant, JobRow.content_key == content_key)
                 .order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(1))
        async with self._reads() as session:
            row = await session.scalar(query)
        return row.record() if row else None

    async def claim(self, lease_s: float, paths: Collection[tuple[str, str]] = ()) -> Job | None:
        """Take the oldest queued job, or a running one whose lease ran out, in one atomic statement; "path"
        jobs only of the (tenant, source) pairs in `paths`, the ones this claimer can run.

        PostgreSQL skips rows another claimer holds (`FOR UPDATE SKIP LOCKED`); SQLite runs it under
        its write lock (BEGIN IMMEDIATE), so two claimers never get the same job.
        """
        now = utcnow()
        runnable = or_(JobRow.kind != "path",
                       *[and_(JobRow.tenant == tenant, JobRow.source == source) for tenant, source in paths])
        claimable = and_(
            runnable, or_(JobRow.status == "queued", and_(JobRow.status == "running", JobRow.lease_until < now))
        )
        oldest = (select(JobRow.id).where(claimable).order_by(JobRow.created_at, JobRow.id).limit(1)
                  .with_for_update(skip_locked=True).scalar_subquery())
        statement = (
            update(JobRow).where(JobRow.id == oldest, claimable)
            .values(status="running", attempts=JobRow.attempts + 1, lease_until=now + timedelta(seconds=lease_s),
                    updated_at=now)
            .returning(JobRow).execution_options(synchronize_session=False)
        )
        async with self._writes() as session, session.begin():
            row = await session.scalar(statement)
            return row.record() if row else None

    async def heartbeat(self, job_id: str, lease_s: float, attempt: int | None = None) -> bool:
        """Extend the lease of a running job; False when it is not running (finished or unknown), or when
        `attempt` is given and another claim has taken the job since (the lease had run out)."""
        now = utcnow()
        held = [JobRow.attempts == attempt] if attempt is not None else []
        async with self._writes() as session, session.begin():
            result = await session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == "running", *held)
                .values(lease_until=now + timedelta(seconds=lease_s), updated_at=now)
                .execution_options(synchronize_session=False)
            )
        return result.rowcount == 1  # type: ignore[attr-defined]

    async def finish(
        self, job_id: str, status: JobStatus, report: dict[str, Any] | None = None, error: str = "",
        doc_id: str | None = None, attempt: int | None = None,
    ) -> Job | None:
        """Record the outcome; the content may then be submitted again. None when no job has this id, or
        when `attempt` is given and is no longer the job's running claim (a later claim owns the outcome)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"a job finishes as succeeded or failed, not {status!r}")
        held = [JobRow.attempts == attempt, JobRow.status == "running"] if attempt is not None else []
        statement = (
            update(JobRow).where(JobRow.id == job_id, *held)
            .values(status=status, report=report, error=error, doc_id=doc_id, active=None, lease_until=None,
                    updated_at=utcnow())
            .returning(JobRow).execution_options(synchronize_session=False)
        )
        async with self._writes() as session, session.begin():
            row = await session.scalar(statement)
            return row.record() if row else None


    async def prune(self, before: datetime) -> int:
        """Delete the finished jobs last changed before `before` (queued and running ones stay); how many."""
        async with self._writes() as session, session.begin():
            result = await session.execute(
                delete(JobRow).where(JobRow.active.is_(None), JobRow.updated_at < before)
                .execution_options(synchronize_session=False)
            )
        return result.rowcount  # type: ignore[attr-defined]


class ChatRepository(_Repository):
    """Chat sessions belong to one subject of one tenant; their messages are read through the session."""

    async def create_session(self, tenant: str, subject: str, title: str) -> ChatSession:
        now = utcnow()
        row = ChatSessionRow(id=_new_id(), tenant=tenant, subject=subject, title=title, created_at=now,
                             updated_at=now)
        async with self._writes() as session, session.begin():
            session.add(row)
        return row.record()

    async def get_session(self, tenant: str, subject: str, session_id: str) -> ChatSession | None:
        async with self._reads() as session:
            row = await session.scalar(select(ChatSessionRow).where(
                ChatSessionRow.id == session_id, ChatSessionRow.tenant == tenant, ChatSessionRow.subject == subject
            ))
        return row.record() if row else None

    async def list_sessions(
        self, tenant: str, subject: str, limit: int = 50, offset: int = 0
    ) -> builtins.list[ChatSession]:
        """Most recently active first."""
        query = (
            select(ChatSessionRow).where(ChatSessionRow.tenant == tenant, ChatSessionRow.subject == subject)
            .order_by(ChatSessionRow.updated_at.desc(), ChatSessionRow.id.desc()).limit(limit).offset(offset)
        )
        async with self._reads() as session:
            return [row.record() for row in await session.scalars(query)]

    async def delete_session(self, tenant: str, subject: str, session_id: str) -> bool:
        """Delete a session and its messages (its answers stay, detached); False when it is not the caller's."""
        async with self._writes() as session, session.begin():
            result = await session.execute(delete(ChatSessionRow).where(
                ChatSessionRow.id == session_id, ChatSessionRow.tenant == tenant, ChatSessionRow.subject == subject
            ).execution_options(synchronize_session=False))
        return result.rowcount == 1  # type: ignore[attr-defined]

    async def add_message(
        self, session_id: str, role: MessageRole, content: str, answer_id: str | None = None
    ) -> ChatMessage:
        """Append a message and mark the session active; LookupError when the session does not exist."""
        now = utcnow()
        async with self._writes() as session, session.begin():
            touched = await session.execute(
                update(ChatSessionRow).where(ChatSessionRow.id == session_id).values(updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if touched.rowcount != 1:  # type: ignore[attr-defined]
                raise LookupError(f"no chat session {session_id}")
            row = ChatMessageRow(session_id=session_id, role=role, content=content, answer_id=answer_id,
                                 created_at=now)
            session.add(row)
            await session.flush()
            return row.record()

    async def messages(self, session_id: str, limit: int | None = None) -> builtins.list[ChatMessage]:
        """Oldest first; with `limit`, the last `limit` messages (the recent history)."""
        query = select(ChatMessageRow).where(ChatMessageRow.session_id == session_id).order_by(ChatMessageRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        async with self._reads() as session:
            rows = [row.record() for row in await session.scalars(query)]
        return rows[::-1]


class AnswerRepository(_Repository):
    """Answers given (for feedback and audit) and the feedback on them."""

    async def record(
        self, tenant: str, subject: str, question: str, answer: dict[str, Any], session_id: str | None = None
    ) -> str:
        row = AnswerRow(id=_new_id(), tenant=tenant, subject=subject, session_id=session_id, question=question,
                        answer=answer, created_at=utcnow())
        async with self._writes() as session, session.begin():
            session.add(row)
        return row.id

    async def get(self, tenant: str, answer_id: str) -> StoredAnswer | None:
        async with self._reads() as session:
            row = await session.scalar(select(AnswerRow).where(AnswerRow.id == answer_id, AnswerRow.tenant == tenant))
        return row.record() if row else None

    async def add_feedback(
        self, tenant: str, subject: str, answer_id: str, rating: int, comment: str = ""
    ) -> Feedback | None:
        """None when the tenant has no answer with this id (another tenant's answer is never rated)."""
        async with self._writes() as session, session.begin():
            found = await session.scalar(
                select(AnswerRow.id).where(AnswerRow.id == answer_id, AnswerRow.tenant == tenant)
            )
            if found is None:
                return None
            row = FeedbackRow(id=_new_id(), answer_id=answer_id, tenant=tenant, subject=subject, rating=rating,
                              comment=comment, created_at=utcnow())
            session.add(row)
        return row.record()

    async def list_feedback(self, tenant: str, limit: int = 50, offset: int = 0) -> builtins.list[Feedback]:
        """Newest first."""
        query = (select(FeedbackRow).where(FeedbackRow.tenant == tenant)
                 .order_by(FeedbackRow.created_at.desc(), FeedbackRow.id.desc()).limit(limit).offset(offset))
        async with self._reads() as session:
            return [row.record() for row in await session.scalars(query)]


    async def prune(self, before: datetime) -> int:
        """Delete the answers recorded before `before`, their feedback with them (chat messages keep their text
        and lose the link); how many."""
        async with self._writes() as session, session.begin():
            result = await session.execute(
                delete(AnswerRow).where(AnswerRow.created_at < before).execution_options(synchronize_session=False)
            )
        return result.rowcount  # type: ignore[attr-defined]


# --- the database ----------------------------------------------------------------------------------------------


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL (readers never wait for the writer), a bounded wait for the write lock, enforced foreign keys;
    SQLAlchemy's `begin` event, not the driver, starts transactions."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(CONNECT_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    """Writers take SQLite's write lock up front: a read-then-write transaction can then never fail midway
    because another process wrote in between (SQLITE_BUSY_SNAPSHOT, which no busy timeout retries)."""
    mode = "IMMEDIATE" if connection.get_execution_options().get(_WRITE) else "DEFERRED"
    connection.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The engine, the migrations and the repositories of the service database."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.backend = parsed.get_backend_name()
        self.safe_url = (  # what errors name: no password, and no host path of a SQLite file
            f"sqlite:///…/{Path(parsed.database).name}" if self.backend == "sqlite" and parsed.database
            else parsed.render_as_string(hide_password=True)
        )
        self._folder: Path | None = None
        """SQLite's folder, made by `migrate()` (not here: building a server must not touch the disk)."""
        if self.backend == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                self._folder = Path(parsed.database).parent
            engine = create_async_engine(url, connect_args={"timeout": CONNECT_TIMEOUT_S})
            event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
        else:
            engine = create_async_engine(url, pool_pre_ping=True, connect_args={"timeout": CONNECT_TIMEOUT_S})
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        reads = async_sessionmaker(engine, expire_on_commit=False)
        writes = async_sessionmaker(self._writer, expire_on_commit=False)
        self.keys = KeyRepository(reads, writes)
        self.jobs = JobRepository(reads, writes)
        self.chats = ChatRepository(reads, writes)
        self.answers = AnswerRepository(reads, writes)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """`serve.database_url`, or SQLite in the data folder."""
        if settings.serve.database_url:
            return cls(settings.serve.database_url)
        return cls(f"sqlite+aiosqlite:///{(settings.data_dir / 'service.sqlite').resolve()}")

    async def migrate(self) -> None:
        """Bring the schema to the newest migration; a no-op when it is there already.

        Server processes starting together take turns: PostgreSQL under an advisory lock held
        for the transaction, SQLite under its write lock (BEGIN IMMEDIATE); the later ones find
        the schema current.
        """
        try:
            if self._folder is not None:
                self._folder.mkdir(parents=True, exist_ok=True)
            async with asyncio.timeout(MIGRATE_TIMEOUT_S):
                while True:
                    try:
                        async with self._writer.connect() as connection:
                            await connection.run_sync(self._upgrade)
                        return
                    except OperationalError as exc:
                        # SQLite: switching a new file to WAL needs it to itself, and a busy timeout does not
                        # cover that; another process is migrating it right now: wait for it and try again
                        if self.backend != "sqlite" or "locked" not in str(exc):
                            raise
                        await asyncio.sleep(0.2)
        except (TimeoutError, OSError, SQLAlchemyError) as exc:
            reason = str(exc) or f"no answer within {MIGRATE_TIMEOUT_S:.0f} s"
            raise DatabaseError(
                f"could not migrate the service database {self.safe_url}: {reason}; "
                "check that it is running and serve.database_url is right"
            ) from exc

    def _upgrade(self, connection: Connection) -> None:
        from alembic import command
        from alembic.config import Config

        with connection.begin():
            if self.backend == "postgresql":
                connection.execute(text(f"SET LOCAL lock_timeout = '{int(MIGRATE_TIMEOUT_S)}s'"))
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    async def prune(self, job_retention_days: float | None, answer_retention_days: float | None) -> dict[str, int]:
        """Delete what is past its retention (None: kept forever): finished jobs, recorded answers with their
        feedback; how many of each."""
        now = utcnow()
        pruned = {}
        if job_retention_days is not None:
            pruned["jobs"] = await self.jobs.prune(now - timedelta(days=job_retention_days))
        if answer_retention_days is not None:
            pruned["answers"] = await self.answers.prune(now - timedelta(days=answer_retention_days))
        return pruned

    async def ping(self) -> None:
        """Raise DatabaseError unless the database answers within PING_TIMEOUT_S (readiness)."""
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                async with self._engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except (TimeoutError, OSError, SQLAlchemyError) as exc:
            reason = str(exc) or f"no answer within {PING_TIMEOUT_S:.0f} s"
            raise DatabaseError(f"the service database {self.safe_url} does not answer: {reason}") from exc

    async def close(self) -> None:
        await self._engine.dispose()
