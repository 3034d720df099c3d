"""The answerer end to end against a real scripted OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from scripted_llm_server import Reply, ScriptedLLMServer, Stream, completion, free_port, make_hit

from ragline.generate.answerer import Answerer
from ragline.generate.context import ContextSelector
from ragline.generate.openai_compat import OpenAICompatLLM
from ragline.generate.prompt import NO_ANSWER
from ragline.generate.router import Router
from ragline.generate.verify import LexicalScorer, Verifier
from ragline.config import GenerateSettings, LLMSettings
from ragline.types import Answer, AnswerEvent, ClaimEvent, TokenEvent

QUESTION = "Which port does the server listen on?"
HITS = [
    make_hit(1, "The server listens on port 8000 by default.", title="Serving"),
    make_hit(2, "Set RAGLINE_SERVE__PORT to change the port.", title="Configuration"),
    make_hit(3, "Chunks overlap by 32 tokens.", title="Chunking"),
]


@pytest.fixture(scope="module")
def server():
    with ScriptedLLMServer() as running:
        yield running


def llm(url: str, name: str = "strong-model", **overrides) -> OpenAICompatLLM:
    options = {"backoff_initial_s": 0.05, "read_timeout_s": 2.0, "max_tries": 2} | overrides
    return OpenAICompatLLM(name, base_url=url, **options)


def test_streamed_answer_yields_pieces_then_a_grounded_answer(server):
    pieces = ["The server", " listens on port 8000 [1];", " change it with RAGLINE_SERVE__PORT [2]."]
    server.script(Stream(pieces, usage={"prompt_tokens": 120, "completion_tokens": 20}))
    events = list(Answerer(llm(server.url)).stream(QUESTION, HITS))

    assert events[:-1] == [TokenEvent(piece) for piece in pieces]
    assert isinstance(events[-1], AnswerEvent)
    answer = events[-1].answer
    assert answer.text == "".join(pieces)
    assert answer.grounded and [c.n for c in answer.citations] == [1, 2]
    assert answer.citations[0].url == "https://docs.example.org/page1.html#section-1"
    assert answer.model == "strong-model" and answer.hits == HITS and answer.note == ""
    assert answer.usage == {"prompt_tokens": 120, "completion_tokens": 20, "total_tokens": 140, "cached_tokens": 0}
    assert 0 < answer.timings["ttft_ms"] <= answer.timings["generate_ms"]

    user = server.received[0].body["messages"][-1]["content"]
    assert "[1] Serving\nThe server listens" in user
    assert f"Question: {QUESTION}\n\n" in user and user.endswith(NO_ANSWER)  # the rules come last


def test_an_answer_citing_a_passage_it_was_not_shown_is_not_grounded(server):
    server.script(Stream(["Port 8000 [9]."]))
    answer = Answerer(llm(server.url)).answer(QUESTION, HITS)
    assert answer.text == "Port 8000 [9]." and not answer.grounded and answer.citations == []


def test_only_the_passages_that_fit_are_sent_and_returned(server):
    server.script(Stream(["Port 8000 [1]."]))
    small = llm(server.url, context_window=1200)
    long_hits = [make_hit(n, f"Passage {n} says a lot about ports. " * 25) for n in (1, 2, 3)]
    answer = Answerer(small).answer(QUESTION, long_hits)
    user = server.received[0].body["messages"][-1]["content"]
    assert "[1] Page 1" in user and "[2] Page 2" not in user
    assert answer.hits == long_hits[:1]
    assert server.received[0].body["max_tokens"] <= 1200 - small.count_tokens(user)


def test_falls_back_to_extraction_when_the_server_is_down():
    down = llm(f"http://127.0.0.1:{free_port()}/v1", max_tries=3)
    events = list(Answerer(down).stream(QUESTION, HITS))

    (final,) = events
    answer = final.answer
    assert answer.model == "extractive"
    assert answer.text.startswith("The server listens on port 8000 by default. [1]")
    assert answer.grounded
    assert answer.note.startswith("the LLM strong-model failed, so this answer was extracted from the documents:")
    assert "failed after 3 tries: cannot connect" in answer.note


def test_a_stream_breaking_midway_ends_in_the_extractive_answer(server):
    server.script(Stream(["The server", " listens", " on"], break_after=2))
    events = list(Answerer(llm(server.url)).stream(QUESTION, HITS))
    assert events[:2] == [TokenEvent("The server"), TokenEvent(" listens")]
    assert events[-1].answer.model == "extractive" and "broke after 2 pieces" in events[-1].answer.note
    assert len(server.received) == 1


def test_a_rejected_request_falls_back_without_retrying(server):
    server.script(Reply(400, {"error": {"message": "context length exceeded"}}))
    answer = Answerer(llm(server.url)).answer(QUESTION, HITS)
    assert answer.model == "extractive" and "context length exceeded" in answer.note
    assert len(server.received) == 1


def test_without_hits_the_model_is_not_asked(server):
    server.script()
    answer = Answerer(llm(server.url)).answer(QUESTION, [])
    assert (answer.text, answer.grounded, answer.note) == (NO_ANSWER, False, "no passages were retrieved")
    assert server.received == []


def test_without_a_model_the_answer_is_extracted():
    answer = Answerer(None).answer(QUESTION, HITS)
    assert answer.model == "extractive" and answer.grounded and answer.note == ""
    assert "generate_ms" in answer.timings


def test_async_answers_match_sync_ones(server):
    async def scenario():
        server.script(Stream(["Port", " 8000 [1]."]))
        events = [event async for event in Answerer(llm(server.url)).astream(QUESTION, HITS)]
        assert events[:2] == [TokenEvent("Port"), TokenEvent(" 8000 [1].")] and events[-1].answer.grounded

        server.script(Reply(200, completion("unused")))
        down = llm(f"http://127.0.0.1:{free_port()}/v1")
        answer = await Answerer(down).aanswer(QUESTION, HITS)
        assert answer.model == "extractive" and "cannot connect" in answer.note

    asyncio.run(scenario())


def test_the_router_sends_lookups_to_the_cheap_model(server):
    answerer = Answerer(
        llm(server.url, "strong-model"), cheap_llm=llm(server.url, "cheap-model"), router=Router.train()
    )
    server.script(Stream(["Port 8000 [1]."]), Stream(["Because [1][2]."]))
    cheap = answerer.answer("What is the default port?", HITS)
    strong = answerer.answer("Explain step by step how to run two servers on different ports and compare them.", HITS)
    assert (cheap.model, strong.model) == ("cheap-model", "strong-model")
    assert [r.body["model"] for r in server.received] == ["cheap-model", "strong-model"]


def test_router_and_cheap_model_go_together(server):
    with pytest.raises(ValueError, match="give both or neither"):
        Answerer(llm(server.url), cheap_llm=llm(server.url))
    with pytest.raises(ValueError, match="router.enabled needs cheap_llm"):
        GenerateSettings(router={"enabled": True})


def test_settings_without_a_model_build_an_extractive_answerer_whose_claims_are_checked(tmp_path: Path, embedder):
    settings = GenerateSettings(llm=LLMSettings(backend="extractive"), max_answer_tokens=200)
    answerer = Answerer.from_settings(settings, tmp_path, embedder)
    assert answerer.llm is None and answerer.max_answer_tokens == 200
    answer = answerer.answer(QUESTION, HITS)
    assert answer.model == "extractive" and answer.claims and answer.supported_share == 1.0 and answer.grounded


def checking(url: str) -> Answerer:
    return Answerer(llm(url), verifier=Verifier(LexicalScorer(), threshold=0.53), abstain=True)


def test_a_wrong_citation_is_replaced_by_the_passage_that_supports_the_claim(server):
    server.script(Stream(["The server listens on port 8000 by default [3]. ", "Set RAGLINE_SERVE__PORT to change it."]))
    answer = checking(server.url).answer(QUESTION, HITS)
    assert answer.text == "The server listens on port 8000 by default [1]. Set RAGLINE_SERVE__PORT to change it [2]."
    assert [c.n for c in answer.citations] == [1, 2] and answer.grounded and answer.supported_share == 1.0
    first, second = answer.claims
    assert answer.text[first.start : first.end] == first.text
    (span,) = first.citations
    assert HITS[0].chunk.text[span.start : span.end] == span.text == "The server listens on port 8000 by default."
    assert answer.to_dict()["claims"][1]["citations"][0]["n"] == 2


def test_a_draft_no_passage_supports_is_withheld(server):
    server.script(Stream(["Lyon has about half a million inhabitants [1]."]))
    answer = checking(server.url).answer(QUESTION, HITS)
    assert answer.abstained and answer.text == NO_ANSWER and answer.citations == [] and not answer.grounded
    assert "withheld" in answer.note and answer.hits == HITS  # the closest passages stay listed


def test_a_failing_cheap_model_hands_the_question_to_the_strong_one(server):
    down = f"http://127.0.0.1:{free_port()}/v1"
    answerer = Answerer(llm(server.url, "strong-model"), cheap_llm=llm(down, "cheap-model"), router=Router.train())
    server.script(Stream(["Port 8000 [1]."]))
    answer = answerer.answer("What is the default port?", HITS)
    assert answer.model == "strong-model" and answer.text == "Port 8000 [1]." and answer.grounded
    assert answer.note.startswith("the cheap model cheap-model failed, so the strong model strong-model answered:")
    assert [r.body["model"] for r in server.received] == ["strong-model"]


def test_when_both_models_fail_the_answer_is_extracted_with_both_reasons(server):
    down = f"http://127.0.0.1:{free_port()}/v1"

    async def scenario() -> Answer:
        answerer = Answerer(llm(down, "strong-model"), cheap_llm=llm(down, "cheap-model"), router=Router.train())
        return await answerer.aanswer("What is the default port?", HITS)

    answer = asyncio.run(scenario())
    assert answer.model == "extractive" and answer.text.startswith("The server listens on port 8000")
    assert "the cheap model cheap-model failed" in answer.note
    assert "the LLM strong-model failed, so this answer was extracted" in answer.note


def test_a_cheap_model_that_cannot_be_built_leaves_the_strong_one_answering(server, tmp_path: Path):
    settings = GenerateSettings(
        llm=LLMSettings(backend="openai", model="strong-model", base_url=server.url),
        cheap_llm=LLMSettings(backend="llama-cpp", model="no-such-model"),
        router={"enabled": True, "model_path": tmp_path / "router.joblib"},
        verify={"method": "lexical"},
    )
    answerer = Answerer.from_settings(settings, tmp_path)
    server.script(Stream(["The server listens on port 8000 [1]."]))
    answer = answerer.answer("What is the default port?", HITS)
    assert answer.model == "strong-model" and answer.grounded
    assert "the cheap model could not be loaded" in answer.note and "no-such-model" in answer.note


def test_claims_are_checked_while_the_answer_streams_sync_and_async(server):
    pieces = ["The server listens on port 8000 by default [3]. ", "Set RAGLINE_SERVE__PORT ", "to change it [2]."]
    server.script(Stream(pieces), Stream(pieces))
    events = list(checking(server.url).stream(QUESTION, HITS))

    async def scenario() -> list:
        return [event async for event in checking(server.url).astream(QUESTION, HITS)]

    assert [type(e).__name__ for e in events] == ["TokenEvent", "TokenEvent", "ClaimEvent", "TokenEvent", "ClaimEvent", "AnswerEvent"]
    async_events = asyncio.run(scenario())
    answer = events[-1].answer
    assert async_events[:-1] == events[:-1] and async_events[-1].answer.claims == answer.claims
    claims = [event for event in events if isinstance(event, ClaimEvent)]
    assert [(c.index, c.claim) for c in claims] == list(enumerate(answer.claims))
    assert claims[0].claim.text == "The server listens on port 8000 by default [1]."  # rewritten before the end


def test_no_relevant_passage_means_no_draft_and_no_model_call(server):
    server.script()
    selector = ContextSelector(LexicalScorer(), None)
    answerer = Answerer(llm(server.url), selector=selector, min_relevance=0.3, abstain=True)
    answer = answerer.answer("What is the population of Lyon?", HITS)
    assert answer.abstained and answer.text == NO_ANSWER and answer.hits == HITS
    assert "below generate.verify.min_relevance 0.3" in answer.note and server.received == []
    server.script(Stream(["Port 8000 [1]."]))
    assert not answerer.answer(QUESTION, HITS).abstained and len(server.received) == 1


def test_with_a_context_budget_the_model_reads_the_relevant_sentences(server):
    long_hits = [
        make_hit(1, "Ragline is a RAG platform. The server listens on port 8000 by default. It logs to stderr."),
        make_hit(2, "Chunks overlap by 32 tokens. Set RAGLINE_SERVE__PORT to change the port the server listens on."),
    ]
    server.script(Stream(["Port 8000 [1]."]))
    answerer = Answerer(llm(server.url), selector=ContextSelector(LexicalScorer(), 32))
    answer = answerer.answer(QUESTION, long_hits)
    user = server.received[0].body["messages"][-1]["content"]
    assert "… The server listens on port 8000 by default. …" in user and "Set RAGLINE_SERVE__PORT" in user
    assert "It logs to stderr" not in user and "Chunks overlap" not in user
    assert answer.hits == long_hits and answer.citations[0].n == 1
