"""Questions answered end to end: index → retrieve → answer, through the CLI, the API and the LLM server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import build_index
from fastapi.testclient import TestClient
from scripted_llm_server import Reply, ScriptedLLMServer, Stream, free_port, serve_in_thread, wait_until_ready

from ragline.app import Ragline
from ragline.generate.prompt import NO_ANSWER
from ragline.cli import run
from ragline.config import LLMSettings, Settings
from ragline.generate.openai_compat import OpenAICompatLLM
from ragline.serve.api import create_app
from ragline.serve.llm_server import create_llm_app
from ragline.store.base import Scope

EVERYTHING = Scope.everything()
QUESTION = "Which port does the Docker image listen on?"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, embedder) -> Path:
    deploy = (
        "# Deploying\n\n## Docker\n\nThe Docker image listens on port 8000 by default. "
        "Set RAGLINE_SERVE__PORT to change it.\n\n## Kubernetes\n\nUse the KubeRay operator on Kubernetes.\n"
    )
    return build_index(tmp_path_factory.mktemp("query"), {"deploy.md": deploy}, embedder, "https://ragline.dev/{path}")


@pytest.fixture(scope="module")
def llm_server():
    with ScriptedLLMServer() as server:
        yield server


def components(index_dir: Path, embedder, **generate) -> Ragline:
    app = Ragline(Settings(data_dir=index_dir, generate=generate))
    app.__dict__["embedder"] = embedder
    return app


def openai_llm(server: ScriptedLLMServer, model: str = "served-model", **overrides) -> dict:
    return {"backend": "openai", "model": model, "base_url": server.url, "backoff_initial_s": 0.01, **overrides}


def test_ask_streams_status_tokens_then_a_cited_answer(index_dir, embedder, llm_server):
    llm_server.script(Stream(["The image listens ", "on port 8000 [1]."]))
    app = components(index_dir, embedder, llm=openai_llm(llm_server))
    events = [event.to_dict() for event in app.ask(QUESTION, k=2, scope=EVERYTHING)]
    assert [e["stage"] for e in events if e["type"] == "status"] == ["retrieve", "generate"]
    assert [e["text"] for e in events if e["type"] == "token"] == ["The image listens ", "on port 8000 [1]."]
    answer = events[-1]
    assert answer["type"] == "answer" and answer["grounded"] and answer["model"] == "served-model"
    assert answer["citations"] == [
        {"n": 1, "url": "https://ragline.dev/deploy#docker", "title": "Docker", "source": answer["hits"][0]["source"]}
    ]
    assert {"embed_ms", "search_ms", "generate_ms", "ttft_ms"} <= set(answer["timings"])
    prompt = llm_server.received[0].body["messages"][-1]["content"]
    assert "[1] Deploying > Docker\nThe Docker image listens on port 8000" in prompt


def test_each_claim_is_checked_and_sent_as_soon_as_the_next_one_begins(index_dir, embedder, llm_server):
    llm_server.script(Stream([" The image listens on port 8000 [1]. ", "Set RAGLINE_SERVE__PORT ", "to change it [2]. ", "It runs on Mars."]))
    app = components(index_dir, embedder, llm=openai_llm(llm_server))
    events = [event.to_dict() for event in app.ask(QUESTION, k=2, scope=EVERYTHING)]
    kinds = [e["type"] for e in events]
    assert kinds == ["status", "status", "token", "token", "claim", "token", "token", "claim", "claim", "answer"]
    claims, answer = [e for e in events if e["type"] == "claim"], events[-1]
    assert [c["index"] for c in claims] == [0, 1, 2]
    assert [c["supported"] for c in claims] == [True, True, False]
    assert [{key: c[key] for key in c if key not in ("type", "index")} for c in claims] == answer["claims"]
    for claim in claims:  # offsets into the final (rewritten) answer, as sent before it was complete
        assert answer["answer"][claim["start"] : claim["end"]] == claim["text"]
    assert "[2]" not in answer["answer"] and claims[1]["citations"][0]["n"] == 1


def test_a_citation_of_a_passage_it_was_not_given_is_replaced_by_the_one_that_supports_the_claim(
    index_dir, embedder, llm_server
):
    llm_server.script(Stream(["Port 8000 [7]."]))
    app = components(index_dir, embedder, llm=openai_llm(llm_server))
    answer = app.answer(QUESTION, k=2, scope=EVERYTHING).to_dict()
    assert answer["answer"] == "Port 8000 [1]." and [c["n"] for c in answer["citations"]] == [1]
    assert answer["grounded"] and "port 8000" in answer["claims"][0]["citations"][0]["text"]


def test_an_answer_the_passages_do_not_support_is_withheld(index_dir, embedder, llm_server):
    llm_server.script(Stream(["The office cat is called Turing [1]."]))
    app = components(index_dir, embedder, llm=openai_llm(llm_server))
    answer = app.answer(QUESTION, k=2, scope=EVERYTHING).to_dict()
    assert answer["abstained"] and answer["answer"] == NO_ANSWER and not answer["grounded"] and answer["hits"]


def test_a_down_llm_still_gives_cited_passages_and_a_note(index_dir, embedder):
    app = components(index_dir, embedder, llm=openai_llm_at(f"http://127.0.0.1:{free_port()}/v1", max_tries=2))
    answer = app.answer(QUESTION, k=2, scope=EVERYTHING).to_dict()
    assert "failed after 2 tries: cannot connect" in answer["note"] and "port 8000" in answer["answer"]
    assert answer["citations"][0]["url"] == "https://ragline.dev/deploy#docker"


def openai_llm_at(base_url: str, **overrides) -> dict:
    return {"backend": "openai", "model": "m", "base_url": base_url, "backoff_initial_s": 0.01, **overrides}


def test_routing_picks_the_cheap_model_for_lookups(index_dir, embedder, llm_server, tmp_path):
    app = components(
        index_dir, embedder,
        llm=openai_llm(llm_server, "strong-model"), cheap_llm=openai_llm(llm_server, "cheap-model"),
        router={"enabled": True, "model_path": str(tmp_path / "router.joblib")},
    )
    llm_server.script(Stream(["Port 8000 [1]."]), Stream(["Because [1]."]))
    cheap = app.answer("What is the default port?", k=1, scope=EVERYTHING).to_dict()
    strong = app.answer(
        "Compare Docker and Kubernetes deployments and explain step by step which to choose", k=2, scope=EVERYTHING
    ).to_dict()
    assert (cheap["model"], strong["model"]) == ("cheap-model", "strong-model")
    assert [r.body["model"] for r in llm_server.received] == ["cheap-model", "strong-model"]


def test_cli_ask_json_and_streamed(index_dir, llm_server, monkeypatch, capsys):
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(index_dir))
    monkeypatch.setenv("RAGLINE_GENERATE__LLM__BACKEND", "openai")
    monkeypatch.setenv("RAGLINE_GENERATE__LLM__BASE_URL", llm_server.url)
    monkeypatch.setenv("RAGLINE_GENERATE__LLM__MODEL", "served-model")
    llm_server.script(Stream(["Port ", "8000 [1]."]), Stream(["Port ", "8000 [1]."]))
    assert run(["ask", QUESTION, "-k", "2", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert set(body) >= {"answer", "citations", "hits", "model", "usage", "timings", "grounded"}
    assert body["answer"] == "Port 8000 [1]." and body["citations"][0]["url"].endswith("#docker")
    assert run(["ask", QUESTION, "-k", "2"]) == 0
    shown = capsys.readouterr().out
    assert "Port 8000 [1]." in shown and "[1] Docker — https://ragline.dev/deploy#docker" in shown


def test_cli_ask_prints_an_extracted_answer(index_dir, monkeypatch, capsys):
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(index_dir))
    monkeypatch.setenv("RAGLINE_GENERATE__LLM__BACKEND", "extractive")
    assert run(["ask", QUESTION, "-k", "2"]) == 0
    shown = capsys.readouterr().out
    assert "listens on port 8000 by default [1]." in shown and "[1] Docker — https://ragline.dev/deploy#docker" in shown


def test_api_query_and_stream(index_dir, embedder, llm_server):
    # no answer cache: the same question twice must reach the model twice here
    settings = Settings(data_dir=index_dir, generate={"llm": openai_llm(llm_server)}, serve={"cache": {"enabled": False}})
    app = Ragline(settings)
    app.__dict__["embedder"] = embedder
    llm_server.script(Stream(["Port 8000 [1]."]), Stream(["Port ", "8000 [1]."]))
    with TestClient(create_app(settings, app)) as client:
        wait_until_ready(client.get)
        body = client.post("/v1/query", json={"query": QUESTION, "k": 2}).json()
        assert body["answer"] == "Port 8000 [1]." and body["latency_ms"] > 0 and body["grounded"]
        with client.stream("POST", "/v1/query/stream", json={"query": QUESTION, "k": 2}) as response:
            assert response.headers["content-type"].startswith("application/x-ndjson")
            events = [json.loads(line) for line in response.iter_lines() if line]
        assert [e["type"] for e in events] == ["status", "status", "token", "token", "claim", "answer"]
        assert events[-1]["citations"][0]["url"] == "https://ragline.dev/deploy#docker"
        rejected = client.post("/v1/query/stream", json={"query": "x", "filters": {"f": {"$lt": 1}}})
        assert rejected.status_code == 422 and "known fields" in rejected.json()["message"]
        assert [r.body["model"] for r in llm_server.received] == ["served-model"] * 2  # no model call for it


def test_cli_router_train(tmp_path, capsys):
    examples = tmp_path / "labels.jsonl"
    lines = [{"query": f"what is the default {w}?", "label": "cheap"} for w in ("port", "host", "timeout")]
    lines += [{"query": f"compare {w} and explain the trade-offs step by step", "label": "strong"} for w in ("a", "b")]
    examples.write_text("\n".join(json.dumps(line) for line in lines))
    assert run(["router", "train", str(examples), "--model-path", str(tmp_path / "r.joblib")]) == 0
    assert "trained on 5 examples" in capsys.readouterr().out and (tmp_path / "r.joblib").is_file()


def test_llm_server_speaks_the_openai_protocol(llm_server):
    """`ragline llm serve` in front of a model: our own OpenAI client talks to it like to vLLM."""
    backend = OpenAICompatLLM.from_settings(LLMSettings(**openai_llm(llm_server, "upstream")))
    with serve_in_thread(create_llm_app(Settings(), backend)) as url:
        client = OpenAICompatLLM.from_settings(LLMSettings(backend="openai", model="upstream", base_url=f"{url}/v1"))
        llm_server.script(Reply(200, {"choices": [{"message": {"content": "Hello!"}, "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
                          Stream(["Hel", "lo", "!"], usage={"prompt_tokens": 5, "completion_tokens": 3}))
        messages = [{"role": "user", "content": "Say hello"}]
        assert client.generate(messages, max_tokens=5).text == "Hello!"
        stream = client.stream(messages, max_tokens=5)
        assert list(stream) == ["Hel", "lo", "!"] and stream.usage.completion_tokens == 3
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "upstream"


def test_a_model_that_cannot_load_degrades_to_extraction_with_a_note(index_dir, embedder):
    app = components(index_dir, embedder, llm={"backend": "llama-cpp", "model": "no-such-model"})
    answer = app.answer(QUESTION, k=2, scope=EVERYTHING).to_dict()
    assert "no LLM could be loaded" in answer["note"] and "no-such-model" in answer["note"]
    assert "port 8000" in answer["answer"] and answer["citations"]


def test_cli_ask_quotes_the_sentence_that_supports_each_citation(index_dir, monkeypatch, capsys):
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(index_dir))
    monkeypatch.setenv("RAGLINE_GENERATE__LLM__BACKEND", "extractive")
    assert run(["ask", QUESTION, "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cited = lines.index("[1] Docker — https://ragline.dev/deploy#docker")
    assert lines[cited + 1].strip().startswith("“") and "port 8000" in lines[cited + 1]
