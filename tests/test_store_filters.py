"""Filters and k at the edges: `check_filters`, the CLI's `--filter` parsing, and the retriever's k.

The tests that take the `store` fixture are store-neutral: the modules of the other stores collect them again
against their own `store` fixture.
"""

from __future__ import annotations

import pytest
import typer
from store_contract import EVERYTHING, chunks_for, put, record

from ragline.cli import run
from ragline.cli.common import parse_filters
from ragline.config import RetrieveSettings
from ragline.retrieve.retriever import Retriever
from ragline.store.base import MAX_IN_VALUES, FilterError, check_filters
from ragline.store.local import LocalStore



@pytest.fixture
def store(tmp_path):
    store = LocalStore(tmp_path / "index")
    yield store
    store.close()


FIELDS = {"format": "str", "page": "int", "score": "float", "draft": "bool", "heading_path": "list[str]"}


def test_check_filters_gives_each_field_its_wanted_values():
    filters = {"format": "pdf", "page": {"$in": [1, 2]}, "score": 1, "draft": False, "heading_path": "Intro"}
    assert check_filters(filters, FIELDS) == {
        "format": ["pdf"], "page": [1, 2], "score": [1], "draft": [False], "heading_path": ["Intro"],
    }
    assert check_filters(None, FIELDS) == {} and check_filters({}, {}) == {}


@pytest.mark.parametrize(
    "filters, problem",
    [
        ({"source": "a"}, "unknown filter field 'source'"),
        ({"format": ["a"]}, r"a list is not a value; use \{'\$in'"),
        ({"format": {"$in": [{"a": 1}]}}, "wants str values, got {'a': 1}"),
        ({"format": {"$in": [["a"]]}}, "wants str values"),
        ({"page": {"$in": list(range(MAX_IN_VALUES + 1))}}, f"at most {MAX_IN_VALUES} values, not {MAX_IN_VALUES + 1}"),
        ({"page": 1.5}, "wants int values"),
        ({"format": {"$in": ["a"], "$nin": ["b"]}}, "give a plain value or"),
        (["format"], "filters must be an object"),
    ],
)
def test_check_filters_names_the_problem_and_the_known_fields(filters, problem):
    with pytest.raises(FilterError, match=problem) as raised:
        check_filters(filters, FIELDS)
    assert "known fields: draft (bool), format (str), heading_path (list[str]), page (int), score (float)" in str(
        raised.value
    )


def test_an_empty_index_says_it_has_no_fields_yet():
    with pytest.raises(FilterError, match="no filterable fields yet"):
        check_filters({"format": "pdf"}, {})


def test_cli_filters_are_parsed_to_the_fields_types():
    parsed = parse_filters(
        ["page=3", "draft=True", "score=0.5", "format=pdf", "format=html", "heading_path=Intro"], FIELDS
    )
    assert parsed == {
        "page": 3, "draft": True, "score": 0.5, "format": {"$in": ["pdf", "html"]}, "heading_path": "Intro",
    }
    assert check_filters(parsed, FIELDS)
    assert parse_filters(None, FIELDS) is None


@pytest.mark.parametrize(
    "item, problem",
    [("pagee=3", "unknown filter field 'pagee'"), ("page=three", "wants an int"), ("draft=yes", "true or false"),
     ("page", "not field=value")],
)
def test_cli_filters_that_do_not_fit_are_bad_parameters(item, problem):
    with pytest.raises(typer.BadParameter, match=problem):
        parse_filters([item], FIELDS)


def test_cli_filter_on_an_int_field_matches(store):
    put(store, "a", [0], page=3)
    put(store, "b", [1], page=4)
    assert store.count(parse_filters(["page=3"], store.filter_fields())) == 1


def test_cli_search_with_an_unknown_field_fails_naming_the_known_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    store = LocalStore(tmp_path / "index")
    put(store, "a", [0], page=3)
    store.close()
    assert run(["search", "anything", "--filter", "pagee=3"]) == 2
    error = capsys.readouterr().err
    assert "unknown filter field 'pagee'" in error and "page (int)" in error


def test_the_retriever_refuses_k_below_one(store, embedder):
    chunks = chunks_for("a", 1)
    store.upsert_document(record("a"), chunks, embedder.embed_documents([c.text for c in chunks]))
    retriever = Retriever(embedder, store, RetrieveSettings(top_k=5))
    for k in (0, -2):
        with pytest.raises(ValueError, match="k must be at least 1"):
            retriever.search("cache", k, scope=EVERYTHING)
    assert len(retriever.search("cache", scope=EVERYTHING).hits) == 1

