"""Context selection: which sentences of the retrieved passages the model reads.

On a CPU the time to the first answer token is the time to read the prompt,
and the passages are most of it. With a `budget` (tokens for all passages),
each passage keeps only its sentences most relevant to the question, in
their original order, with "…" where sentences were left out (a fenced
code block counts as one sentence): every passage
first gets its best sentence (in retrieval order), then the best remaining
sentences of any passage while they fit. A passage whose best sentence does
not fit is left out, and so are the ones after it. Without a budget the
passages are passed whole (the prompt builder still fits them to the
model's window).

The same relevance scores give the retrieval confidence: the best score of
any passage sentence against the question, which the answerer can abstain on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ragline.generate.verify import Span, SupportScorer, text_units
from ragline.types import Hit

GAP = " … "
"""Stands for the sentences left out between two kept ones."""


@dataclass(frozen=True, slots=True)
class Context:
    """The passages the model reads: `hits[i]` shown as `texts[i]`; `confidence` is the best relevance of a
    passage sentence to the question (None when nothing was scored)."""

    hits: list[Hit]
    texts: list[str]
    confidence: float | None

    @classmethod
    def whole(cls, hits: Sequence[Hit], confidence: float | None = None) -> Context:
        return cls(list(hits), [hit.chunk.text for hit in hits], confidence)


class ContextSelector:
    """Scores passage sentences against the question with a verifier scorer, and keeps the best to a budget."""

    def __init__(self, scorer: SupportScorer | None, budget: int | None) -> None:
        if budget is not None and scorer is None:
            raise ValueError("a context budget needs a scorer to rank sentences by")
        self.scorer = scorer
        self.budget = budget

    def select(
        self, question: str, hits: Sequence[Hit], count_tokens: Callable[[str], int], *, confidence: bool = False
    ) -> Context:
        """The passages as the model should read them; scored only when there is a budget to meet or the
        `confidence` is wanted."""
        if self.scorer is None or (self.budget is None and not confidence):
            return Context.whole(hits)
        sentences = [text_units(hit.chunk.text) or [Span(hit.chunk.text, 0, len(hit.chunk.text))] for hit in hits]
        flat = [span.text for spans in sentences for span in spans]
        if not flat:
            return Context.whole(hits)
        row = self.scorer.scores([question], flat)[0].tolist()
        scores, offset = [], 0
        for spans in sentences:
            scores.append(row[offset : offset + len(spans)])
            offset += len(spans)
        best = max(row)
        if self.budget is None:
            return Context.whole(hits, best)
        kept = self._within_budget(sentences, scores, count_tokens)
        texts = [_joined(hits[p].chunk.text, [sentences[p][i] for i in sorted(kept[p])]) for p in range(len(kept))]
        return Context(list(hits[: len(kept)]), texts, best)

    def _within_budget(
        self, sentences: list[list[Span]], scores: list[list[float]], count_tokens: Callable[[str], int]
    ) -> list[set[int]]:
        """For each passage that fits (a leading run of them), the indices of its sentences to keep."""
        assert self.budget is not None
        left = self.budget
        kept: list[set[int]] = []
        for spans, row in zip(sentences, scores, strict=True):
            best = max(range(len(spans)), key=row.__getitem__)
            cost = count_tokens(spans[best].text) + 1
            if cost > left:
                break
            kept.append({best})
            left -= cost
        rest = [(row[i], p, i) for p, row in enumerate(scores[: len(kept)]) for i in range(len(row)) if i not in kept[p]]
        for _, p, i in sorted(rest, key=lambda item: (-item[0], item[1], item[2])):
            cost = count_tokens(sentences[p][i].text) + 1
            if cost <= left:
                kept[p].add(i)
                left -= cost
        return kept


def _joined(text: str, spans: Sequence[Span]) -> str:
    """The kept sentences in order: a space between neighbours, `GAP` where sentences were left out."""
    pieces: list[str] = []
    previous_end: int | None = None
    for span in spans:
        if previous_end is not None:
            between = text[previous_end : span.start]
            pieces.append(between if between.strip() == "" else GAP)
        elif span.start > 0 and text[: span.start].strip():
            pieces.append(GAP.lstrip())
        pieces.append(span.text)
        previous_end = span.end
    if previous_end is not None and text[previous_end:].strip():
        pieces.append(GAP.rstrip())
    return "".join(pieces)
