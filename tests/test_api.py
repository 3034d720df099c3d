"""The HTTP API: in-process through the ASGI app, and once as a real `ragline serve` process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import build_index
from fastapi.testclient import TestClient
from scripted_llm_server import free_port, wait_until_ready

from ragline.app import Ragline
from ragline.config import Settings
from ragline.serve.api import create_app


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, embedder) -> Path:
    files = {
        "deploy.md": "# Deploying\n\n## Kubernetes\n\nUse the KubeRay operator to run the Ray cluster on Kubernetes.\n\n"
        "## Docker\n\nThe Docker image listens on port 8000 by default.\n",
        "faq.txt": "Ragline is licensed under the Apache License 2.0.\n",
    }
    return build_index(tmp_path_factory.mktemp("api"), files, embedder, "https://ragline.dev/{path}").parent


EXTRACTIVE = {"llm": {"backend": "extractive"}}
"""No LLM: these tests are about the API, and the default model would be assembled (1.1 GB) at startup."""


@pytest.fixture(scope="module")
def client(indexed, embedder):
    settings = Settings(data_dir=indexed / "index", generate=EXTRACTIVE)
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as test_client:
        wait_until_ready(test_client.get)
        yield test_client


def test_healthz(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["answers_in_flight"] == 0
    assert "chunks" not in body  # counts are tenant data: /healthz answers anyone


def test_readyz_reports_each_component(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["components"]["store"] == {"status": "ready", "reason": "3 chunks"}
    assert body["components"]["embedder"]["status"] == "ready"
    assert body["components"]["llm"] == {"status": "ready", "reason": "extractive: answers without an LLM"}


def test_a_model_that_cannot_load_is_reported_and_answers_degrade(indexed, embedder):
    settings = Settings(data_dir=indexed / "index", generate={"llm": {"backend": "llama-cpp", "model": "/nowhere/x.gguf"}})
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        body = wait_until_ready(client.get)
        assert body["status"] == "degraded"
        llm = body["components"]["llm"]
        assert llm["status"] == "failed" and "answers are extracted" in llm["reason"] and "x.gguf" in llm["reason"]
        assert "/nowhere" not in llm["reason"]  # no host path reaches a client
        answer = client.post("/v1/query", json={"query": "which port does the container use?", "k": 2}).json()
        assert answer["model"] == "extractive" and "port 8000" in answer["answer"]


def test_a_cheap_model_that_cannot_load_is_reported_and_the_strong_one_answers(indexed, embedder, tmp_path):
    generate = {
        "llm": {"backend": "openai", "model": "strong", "base_url": "http://127.0.0.1:9/v1"},
        "cheap_llm": {"backend": "llama-cpp", "model": "no-such-model"},
        "router": {"enabled": True, "model_path": str(tmp_path / "router.joblib")},
    }
    settings = Settings(data_dir=indexed / "index", generate=generate)
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        body = wait_until_ready(client.get)
        assert body["status"] == "degraded" and body["components"]["llm"] == {"status": "ready", "reason": "strong"}
        cheap = body["components"]["cheap_llm"]
        assert cheap["status"] == "failed" and "strong model answers every question" in cheap["reason"]
        assert "no-such-model" in cheap["reason"]


def test_a_store_that_cannot_open_makes_the_api_unready_without_leaking_paths(tmp_path, embedder):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the index folder should be")
    settings = Settings(data_dir=blocker / "index", generate={"llm": {"backend": "extractive"}})
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        body = wait_until_ready(client.get)
        deadline = time.monotonic() + 60
        while body["components"]["store"]["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)  # the service database (in the same folder) may fail first
            body = client.get("/readyz").json()
        assert body["status"] == "failed" and body["components"]["store"]["status"] == "failed"
        assert body["components"]["database"]["status"] == "failed"
        assert client.get("/readyz").status_code == 503
        response = client.post("/v1/search", json={"query": "port"})
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["code"] == "unavailable" and "store" in response.json()["message"]
        assert str(tmp_path) not in response.text and str(tmp_path) not in client.get("/readyz").text


def test_search_returns_cited_hits(client):
    response = client.post("/v1/search", json={"query": "which port does the container use?", "k": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["hits"][0]["url"] == "https://ragline.dev/deploy#docker"
    assert "port 8000" in body["hits"][0]["text"]
    assert len(body["hits"]) == 2 and {"embed_ms", "search_ms"} <= set(body["timings"])


def test_search_filters(client):
    body = client.post("/v1/search", json={"query": "port", "k": 5, "filters": {"format": "text"}}).json()
    assert [hit["url"] for hit in body["hits"]] == ["https://ragline.dev/faq"]


@pytest.mark.parametrize(
    "payload", [{"query": ""}, {"query": "x", "k": 0}, {"query": "x", "k": 1000}, {"k": 3}, {"query": "x", "filters": 3}]
)
def test_bad_requests_are_422_with_a_reason(client, payload):
    response = client.post("/v1/search", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == "invalid_request" and body["message"]


@pytest.mark.parametrize("endpoint", ["/v1/search", "/v1/query"])
@pytest.mark.parametrize("options", [
    {"rerank": {"backend": "http", "base_url": "http://169.254.169.254/latest"}},  # the server would call it
    {"rerank.backend": "cross-encoder", "rerank.model": "/etc"},  # the server would load it
    {"rerank": {"api_key": "stolen"}},
])
def test_a_request_may_not_name_model_servers_folders_or_keys(client, endpoint, options):
    response = client.post(endpoint, json={"query": "port", "options": options})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_options" and "the server's to set" in response.json()["message"]
    assert client.post(endpoint, json={"query": "port", "options": {"rerank.candidates": 5}}).status_code == 200


@pytest.mark.parametrize("endpoint", ["/v1/search", "/v1/query", "/v1/query/stream"])
@pytest.mark.parametrize(
    "filters",
    [
        {"a": {"$gt": 1}},  # unknown field
        {"format": {"$gt": 1}},  # unknown operator
        {"source": ["a"]},  # a list is not a value
        {"format": {"$in": [{"x": 1}]}},  # dicts inside $in
        {"format": {"$in": [f"v{i}" for i in range(5000)]}},  # beyond SQLite's variable limit
    ],
)
def test_bad_filters_are_422_naming_the_known_fields(client, endpoint, filters):
    response = client.post(endpoint, json={"query": "port", "filters": filters})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "invalid_filter" and "known fields:" in body["message"] and "format" in body["message"]


def test_an_index_built_with_another_model_is_a_503_with_the_reason(tmp_path, embedder):
    index = build_index(tmp_path, {"a.md": "# A\n\nSome text about ports.\n"}, embedder)
    settings = Settings(data_dir=index, generate=EXTRACTIVE)
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    components.store.set_meta("embedder", "another-model")
    with TestClient(create_app(settings, components)) as client:
        wait_until_ready(client.get)
        response = client.post("/v1/search", json={"query": "ports"})
        assert response.status_code == 503
        assert response.json()["code"] == "index_unavailable" and "another-model" in response.json()["message"]


def test_a_server_deletes_finished_jobs_past_their_retention(tmp_path, embedder):
    """At startup (then hourly) the server prunes the service database by serve.job_retention_days."""
    import asyncio

    from ragline.serve.db import Database

    index = build_index(tmp_path, {"a.md": "# A\n\nSome text about ports.\n"}, embedder)
    settings = Settings(data_dir=index, generate=EXTRACTIVE, serve={"job_retention_days": 1e-6})  # 86 ms

    async def jobs(finish_one: bool) -> list[str]:
        database = Database.from_settings(settings)
        try:
            await database.migrate()
            if finish_one:
                job, _ = await database.jobs.submit("default", "source", "docs", "source:docs", ["*"])
                await database.jobs.claim(30)
                await database.jobs.finish(job.id, "succeeded", report={})
            return [job.id for job in await database.jobs.list("default")]
        finally:
            await database.close()

    assert len(asyncio.run(jobs(finish_one=True))) == 1
    time.sleep(0.2)
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        wait_until_ready(client.get)
        for _ in range(100):  # a hang guard: pruning runs right after the migration
            if not asyncio.run(jobs(finish_one=False)):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the finished job was not deleted after its retention")


def test_an_unexpected_failure_is_a_generic_500_without_a_trace(indexed, embedder, monkeypatch):
    settings = Settings(data_dir=indexed / "index", generate=EXTRACTIVE)
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder

    def broken(*args, **kwargs):
        raise RuntimeError(f"disk on fire at {indexed}/index/chunks.sqlite")

    with TestClient(create_app(settings, components), raise_server_exceptions=False) as client:
        wait_until_ready(client.get)
        monkeypatch.setattr(components.retriever, "search", broken)
        response = client.post("/v1/search", json={"query": "port"})
        assert response.status_code == 500
        assert response.json() == {
            "code": "internal_error", "message": "the server failed on this request; its log has the details"
        }
        assert client.get("/nowhere").json()["code"] == "not_found"


@pytest.mark.slow
def test_ragline_serve_answers_on_loopback(indexed):
    port = free_port()
    env = {**os.environ, "RAGLINE_DATA_DIR": str(indexed / "index"), "RAGLINE_GENERATE__LLM__BACKEND": "extractive"}
    server = subprocess.Popen(
        [sys.executable, "-m", "ragline", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not come up")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert wait_until_ready(http.get)["status"] == "ready"
        response = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"query": "licence", "k": 1}, timeout=30)
        assert response.json()["hits"][0]["url"] == "https://ragline.dev/faq"
    finally:
        server.terminate()
        server.wait(timeout=30)
