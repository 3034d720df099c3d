"""The API under concurrent answers, served by uvicorn on loopback: it stays responsive, bounds its
queue with a 503 + Retry-After, and a client that leaves mid-stream frees the model for the next."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from scripted_llm_server import ScriptedLLMServer, Stream, serve_in_thread, wait_until_ready
from test_generate_local import llama_cpp_problem
from test_query import index_dir  # noqa: F401  (the indexed deployment page, a module fixture)

from ragline.app import Ragline
from ragline.config import Settings
from ragline.generate.local import SMOLLM2
from ragline.serve.api import create_app

QUESTION = {"query": "Which port does the Docker image listen on?", "k": 2}


@contextmanager
def serving(settings: Settings, embedder) -> Iterator[tuple[httpx.Client, Ragline]]:
    """The real API in uvicorn on a loopback port, ready to answer; each request gets at most 30 s."""
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with serve_in_thread(create_app(settings, components)) as url, httpx.Client(base_url=url, timeout=30) as http:
        wait_until_ready(http.get)
        yield http, components


def open_stream(http: httpx.Client, **timeouts: float) -> tuple[httpx.Response, Iterator[dict[str, Any]]]:
    response = http.send(http.build_request("POST", "/v1/query/stream", json=QUESTION, **timeouts), stream=True)
    assert response.status_code == 200
    return response, (json.loads(line) for line in response.iter_lines() if line)


def next_of_type(events: Iterator[dict[str, Any]], kind: str) -> dict[str, Any]:
    for event in events:
        if event["type"] == kind:
            return event
        assert event["type"] != "error", event
    raise AssertionError(f"the stream ended without a {kind} event")


def assert_busy(http: httpx.Client, retry_after: str) -> None:
    for endpoint in ("/v1/query", "/v1/query/stream"):
        busy = http.post(endpoint, json=QUESTION)
        assert busy.status_code == 503 and busy.headers["retry-after"] == retry_after
        assert busy.json()["code"] == "busy" and "retry in" in busy.json()["message"]


def test_beyond_the_queue_503_and_a_client_leaving_cancels_its_generation(index_dir, embedder):
    llm = {"backend": "openai", "model": "served-model", "backoff_initial_s": 0.01}
    serve = {"max_concurrent_generations": 1, "max_queued_generations": 1, "busy_retry_after_s": 7}
    with ScriptedLLMServer() as upstream:
        settings = Settings(data_dir=index_dir, generate={"llm": {**llm, "base_url": upstream.url}}, serve=serve)
        # The first answer would stream for 100 s: the second can only get its turn if leaving cancels it.
        upstream.script(Stream([f"w{i} " for i in range(2000)], piece_delay_s=0.05), Stream(["Port 8000 [1]."]))
        with serving(settings, embedder) as (http, _):
            first, first_events = open_stream(http)
            next_of_type(first_events, "token")
            second, second_events = open_stream(http, timeout=10.0)  # 100x what the cancelled path needs
            assert next(second_events) == {"type": "status", "stage": "queued"}
            assert_busy(http, "7")
            assert http.get("/healthz").json()["answers_in_flight"] == 2

            first.close()  # the client goes away mid-stream
            answer = next_of_type(second_events, "answer")
            assert answer["answer"] == "Port 8000 [1]." and answer["model"] == "served-model"
            second.close()
            assert [r.body["model"] for r in upstream.received] == ["served-model"] * 2


@pytest.fixture(scope="module")
def local_model_ready() -> None:
    if problem := llama_cpp_problem():
        pytest.skip(problem)


@pytest.mark.slow
def test_health_checks_are_answered_while_two_local_answers_generate(index_dir, embedder, local_model_ready, capsys):
    llm = {"backend": "llama-cpp", "model": SMOLLM2, "n_ctx": 1024, "n_threads": 2, "generation_timeout_s": 120}
    settings = Settings(
        data_dir=index_dir,
        generate={"llm": llm, "input_fraction": 0.8, "max_answer_tokens": 48, "temperature": 0},
        serve={"max_concurrent_generations": 2, "max_queued_generations": 0, "busy_retry_after_s": 3,
               "cache": {"enabled": False}},  # the same question each time must reach the model
    )
    with serving(settings, embedder) as (http, components):
        assert http.get("/readyz").json()["components"]["llm"] == {"status": "ready", "reason": SMOLLM2}
        model = components.answerer.llm

        # Hold the model as a long generation would: both answers must then wait for it in worker threads,
        # while building their prompts (token counting) and every health check go on.
        model._lock.acquire()
        try:
            first, first_events = open_stream(http, timeout=120.0)
            assert next_of_type(first_events, "status")["stage"] == "retrieve"
            assert next_of_type(first_events, "status")["stage"] == "generate"
            second, second_events = open_stream(http, timeout=120.0)
            assert next_of_type(second_events, "status")["stage"] == "retrieve"
            assert next_of_type(second_events, "status")["stage"] == "generate"
            held = [http.get("/healthz") for _ in range(5)]  # before the fix: the loop froze, each timed out
            assert all(r.status_code == 200 and r.json()["answers_in_flight"] == 2 for r in held)
            assert_busy(http, "3")
        finally:
            model._lock.release()

        # Now the two answers really generate, one after the other, while a poller keeps asking /healthz.
        polled: list[dict[str, Any]] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=str(http.base_url), timeout=30) as poller:
                while not done.wait(0.02):
                    polled.append(poller.get("/healthz").json())

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            answers = [next_of_type(first_events, "answer"), next_of_type(second_events, "answer")]
        finally:
            done.set()
            poller.join(timeout=60)
        first.close()
        second.close()
        assert [(a["model"], a["note"]) for a in answers] == [(SMOLLM2, ""), (SMOLLM2, "")]
        assert answers[0]["usage"]["completion_tokens"] > 0 and answers[1]["usage"]["completion_tokens"] > 0
        while_generating = sum(1 for body in polled if body["answers_in_flight"] > 0)

        # A client that leaves mid-stream releases the model: the next question is answered by it.
        third, third_events = open_stream(http, timeout=120.0)
        next_of_type(third_events, "token")
        third.close()
        deadline = time.monotonic() + 60
        while http.get("/healthz").json()["answers_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        after = http.post("/v1/query", json=QUESTION, timeout=120.0).json()
        assert (after["model"], after["note"]) == (SMOLLM2, "")

    with capsys.disabled():
        print(
            f"\nserve figures: answers served {len(answers) + 1} (+1 cancelled mid-stream); /healthz answered "
            f"{len(held)} times while both answers held their turns and {while_generating} of {len(polled)} "
            f"times while the local model generated; 503 + Retry-After beyond the bound: yes"
        )
