"""Fusing ranked lists into one: reciprocal rank fusion and convex (min-max normalised) score fusion.

Stores use it to merge their dense and keyword lists, and the retriever to
merge the lists of several phrasings of one query. Lists are of `Hit`s; a
chunk in several lists is one result, keeping the first copy seen (with its
vector, if any).

- **RRF** (Cormack et al. 2009): score = Σ weight / (rrf_k + rank). Uses
  ranks only, so it needs no calibration between BM25 and cosine scores.
- **Convex**: each list's scores are min-max normalised to [0, 1], then
  summed with the weights (LlamaIndex's relative-score fusion). It keeps how
  far ahead a clear winner is, which RRF forgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ragline.types import Hit

FusionMethod = Literal["rrf", "convex"]

TIE_SLACK = 32
TIE_DIGITS = 6
"""Equal scores (the same text twice; float noise in the 7th digit) rank by chunk id, not by where rows happen
to lie, so a rebuilt or resumed index, or another store, answers exactly like an uninterrupted one: each list
is read TIE_SLACK deeper than k, ordered by (score to TIE_DIGITS significant digits, chunk id), then cut."""


@dataclass(frozen=True, slots=True)
class Fusion:
    """How a hybrid search merges its dense and keyword lists."""

    method: FusionMethod = "rrf"
    rrf_k: int = 60
    dense_weight: float = 1.0
    keyword_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ("rrf", "convex"):
            raise ValueError(f"fusion method must be 'rrf' or 'convex', not {self.method!r}")
        if self.rrf_k < 0 or self.dense_weight < 0 or self.keyword_weight < 0:
            raise ValueError("fusion rrf_k and weights must not be negative")


def fuse(lists: Sequence[Sequence[Hit]], weights: Sequence[float], method: FusionMethod = "rrf",
         rrf_k: int = 60, k: int | None = None) -> list[Hit]:
    """One ranking from several, best first, cut to `k` (all when None); each hit scored by the fusion."""
    if len(lists) != len(weights):
        raise ValueError(f"{len(lists)} lists but {len(weights)} weights")
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for hits, weight in zip(lists, weights):
        if method == "rrf":
            contributions = [weight / (rrf_k + rank) for rank in range(1, len(hits) + 1)]
        else:
            contributions = [weight * value for value in min_max([hit.score for hit in hits])]
        for hit, contribution in zip(hits, contributions):
            key = hit.chunk.chunk_id
            if key not in first:
                first[key] = hit
            elif first[key].vector is None and hit.vector is not None:
                first[key] = hit
            scores[key] = scores.get(key, 0.0) + contribution
    ranked = sorted(scores, key=lambda key: -scores[key])
    return [replace(first[key], score=scores[key]) for key in ranked[:k]]


def store_result(lists: Sequence[list[Hit]], k: int, fusion: Fusion) -> list[Hit]:
    """A store's answer from its dense and/or keyword lists (each read `TIE_SLACK` deeper than `k`): each list
    ordered with ties broken by chunk id and cut to `k`; two lists fused by `fusion`."""
    cut = []
    for hits in lists:
        ordered = sorted(hits, key=lambda hit: (-float(f"{hit.score:.{TIE_DIGITS}g}"), hit.chunk.chunk_id))
        cut.append(ordered[:k])
    if len(cut) == 1:
        return cut[0]
    return fuse(cut, (fusion.dense_weight, fusion.keyword_weight), fusion.method, fusion.rrf_k, k)


def min_max(values: list[float]) -> list[float]:
    """Scores scaled to [0, 1]; a list of equal scores counts as all 1 (each is as good as the best)."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high - low <= 1e-12:
        return [1.0] * len(values)
    return [(value - low) / (high - low) for value in values]
