"""The FastAPI application factory.

Handlers are async; the CPU-bound work (embedding, matrix search) runs in a
worker thread so the event loop keeps answering, health checks included.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from anyio import to_thread
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from ragline import __version__
from ragline.app import Ragline
from ragline.config import Settings
from ragline.retrieve.dense import RetrievalError
from ragline.store.base import StoreError


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=100)
    filters: dict[str, Any] | None = Field(
        default=None, description='metadata filters: {"format": "pdf"} or {"source": {"$in": [...]}}'
    )


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
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except (RetrievalError, StoreError) as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        return {"query": result.query, "hits": [hit.to_dict() for hit in result.hits], "timings": result.timings}

    return api
