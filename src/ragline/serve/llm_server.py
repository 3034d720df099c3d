"""The configured LLM as an OpenAI-compatible server (`ragline llm serve`).

The API, Ray Serve replicas and other tools then reach the local model
exactly as they would reach vLLM or Ollama: `generate.llm.backend: openai`
with `base_url` pointing here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from anyio import to_thread
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ragline.app import Ragline
from ragline.config import ConfigError, Settings
from ragline.generate.base import LLM, LLMError
from ragline.serve.readiness import without_host_paths


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None


def _chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice], **extra}
    return f"data: {json.dumps(body)}\n\n"


def _llm_error(exc: LLMError) -> dict[str, Any]:
    return {"error": {"message": without_host_paths(str(exc)), "type": "llm_error"}}


def create_llm_app(settings: Settings, llm: LLM | None = None) -> FastAPI:
    """The app serving `llm` (default: the configured model), loaded at startup in a worker thread."""
    if llm is None:
        answerer = Ragline(settings).answerer
        if answerer.llm is None:
            raise ConfigError(answerer.unavailable or "generate.llm.backend is extractive: there is no LLM to serve")
        llm = answerer.llm
    served: LLM = llm

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(served.load)  # a model that cannot load stops the server before it listens
        yield

    api = FastAPI(title="Ragline LLM", description="OpenAI-compatible chat completions", lifespan=lifespan)

    def budget(request: ChatRequest) -> int:
        return request.max_tokens or max(served.context_window // 4, 16)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "owned_by": "ragline"}]}

    @api.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatRequest) -> JSONResponse | StreamingResponse:
        messages = [message.model_dump() for message in request.messages]
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        if not request.stream:
            try:
                result = await served.agenerate(messages, max_tokens=budget(request), temperature=request.temperature)
            except LLMError as exc:
                return JSONResponse(_llm_error(exc), status_code=503)
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": served.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason or "stop"}],
                "usage": result.usage.as_dict(),
            })

        async def events() -> AsyncIterator[str]:
            pieces = served.astream(messages, max_tokens=budget(request), temperature=request.temperature)
            yield _chunk(completion_id, served.name, {"role": "assistant"})
            try:
                async for piece in pieces:
                    yield _chunk(completion_id, served.name, {"content": piece})
            except LLMError as exc:
                yield f"data: {json.dumps(_llm_error(exc))}\n\n"
                return
            finally:
                await pieces.aclose()
            yield _chunk(completion_id, served.name, {}, "stop")
            if request.stream_options and request.stream_options.include_usage:
                body = {"id": completion_id, "object": "chat.completion.chunk", "model": served.name,
                        "choices": [], "usage": pieces.usage.as_dict()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return api
