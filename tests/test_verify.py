"""Span-level verification of answers: claims, supporting spans, rewritten citations, the verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scripted_llm_server import make_hit

from ragline.config import ConfigError, GenerateSettings, VerifySettings, load_settings
from ragline.generate.prompt import NO_ANSWER
from ragline.generate.verify import (
    DEFAULT_THRESHOLDS,
    CombinedScorer,
    EmbeddingScorer,
    LexicalScorer,
    SupportScorer,
    Verifier,
    sentence_spans,
    split_claims,
    without_citations,
)

PORT = "The server listens on port 8080 unless the PORT variable is set. Logs go to stderr by default."
INSTALL = "Run pip install example to install the package. Python 3.9 or newer is required."
JSON = (
    "To decode JSON, call json.loads(text) on a str. Use json.load(fp) to read a file object.\n"
    ">>> import json\n>>> json.loads('[1, 2]')"
)
HITS = [make_hit(1, PORT, title="Configuration"), make_hit(2, INSTALL, title="Installing"), make_hit(3, JSON)]


def lexical(**options) -> Verifier:
    return Verifier(LexicalScorer(), threshold=DEFAULT_THRESHOLDS["lexical"], **options)


def claim_texts(text: str) -> list[str]:
    return [claim.span.text for claim in split_claims(text)]


# --- splitting -------------------------------------------------------------------------------------


def test_sentences_split_at_ends_but_not_after_abbreviations_decimals_or_inside_code():
    text = (
        "Use a mapping, e.g. a dict, for lookups [1]. Python 3.11 is fast, i.e. faster than 3.10. "
        "Call `os.path. Join` carefully! Dr. Smith wrote it?"
    )
    assert claim_texts(text) == [
        "Use a mapping, e.g. a dict, for lookups [1].",
        "Python 3.11 is fast, i.e. faster than 3.10.",
        "Call `os.path. Join` carefully!",
        "Dr. Smith wrote it?",
    ]


def test_claim_offsets_point_at_the_claim_in_the_answer():
    text = "## Answer\n\nThe server listens on port 8080. [1] It logs to stderr [1].\n\n- Install it with pip [2]."
    claims = split_claims(text)
    assert [text[c.span.start : c.span.end] for c in claims] == [c.span.text for c in claims]
    assert [c.span.text for c in claims] == [
        "The server listens on port 8080. [1]",
        "It logs to stderr [1].",
        "Install it with pip [2].",
    ]
    assert [c.cited for c in claims] == [(1,), (1,), (2,)]


def test_a_code_block_is_one_claim_and_headings_lead_ins_and_fragments_are_not():
    text = (
        "# Reading JSON\n**Example**\nHere is how you do it:\n\n"
        "```python\nimport json\ndata = json.loads('[1]')\n```\n[3]\n\nYes.\n- Short one.\n"
        f"1. The loads function takes a str [3].\n{NO_ANSWER}"
    )
    claims = split_claims(text)
    assert [(c.kind, c.span.text) for c in claims] == [
        ("code", "```python\nimport json\ndata = json.loads('[1]')\n```"),
        ("sentence", "The loads function takes a str [3]."),
    ]
    assert claims[0].cited == (3,), "a citation on the line after a code block belongs to the block"
    assert all(text[c.span.start : c.span.end] == c.span.text for c in claims)


def test_list_items_are_claims_without_their_markers():
    text = "The options are:\n- indent pretty-prints the output [3]\n* sort_keys sorts the keys.\n2) skipkeys drops bad keys."
    assert claim_texts(text) == [
        "indent pretty-prints the output [3]",
        "sort_keys sorts the keys.",
        "skipkeys drops bad keys.",
    ]


def test_passage_sentences_keep_offsets_into_the_passage():
    spans = sentence_spans(JSON)
    assert [s.text for s in spans] == [
        "To decode JSON, call json.loads(text) on a str.",
        "Use json.load(fp) to read a file object.",
        ">>> import json",
        ">>> json.loads('[1, 2]')",
    ]
    assert all(JSON[s.start : s.end] == s.text for s in spans)


def test_citation_markers_are_removed_but_indexes_in_code_are_not():
    assert without_citations("Port 8080 [1][2]. Use `a[1]` here.[3]\n[4] Next.") == "Port 8080. Use `a[1]` here.\nNext."


# --- citations -------------------------------------------------------------------------------------


def test_a_supported_citation_is_kept_with_the_sentence_that_supports_it():
    result = lexical().verify("The server listens on port 8080 [1].", HITS)
    assert result.text == "The server listens on port 8080 [1]."
    (claim,) = result.claims
    assert claim.supported and [c.n for c in claim.citations] == [1]
    span = claim.citations[0]
    assert span.text == "The server listens on port 8080 unless the PORT variable is set."
    assert PORT[span.start : span.end] == span.text


def test_an_unsupported_citation_is_replaced_by_the_passage_that_supports_the_claim():
    result = lexical().verify("Python 3.9 or newer is required to install the package [1].", HITS)
    assert result.text == "Python 3.9 or newer is required to install the package [2]."
    assert result.cited == [2]
    span = result.claims[0].citations[0]
    assert INSTALL[span.start : span.end] == span.text and "3.9" in span.text


def test_a_citation_no_passage_supports_is_dropped_and_the_claim_marked():
    result = lexical().verify("The server listens on port 8080 [1]. It was written in Haskell by elves [2].", HITS)
    assert result.text == "The server listens on port 8080 [1]. It was written in Haskell by elves."
    assert [c.supported for c in result.claims] == [True, False]
    assert result.claims[1].citations == []


def test_a_supported_claim_without_citations_gets_one_before_its_final_punctuation():
    answer = "You need Python 3.9 or newer to install the package!\n- Logs go to stderr by default"
    result = lexical().verify(answer, HITS)
    assert result.text == "You need Python 3.9 or newer to install the package [2]!\n- Logs go to stderr by default [1]"
    assert all(result.text[c.start : c.end] == c.text for c in result.claims)
    assert [c.text for c in result.claims] == [
        "You need Python 3.9 or newer to install the package [2]!",
        "Logs go to stderr by default [1]",
    ]


def test_of_two_citations_only_the_supporting_one_stays():
    result = lexical().verify("Logs go to stderr by default [2][1].", HITS)
    assert result.text == "Logs go to stderr by default [1]."


def test_a_code_block_is_supported_by_a_passage_that_has_its_identifiers():
    answer = "```python\nimport json\nitems = json.loads('[1, 2]')\n```\n\n```python\nimport yaml\nyaml.safe_load(s)\n```"
    result = lexical().verify(answer, HITS)
    assert [(c.kind, c.supported) for c in result.claims] == [("code", True), ("code", False)]
    assert [c.n for c in result.claims[0].citations] == [3]
    assert result.text == answer, "code blocks are never rewritten"


# --- the verdict -----------------------------------------------------------------------------------


def test_grounded_is_the_share_of_supported_claims_against_the_configured_share():
    answer = "The server listens on port 8080 [1]. Python 3.9 or newer is required [2]. The moon is made of cheese [1]."
    strict, lenient = lexical(grounded_share=1.0).verify(answer, HITS), lexical(grounded_share=0.6).verify(answer, HITS)
    assert strict.supported_share == pytest.approx(2 / 3) == lenient.supported_share
    assert (strict.grounded, lenient.grounded) == (False, True)


def test_an_answer_without_passages_has_no_support_and_loses_its_citations():
    result = lexical().verify("The server listens on port 8080 [1]. Python 3.9 is required [2].", [])
    assert result.text == "The server listens on port 8080. Python 3.9 is required."
    assert [c.supported for c in result.claims] == [False, False]
    assert (result.supported_share, result.grounded) == (0.0, False)


@pytest.mark.parametrize("refusal", [NO_ANSWER, "The document does not contain the answer.", "The passages do not mention it."])
def test_an_abstention_has_no_claims_and_is_not_grounded(refusal):
    result = lexical().verify(refusal, HITS)
    assert (result.text, result.claims, result.supported_share, result.grounded) == (refusal, [], 0.0, False)


def test_the_result_serialises_to_json():
    result = lexical().verify("The server listens on port 8080 [1]. Elves wrote it [2].", HITS)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["supported_share"] == 0.5 and data["method"] == "lexical"
    assert data["claims"][0]["citations"][0] == {
        "n": 1,
        "text": "The server listens on port 8080 unless the PORT variable is set.",
        "start": 0,
        "end": 64,
        "score": pytest.approx(result.claims[0].citations[0].score, abs=1e-4),
    }


# --- scorers and settings --------------------------------------------------------------------------


def test_the_embedding_scorer_finds_a_paraphrase(embedder):
    scorer = EmbeddingScorer(embedder)
    assert isinstance(scorer, SupportScorer)
    claim = "The server's port is 8080 unless the PORT variable says otherwise."
    evidence = [PORT, INSTALL, "Bake the bread at 230 degrees for forty minutes."]
    scores = scorer.scores([claim], evidence)
    assert scores.shape == (1, 3) and int(np.argmax(scores[0])) == 0
    verifier = Verifier(scorer, threshold=DEFAULT_THRESHOLDS["embedding"])
    result = verifier.verify(f"{claim} Sourdough needs a long cold fermentation [1].", HITS)
    assert [c.supported for c in result.claims] == [True, False]
    assert result.text == f"{claim[:-1]} [1]. Sourdough needs a long cold fermentation."


def test_the_combined_scorer_is_the_weighted_mean_of_its_parts(embedder):
    parts = [(LexicalScorer(), 1.0), (EmbeddingScorer(embedder), 3.0)]
    claims, evidence = ["Logs go to stderr."], [PORT, INSTALL]
    expected = (parts[0][0].scores(claims, evidence) + 3 * parts[1][0].scores(claims, evidence)) / 4
    assert CombinedScorer(parts).scores(claims, evidence) == pytest.approx(expected, abs=1e-6)


def test_the_cross_encoder_scorer_gives_the_models_own_score_per_pair(tmp_path):
    from sentence_transformers import CrossEncoder
    from test_rerank import train_tiny_cross_encoder

    from ragline.generate.verify import CrossEncoderScorer

    train_tiny_cross_encoder(tmp_path)
    claims, evidence = ["How do I save a model?", "Install it with pip."], [PORT, INSTALL, JSON]
    scores = CrossEncoderScorer(tmp_path).scores(claims, evidence)
    expected = CrossEncoder(str(tmp_path), local_files_only=True, max_length=256).predict(
        [(c, e) for c in claims for e in evidence]
    )
    assert scores == pytest.approx(np.asarray(expected).reshape(2, 3), abs=1e-5)


def test_settings_build_the_verifier_and_name_what_is_missing(tmp_path, embedder):
    assert GenerateSettings().verify == VerifySettings()
    default = Verifier.from_settings(VerifySettings(), embedder)
    assert isinstance(default.scorer, CombinedScorer) and default.threshold == DEFAULT_THRESHOLDS["combined"]
    verifier = Verifier.from_settings(VerifySettings(method="lexical", grounded_share=0.5))
    assert (verifier.threshold, verifier.grounded_share) == (DEFAULT_THRESHOLDS["lexical"], 0.5)
    assert Verifier.from_settings(VerifySettings(method="embedding", support_threshold=0.7), embedder).threshold == 0.7
    with pytest.raises(ValueError, match="needs the embedding model"):
        Verifier.from_settings(VerifySettings(method="embedding"))
    config = tmp_path / "ragline.yaml"
    config.write_text("generate:\n  verify:\n    method: cross-encoder\n")
    with pytest.raises(ConfigError, match="verify.model"):
        load_settings(config)
