"""The HTTP API: in-process through the ASGI app, and once as a real `ragline serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import build_index
from fastapi.testclient import TestClient

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


@pytest.fixture
def client(indexed, embedder):
    settings = Settings(data_dir=indexed / "index")
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as test_client:
        yield test_client


def test_healthz(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["chunks"] == 3


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
    "payload",
    [{"query": ""}, {"query": "x", "k": 0}, {"query": "x", "k": 1000}, {"k": 3}, {"query": "x", "filters": {"a": {"$gt": 1}}}],
)
def test_bad_requests_are_422_with_a_reason(client, payload):
    response = client.post("/v1/search", json=payload)
    assert response.status_code == 422
    assert response.json()["detail"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ragline_serve_answers_on_loopback(indexed):
    port = free_port()
    env = {**os.environ, "RAGLINE_DATA_DIR": str(indexed / "index")}
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
        response = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"query": "licence", "k": 1}, timeout=30)
        assert response.json()["hits"][0]["url"] == "https://ragline.dev/faq"
    finally:
        server.terminate()
        server.wait(timeout=30)
