"""Rank metrics of one gold item per question: hit@k, MRR and nDCG over the top `DEPTH` passages."""

from __future__ import annotations

import math
from collections.abc import Sequence

KS = (1, 3, 5, 7, 10)
DEPTH = max(KS)
"""Passages retrieved per question; ranks beyond it count as misses."""


def first_rank(matches: Sequence[bool]) -> int | None:
    """The 1-based position of the first matching passage within `DEPTH`, or None."""
    return next((i for i, match in enumerate(matches[:DEPTH], start=1) if match), None)


def rank_metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    """hit@k, MRR and nDCG@10 averaged over questions (`ranks` from `first_rank`).

    Relevance is binary with one relevant item, the gold page (or section):
    further passages from it are duplicates that earn nothing, so a
    question's nDCG@10 is 1/log2(1 + rank) and ranking more of the same
    page never lowers the score.
    """
    n = len(ranks)
    if n == 0:
        return {**{f"hit@{k}": 0.0 for k in KS}, "mrr": 0.0, "ndcg@10": 0.0}
    found = [r for r in ranks if r is not None and r <= DEPTH]
    figures = {f"hit@{k}": round(sum(r <= k for r in found) / n, 4) for k in KS}
    figures["mrr"] = round(sum(1 / r for r in found) / n, 4)
    figures["ndcg@10"] = round(sum(1 / math.log2(1 + r) for r in found) / n, 4)
    return figures
