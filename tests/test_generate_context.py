"""Context selection: the passages' sentences most relevant to the question, to a token budget."""

from __future__ import annotations

import pytest
from scripted_llm_server import make_hit

from ragline.generate.context import GAP, ContextSelector
from ragline.generate.verify import LexicalScorer

QUESTION = "How do I change the port?"
HITS = [
    make_hit(1, "Ragline serves answers. The server listens on port 8000. Set PORT to change the port. It logs to stderr."),
    make_hit(2, "Chunks overlap. Example:\n```yaml\nserve:\n  port: 9000\n```\nThe port setting wins over PORT."),
    make_hit(3, "The cache keeps answers for an hour."),
]


def words(text: str) -> int:
    return len(text.split())


def test_without_a_budget_passages_are_whole_and_scored_only_when_asked():
    selector = ContextSelector(LexicalScorer(), None)
    plain = selector.select(QUESTION, HITS, words)
    assert plain.texts == [hit.chunk.text for hit in HITS] and plain.hits == HITS and plain.confidence is None
    scored = selector.select(QUESTION, HITS, words, confidence=True)
    assert scored.texts == plain.texts and 0 < scored.confidence <= 1


@pytest.mark.parametrize("budget", [8, 14, 18, 22, 26, 30, 60])
def test_every_passage_first_gets_its_best_sentence_then_the_best_rest_fit_in_order(budget):
    context = ContextSelector(LexicalScorer(), budget).select(QUESTION, HITS, words)
    used = sum(words(sentence) + 1 for text in context.texts for sentence in text.split(GAP.strip()) if sentence.strip())
    assert used <= budget + 2 * len(context.texts)  # a gap marker is not a sentence; separators are approximate
    assert context.hits == HITS[: len(context.texts)]
    if len(context.hits) >= 1:
        assert "Set PORT to change the port." in context.texts[0]  # the best sentence of passage 1
        assert "It logs to stderr." not in context.texts[0] or budget >= 30
    for hit, text in zip(context.hits, context.texts):
        assert text.count("```") in (0, 2)  # a code block is kept or left out whole
        kept = [piece.strip() for piece in text.split(GAP.strip()) if piece.strip()]
        positions = [hit.chunk.text.index(piece) for piece in kept]
        assert positions == sorted(positions)  # original order


def test_left_out_sentences_are_marked_where_they_were():
    tight = ContextSelector(LexicalScorer(), 12).select(QUESTION, HITS, words)
    assert tight.texts == [f"Ragline serves answers.{GAP}Set PORT to change the port.{GAP.rstrip()}"]


def test_passages_whose_best_sentence_does_not_fit_are_dropped_from_the_end():
    context = ContextSelector(LexicalScorer(), 7).select(QUESTION, HITS, words)
    assert len(context.hits) == 1 and context.texts[0].strip(" …") == "Set PORT to change the port."


def test_a_budget_needs_a_scorer():
    with pytest.raises(ValueError, match="needs a scorer"):
        ContextSelector(None, 100)
