"""The core records that flow through the pipeline: loaders → chunker → embedder → store → retriever."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any


def utc_now() -> str:
    """The timestamp format of every record: UTC, ISO 8601, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def heading_prefix(heading_path: tuple[str, ...] | list[str]) -> str:
    """The line a chunk's embedded text starts with, e.g. `Ray Data > Transforming data`."""
    return f"{' > '.join(heading_path)}\n\n" if heading_path else ""


@dataclass(frozen=True, slots=True)
class Section:
    """One addressable part of a source file: an HTML section, a Markdown heading, a PDF page."""

    text: str
    title: str
    anchor: str
    heading_path: tuple[str, ...]
    page: int | None = None


@dataclass(slots=True)
class Document:
    """A loaded source file, split into sections, with the identity the index keys it by."""

    doc_id: str
    source: str
    url: str
    format: str
    title: str
    sections: list[Section] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one section, small enough for the embedding model.

    `metadata` carries source, url, anchor, title, heading_path, page, format,
    chunk_index, content_hash and ingested_at.
    """

    chunk_id: str
    doc_id: str
    text: str
    metadata: dict[str, Any]

    @property
    def embed_text(self) -> str:
        """What the embedder sees: the heading path first, so a passage carries its context."""
        return heading_prefix(self.metadata.get("heading_path") or ()) + self.text

    @property
    def citation_url(self) -> str:
        url = self.metadata.get("url", "")
        anchor = self.metadata.get("anchor", "")
        return f"{url}#{anchor}" if anchor else url


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk returned by a search, with its score (higher is better; its scale depends on the search mode).

    `vector` is the chunk's embedding when the search asked for it (diversity needs it).
    """

    chunk: Chunk
    score: float
    vector: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        meta = self.chunk.metadata
        return {
            "score": round(self.score, 6),
            "text": self.chunk.text,
            "title": meta.get("title", ""),
            "url": self.chunk.citation_url,
            "source": meta.get("source", ""),
            "heading_path": list(meta.get("heading_path") or ()),
            "page": meta.get("page"),
            "chunk_id": self.chunk.chunk_id,
        }


@dataclass(frozen=True, slots=True)
class Citation:
    """A numbered reference in an answer, resolved to the section it came from."""

    n: int
    url: str
    title: str
    source: str


@dataclass(frozen=True, slots=True)
class SupportingSpan:
    """A citation of a claim: passage `n` and the sentence(s) of its `chunk.text` that support the claim."""

    n: int
    text: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": round(self.score, 4)}


@dataclass(frozen=True, slots=True)
class CheckedClaim:
    """A claim of the rewritten answer (`text == answer[start:end]`, citation markers included)."""

    text: str
    start: int
    end: int
    kind: str
    supported: bool
    score: float
    citations: list[SupportingSpan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "start": self.start,
            "end": self.end,
            "kind": self.kind,
            "supported": self.supported,
            "score": round(self.score, 4),
            "citations": [c.to_dict() for c in self.citations],
        }


@dataclass(slots=True)
class Answer:
    """A generated (or extracted) answer with the evidence behind it."""

    text: str
    citations: list[Citation]
    hits: list[Hit]
    model: str
    grounded: bool
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""
    claims: list[CheckedClaim] = field(default_factory=list)
    """Each claim of `text` with the passage sentences that support it (`generate.verify`), when checked."""
    supported_share: float | None = None
    """Share of the claims a passage supports; None when the answer was not checked."""
    abstained: bool = False
    """The draft answer was replaced by "not in the documents": none of its claims was supported."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.text,
            "citations": [{"n": c.n, "url": c.url, "title": c.title, "source": c.source} for c in self.citations],
            "hits": [hit.to_dict() for hit in self.hits],
            "model": self.model,
            "usage": self.usage,
            "timings": {key: round(value, 1) for key, value in self.timings.items()},
            "grounded": self.grounded,
            "supported_share": None if self.supported_share is None else round(self.supported_share, 4),
            "abstained": self.abstained,
            "claims": [claim.to_dict() for claim in self.claims],
            "note": self.note,
        }


# --- the events of answering a question, as streamed to clients -----------------------------------


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A stage began: "retrieve", then "generate" with the number of passages found."""

    stage: str
    hits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "status", "stage": self.stage, **({} if self.hits is None else {"hits": self.hits})}


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A piece of the answer text as the model writes it."""

    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "token", "text": self.text}


@dataclass(frozen=True, slots=True)
class ClaimEvent:
    """Claim number `index` of the answer, checked as soon as it is complete (a later claim has begun).

    Its text has the citations rewritten as the final answer will have them,
    and its offsets are into the final answer's text, unless that answer
    replaces the streamed draft (withheld, or extracted after a model failure).
    """

    index: int
    claim: CheckedClaim

    def to_dict(self) -> dict[str, Any]:
        return {"type": "claim", "index": self.index, **self.claim.to_dict()}


@dataclass(frozen=True, slots=True)
class AnswerEvent:
    """The final answer, always the last event; its claims and citations are the authoritative ones."""

    answer: Answer

    def to_dict(self) -> dict[str, Any]:
        return {"type": "answer", **self.answer.to_dict()}


Event = StatusEvent | TokenEvent | ClaimEvent | AnswerEvent
"""What `Ragline.ask` streams: status per stage, answer tokens, checked claims, then the answer."""
