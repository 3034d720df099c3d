"""Retrieval quality on a question set: does the gold page (section) come up, and how high?

Questions are `{"question", "source"}` with source the gold URL (optionally
`#anchor`). Each question is searched for the top `DEPTH` passages through
the app's retriever, with the config's retrieve settings or per-run options,
and one line per question is appended to the results file: the question,
its source, the ranked passage URLs, the rank of the first passage on the
gold page and in the gold section (None: not in the top `DEPTH`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragline.app import Ragline
from ragline.config import RetrieveSettings
from ragline.evaluate.matching import same_page, same_section
from ragline.evaluate.metrics import DEPTH, first_rank, rank_metrics
from ragline.evaluate.records import Progress, ResultsFile, Silent, config_hash, pending, question_key
from ragline.store.base import Scope
from ragline.types import Hit


@dataclass(slots=True)
class RetrievalReport:
    """Figures over the questions at page and at anchor (section) level."""

    questions: int
    page: dict[str, float]
    anchor: dict[str, float]
    config: str
    results: Path

    def to_dict(self) -> dict[str, Any]:
        return {"questions": self.questions, "page": self.page, "anchor": self.anchor,
                "config": self.config, "results": str(self.results)}


def retrieval_config(app: Ragline, options: RetrieveSettings) -> dict[str, Any]:
    """What decides the rankings: retrieve options, query embedding, chunking and the index's size."""
    embedder = app.settings.embedder
    return {
        "kind": "retrieval",
        "depth": DEPTH,
        "retrieve": options.model_dump(mode="json"),
        "embedder": [embedder.backend, embedder.model, embedder.query_prefix],
        "chunker": app.settings.chunker.model_dump(mode="json"),
        "chunks": app.store.count(),
    }


def judge_ranking(item: dict[str, Any], hits: Sequence[Hit]) -> dict[str, Any]:
    """One results line: the ranked passage URLs and the ranks of the gold page and section."""
    gold = item["source"]
    metas = [hit.chunk.metadata for hit in hits]
    return {
        "question": item["question"],
        "source": gold,
        "ranked": [hit.chunk.citation_url for hit in hits],
        "rank": first_rank([same_page(gold, m.get("url", ""), m.get("source")) for m in metas]),
        "anchor_rank": first_rank(
            [same_section(gold, m.get("url", ""), m.get("anchor", ""), m.get("source")) for m in metas]
        ),
    }


def evaluate_retrieval(
    app: Ragline,
    questions: Sequence[dict[str, Any]],
    results: Path,
    *,
    options: RetrieveSettings | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> RetrievalReport:
    """Search every question not yet in `results` for this configuration, append its line, return the figures.

    Questions are searched `batch_size` at a time (one embedding call per
    batch); an interrupted run loses at most the batch in flight.
    """
    options = options or app.settings.retrieve
    progress = progress or Silent()
    config = config_hash(retrieval_config(app, options))
    log = ResultsFile(results, config)
    done = log.done()
    todo, total = pending(questions, done)
    progress.start(total, total - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        found = app.retriever.search_many(
            [item["question"] for item in batch], k=DEPTH, options=options, scope=Scope.everything()
        )
        for item, retrieval in zip(batch, found):
            record = judge_ranking(item, retrieval.hits)
            log.append(record)
            done[question_key(item)] = record
        progress.advance(len(batch))
    lines = [done[question_key(item)] for item in questions]
    return RetrievalReport(
        questions=len(lines),
        page=rank_metrics([line["rank"] for line in lines]),
        anchor=rank_metrics([line["anchor_rank"] for line in lines]),
        config=config,
        results=results,
    )
