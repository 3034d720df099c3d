"""The API's request and response bodies: what the OpenAPI document shows and every route validates."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _printable(text: str) -> str:
    """Refuse control characters (other than tab and newlines) and lone surrogates: never part of a question."""
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc" and char not in "\t\n\r":
            raise ValueError(f"contains the control character U+{ord(char):04X}; send plain text")
        if category == "Cs":
            raise ValueError(f"contains a lone surrogate U+{ord(char):04X}, which is not text; send valid UTF-8")
    return text


Text = Annotated[str, AfterValidator(_printable)]
Question = Annotated[str, Field(min_length=1, max_length=8000), AfterValidator(_printable)]
PageLimit = Annotated[int, Query(ge=1, le=500, description="items per page")]
PageOffset = Annotated[int, Query(ge=0, le=1_000_000, description="items to skip")]
Group = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@*-]+$")]


class ChatTurn(BaseModel):
    role: Literal["user", "assistant"]
    content: Annotated[Text, Field(max_length=8000)]


class SearchRequest(BaseModel):
    query: Question
    k: int | None = Field(default=None, ge=1, le=1000, description="passages (default: retrieve.top_k; at most serve.limits.max_k)")
    filters: dict[str, Any] | None = Field(
        default=None, description='metadata filters: {"format": "pdf"} or {"source": {"$in": [...]}}'
    )
    options: dict[str, Any] | None = Field(
        default=None,
        description='retrieval settings for this request, e.g. {"mode": "keyword", "rerank": {"backend": "llm"}}',
    )
    history: list[ChatTurn] | None = Field(
        default=None, max_length=50, description="the conversation so far; a follow-up is rewritten to stand alone"
    )

    def turns(self) -> list[dict[str, str]] | None:
        return [turn.model_dump() for turn in self.history] if self.history else None


class ChatRequest(BaseModel):
    message: Question
    session_id: str | None = Field(
        default=None, max_length=64, description="continue this session (default: start a new one)"
    )
    k: int | None = Field(default=None, ge=1, le=1000)
    filters: dict[str, Any] | None = None
    options: dict[str, Any] | None = None


class HitOut(BaseModel):
    score: float
    text: str
    title: str
    url: str
    source: str
    heading_path: list[str]
    page: int | None
    chunk_id: str


class SearchResponse(BaseModel):
    query: str = Field(description="the question searched (a follow-up rewritten to stand alone)")
    hits: list[HitOut]
    timings: dict[str, float]
    notes: list[str] = Field(default_factory=list, description="steps skipped, e.g. a reranker that was down")


class AnswerOut(BaseModel):
    """A cited answer; `answer_id` is what feedback refers to."""

    model_config = ConfigDict(extra="allow")

    answer: str
    citations: list[dict[str, Any]]
    hits: list[dict[str, Any]]
    model: str
    grounded: bool
    abstained: bool
    claims: list[dict[str, Any]]
    note: str
    answer_id: str | None = Field(default=None, description="null when the answer could not be recorded")
    cached: bool = False
    latency_ms: float | None = None
    session_id: str | None = None


class ErrorOut(BaseModel):
    code: str
    message: str


class DocumentOut(BaseModel):
    id: str
    name: str = Field(description="the file's name (uploads) or its path in its source folder")
    tenant: str
    groups: list[str]
    status: str
    error: str
    size: int
    chunks: int
    updated_at: str


class DocumentPage(BaseModel):
    items: list[DocumentOut]
    total: int
    limit: int
    offset: int


class AccessPatch(BaseModel):
    groups: list[Group] = Field(min_length=1, max_length=100, description='who may read it; "*" is the whole tenant')


class JobOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    tenant: str
    kind: str
    status: str
    filename: str
    groups: list[str]
    attempts: int
    report: dict[str, Any] | None
    error: str
    doc_id: str | None
    created_at: str
    updated_at: str


class JobPage(BaseModel):
    items: list[JobOut]
    limit: int
    offset: int


class IngestRequest(BaseModel):
    source: str = Field(min_length=1, max_length=200, description="the name of a source in the server's config")


class FeedbackRequest(BaseModel):
    answer_id: str = Field(min_length=1, max_length=64)
    rating: int = Field(ge=-1, le=5, description="-1/1 (thumbs) or 1–5 stars; 0 for a comment only")
    comment: Annotated[Text, Field(max_length=4000)] = ""


class FeedbackOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    answer_id: str
    rating: int
    comment: str
    created_at: str


class SessionOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    title: str
    created_at: str
    updated_at: str


class MessageOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str
    answer_id: str | None
    created_at: str


class SessionDetail(SessionOut):
    messages: list[MessageOut]


# --- the OpenAI-compatible chat completions endpoint -------------------------------------------------


class CompletionMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Text, Field(max_length=8000)] | None = None


class CompletionRequest(BaseModel):
    """The fields of OpenAI's request that matter here; others (top_p, n, user…) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=200)
    messages: list[CompletionMessage] = Field(min_length=1, max_length=100)
    stream: bool = False


class CompletionChoice(BaseModel):
    index: int
    message: dict[str, str]
    finish_reason: str


class CompletionOut(BaseModel):
    """OpenAI's chat.completion, plus `citations` and `answer_id`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, int]
    citations: list[dict[str, Any]]
    answer_id: str | None = None
