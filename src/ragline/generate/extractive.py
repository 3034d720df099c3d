"""Answers without an LLM: the sentences of the top hits that best match the question.

Used when no model is configured and as the fallback when the model fails,
so it must be cheap and dependency-free. Sentences are scored by the
idf-weighted share of the question's terms they contain, or by cosine
similarity when an embedding function is given. Every sentence is cited
with the number of its hit, matching the numbering the LLM prompt uses.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from ragline.generate.prompt import NO_ANSWER, citation
from ragline.types import Answer, Hit

EmbedFn = Callable[[list[str]], Sequence[Sequence[float]]]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])|\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)])\s)")
_LIST_MARKER = re.compile(r"^(?:[-*•]|\d+[.)])\s+")
_WORD = re.compile(r"[a-z0-9_]+")
_STOPWORDS = frozenset(
    re.findall(
        r"\w+",
        """a an and are as at be but by can do does for from has have how i if in into is it its me my no not of
        on or so than that the their them then there these they this to was we what when where which who why will
        with you your""",
    )
)
_MIN_WORDS = 4


def _terms(text: str) -> set[str]:
    """Lower-cased content words with a crude plural strip, so "tokens" matches "token"."""
    words = (w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS)
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words}


def split_sentences(text: str) -> list[str]:
    pieces = (_LIST_MARKER.sub("", " ".join(s.split())) for s in _SENTENCE_END.split(text))
    return [s for s in pieces if len(s.split()) >= _MIN_WORDS]


class ExtractiveAnswerer:
    """Picks up to `max_sentences` sentences scoring at least `min_score`.

    `min_score` is on the scale of the scorer in use: the idf-weighted share
    of question terms (0..1), or cosine similarity with `embed`.
    """

    name = "extractive"

    def __init__(self, *, max_sentences: int = 3, min_score: float = 0.2, embed: EmbedFn | None = None):
        self.max_sentences = max_sentences
        self.min_score = min_score
        self._embed = embed

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        candidates = [
            (n, position, sentence)
            for n, hit in enumerate(hits, start=1)
            for position, sentence in enumerate(split_sentences(hit.chunk.text))
        ]
        scores = self._scores(question, [sentence for _, _, sentence in candidates])
        ranked = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
        chosen = sorted(i for i in ranked[: self.max_sentences] if scores[i] >= self.min_score)
        if not chosen:
            return Answer(text=NO_ANSWER, citations=[], hits=list(hits), model=self.name, grounded=False)
        text = " ".join(f"{candidates[i][2]} [{candidates[i][0]}]" for i in chosen)
        cited = sorted({candidates[i][0] for i in chosen})
        return Answer(
            text=text,
            citations=[citation(n, hits[n - 1]) for n in cited],
            hits=list(hits),
            model=self.name,
            grounded=True,
        )

    def _scores(self, question: str, sentences: list[str]) -> list[float]:
        if not sentences:
            return []
        if self._embed is not None:
            vectors = np.asarray(self._embed([question, *sentences]), dtype=np.float32)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return (vectors[1:] @ vectors[0]).tolist()
        sentence_terms = [_terms(s) for s in sentences]
        df = Counter(term for terms in sentence_terms for term in terms)
        idf = {term: math.log((len(sentences) + 1) / (df[term] + 1)) + 1 for term in _terms(question)}
        total = sum(idf.values()) or 1.0
        return [sum(weight for term, weight in idf.items() if term in terms) / total for terms in sentence_terms]
