"""Query transformations through a real OpenAI-compatible client and a scripted server on loopback."""

from __future__ import annotations

import logging

import pytest
from scripted_llm_server import Reply, ScriptedLLMServer, completion

from ragline.generate.openai_compat import OpenAICompatLLM
from ragline.retrieve.transform import (
    HISTORY_CHARS,
    HISTORY_MESSAGES,
    hyde,
    multi_query,
    parse_queries,
    rewrite_with_history,
)

HISTORY = [
    {"role": "user", "content": "What is a Flax checkpoint?"},
    {"role": "assistant", "content": "A checkpoint stores the train state (parameters, optimizer state) with Orbax."},
]
FAILURES = [
    Reply(500, {"error": {"message": "model crashed"}}),
    Reply(200, completion("")),
]


@pytest.fixture(scope="module")
def server():
    with ScriptedLLMServer() as running:
        yield running


@pytest.fixture
def model(server):
    return OpenAICompatLLM("rewriter", base_url=server.url, max_tries=1, read_timeout_s=5.0)


def test_a_follow_up_becomes_a_standalone_question(server, model):
    server.script(Reply(200, completion("Standalone question: How do I save a Flax checkpoint?\n")))
    assert rewrite_with_history(model, "and how do I save it?", HISTORY) == "How do I save a Flax checkpoint?"
    (request,) = server.received
    assert request.body["temperature"] == 0.0
    assert request.body["max_tokens"] <= 128
    prompt = request.body["messages"][-1]["content"]
    assert "user: What is a Flax checkpoint?" in prompt
    assert "assistant: A checkpoint stores the train state" in prompt
    assert "Follow-up question: and how do I save it?" in prompt


def test_without_history_the_query_is_kept_and_no_model_is_asked(server, model):
    server.script()
    system_only = [{"role": "system", "content": "You are helpful."}]
    for history in (None, [], system_only):
        assert rewrite_with_history(model, "how do I save it?", history) == "how do I save it?"
    assert server.received == []


def test_only_recent_history_is_sent_and_long_messages_are_cut(server, model):
    server.script(Reply(200, completion("How do I save a Flax checkpoint?")))
    old = [{"role": "user", "content": f"old question {n}"} for n in range(10)]
    long_answer = {"role": "assistant", "content": "checkpoint " * 500}
    rewrite_with_history(model, "and save it?", [*old, long_answer])
    prompt = server.received[0].body["messages"][-1]["content"]
    assert "old question 9" in prompt and f"old question {10 - HISTORY_MESSAGES + 1}" in prompt
    assert f"old question {10 - HISTORY_MESSAGES}" not in prompt
    (answer,) = [line for line in prompt.splitlines() if line.startswith("assistant: ")]
    assert len(answer) == len("assistant: ") + HISTORY_CHARS


@pytest.mark.parametrize("failure", FAILURES, ids=["server-error", "empty-reply"])
def test_a_failed_rewrite_searches_the_question_as_asked(server, model, failure, caplog):
    server.script(failure)
    with caplog.at_level(logging.WARNING, logger="ragline.retrieve.transform"):
        assert rewrite_with_history(model, "and how do I save it?", HISTORY) == "and how do I save it?"
    assert "query rewrite failed" in caplog.text


def test_each_fallback_is_noted_for_the_caller(server, model):
    server.script(*[Reply(500, {"error": {"message": "model crashed"}})] * 3)
    notes: list[str] = []
    assert rewrite_with_history(model, "and save it?", HISTORY, notes) == "and save it?"
    assert hyde(model, "and save it?", notes) == "and save it?"
    assert multi_query(model, "and save it?", 2, notes) == []
    assert [note.split(",")[0] for note in notes] == [
        "query rewrite failed",
        "HyDE failed",
        "multi-query expansion failed",
    ]
    assert all("model crashed" in note for note in notes)


def test_hyde_returns_a_hypothetical_passage(server, model):
    passage = "Use orbax.checkpoint.PyTreeCheckpointer().save(path, state) to write the train state."
    server.script(Reply(200, completion(f"  {passage}\n")))
    assert hyde(model, "how do I save my model?") == passage
    request = server.received[0].body
    assert request["temperature"] == 0.0 and request["max_tokens"] <= 256
    assert request["messages"][-1]["content"] == "how do I save my model?"


@pytest.mark.parametrize("failure", FAILURES, ids=["server-error", "empty-reply"])
def test_a_failed_hyde_embeds_the_question(server, model, failure, caplog):
    server.script(failure)
    with caplog.at_level(logging.WARNING, logger="ragline.retrieve.transform"):
        assert hyde(model, "how do I save my model?") == "how do I save my model?"
    assert "HyDE failed" in caplog.text


def test_multi_query_parses_a_numbered_list_and_drops_repeats(server, model):
    reply = (
        "Here are three search queries:\n"
        "1. Save a checkpoint with Orbax\n"
        "2) how do I save my model?\n"
        '3. "save a checkpoint with orbax"\n'
        "4. Serialize the train state to disk\n"
        "5. Restore parameters from a checkpoint\n"
    )
    server.script(Reply(200, completion(reply)))
    queries = multi_query(model, "how do I save my model?", 3)
    assert queries == [
        "Save a checkpoint with Orbax",
        "Serialize the train state to disk",
        "Restore parameters from a checkpoint",
    ]
    request = server.received[0].body
    assert request["temperature"] == 0.0 and request["max_tokens"] <= 400
    assert "3 different search queries" in request["messages"][0]["content"]


def test_multi_query_reads_json_too():
    assert parse_queries('```json\n["save a checkpoint", "write state to disk"]\n```') == [
        "save a checkpoint",
        "write state to disk",
    ]
    assert parse_queries('{"queries": ["a", "b"]}') == ["a", "b"]
    assert parse_queries("- save a checkpoint\n* write state\n") == ["save a checkpoint", "write state"]
    assert parse_queries("1. pad a list to [1, 2]\n2. other") == ["pad a list to [1, 2]", "other"]


@pytest.mark.parametrize("failure", FAILURES, ids=["server-error", "empty-reply"])
def test_a_failed_expansion_gives_no_extra_queries(server, model, failure, caplog):
    server.script(failure)
    with caplog.at_level(logging.WARNING, logger="ragline.retrieve.transform"):
        assert multi_query(model, "how do I save my model?", 3) == []
    assert "multi-query expansion failed" in caplog.text


def test_no_expansion_asked_no_call(server, model):
    server.script()
    assert multi_query(model, "q", 0) == []
    assert server.received == []
