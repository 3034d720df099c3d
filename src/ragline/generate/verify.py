"""Span-level attribution: check every claim of an answer against the passages it was given.

Works on any answer text, from any LLM or the extractive answerer, whether or
not the model followed the citation format. The answer is split into claims
(sentences and list items; a fenced code block is one claim; headings,
lead-ins ending in ":" and fragments of fewer than three words are not
claims), each passage (`Hit`, numbered 1..n as in the prompt) into sentences
with their character offsets. A `SupportScorer` scores every claim against
every window of `window` consecutive passage sentences; a passage supports a
claim when its best window scores at least the threshold. A code block is
judged by its identifiers instead: supported when enough of them appear in
the passage.

Citations are then rewritten: the model's supported citations are kept, an
unsupported one is replaced by the best supporting passage (dropped if none
supports the claim), and a supported claim without citations gets the best
one. Convention: markers go at the end of the claim sentence, before its
final punctuation, as the prompt's worked example writes them
(`... port 8080 [2].`); a claim without final punctuation gets them at its
end. Code blocks are left untouched: their citations are in the result only.
Offsets of claims are into the rewritten answer (`Verification.text`),
offsets of supporting spans into the passage's `chunk.text`.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ragline.config import VerifySettings
from ragline.generate.prompt import CITATION_RUN, CODE_SPAN
from ragline.store.keywords import STOP_WORDS, terms
from ragline.types import CheckedClaim, Chunk, Hit, SupportingSpan

if TYPE_CHECKING:
    from ragline.embed.base import Embedder

# --- splitting text into sentences with offsets ------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)]*(?:[ \t]*\[\d{1,4}(?:\s*,\s*\d{1,4})*\])*(?=[ \t]+[^\sa-z]|[ \t]*$)", re.M)
"""End punctuation, closing quotes, then any citation run, followed by a word that may start a sentence."""
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|cf|vs|viz|approx|resp|Mr|Mrs|Ms|Dr|St|Fig|No)|\b[A-Za-z])\.$")
"""Words whose period ends no sentence, and single initials (`J. Smith`)."""
_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_LIST_MARKER = re.compile(r"[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+")
_HEADING = re.compile(r"[ \t]*(?:#{1,6}[ \t]|\*\*[^*]+\*\*:?[ \t]*$|__[^_]+__:?[ \t]*$)")
_FINAL_PUNCTUATION = re.compile(r"[.!?;]+[\"'”’)]*$")
_ABSTENTION = re.compile(
    r"(?:the )?(?:provided )?(?:documents?|passages?|context)(?: provided)? (?:do|does) not (?:contain|include|mention|say)",
    re.I,
)
"""The prompt's refusal (`NO_ANSWER`) and the variants small models write: no claim about the documents' subject."""
MIN_CLAIM_WORDS = 3


@dataclass(frozen=True, slots=True)
class Span:
    """A piece of a text: `text == source[start:end]`."""

    text: str
    start: int
    end: int


def _masked(text: str) -> str:
    """`text` with code (fenced and inline) blanked to spaces, same length: its periods and brackets mean nothing."""
    return CODE_SPAN.sub(lambda m: " " * len(m.group()), text)


def _is_abbreviation(text: str, end_of_word: int) -> bool:
    start = end_of_word
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return bool(_ABBREVIATION.search(text[start:end_of_word]))


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[Span]:
    """The sentences of `text[start:end]`: split after end punctuation (and a citation run after it),
    at every line break, never inside code or after an abbreviation such as "e.g."."""
    end = len(text) if end is None else end
    masked = _masked(text)
    spans = []
    for line in re.finditer(r"[^\n]+", masked[:end]):
        if line.end() <= start:
            continue
        cursor = max(line.start(), start)
        cuts = [
            m.end()
            for m in _SENTENCE_END.finditer(masked, cursor, line.end())
            if not _is_abbreviation(masked, m.start() + 1)
        ]
        for cut in [*cuts, line.end()]:
            spans.extend(_trimmed(text, cursor, cut))
            cursor = cut
    return spans


def text_units(text: str) -> list[Span]:
    """The sentences of `text`, with each fenced code block kept whole as one unit."""
    units: list[Span] = []
    cursor = 0
    for fence in _FENCE.finditer(text):
        units.extend(sentence_spans(text, cursor, fence.start()))
        units.extend(_trimmed(text, fence.start(), fence.end()))
        cursor = fence.end()
    units.extend(sentence_spans(text, cursor))
    return units


def _trimmed(text: str, start: int, end: int) -> list[Span]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return [Span(text[start:end], start, end)] if end > start else []


# --- claims ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """A checkable statement of the answer; `kind` is "sentence" or "code"."""

    span: Span
    kind: str
    cited: tuple[int, ...] = ()
    """Passage numbers the answer cites for it, in order of first use."""


def _citation_runs(text: str) -> list[tuple[int, int, tuple[int, ...]]]:
    """`(start, end, numbers)` of every citation run outside code."""
    return [
        (m.start(), m.end(), tuple(int(n) for n in re.findall(r"\d+", m.group())))
        for m in CITATION_RUN.finditer(_masked(text))
    ]


def _is_claim(span: Span) -> bool:
    bare = CITATION_RUN.sub(" ", span.text).strip()
    if bare.endswith(":") or _ABSTENTION.match(bare) or _HEADING.match(bare):
        return False
    return len(bare.split()) >= MIN_CLAIM_WORDS and any(term not in STOP_WORDS for term in terms(bare))


def _prose_claims(text: str, start: int, end: int) -> list[Span]:
    claims = []
    for line in re.finditer(r"[^\n]+", text[:end]):
        if line.end() <= start or _HEADING.match(line.group()):
            continue
        marker = _LIST_MARKER.match(text, max(line.start(), start))
        body_start = marker.end() if marker else max(line.start(), start)
        claims.extend(span for span in sentence_spans(text, body_start, line.end()) if _is_claim(span))
    return claims


def split_claims(text: str) -> list[Claim]:
    """The claims of an answer in order, each with the passage numbers cited in it or right after it.

    A citation run outside every claim (e.g. `[2]` on the line after a code
    block) belongs to the claim before it.
    """
    spans: list[tuple[Span, str]] = []
    cursor = 0
    for fence in _FENCE.finditer(text):
        spans.extend((span, "sentence") for span in _prose_claims(text, cursor, fence.start()))
        code = _trimmed(text, fence.start(), fence.end())
        if code and any(len(term) > 1 for term in terms(code_identifiers(code[0].text))):
            spans.append((code[0], "code"))
        cursor = fence.end()
    spans.extend((span, "sentence") for span in _prose_claims(text, cursor, len(text)))
    cited: list[list[int]] = [[] for _ in spans]
    for run_start, _, numbers in _citation_runs(text):
        owner = max((i for i, (span, _) in enumerate(spans) if span.start <= run_start), default=None)
        if owner is not None:
            cited[owner].extend(n for n in numbers if n not in cited[owner])
    return [Claim(span, kind, tuple(numbers)) for (span, kind), numbers in zip(spans, cited, strict=True)]


def _code_body(block: str) -> str:
    """A fenced block without its fence lines."""
    lines = block.split("\n")
    return "\n".join(lines[1:-1] if len(lines) > 2 and lines[-1].strip().startswith(("```", "~~~")) else lines[1:])


_API_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[A-Za-z_]\w*(?=\()")


def code_identifiers(block: str) -> str:
    """The names a code block takes from an API: dotted names and called names (`json.load`, `open`),
    not the variables it makes up; all its words when it has none."""
    body = _code_body(block)
    return " ".join(_API_NAME.findall(body)) or body


def without_citations(text: str) -> str:
    """`text` with its citation runs (and the blanks before them) removed; code is left alone."""
    pieces, cursor = [], 0
    for start, end, _ in _citation_runs(text):
        while start > cursor and text[start - 1] in " \t":
            start -= 1
        pieces.append(text[cursor:start])
        cursor = end
        if not pieces[-1] or pieces[-1].endswith("\n"):  # a run that starts a line takes the blanks after it
            while cursor < len(text) and text[cursor] in " \t":
                cursor += 1
    pieces.append(text[cursor:])
    return "".join(pieces)


# --- scorers ---------------------------------------------------------------------------------------


@runtime_checkable
class SupportScorer(Protocol):
    """Scores how well each evidence text supports each claim: higher is better, on the scorer's own scale."""

    name: str

    def scores(self, claims: Sequence[str], evidence: Sequence[str]) -> np.ndarray:
        """A `len(claims) × len(evidence)` float array."""
        ...


_STEM_CHARS = 6


def content_terms(text: str) -> set[str]:
    """Code-aware terms (`ragline.store.keywords.terms`) less stop words; plain words cut to their first
    six letters, a crude stem under which "returns", "returned" and "return" are one."""
    found = set()
    for term in terms(text):
        if term in STOP_WORDS or len(term) < 2:
            continue
        found.add(term[:_STEM_CHARS] if term.isalpha() else term)
    return found


class LexicalScorer:
    """The idf-weighted share of the claim's content terms that the evidence contains (0..1).

    Idf is taken over the evidence of the call (the answer's passages), so a
    word every passage shares (the topic) counts little and the terms that
    tell passages apart count most.
    """

    name = "lexical"

    def scores(self, claims: Sequence[str], evidence: Sequence[str]) -> np.ndarray:
        evidence_terms = [content_terms(text) for text in evidence]
        frequency = Counter(term for found in evidence_terms for term in found)
        result = np.zeros((len(claims), len(evidence)), dtype=np.float32)
        for i, claim in enumerate(claims):
            weights = {t: math.log((len(evidence) + 1) / (frequency[t] + 0.5)) for t in content_terms(claim)}
            total = sum(weights.values())
            if total <= 0:
                continue
            for j, found in enumerate(evidence_terms):
                result[i, j] = sum(weight for term, weight in weights.items() if term in found) / total
        return result


class EmbeddingScorer:
    """Cosine similarity of claim and evidence under the embedding model (both embedded as documents).

    Vectors are kept for the last `cache_size` texts: a streamed answer is
    checked again as each claim completes, against the same passages.
    """

    def __init__(self, embedder: Embedder, cache_size: int = 4096) -> None:
        self.embedder = embedder
        self.name = f"embedding:{embedder.name}"
        self.cache_size = cache_size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def scores(self, claims: Sequence[str], evidence: Sequence[str]) -> np.ndarray:
        if not claims or not evidence:
            return np.zeros((len(claims), len(evidence)), dtype=np.float32)
        vectors = self._embedded([*claims, *evidence])
        return vectors[: len(claims)] @ vectors[len(claims) :].T

    def _embedded(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            known = {text: self._vectors[text] for text in texts if text in self._vectors}
        missing = list(dict.fromkeys(text for text in texts if text not in known))
        if missing:
            known.update(zip(missing, self.embedder.embed_documents(missing), strict=True))
        with self._lock:
            for text in texts:
                self._vectors[text] = known[text]
                self._vectors.move_to_end(text)
            while len(self._vectors) > self.cache_size:
                self._vectors.popitem(last=False)
        return np.stack([known[text] for text in texts])


class CrossEncoderScorer:
    """A local cross-encoder (e.g. the reranker `ragline tune` trains) reading claim and evidence together.

    Each claim is the query and its evidence windows the candidates, through
    `CrossEncoderReranker`, so loading, batching and thread safety are the reranker's.
    """

    def __init__(self, folder: str | Path, *, max_length: int | None = 256) -> None:
        from ragline.retrieve.rerank import CrossEncoderReranker

        self.reranker = CrossEncoderReranker(folder, max_length=max_length)
        self.name = self.reranker.name

    def scores(self, claims: Sequence[str], evidence: Sequence[str]) -> np.ndarray:
        result = np.zeros((len(claims), len(evidence)), dtype=np.float32)
        if not evidence:
            return result
        candidates = [Hit(Chunk(chunk_id=str(j), doc_id="", text=text, metadata={}), 0.0) for j, text in enumerate(evidence)]
        for i, claim in enumerate(claims):
            for hit in self.reranker.rerank(claim, candidates):
                result[i, int(hit.chunk.chunk_id)] = hit.score
        return result


class CombinedScorer:
    """A weighted mean of other scorers' scores (meaningful when they share a 0..1 scale)."""

    def __init__(self, parts: Sequence[tuple[SupportScorer, float]]) -> None:
        if not parts or any(weight < 0 for _, weight in parts) or sum(w for _, w in parts) <= 0:
            raise ValueError("a combined scorer needs scorers with non-negative weights that sum above 0")
        self.parts = list(parts)
        self.name = "+".join(f"{weight:g}*{scorer.name}" for scorer, weight in parts)

    def scores(self, claims: Sequence[str], evidence: Sequence[str]) -> np.ndarray:
        total = sum(weight for _, weight in self.parts)
        return sum(weight * scorer.scores(claims, evidence) for scorer, weight in self.parts) / total


# --- verification ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verification:
    """An answer checked claim by claim; `text` is the answer with its citations rewritten.

    `supported_share` is 0.0 when there are no claims (e.g. an abstention),
    and such an answer is not `grounded`.
    """

    text: str
    claims: list[CheckedClaim]
    supported_share: float
    grounded: bool
    method: str
    threshold: float

    @property
    def cited(self) -> list[int]:
        """Passage numbers the rewritten answer cites, in order of first use."""
        return list(dict.fromkeys(c.n for claim in self.claims for c in claim.citations))

    def to_dict(self) -> dict[str, Any]:
        return {
            "claims": [claim.to_dict() for claim in self.claims],
            "supported_share": round(self.supported_share, 4),
            "grounded": self.grounded,
            "method": self.method,
            "threshold": self.threshold,
        }


@dataclass(frozen=True, slots=True)
class _Evidence:
    """The windows of one passage's sentences that a claim is scored against."""

    n: int
    windows: list[Span]


def passage_windows(text: str, window: int) -> list[Span]:
    """Each sentence of a passage, and each run of up to `window` consecutive ones, as spans of `text`."""
    sentences = sentence_spans(text)
    spans = []
    for size in range(1, window + 1):
        for i in range(len(sentences) - size + 1):
            first, last = sentences[i], sentences[i + size - 1]
            spans.append(Span(text[first.start : last.end], first.start, last.end))
    return spans


CODE_SUPPORT = 0.5
"""Share of a code block's identifiers (idf-weighted) a passage must contain to support it."""


class Verifier:
    """Checks answers against their passages with one scorer and its threshold."""

    def __init__(
        self, scorer: SupportScorer, *, threshold: float, grounded_share: float = 0.8, window: int = 2
    ) -> None:
        self.scorer = scorer
        self.threshold = threshold
        self.grounded_share = grounded_share
        self.window = window
        self._code_scorer = LexicalScorer()

    @classmethod
    def from_settings(
        cls, settings: VerifySettings, embedder: Embedder | None = None, scorer: SupportScorer | None = None
    ) -> Verifier:
        """The configured verifier; `embedder` (the index's model) is needed by "embedding" and "combined",
        unless the `scorer` of `settings.method` is given, already built."""
        scorer = scorer or build_scorer(settings.method, embedder=embedder, model=settings.model)
        threshold = settings.support_threshold
        if threshold is None:
            threshold = DEFAULT_THRESHOLDS[settings.method]
        return cls(scorer, threshold=threshold, grounded_share=settings.grounded_share, window=settings.window)

    def verify(self, answer: str, hits: Sequence[Hit]) -> Verification:
        claims = split_claims(answer)
        evidence = self._evidence(hits)
        prose = [i for i, claim in enumerate(claims) if claim.kind == "sentence"]
        code = [i for i, claim in enumerate(claims) if claim.kind == "code"]
        best: dict[int, list[SupportingSpan]] = {}
        prose_texts = [without_citations(claims[i].span.text) for i in prose]
        for i, ranked in zip(prose, self._rank(self.scorer, prose_texts, evidence), strict=True):
            best[i] = ranked
        for i, ranked in zip(code, self._rank_code([claims[i] for i in code], hits, evidence), strict=True):
            best[i] = ranked
        thresholds = [self.threshold if claim.kind == "sentence" else CODE_SUPPORT for claim in claims]
        chosen = [_choose(claim.cited, best[i], thresholds[i]) for i, claim in enumerate(claims)]
        return self._result(answer, claims, best, chosen, thresholds)

    def support(self, claims: Sequence[str], hits: Sequence[Hit]) -> list[list[SupportingSpan]]:
        """For each claim (plain text), each passage's best span and its score, best passage first."""
        return self._rank(self.scorer, claims, self._evidence(hits))

    def _evidence(self, hits: Sequence[Hit]) -> list[_Evidence]:
        return [_Evidence(n, passage_windows(hit.chunk.text, self.window)) for n, hit in enumerate(hits, start=1)]

    def _rank(
        self, scorer: SupportScorer, claims: Sequence[str], evidence: Sequence[_Evidence]
    ) -> list[list[SupportingSpan]]:
        """For each claim, each passage's best window (best passage first)."""
        windows = [(item.n, span) for item in evidence for span in item.windows]
        if not claims or not windows:
            return [[] for _ in claims]
        matrix = scorer.scores(claims, [span.text for _, span in windows])
        return [_best_per_passage(windows, row) for row in matrix]

    def _rank_code(
        self, claims: Sequence[Claim], hits: Sequence[Hit], evidence: Sequence[_Evidence]
    ) -> list[list[SupportingSpan]]:
        """Code blocks: each passage scored whole by the share of the block's identifiers it holds;
        the span shown is the passage's window that holds most of them."""
        if not claims or not hits:
            return [[] for _ in claims]
        names = [code_identifiers(claim.span.text) for claim in claims]
        whole = self._code_scorer.scores(names, [hit.chunk.text for hit in hits])
        spans = self._rank(self._code_scorer, names, evidence)
        ranked = []
        for row, per_passage in zip(whole, spans, strict=True):
            located = {span.n: span for span in per_passage}
            scored = [
                SupportingSpan(n, located[n].text, located[n].start, located[n].end, float(row[n - 1]))
                for n in range(1, len(hits) + 1)
                if n in located
            ]
            ranked.append(sorted(scored, key=lambda s: -s.score))
        return ranked

    def _result(
        self,
        answer: str,
        claims: Sequence[Claim],
        best: dict[int, list[SupportingSpan]],
        chosen: Sequence[list[SupportingSpan]],
        thresholds: Sequence[float],
    ) -> Verification:
        pieces: list[str] = []
        checked: list[CheckedClaim] = []
        cursor = 0
        length = 0
        for i, claim in enumerate(claims):
            gap = without_citations(answer[cursor : claim.span.start])
            body = _with_markers(claim, chosen[i])
            pieces += [gap, body]
            start = length + len(gap)
            length = start + len(body)
            score = best[i][0].score if best[i] else 0.0
            supported = score >= thresholds[i]
            checked.append(CheckedClaim(body, start, length, claim.kind, supported, score, chosen[i]))
            cursor = claim.span.end
        pieces.append(without_citations(answer[cursor:]))
        share = sum(c.supported for c in checked) / len(checked) if checked else 0.0
        grounded = bool(checked) and share >= self.grounded_share
        return Verification("".join(pieces), checked, share, grounded, self.scorer.name, self.threshold)


def _best_per_passage(windows: Sequence[tuple[int, Span]], row: np.ndarray) -> list[SupportingSpan]:
    best: dict[int, SupportingSpan] = {}
    for (n, span), score in zip(windows, row.tolist(), strict=True):
        if n not in best or score > best[n].score:
            best[n] = SupportingSpan(n, span.text, span.start, span.end, float(score))
    return sorted(best.values(), key=lambda s: -s.score)


def _choose(cited: Sequence[int], ranked: Sequence[SupportingSpan], threshold: float) -> list[SupportingSpan]:
    """The model's supported citations; else the best supporting passage; else none."""
    supporting = {span.n: span for span in ranked if span.score >= threshold}
    kept = [supporting[n] for n in cited if n in supporting]
    if kept:
        return kept
    return [ranked[0]] if ranked and ranked[0].n in supporting else []


def _with_markers(claim: Claim, citations: Sequence[SupportingSpan]) -> str:
    """The claim's text with its citations rewritten: `[n]` markers before the final punctuation."""
    if claim.kind == "code":
        return claim.span.text
    bare = without_citations(claim.span.text).rstrip()
    if not citations:
        return bare
    markers = " " + "".join(f"[{c.n}]" for c in citations)
    final = _FINAL_PUNCTUATION.search(bare)
    cut = final.start() if final else len(bare)
    return bare[:cut].rstrip() + markers + bare[cut:]


# --- construction from settings -------------------------------------------------------------------

DEFAULT_THRESHOLDS = {"lexical": 0.53, "embedding": 0.8, "cross-encoder": 0.5, "combined": 0.5}
"""Support threshold per method when `generate.verify.support_threshold` is unset: the best F1 on the
labelled pairs (benchmarks/verifier.py); the cross-encoder's is its sigmoid midpoint, not measured."""

DEFAULT_MIN_RELEVANCE = {"combined": 0.25, "embedding": 0.32}
"""Retrieval confidence (best passage sentence against the question) below which the answerer abstains
unasked, when `generate.verify.min_relevance` is unset: about 1% of the Flax dev set's answerable
questions fall below it, and 37% of its unanswerable ones (53% on the Python samples); lexical scores
separate them worse (27% of answerable questions at the same share caught)."""

COMBINED_WEIGHTS = (0.5, 0.5)
"""Weights of the lexical and the embedding score in the "combined" method: lexical weights 0.3 to 0.5
tie for the best F1 on the labelled pairs (benchmarks/verifier.py --weights)."""


def build_scorer(method: str, *, embedder: Embedder | None = None, model: str | None = None) -> SupportScorer:
    """The scorer a verify method names; raises ValueError saying what is missing."""
    if method == "lexical":
        return LexicalScorer()
    if method == "cross-encoder":
        if not model:
            raise ValueError("generate.verify.method cross-encoder needs generate.verify.model: a local model folder")
        return CrossEncoderScorer(model)
    if embedder is None:
        raise ValueError(f"generate.verify.method {method} needs the embedding model; use method lexical without one")
    if method == "embedding":
        return EmbeddingScorer(embedder)
    if method == "combined":
        lexical, embedding = COMBINED_WEIGHTS
        return CombinedScorer([(LexicalScorer(), lexical), (EmbeddingScorer(embedder), embedding)])
    raise ValueError(f"unknown generate.verify.method {method!r}: use lexical, embedding, cross-encoder or combined")
