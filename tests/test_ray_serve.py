"""`serve --engine ray` against a real Ray runtime on 127.0.0.1: the embedding deployment's vectors, dynamic
batching, the ingress's search, answers from the LLM deployment, a replica killed mid-traffic, and a stalled
model cut by the request deadline.

One Ray runtime (2 CPUs) and one Serve instance serve the whole module: an index of the fixture docs, the
embedding deployment (2 replicas), the reranker, the LLM (llama.cpp with the small SmolLM2 the local-model tests
use) and the API; the tests run in file order, the replica kill last but one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from scripted_llm_server import free_port, wait_until_ready
from test_generate_local import llama_cpp_problem
from test_rerank import train_tiny_cross_encoder

from ragline.app import Ragline
from ragline.cluster.ray_ingest import keep_ray_sockets_short
from ragline.config import Settings, SourceSettings
from ragline.embed.openai_compat import OpenAIEmbedder
from ragline.generate.local import SMOLLM2
from ragline.modelclient import CallPolicy, ModelClient

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
keep_ray_sockets_short()
try:
    import ray
    from ray import serve
except ImportError:
    pytest.fail("the Ray Serve tests need the ray extra: pip install -e '.[dev]'", pytrace=False)

from ragline.cluster.serve import (  # noqa: E402 (after Ray's environment is set)
    APPS, BATCH_HEADER, PREFIXES, RerankerDeployment, absolute, deploy, deployment_options,
)

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "docs_sources"
KEY = "test-model-key"
TEXTS = ["How do I install xarray?", "Ray Serve scales model replicas.", "", "数据 naïve ünïcode"]
QUERIES = [
    "how do I install xarray?", "transfer learning with a pretrained model", "module attributes and setup",
    "license terms for redistribution", "open a netCDF dataset", "flax linen dense layer",
]
GUARD_S = 180.0  # hang guards only: far beyond what any step takes, never a speed check


LLM = {"backend": "llama-cpp", "model": SMOLLM2, "n_ctx": 1024, "generation_timeout_s": 120}


def settings_for(index: Path, port: int, reranker: Path) -> Settings:
    return Settings(
        data_dir=index,
        generate={"llm": LLM, "max_answer_tokens": 48},
        retrieve={"rerank": {"backend": "cross-encoder", "model": str(reranker), "candidates": 10,
                            "max_length": 128}},
        serve={"rate_limits": {"enabled": False}, "cache": {"enabled": False}},
        ray={"serve": {
            "http_port": port, "model_api_key": KEY,
            "embedder": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.25, "max_batch_size": 16,
                         "batch_wait_timeout_s": 0.05},
            "reranker": {"num_cpus": 0.25},
            "llm": {"num_cpus": 0.5},
            "api": {"num_cpus": 0.25, "model_deadline_s": 15.0},
        }},
    )


@pytest.fixture(scope="session")
def served(tmp_path_factory, embedder):
    """The fixture docs indexed locally, then Ray (2 CPUs) with the embedder, reranker (a tiny cross-encoder),
    LLM and API deployments on them."""
    if problem := llama_cpp_problem():
        pytest.fail(f"the LLM deployment needs llama.cpp: {problem}", pytrace=False)
    root = tmp_path_factory.mktemp("ray-serve")
    shutil.copytree(FIXTURES, root / "docs")
    train_tiny_cross_encoder(root / "reranker")
    port = free_port()
    settings = settings_for(root / "index", port, root / "reranker")
    local = Ragline(settings)
    local.__dict__["embedder"] = embedder
    local.indexer().run([SourceSettings(path=root / "docs")])
    local.close()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        deployed = deploy(settings, "127.0.0.1", port)
        with httpx.Client(base_url=deployed.url, timeout=GUARD_S) as client:
            wait_until_ready(client.get, deadline_s=GUARD_S)
            yield settings, deployed, client
    finally:
        serve.shutdown()
        ray.shutdown()


def embed_remote(deployed, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{deployed.model_url}/embedder/v1/embeddings", json={"model": "m", "input": texts},
                      headers=deployed.model_headers(), timeout=GUARD_S)


def test_the_embedding_deployment_returns_the_local_models_vectors(served, embedder):
    settings, deployed, _ = served
    response = embed_remote(deployed, TEXTS)
    assert response.status_code == 200
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(TEXTS)))
    assert np.allclose(np.array([item["embedding"] for item in data]), embedder.embed_documents(TEXTS), atol=1e-5)
    # the API's own client of it, with the prefixes and normalisation of the openai backend
    remote = OpenAIEmbedder(deployed.api_settings.embedder)
    assert remote.name == embedder.name and remote.dim == embedder.dim
    assert np.allclose(remote.embed_queries(QUERIES), embedder.embed_queries(QUERIES), atol=1e-5)


def test_the_model_routes_need_the_deployments_key(served):
    _, deployed, _ = served
    response = httpx.post(f"{deployed.model_url}/embedder/v1/embeddings", json={"input": ["x"]}, timeout=GUARD_S)
    assert response.status_code == 401 and "ray.serve.model_api_key" in response.json()["error"]["message"]


def test_concurrent_requests_are_embedded_together(served, embedder):
    """Requests that arrive together share one model call: some answer says it shared its call."""
    _, deployed, _ = served
    client = ModelClient()
    url = f"{deployed.model_url}/embedder/v1/embeddings"
    policy = CallPolicy(tries=3, backoff_initial_s=0.1, read_timeout_s=GUARD_S)

    async def burst(round_: int) -> list[httpx.Response]:
        texts = [f"question {round_}-{i} about arrays" for i in range(24)]
        calls = [client.apost(url, {"input": [text]}, headers=deployed.model_headers(), policy=policy) for text in texts]
        responses = await asyncio.gather(*calls)
        for text, response in zip(texts, responses):  # batched or not, each gets its own vector
            assert np.allclose(response.json()["data"][0]["embedding"], embedder.embed_documents([text])[0], atol=1e-5)
        return responses

    shared = []
    try:
        for round_ in range(5):  # more rounds only if the cores were too busy for any two requests to meet
            shared += [int(r.headers[BATCH_HEADER]) for r in asyncio.run(burst(round_))]
            if max(shared) > 1:
                break
    finally:
        client.close()
    assert max(shared) > 1, f"no request shared a model call in {len(shared)} requests"
    stats = [httpx.get(f"{deployed.model_url}/embedder/stats", headers=deployed.model_headers()).json()
             for _ in range(4)]
    assert any(int(size) > 1 for s in stats for size in s["batches"])


def test_the_ingress_finds_what_a_local_server_finds(served, embedder):
    """Search and rerank through the deployments equal a local server's, which embeds and reranks in-process."""
    settings, deployed, client = served
    assert deployed.api_settings.retrieve.rerank.backend == "http"
    settings = settings.model_copy(update={"generate": settings.generate.model_copy(
        update={"llm": settings.generate.llm.model_copy(update={"backend": "extractive"})})})
    local = Ragline(settings)
    local.__dict__["embedder"] = embedder
    from ragline.serve.api import create_app

    with TestClient(create_app(settings, local)) as here:
        wait_until_ready(here.get)
        for query in QUERIES:
            body = {"query": query, "k": 5}
            on_ray = client.post("/v1/search", json=body)
            assert on_ray.status_code == 200, on_ray.text
            expected = here.post("/v1/search", json=body).json()["hits"]
            hits = on_ray.json()["hits"]
            assert [hit["chunk_id"] for hit in hits] == [hit["chunk_id"] for hit in expected]
            assert np.allclose([hit["score"] for hit in hits], [hit["score"] for hit in expected], atol=1e-4)
            assert "rerank_ms" in on_ray.json()["timings"] and not on_ray.json()["notes"]


def test_answers_are_written_by_the_llm_deployment(served):
    """The ingress's answers come from the llama.cpp replica (its model, streamed tokens), with the usual
    citations check; the replica's own route wants the deployments' key."""
    _, deployed, client = served
    assert deployed.api_settings.generate.llm.backend == "openai"
    assert deployed.api_settings.generate.llm.base_url.startswith(deployed.model_url)
    response = client.post("/v1/query", json={"query": QUERIES[0], "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == SMOLLM2 and body["answer"].strip() and body["hits"]
    assert body["usage"]["completion_tokens"] > 0
    with client.stream("POST", "/v1/query/stream", json={"query": QUERIES[1], "k": 3},
                       headers={"accept": "application/x-ndjson"}) as stream:
        events = [json.loads(line) for line in stream.iter_lines() if line.strip()]
    kinds = [event["type"] for event in events]
    assert "token" in kinds and kinds[-1] == "answer", kinds
    assert events[-1]["model"] == SMOLLM2 and events[-1]["answer"].strip()
    chat = {"model": SMOLLM2, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    refused = httpx.post(f"{deployed.model_url}/llm/v1/chat/completions", json=chat, timeout=GUARD_S)
    assert refused.status_code == 401
    direct = httpx.post(f"{deployed.model_url}/llm/v1/chat/completions", json=chat,
                        headers=deployed.model_headers(), timeout=GUARD_S)
    assert direct.status_code == 200 and direct.json()["choices"][0]["message"]["content"] is not None


def embedder_replicas() -> list[str]:
    prefix = f"SERVE_REPLICA::{APPS['embedder']}#"
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(prefix))


def test_searches_are_answered_while_an_embedding_replica_is_killed(served):
    """One of the two embedding replicas dies mid-traffic; the API's model client retries on the other."""
    _, deployed, client = served
    before = embedder_replicas()
    assert len(before) == 2
    answered: list[int] = []
    first_answers = threading.Event()

    def search(i: int) -> int:
        response = client.post("/v1/search", json={"query": f"{QUERIES[i % len(QUERIES)]} {i}", "k": 3})
        answered.append(response.status_code)
        if len(answered) >= 5:
            first_answers.set()
        return response.status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(search, i) for i in range(60)]
        if not first_answers.wait(GUARD_S):
            pytest.fail("no search was answered before the kill")
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        statuses = [future.result(timeout=GUARD_S) for future in futures]
    assert statuses == [200] * 60
    end = time.monotonic() + GUARD_S
    while len(after := embedder_replicas()) != 2 or before[0] in after:  # Serve replaces the lost replica
        if time.monotonic() > end:
            pytest.fail(f"Serve did not replace the killed replica: {after}")
        time.sleep(0.5)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Stalled:
    """A model server that never answers in time: it sleeps far past every deadline."""

    async def __call__(self, request) -> list:
        await asyncio.sleep(GUARD_S * 2)
        return []


def test_a_stalled_model_is_cut_by_the_requests_deadline(served):
    """The reranker application is swapped for one that stalls (requests may not name model servers: the
    reranker's own is the API's config); the API's deadline for model calls (15 s) ends the call before the
    reranker's 30 s timeout, and the search answers with the first ranking and a note. Then the reranker is back."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replica cannot import this test module
    settings, deployed, client = served
    serve.run(Stalled.bind(), name=APPS["reranker"], route_prefix=PREFIXES["reranker"])
    try:
        try:
            response = client.post("/v1/search", json={"query": QUERIES[0], "k": 3})
        except httpx.TimeoutException:
            pytest.fail("the search waited for the stalled reranker: the deadline was not honoured")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["hits"] and any("the request's deadline for model calls" in note for note in body["notes"])
    finally:
        reranker = RerankerDeployment.options(**deployment_options("Reranker", settings.ray.serve.reranker, settings))
        serve.run(reranker.bind(absolute(settings), deployed.key), name=APPS["reranker"],
                  route_prefix=PREFIXES["reranker"])
    response = client.post("/v1/search", json={"query": QUERIES[0], "k": 3})
    assert response.status_code == 200 and not response.json()["notes"]


def test_a_request_may_not_point_the_server_at_another_model_server(served):
    """A caller's options naming a reranker URL (or model folder, or key) are refused: the server would call it."""
    _, deployed, client = served
    for options in ({"rerank": {"backend": "http", "base_url": f"{deployed.model_url}/stalled"}},
                    {"rerank.model": "/etc"}, {"rerank": {"api_key": "x"}}):
        response = client.post("/v1/search", json={"query": QUERIES[0], "k": 3, "options": options})
        assert response.status_code == 422 and "the server's to set" in response.json()["message"], response.text


def test_serve_engine_ray_runs_until_sigterm_then_deletes_everything(served, tmp_path):
    """The command itself: its own local Ray runtime, the API answering, and a clean exit on SIGTERM."""
    import signal
    import subprocess

    import yaml

    settings, _, _ = served
    port = free_port()
    config = tmp_path / "ragline.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(settings.data_dir), "generate": {"llm": {"backend": "extractive"}},
        "ray": {"num_cpus": 2, "serve": {"embedder": {"num_cpus": 0.5}, "api": {"num_cpus": 0.5}}},
    }))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "ragline", "--config", str(config), "serve", "--engine", "ray",
                               "--port", str(port)], env=env, stdout=log, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=GUARD_S) as client:
            end = time.monotonic() + GUARD_S
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > end:
                    pytest.fail(f"ragline serve --engine ray did not get ready: {(tmp_path / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.5)
            assert client.post("/v1/search", json={"query": QUERIES[0], "k": 2}).json()["hits"]
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=GUARD_S) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("ragline serve --engine ray did not stop on SIGTERM")
        assert "Deleting app" in (tmp_path / "serve.log").read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def test_serve_engine_ray_keeps_the_refusal_to_listen_beyond_loopback_without_auth(capsys):
    from ragline.cli.main import run

    assert run(["serve", "--engine", "ray", "--host", "0.0.0.0"]) == 1
    assert "refusing to listen on 0.0.0.0 with authentication off" in capsys.readouterr().err


def test_deployment_settings_are_checked():
    from ragline.config import ConfigError, load_settings

    with pytest.raises((ConfigError, ValueError), match="max_replicas .* below min_replicas"):
        load_settings(ray={"serve": {"embedder": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises((ConfigError, ValueError), match="model_url must start with http"):
        load_settings(ray={"serve": {"model_url": "localhost:8000"}})
