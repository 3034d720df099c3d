"""The FastAPI application factory.

Handlers are async; the CPU-bound work (embedding, matrix search) runs in a
worker thread so the event loop keeps answering, health checks included.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from anyio import to_thread
import json
import time

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator

from ragline import __version__
from ragline.app import Ragline
from ragline.config import Settings
from ragline.retrieve.dense import RetrievalError
from ragline.store.base import StoreError, check_filters


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=100)
    filters: dict[str, Any] | None = Field(
        default=None, description='metadata filters: {"format": "pdf"} or {"source": {"$in": [...]}}'
    )

    @field_validator("filters")
    @classmethod
    def _valid_filters(cls, filters: dict[str, Any] | None) -> dict[str, Any] | None:
        check_filters(filters)  # a ValueError here becomes a 422 naming the problem
        return filters


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
    query: str
    hits: list[HitOut]
    timings: dict[str, float]


def create_app(settings: Settings, components: Ragline | None = None) -> FastAPI:
    """Build the API over the components of the composition root (built from `settings` if not given)."""
    ragline = components or Ragline(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(lambda: ragline.retriever)  # load the model before the first request
        yield
        ragline.close()

    api = FastAPI(title="Ragline", version=__version__, lifespan=lifespan)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        chunks = await to_thread.run_sync(ragline.store.count)
        return {"status": "ok", "version": __version__, "chunks": chunks, "embedder": ragline.embedder.name}

    @api.post("/v1/search", response_model=SearchResponse)
    async def search(request: SearchRequest) -> dict[str, Any]:
        try:
            result = await to_thread.run_sync(
                ragline.retriever.search, request.query, request.k, request.filters
            )
        except (RetrievalError, StoreError) as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        return {"query": result.query, "hits": [hit.to_dict() for hit in result.hits], "timings": result.timings}

    @api.post("/v1/query")
    async def query(request: SearchRequest) -> dict[str, Any]:
        """The cited answer, when it is complete (same JSON as `ragline ask --json`, plus latency_ms)."""
        started = time.perf_counter()
        final: dict[str, Any] = {}
        try:
            async for event in ragline.aask(request.query, request.k, request.filters):
                if event["type"] == "answer":
                    final = {key: value for key, value in event.items() if key != "type"}
        except (RetrievalError, StoreError) as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        return {**final, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    @api.post("/v1/query/stream")
    async def query_stream(request: SearchRequest) -> StreamingResponse:
        """NDJSON events: `status` per stage, `token` pieces, then the final `answer` (or an `error`)."""
        async def lines() -> AsyncIterator[str]:
            try:
                async for event in ragline.aask(request.query, request.k, request.filters):
                    yield json.dumps(event) + "\n"
            except (RetrievalError, StoreError) as exc:
                yield json.dumps({"type": "error", "detail": str(exc)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return api

