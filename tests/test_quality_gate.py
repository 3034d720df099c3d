"""The quality gate: retrieval on a small fixed eval must not get worse.

tests/fixtures/gate_corpus/ is a slice of a real project's documentation
sources (MyST, reST, notebooks) and gate_questions.jsonl asks ~30 questions
about it the way users do, each with its gold page#section. The corpus is
ingested with the default settings and `ragline eval retrieval` measured;
the build fails when page-level hit@5 falls below `MIN_PAGE_HIT_AT_5`, or
section-level hit@5 (the finer signal on so small a corpus) below `MIN_ANCHOR_HIT_AT_5`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings
from ragline.evaluate.records import read_questions
from ragline.evaluate.retrieval import evaluate_retrieval

FIXTURES = Path(__file__).resolve().parent / "fixtures"
URL_TEMPLATE = "https://flax.readthedocs.io/en/latest/{path}.html"

MIN_PAGE_HIT_AT_5 = 0.93
"""Measured with the defaults (hybrid RRF search, dedupe, max 2 per page and 1 per section, no reranker,
all-MiniLM-L6-v2): page hit@5 1.000 (30/30), hit@1 0.900, MRR 0.944. The gate allows two misses."""
MIN_ANCHOR_HIT_AT_5 = 0.76
"""Measured as above: section hit@5 0.833 (25/30), hit@1 0.700, MRR 0.751. Allows two more misses."""


@pytest.mark.slow
def test_page_hit_at_5_on_the_gate_set_stays_above_the_threshold(tmp_path, capsys):
    questions = read_questions(FIXTURES / "gate_questions.jsonl", required=("question", "source"))
    app = Ragline(Settings(data_dir=tmp_path / "index"))
    try:
        ingest = app.indexer().run([SourceSettings(path=FIXTURES / "gate_corpus", url_template=URL_TEMPLATE)])
        assert not ingest.failed, ingest.failed
        report = evaluate_retrieval(app, questions, tmp_path / "gate.jsonl")
    finally:
        app.close()
    with capsys.disabled():
        print(f"\nquality gate: {report.questions} questions, page {report.page}, anchor {report.anchor}")
    assert report.questions == len(questions) >= 25
    assert report.page["hit@5"] >= MIN_PAGE_HIT_AT_5, (
        f"page hit@5 fell to {report.page['hit@5']:.3f} (gate {MIN_PAGE_HIT_AT_5}); per question: {report.results}"
    )
    assert report.anchor["hit@5"] >= MIN_ANCHOR_HIT_AT_5, (
        f"section hit@5 fell to {report.anchor['hit@5']:.3f} (gate {MIN_ANCHOR_HIT_AT_5}); per question: {report.results}"
    )
