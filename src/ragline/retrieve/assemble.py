"""Turning ranked candidates into the passages an answer is built from.

- **De-duplication**: a passage whose words are nearly all in one ranked
  higher (overlapping chunks, the same boilerplate on several pages) adds
  nothing; it is dropped.
- **Diversity**: maximal marginal relevance (MMR) trades relevance against
  similarity to what is already picked; caps keep one page or one section
  from filling the list. When the caps leave fewer than k, the best of the
  passages they held back fill the rest: a short list helps nobody.
- **Neighbour expansion**: a hit is joined with the chunks next to it in the
  same section, so the LLM sees the sentence before and after a cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ragline.store.fusion import min_max
from ragline.types import Chunk, Hit

NEAR_DUPLICATE = 0.8
"""Share of common words (Jaccard) above which a passage repeats one ranked higher."""
_WORD = re.compile(r"\w+")


def page_key(hit: Hit) -> str:
    return str(hit.chunk.metadata.get("url") or hit.chunk.doc_id)


def section_key(hit: Hit) -> tuple[str, str]:
    return hit.chunk.doc_id, str(hit.chunk.metadata.get("anchor", ""))


def dedupe(hits: Sequence[Hit]) -> list[Hit]:
    """The hits without near-duplicates of ones ranked higher."""
    kept: list[Hit] = []
    kept_words: list[set[str]] = []
    for hit in hits:
        words = set(_WORD.findall(hit.chunk.text.lower()))
        if any(_jaccard(words, other) >= NEAR_DUPLICATE for other in kept_words):
            continue
        kept.append(hit)
        kept_words.append(words)
    return kept


def _jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def diversify(
    hits: Sequence[Hit],
    k: int,
    mmr_lambda: float | None = None,
    max_per_page: int | None = None,
    max_per_section: int | None = None,
) -> list[Hit]:
    """Pick k hits in order: by MMR when `mmr_lambda` is set (hits need vectors), else by rank, under the caps."""
    remaining = list(hits)
    relevance = min_max([hit.score for hit in remaining])  # on [0, 1], whatever the fusion's scale
    picked: list[Hit] = []
    held_back: list[Hit] = []
    per_page: dict[str, int] = {}
    per_section: dict[tuple[str, str], int] = {}
    picked_vectors: list[np.ndarray] = []
    while remaining and len(picked) < k:
        index = _next_index(remaining, relevance, picked_vectors, mmr_lambda)
        hit = remaining.pop(index)
        relevance.pop(index)
        page, section = page_key(hit), section_key(hit)
        if (max_per_page and per_page.get(page, 0) >= max_per_page) or (
            max_per_section and per_section.get(section, 0) >= max_per_section
        ):
            held_back.append(hit)
            continue
        per_page[page] = per_page.get(page, 0) + 1
        per_section[section] = per_section.get(section, 0) + 1
        picked.append(hit)
        if hit.vector is not None:
            picked_vectors.append(np.asarray(hit.vector, dtype=np.float32))
    return picked + held_back[: k - len(picked)]


def _next_index(remaining: list[Hit], relevance: list[float], picked: list[np.ndarray], mmr_lambda: float | None) -> int:
    if mmr_lambda is None or not picked:
        return 0
    best, best_value = 0, -np.inf
    chosen = np.stack(picked)
    for index, (hit, rel) in enumerate(zip(remaining, relevance)):
        similarity = float(np.max(chosen @ np.asarray(hit.vector, dtype=np.float32))) if hit.vector is not None else 0.0
        value = mmr_lambda * rel - (1 - mmr_lambda) * similarity
        if value > best_value:
            best, best_value = index, value
    return best


def expand(hits: Sequence[Hit], neighbours: int, document_chunks: Callable[[str], list[Chunk]]) -> list[Hit]:
    """Each hit with up to `neighbours` chunks of its own section on each side joined to its text."""
    if neighbours < 1:
        return list(hits)
    by_doc: dict[str, list[Chunk]] = {}
    expanded = []
    for hit in hits:
        chunks = by_doc.get(hit.chunk.doc_id)
        if chunks is None:
            chunks = by_doc[hit.chunk.doc_id] = document_chunks(hit.chunk.doc_id)
        ids = [chunk.chunk_id for chunk in chunks]
        if hit.chunk.chunk_id not in ids:
            expanded.append(hit)
            continue
        at = ids.index(hit.chunk.chunk_id)
        anchor = hit.chunk.metadata.get("anchor")
        start = at
        while start > 0 and at - start < neighbours and chunks[start - 1].metadata.get("anchor") == anchor:
            start -= 1
        end = at
        while end < len(chunks) - 1 and end - at < neighbours and chunks[end + 1].metadata.get("anchor") == anchor:
            end += 1
        text = chunks[start].text
        for chunk in chunks[start + 1 : end + 1]:
            text = join_overlapping(text, chunk.text)
        metadata = {**hit.chunk.metadata, "expanded_from": ids[start : end + 1]}
        expanded.append(replace(hit, chunk=replace(hit.chunk, text=text, metadata=metadata)))
    return expanded


def join_overlapping(first: str, second: str, longest: int = 2000) -> str:
    """`first` followed by `second`, without the text the chunker repeated at the start of `second`."""
    for size in range(min(len(first), len(second), longest), 0, -1):
        if first.endswith(second[:size]):
            return first + second[size:]
    return f"{first}\n{second}"
