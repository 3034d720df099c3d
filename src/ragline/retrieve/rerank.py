"""Rerankers: score each (query, passage) pair jointly and reorder the candidates of a search.

A bi-encoder compares two vectors made apart; a reranker reads the query and
the passage together, which is slower but finds the passage that answers
rather than the one that shares words. Three backends behind one protocol: a
local cross-encoder folder, a served one behind a TEI-style `/rerank` API, and
any chat model asked for pointwise scores. Each scores the passage with its
heading path (`Chunk.embed_text`), the context a reader sees.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ragline.config import RerankSettings
from ragline.modelclient import CallPolicy, DeadlineExceeded, GaveUp, ModelCallError, ModelClient, Rejected, shared_client
from ragline.retrieve.chat import ChatModel, ask, find_json
from ragline.types import Hit

log = logging.getLogger(__name__)

CROSS_ENCODER_BATCH = 32
"""Pairs per forward pass: all 20 usual candidates in one batch."""

LLM_BATCH = 5
"""Passages per prompt: few enough for a small model's context and attention."""


class RerankError(RuntimeError):
    """The reranker could not be loaded or did not answer; the message says which one and what to do."""


@runtime_checkable
class Reranker(Protocol):
    name: str

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        """The same hits (vectors kept) with the reranker's scores, best first; ties keep their input order."""
        ...


def by_score(hits: Sequence[Hit], scores: Sequence[float]) -> list[Hit]:
    """Hits rescored and sorted best first; the sort is stable, so equal scores keep the input order."""
    rescored = [replace(hit, score=float(score)) for hit, score in zip(hits, scores, strict=True)]
    return sorted(rescored, key=lambda hit: -hit.score)


# --- a local cross-encoder ------------------------------------------------------------------------

_HEADS = ("ForSequenceClassification", "ForCausalLM")


def check_model_folder(folder: Path) -> None:
    """Refuse early, with the reason, what CrossEncoder would load silently with a random scoring head."""
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise RerankError(
            f"reranker model folder {folder} does not exist: give a local cross-encoder folder "
            "(e.g. a downloaded bge-reranker-base, or the output of `ragline tune`); downloads are disabled"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise RerankError(f"{folder} is not a model folder: cannot read its config.json ({exc})") from exc
    architectures = config.get("architectures") or []
    if architectures and not any(name.endswith(_HEADS) for name in architectures):
        raise RerankError(
            f"{folder} holds a {architectures[0]}, not a cross-encoder: a reranker needs a scoring head "
            "(…ForSequenceClassification); an embedding model folder cannot rerank until `ragline tune` trains one"
        )


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder from a local folder, loaded on first use.

    One prediction runs at a time: torch already spreads one batch over every
    core, and a fast tokenizer is not safe to share between threads.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        batch_size: int = CROSS_ENCODER_BATCH,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.folder = Path(model).expanduser()
        check_model_folder(self.folder)
        self.name = f"cross-encoder:{self.folder.name}"
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: RerankSettings, chat_model: Callable[[], ChatModel | None] | None = None
    ) -> CrossEncoderReranker:
        if not settings.model:
            raise RerankError("retrieve.rerank.model must name the cross-encoder's local folder")
        return cls(
            settings.model, batch_size=settings.batch_size or CROSS_ENCODER_BATCH, max_length=settings.max_length
        )

    def load(self) -> None:
        """Load the weights now (servers call this at startup, in a worker thread)."""
        with self._lock:
            self._load()

    def _load(self) -> Any:
        if self._model is None:
            try:
                from sentence_transformers import CrossEncoder
                from transformers.utils import logging as transformers_logging
            except ImportError as exc:
                raise RerankError(
                    "the cross-encoder reranker needs sentence-transformers: `pip install 'ragline[local]'`"
                ) from exc
            transformers_logging.disable_progress_bar()  # no "Loading weights" bar in a search
            try:
                self._model = CrossEncoder(
                    str(self.folder), device=self.device, max_length=self.max_length, local_files_only=True
                )
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise RerankError(f"cannot load the cross-encoder in {self.folder}: {exc}") from exc
            if self._model.num_labels != 1:
                labels = self._model.num_labels
                self._model = None
                raise RerankError(f"{self.folder} has {labels} output labels; a reranker needs a model with one score")
        return self._model

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        return by_score(hits, self.scores(query, [hit.chunk.embed_text for hit in hits]))

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """The model's score of each text against the query, in input order (what a `/rerank` server returns)."""
        if not texts:
            return []
        pairs = [(query, text) for text in texts]
        with self._lock:
            scores = self._load().predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        return [float(score) for score in scores.tolist()]


# --- a served cross-encoder (TEI, Infinity, vLLM, llama.cpp server, Cohere/Jina-style APIs) ---------------------

_HINTS = {
    401: "check retrieve.rerank.api_key",
    403: "check retrieve.rerank.api_key",
    404: "check retrieve.rerank.base_url",
}


def parse_rerank_scores(body: object, count: int) -> list[float]:
    """Scores in input order from TEI's `[{index, score}]` or the `{"results": [{index, relevance_score}]}` shape.

    Raises ValueError unless every input index has exactly one finite score.
    """
    items = body.get("results") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise ValueError('expected a list of {"index", "score"} or {"results": [...]}')
    scores: list[float | None] = [None] * count
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"expected objects in the list, got {item!r:.80}")
        index = item.get("index")
        score = item.get("score", item.get("relevance_score"))
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"index {index!r} is not one of the {count} texts sent")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"text {index} has no finite score ({score!r})")
        if scores[index] is not None:
            raise ValueError(f"text {index} was scored twice")
        scores[index] = float(score)
    missing = [i for i, score in enumerate(scores) if score is None]
    if missing:
        raise ValueError(f"{len(missing)} of {count} texts have no score (first: {missing[0]})")
    return [float(score) for score in scores if score is not None]


class HTTPReranker:
    """`POST {base_url}/rerank` with `{"query", "texts", "truncate": true}`, as Text Embeddings Inference serves it.

    429, 5xx, timeouts and dropped connections are retried with backoff; the
    whole call, retries included, ends by `timeout_s` (the model client's deadline).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        max_tries: int = 3,
        backoff_initial_s: float = 0.25,
        client: ModelClient | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise RerankError(f"retrieve.rerank.base_url must start with http:// or https://, not {base_url!r}")
        self.url = base_url.rstrip("/") + "/rerank"
        self.model = model
        self.name = f"http:{model or self.url}"
        self.timeout_s = timeout_s
        self.max_tries = max_tries
        self._backoff_initial_s = backoff_initial_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or shared_client()
        self._policy = CallPolicy(
            tries=max_tries, backoff_initial_s=backoff_initial_s, backoff_max_s=timeout_s,
            read_timeout_s=timeout_s, deadline_s=timeout_s,
        )

    @classmethod
    def from_settings(
        cls, settings: RerankSettings, chat_model: Callable[[], ChatModel | None] | None = None
    ) -> HTTPReranker:
        if not settings.base_url:
            raise RerankError("retrieve.rerank.base_url must name the rerank server, e.g. http://127.0.0.1:8080")
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.base_url, model=settings.model, api_key=api_key, timeout_s=settings.timeout_s)

    def close(self) -> None:
        """Nothing of its own to close: the connections are the model client's pool."""

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        body: dict[str, Any] = {"query": query, "texts": [hit.chunk.embed_text for hit in hits], "truncate": True}
        if self.model:
            body["model"] = self.model
        return by_score(hits, self._scores(body, len(hits)))

    def _scores(self, body: dict[str, Any], count: int) -> list[float]:
        try:
            response = self._client.post(self.url, body, headers=self._headers, policy=self._policy)
        except DeadlineExceeded as exc:
            which = "the request's deadline for model calls" if exc.imposed else "retrieve.rerank.timeout_s"
            raise RerankError(
                f"reranker at {self.url} gave no answer within {exc.seconds:.3g}s ({which}); last try: {exc.last}"
            ) from exc
        except GaveUp as exc:
            raise RerankError(
                f"reranker at {self.url} failed after {exc.tries} {'try' if exc.tries == 1 else 'tries'} "
                f"(timeout_s={self.timeout_s:g}, max_tries={self.max_tries}): {exc.last}"
            ) from exc
        except Rejected as exc:
            hint = _HINTS.get(exc.status_code)
            raise RerankError(
                f"reranker at {self.url} rejected the request: {exc.reason}" + (f" ({hint})" if hint else "")
            ) from exc
        except ModelCallError as exc:
            raise RerankError(f"reranker at {self.url} failed: {exc.reason}") from exc
        try:
            return parse_rerank_scores(response.json(), count)
        except ValueError as exc:
            raise RerankError(
                f"reranker at {self.url} sent an unexpected body: {exc}: {response.text[:200]!r}"
            ) from exc


# --- a chat model as the judge ------------------------------------------------------------------------

LLM_RERANK_PROMPT = (
    "You judge search results. For each numbered passage, rate how well it answers the question, "
    "from 0 (unrelated) to 10 (answers it fully). Reply with one JSON object mapping each passage number "
    'to its score, e.g. {"1": 7, "2": 0}, and nothing else.'
)
_PAIR = re.compile(r"""["']?(\d+)["']?\s*[:=]\s*["']?(\d+(?:\.\d+)?)""")


def parse_llm_scores(reply: str, count: int) -> dict[int, float]:
    """Scores for passages 1..count from a reply: a JSON object, else `1: 7` pairs; out-of-range ones dropped."""
    found = find_json(reply)
    if isinstance(found, dict):
        pairs = [(str(key), value) for key, value in found.items()]
    elif isinstance(found, list) and len(found) == count:  # a bare list of scores, in passage order
        pairs = [(str(n), value) for n, value in enumerate(found, start=1)]
    else:
        pairs = _PAIR.findall(reply)
    scores = {}
    for key, value in pairs:
        try:
            number, score = int(key.strip().strip("[]#")), float(value)
        except (TypeError, ValueError):
            continue
        if 1 <= number <= count and 0 <= score <= 10:
            scores[number] = score
    return scores


def fill_unscored(hits: Sequence[Hit], scores: Sequence[float | None]) -> list[Hit]:
    """Sort the scored hits best first while every unscored hit keeps its place in the list.

    An unscored hit gets a score between its new neighbours', so scores still
    fall from first to last. Nothing scored at all: the hits come back as they were.
    """
    if all(score is None for score in scores):
        return list(hits)
    scored = [(hit, score) for hit, score in zip(hits, scores, strict=True) if score is not None]
    ranked = iter(by_score([hit for hit, _ in scored], [score for _, score in scored]))
    placed: list[Hit | None] = [None if score is None else next(ranked) for score in scores]
    result = []
    for i, (hit, slot) in enumerate(zip(hits, placed, strict=True)):
        if slot is not None:
            result.append(slot)
            continue
        before = next((p.score for p in reversed(placed[:i]) if p is not None), None)
        after = next((p.score for p in placed[i + 1 :] if p is not None), None)
        neighbours = [s for s in (before, after) if s is not None]
        result.append(replace(hit, score=sum(neighbours) / len(neighbours)))
    return result


class LLMReranker:
    """Pointwise scores from a chat model, `batch_size` numbered passages per prompt.

    A bad reply never fails the search: passages the model did not score keep
    their place. `concurrency` prompts run at once (useful for a served model).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        batch_size: int = LLM_BATCH,
        max_tokens: int = 96,
        passage_chars: int = 1500,
        concurrency: int = 1,
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be at least 1")
        self.model = model
        self.name = f"llm:{model.name}"
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.passage_chars = passage_chars
        self.concurrency = concurrency

    @classmethod
    def from_settings(
        cls, settings: RerankSettings, chat_model: Callable[[], ChatModel | None] | None = None
    ) -> LLMReranker:
        model = chat_model() if chat_model is not None else None
        if model is None:
            raise RerankError("retrieve.rerank.backend llm needs an LLM: configure generate.llm (or its cheap LLM)")
        return cls(model, batch_size=settings.batch_size or LLM_BATCH)

    def _score_batch(self, query: str, batch: Sequence[Hit]) -> list[float | None]:
        passages = "\n\n".join(
            f"[{n}] {hit.chunk.embed_text[: self.passage_chars]}" for n, hit in enumerate(batch, start=1)
        )
        try:
            reply = ask(
                self.model,
                LLM_RERANK_PROMPT,
                f"Question: {query}\n\nPassages:\n\n{passages}",
                max_tokens=self.max_tokens,
            )
        except RuntimeError as exc:  # LLMError and ChatError: keep this batch's order
            log.warning(
                "LLM reranker %s failed on %d passages, keeping their order: %s", self.model.name, len(batch), exc
            )
            return [None] * len(batch)
        scores = parse_llm_scores(reply, len(batch))
        if len(scores) < len(batch):
            log.warning(
                "LLM reranker %s scored %d of %d passages (reply %r); the rest keep their place",
                self.model.name,
                len(scores),
                len(batch),
                reply[:200],
            )
        return [scores.get(n) for n in range(1, len(batch) + 1)]

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        batches = [hits[i : i + self.batch_size] for i in range(0, len(hits), self.batch_size)]
        score = partial(self._score_batch, query)
        if self.concurrency == 1 or len(batches) == 1:
            results = [score(batch) for batch in batches]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(batches))) as pool:
                results = list(pool.map(score, batches))
        return fill_unscored(hits, [s for batch_scores in results for s in batch_scores])
