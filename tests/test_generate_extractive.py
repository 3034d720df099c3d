"""The extractive answerer: cited sentences from the hits, no LLM."""

from __future__ import annotations

from scripted_llm_server import make_hit
from sklearn.feature_extraction.text import HashingVectorizer

from ragline.generate.extractive import ExtractiveAnswerer, split_sentences
from ragline.generate.prompt import NO_ANSWER, check_citations

HITS = [
    make_hit(
        1,
        "Ragline is a retrieval platform. The server listens on port 8000 by default. "
        "Set RAGLINE_SERVE__PORT to change the port.",
        title="Serving",
    ),
    make_hit(2, "Chunks overlap by 32 tokens. The chunk size defaults to the model's limit.", title="Chunking"),
    make_hit(3, "Ragline supports HTML, Markdown and PDF files.\n\n- DOCX files are supported too.", title="Formats"),
]


def test_sentences_split_on_ends_and_list_items():
    text = "First one is here. Second one is here!\n- a list item here\n\nNew paragraph starts now"
    assert split_sentences(text) == [
        "First one is here.",
        "Second one is here!",
        "a list item here",
        "New paragraph starts now",
    ]


def test_it_picks_the_matching_sentences_and_cites_them():
    answer = ExtractiveAnswerer(max_sentences=2).answer("Which port does the server listen on?", HITS)
    assert answer.text.startswith("The server listens on port 8000 by default. [1]")
    assert "chunk" not in answer.text.lower()
    assert answer.grounded and answer.model == "extractive"
    assert [c.n for c in answer.citations] == [1]
    assert answer.citations[0].url == "https://docs.example.org/page1.html#section-1"
    assert check_citations(answer.text, HITS) == (answer.citations, True)


def test_sentences_from_several_hits_keep_their_own_numbers():
    answer = ExtractiveAnswerer(max_sentences=3).answer("What chunk size and which file formats?", HITS)
    assert "The chunk size defaults to the model's limit. [2]" in answer.text
    assert "Ragline supports HTML, Markdown and PDF files. [3]" in answer.text
    assert {c.n for c in answer.citations} == {2, 3}


def test_no_matching_sentence_means_no_answer():
    answer = ExtractiveAnswerer().answer("Who won the football world cup?", HITS)
    assert (answer.text, answer.grounded, answer.citations) == (NO_ANSWER, False, [])


def test_an_embedding_function_can_score_instead():
    vectorizer = HashingVectorizer(n_features=2**12, analyzer="char_wb", ngram_range=(3, 4))
    embed = lambda texts: vectorizer.transform(texts).toarray()  # noqa: E731
    answer = ExtractiveAnswerer(max_sentences=1, min_score=0.1, embed=embed).answer(
        "Which file formats are supported?", HITS
    )
    assert answer.text in {"DOCX files are supported too. [3]", "Ragline supports HTML, Markdown and PDF files. [3]"}
