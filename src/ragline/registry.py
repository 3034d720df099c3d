"""The one registry of swappable components, picked by name from the config.

Built-in implementations are named by import path and imported only when
chosen, so the default install never imports a backend it does not use.
Third-party packages add their own through the `ragline.components` entry
point group, with entry names of the form `kind.name`.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

BUILTIN: dict[str, dict[str, str]] = {
    "embedder": {
        "sentence-transformers": "ragline.embed.sentence_transformer:SentenceTransformerEmbedder",
        "openai": "ragline.embed.openai_compat:OpenAIEmbedder",
        "onnx": "ragline.embed.onnx:OnnxEmbedder",
    },
    "store": {
        "local": "ragline.store.local:LocalStore",
        "pgvector": "ragline.store.pgvector:PgVectorStore",
        "qdrant": "ragline.store.qdrant:QdrantStore",
        "milvus": "ragline.store.milvus:MilvusStore",
    },
    "reranker": {
        "cross-encoder": "ragline.retrieve.rerank:CrossEncoderReranker",
        "http": "ragline.retrieve.rerank:HTTPReranker",
        "llm": "ragline.retrieve.rerank:LLMReranker",
    },
    "llm": {
        "llama-cpp": "ragline.generate.local:LlamaCppLLM",
        "openai": "ragline.generate.openai_compat:OpenAICompatLLM",
    },
    "rate_limiter": {
        "redis": "ragline.serve.limits:RedisRateLimiter",
        "memory": "ragline.serve.limits:MemoryRateLimiter",
    },
    "answer_cache": {
        "redis": "ragline.serve.cache:RedisAnswerCache",
        "memory": "ragline.serve.cache:MemoryAnswerCache",
    },
}


class UnknownComponentError(ValueError):
    pass


def _plugins(kind: str) -> dict[str, str]:
    found = {}
    for ep in entry_points(group="ragline.components"):
        ep_kind, _, name = ep.name.partition(".")
        if ep_kind == kind:
            found[name] = ep.value
    return found


def names(kind: str) -> list[str]:
    return sorted({**BUILTIN.get(kind, {}), **_plugins(kind)})


def resolve(kind: str, name: str) -> Any:
    """Return the class or factory registered as `name` for `kind`."""
    target = BUILTIN.get(kind, {}).get(name) or _plugins(kind).get(name)
    if target is None:
        raise UnknownComponentError(
            f"unknown {kind} {name!r}; choose one of: {', '.join(names(kind)) or 'none'}"
        )
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)
