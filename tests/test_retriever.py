"""The query flow: modes, fusion, de-duplication, diversity, neighbour expansion and per-request options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_index
from fastapi.testclient import TestClient
from scripted_llm_server import free_port, wait_until_ready

from ragline.app import Ragline
from ragline.cli import run
from ragline.config import ConfigError, RetrieveSettings, Settings, SourceSettings, retrieve_options
from ragline.retrieve.assemble import dedupe, diversify, expand, join_overlapping
from ragline.serve.api import create_app
from ragline.store.base import Scope
from ragline.types import Chunk, Hit

EVERYTHING = Scope.everything()
PAGES = {
    "json.md": (
        "# json\n\n## Decoding\n\nUse json.load to read a JSON document from a file object into a Python dict; "
        "json.loads does the same for a str.\n\n## Encoding\n\nUse json.dump to write an object as JSON to a file.\n\n"
        "## Command line\n\nThe json.tool module validates and pretty-prints JSON on the command line.\n"
    ),
    "csv.md": "# csv\n\n## Reading\n\nThe csv.reader object iterates over rows of a comma separated file.\n",
    "pickle.md": "# pickle\n\n## Loading\n\nUse pickle.load to read a pickled object back from a binary file.\n",
    "tutorial.md": (
        "# Tutorial\n\n## Files\n\nOpen a file with open() and read it with read(); files hold text or bytes.\n\n"
        "## Saving structured data\n\nThe json module turns nested lists and dicts into strings and back.\n"
    ),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory, embedder) -> Ragline:
    data_dir = build_index(tmp_path_factory.mktemp("retriever"), PAGES, embedder, "https://docs.test/{path}.html")
    components = Ragline(Settings(data_dir=data_dir, generate={"llm": {"backend": "extractive"}}))
    components.__dict__["embedder"] = embedder
    yield components
    components.close()


def urls(retrieval) -> list[str]:
    return [hit.chunk.citation_url for hit in retrieval.hits]


def test_the_readme_question_finds_json_load_first_in_hybrid_mode(app):
    retrieval = app.retriever.search("How do I read a JSON file into a Python dict?", k=3, scope=EVERYTHING)
    assert urls(retrieval)[0] == "https://docs.test/json.html#decoding"


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_every_mode_answers_and_is_chosen_per_request(app, mode):
    options = retrieve_options(app.settings.retrieve, {"mode": mode})
    retrieval = app.retriever.search("pickle.load", k=2, options=options, scope=EVERYTHING)
    assert urls(retrieval)[0] == "https://docs.test/pickle.html#loading"
    assert ("embed_ms" in retrieval.timings) == (mode != "keyword")


def test_the_page_cap_spreads_results_over_pages(app):
    capped = retrieve_options(app.settings.retrieve, {"max_per_page": 1, "max_per_section": None})
    capped_hits = app.retriever.search("json module file", k=4, options=capped, scope=EVERYTHING)
    pages = [url.split("#")[0] for url in urls(capped_hits)]
    assert len(pages) == len(set(pages)) == 4
    uncapped = retrieve_options(app.settings.retrieve, {"max_per_page": None, "max_per_section": None})
    uncapped_hits = app.retriever.search("json module file", k=4, options=uncapped, scope=EVERYTHING)
    pages = [url.split("#")[0] for url in urls(uncapped_hits)]
    assert len(set(pages)) < 4


def test_neighbour_expansion_joins_the_sections_chunks(tmp_path, embedder):
    sentences = " ".join(f"Sentence {i} talks about widget number {i}." for i in range(400))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "long.md").write_text(f"# Long\n\n## Widgets\n\n{sentences}\n")
    components = Ragline(Settings(data_dir=tmp_path / "index", chunker={"chunk_tokens": 64, "overlap_tokens": 8}))
    components.__dict__["embedder"] = embedder
    components.indexer().run([SourceSettings(path=tmp_path / "docs")])
    plain = components.retriever.search("widget number 200", k=1, scope=EVERYTHING).hits[0]
    options = retrieve_options(components.settings.retrieve, {"expand_neighbours": 1})
    wide = components.retriever.search("widget number 200", k=1, options=options, scope=EVERYTHING).hits[0]
    components.close()
    assert plain.chunk.text in wide.chunk.text and len(wide.chunk.text) > 2 * len(plain.chunk.text)
    assert len(wide.chunk.metadata["expanded_from"]) == 3
    numbers = [int(word) for word in wide.chunk.text.replace(".", " ").split() if word.isdigit()]
    assert numbers == sorted(numbers), "neighbours are joined in reading order, overlap removed"


def hit(chunk_id: str, text: str, score: float, page: str = "p", anchor: str = "a", vector=None) -> Hit:
    return Hit(Chunk(chunk_id, page, text, {"url": f"https://x/{page}", "anchor": anchor}), score, vector)


def test_near_duplicates_of_a_higher_hit_are_dropped():
    hits = [
        hit("1", "the quick brown fox jumps over the lazy dog", 0.9),
        hit("2", "The quick brown fox jumps over the lazy dog!", 0.8, page="q"),
        hit("3", "a different passage entirely", 0.7),
    ]
    assert [h.chunk.chunk_id for h in dedupe(hits)] == ["1", "3"]


def test_caps_hold_back_hits_and_backfill_when_short():
    hits = [hit(str(i), f"text {i}", 1 - i / 10, page="same", anchor=str(i % 2)) for i in range(4)]
    assert [h.chunk.chunk_id for h in diversify(hits, 2, max_per_section=1)] == ["0", "1"]
    assert [h.chunk.chunk_id for h in diversify(hits, 3, max_per_page=1)] == ["0", "1", "2"]  # backfilled in rank order


def test_mmr_prefers_a_different_passage_over_a_near_copy():
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    hits = [hit("1", "x", 0.9, vector=a), hit("2", "y", 0.89, page="q", vector=a), hit("3", "z", 0.5, page="r", vector=b)]
    assert [h.chunk.chunk_id for h in diversify(hits, 2, mmr_lambda=0.5)] == ["1", "3"]
    assert [h.chunk.chunk_id for h in diversify(hits, 2, mmr_lambda=1.0)] == ["1", "2"]


def test_join_overlapping_removes_the_repeated_text():
    assert join_overlapping("one two three", "two three four") == "one two three four"
    assert join_overlapping("alpha", "beta") == "alpha\nbeta"


def test_expansion_stays_inside_the_section():
    chunks = [Chunk(f"c{i}", "d", f"t{i}", {"anchor": "s1" if i < 2 else "s2"}) for i in range(4)]
    hits = [Hit(chunks[1], 1.0)]
    [wide] = expand(hits, 2, lambda doc_id: chunks)
    assert wide.chunk.metadata["expanded_from"] == ["c0", "c1"]


def test_bad_options_are_refused_with_the_option_named():
    base = RetrieveSettings()
    for bad, named in (({"mode": "fuzzy"}, "mode"), ({"fusion.method": "max"}, "fusion.method"),
                       ({"nonsense": 1}, "nonsense"), ({"rerank.backend": "cross-encoder"}, "rerank")):
        with pytest.raises(ConfigError, match=named):
            retrieve_options(base, bad)
    assert retrieve_options(base, {"fusion": {"keyword_weight": 2}}).fusion.keyword_weight == 2


def test_the_api_takes_options_per_request_and_refuses_bad_ones(app):
    served = Ragline(app.settings)  # the API closes its components when it stops
    served.__dict__["embedder"] = app.embedder
    with TestClient(create_app(app.settings, served)) as client:
        wait_until_ready(client.get)
        good = client.post("/v1/search", json={"query": "pickle.load", "k": 1, "options": {"mode": "keyword"}})
        bad = client.post("/v1/search", json={"query": "pickle.load", "options": {"mode": "fuzzy"}})
    assert good.status_code == 200 and good.json()["hits"][0]["url"].endswith("pickle.html#loading")
    assert "embed_ms" not in good.json()["timings"]
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_options" and "mode" in bad.json()["message"]


def test_the_cli_takes_mode_and_retrieve_options(app, capsys, monkeypatch):
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(app.settings.data_dir))
    assert run(["search", "pickle.load", "--mode", "keyword", "--retrieve", "max_per_page=1", "--json", "-k", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["url"].endswith("pickle.html#loading") and "embed_ms" not in result["timings"]
    assert run(["search", "x", "--retrieve", "mmr_lambda=7"]) == 2
    assert "mmr_lambda" in capsys.readouterr().err



def test_a_reranker_that_is_down_leaves_the_first_ranking_with_a_note(app):
    down = {"backend": "http", "base_url": f"http://127.0.0.1:{free_port()}", "timeout_s": 2}
    dead = retrieve_options(app.settings.retrieve, {"rerank": down})
    plain = app.retriever.search("pickle.load", k=2, scope=EVERYTHING)
    degraded = app.retriever.search("pickle.load", k=2, options=dead, scope=EVERYTHING)
    assert urls(degraded) == urls(plain)
    assert degraded.notes and "reranking skipped" in degraded.notes[0]


def test_an_embedding_service_that_is_down_degrades_to_keyword_search_with_a_note(app):
    from ragline.config import EmbedderSettings
    from ragline.embed.openai_compat import OpenAIEmbedder
    from ragline.retrieve.retriever import Retriever

    down_settings = EmbedderSettings(
        backend="openai", model=app.embedder.name, base_url=f"http://127.0.0.1:{free_port()}/v1", dimensions=384,
    )
    down = OpenAIEmbedder(down_settings)
    retriever = Retriever(down, app.store, app.settings.retrieve)
    retrieval = retriever.search("pickle.load", k=2, scope=EVERYTHING)
    assert urls(retrieval)[0] == "https://docs.test/pickle.html#loading"
    assert "embed_ms" not in retrieval.timings
    assert any("keyword search" in note for note in retrieval.notes)
    # the whole answer flow: keyword passages, whole passages for the model, an unchecked answer that says so
    settings = app.settings.model_copy(update={"embedder": down_settings})
    degraded = Ragline(settings)
    degraded.__dict__["embedder"] = down
    answer = degraded.answer("How do I load a pickled object?", k=2, scope=EVERYTHING)
    assert "pickle.load" in answer.text and answer.citations
    assert "keyword search" in answer.note and "claims not checked" in answer.note
    degraded.close()
