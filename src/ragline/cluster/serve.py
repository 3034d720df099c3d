"""Ragline on Ray Serve (`ragline serve --engine ray`): the models and the API as deployments, each scaled alone.

Four applications behind Serve's HTTP proxy, one route prefix each:

- `/embedder`: the configured embedding model with OpenAI-compatible `POST /v1/embeddings`; concurrent
  requests are embedded together in one model call (`@serve.batch`, `ray.serve.embedder.max_batch_size`
  and `batch_wait_timeout_s`); each answer says in `x-ragline-batch-requests` how many requests shared its
  call, and `GET /stats` counts the calls by that number.
- `/reranker`: retrieve.rerank's cross-encoder with TEI-style `POST /rerank` (the shape `HTTPReranker` sends).
- `/llm`: generate.llm's local model through ragline's own OpenAI-compatible server
  (`serve.llm_server.create_llm_app`), or with `ray.serve.llm.engine: vllm`, Ray's own `ray.serve.llm`
  OpenAI app on GPU nodes (built only then; it needs vLLM on those nodes, and is untested here).
- `/`: the API (`serve.api.create_app`), whose settings are rewritten so that it reaches those routes over
  HTTP like any remote model (embedder `openai`, reranker `http`, LLM `openai`), through the one model client
  (`ragline.modelclient`): pooled connections, retries on transient failures (a replica lost mid-request
  included), and a deadline per model call (`ray.serve.api.model_deadline_s`).

Every replica builds its components through the composition root (`Ragline(settings)`). The model routes
require a bearer token the API replicas are given (`ray.serve.model_api_key`, else a random one per run).

The route handlers' annotations are real objects, not strings (no `from __future__ import annotations`):
Serve ships the deployment classes to the replicas by value, where FastAPI could not resolve a string.
"""

import asyncio
import hmac
import json
import logging
import math
import os
import secrets
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ragline.config import ServeDeploymentSettings, Settings
from ragline.modelclient import deadline

log = logging.getLogger(__name__)

APPS = {"embedder": "ragline-embedder", "reranker": "ragline-reranker", "llm": "ragline-llm", "api": "ragline-api"}
PREFIXES = {"embedder": "/embedder", "reranker": "/reranker", "llm": "/llm", "api": "/"}
LOCAL_EMBEDDERS = ("sentence-transformers", "onnx")
MAX_INPUTS = 4096
BATCH_HEADER = "x-ragline-batch-requests"


class ServeError(RuntimeError):
    """The deployments cannot run as configured; the message says what to change."""


# --- what every model route shares ------------------------------------------------------------------------


class BearerKey:
    """ASGI middleware: only callers with `Authorization: Bearer <key>` reach the app (none needed without a key)."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app = app
        self.key = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.key is not None:
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                body = json.dumps({"error": {"message": "this model route needs the deployment's key "
                                             "(ray.serve.model_api_key)", "type": "auth"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class ModelDeadline:
    """ASGI middleware: every model call an HTTP request makes ends within `seconds` (`modelclient.deadline`)."""

    def __init__(self, app: Any, seconds: float | None) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.seconds is None:
            await self.app(scope, receive, send)
            return
        with deadline(self.seconds):
            await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def _model_app(title: str, description: str, key: str | None) -> FastAPI:
    """The app of a model route: only callers with the deployment's key get in."""
    app = FastAPI(title=title, description=description)
    app.add_middleware(BearerKey, key=key)
    return app


async def _json_object(request: Request) -> dict[str, Any] | None:
    """The request's JSON object body, or None when it is not one."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


# --- the deployments ----------------------------------------------------------------------------------------


@serve.deployment
@serve.ingress()
class EmbedderDeployment:
    """The embedding model behind OpenAI-compatible `/v1/embeddings`, concurrent requests batched."""

    def __init__(self, settings: Settings, key: str | None) -> None:
        from ragline.app import Ragline

        options = settings.ray.serve.embedder
        threads = settings.embedder.threads or max(1, math.ceil(options.num_cpus))
        # Raw texts in, vectors out: the caller adds its prefixes, and batching is Serve's.
        local = settings.embedder.model_copy(
            update={"threads": threads, "batch_queries": False, "query_prefix": "", "document_prefix": ""}
        )
        self.embedder = Ragline(settings.model_copy(update={"embedder": local})).embedder
        self.key = key
        self.batches: Counter[int] = Counter()
        self.embed_batch.set_max_batch_size(options.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def embed_batch(self, requests: list[list[str]]) -> list[tuple[list[list[float]], int]]:
        """One model call for every request that arrived together; each gets its vectors and the batch's size."""
        texts = [text for request in requests for text in request]
        vectors = await asyncio.to_thread(self.embedder.embed_documents, texts) if texts else []
        self.batches[len(requests)] += 1
        results, start = [], 0
        for request in requests:
            results.append(([vector.tolist() for vector in vectors[start : start + len(request)]], len(requests)))
            start += len(request)
        return results

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = _model_app("Ragline embeddings", "OpenAI-compatible /v1/embeddings", self.key)

        @app.post("/v1/embeddings", response_model=None)
        async def embeddings(request: Request) -> JSONResponse:
            body = await _json_object(request)
            inputs = body.get("input") if body is not None else None
            if isinstance(inputs, str):
                inputs = [inputs]
            if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
                return _error(400, "input must be a string or a list of strings (token ids are not accepted)")
            if len(inputs) > MAX_INPUTS:
                return _error(400, f"at most {MAX_INPUTS} inputs per request, not {len(inputs)}")
            if body.get("encoding_format") not in (None, "float"):
                return _error(400, "only encoding_format float is served")
            vectors, shared = await self.embed_batch(inputs)
            tokens = sum(len(text.split()) for text in inputs)
            return JSONResponse(
                {
                    "object": "list", "model": self.embedder.name,
                    "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
                headers={BATCH_HEADER: str(shared)},
            )

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{
                "id": self.embedder.name, "object": "model", "owned_by": "ragline", "dimensions": self.embedder.dim,
                "max_tokens": self.embedder.max_tokens,
            }]}

        @app.get("/stats")
        async def stats() -> dict[str, Any]:
            """Model calls of this replica by the number of requests that shared them."""
            return {"replica": serve.get_replica_context().replica_tag,
                    "batches": {str(size): count for size, count in sorted(self.batches.items())}}

        return app


@serve.deployment
@serve.ingress()
class RerankerDeployment:
    """retrieve.rerank's cross-encoder behind TEI-style `/rerank`."""

    def __init__(self, settings: Settings, key: str | None) -> None:
        from ragline.app import Ragline

        self.reranker = Ragline(settings).reranker(settings.retrieve.rerank)
        load = getattr(self.reranker, "load", None)
        if load is not None:
            load()
        self.key = key

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = _model_app("Ragline reranker", "TEI-style /rerank", self.key)

        @app.post("/rerank", response_model=None)
        async def rerank(request: Request) -> JSONResponse:
            body = await _json_object(request) or {}
            query, texts = body.get("query"), body.get("texts")
            if not isinstance(query, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                return _error(400, 'the body must be {"query": str, "texts": [str, ...]}')
            if len(texts) > MAX_INPUTS:
                return _error(400, f"at most {MAX_INPUTS} texts per request, not {len(texts)}")
            scores = await asyncio.to_thread(self.reranker.scores, query, texts)  # type: ignore[attr-defined]
            ranked = sorted(({"index": i, "score": s} for i, s in enumerate(scores)), key=lambda r: -r["score"])
            return JSONResponse(ranked)

        return app


@serve.deployment
@serve.ingress()
class LLMDeployment:
    """generate.llm (a local model) behind ragline's own OpenAI-compatible server."""

    def __init__(self, settings: Settings, key: str | None) -> None:
        self.settings = settings
        self.key = key

    def __serve_build_asgi_app__(self) -> Any:
        from ragline.serve.llm_server import create_llm_app

        app = create_llm_app(self.settings)  # loads the model at startup, before the replica takes requests
        app.add_middleware(BearerKey, key=self.key)
        return app


@serve.deployment
@serve.ingress()
class APIDeployment:
    """The API, its model components remote (the settings `ingress_settings` made)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        from ragline.serve.api import create_app

        app = create_app(self.settings)
        app.add_middleware(ModelDeadline, seconds=self.settings.ray.serve.api.model_deadline_s)
        return app


# --- what is deployed, and how -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the API must know of the served embedding model to use it as the index's own."""

    name: str
    dim: int
    max_tokens: int


@dataclass
class Deployed:
    """The running applications: `url` answers the API; `model_url` is where the model routes live."""

    url: str
    model_url: str
    key: str
    apps: list[str]
    api_settings: Settings

    def model_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def plan(settings: Settings) -> dict[str, bool]:
    """Which model deployments these settings call for."""
    options = settings.ray.serve
    llm = settings.generate.llm
    return {
        "embedder": settings.embedder.backend in LOCAL_EMBEDDERS,
        "reranker": options.reranker.enabled and settings.retrieve.rerank.backend == "cross-encoder",
        "llm": options.llm.enabled and (options.llm.engine == "vllm" or llm.backend == "llama-cpp"),
    }


def deployment_options(name: str, options: ServeDeploymentSettings, settings: Settings) -> dict[str, Any]:
    """Serve's options of one deployment from its settings: autoscaling, per-replica concurrency, resources."""
    actor: dict[str, Any] = {"num_cpus": options.num_cpus}
    if options.num_gpus:
        actor["num_gpus"] = options.num_gpus
    if settings.ray.runtime_env:
        actor["runtime_env"] = settings.ray.runtime_env
    return {
        "name": name,
        "autoscaling_config": {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "initial_replicas": options.min_replicas, "target_ongoing_requests": options.target_ongoing_requests,
        },
        "max_ongoing_requests": options.max_ongoing_requests,
        "ray_actor_options": actor,
    }


def check_resources(settings: Settings, wanted: dict[str, bool]) -> None:
    """Refuse, with the numbers, deployments whose minimum replicas the cluster cannot place (Serve would wait
    for them forever)."""
    import ray

    options = settings.ray.serve
    parts = {"api": options.api, **{name: getattr(options, name) for name, on in wanted.items() if on}}
    if wanted["llm"] and options.llm.engine == "vllm":
        parts.pop("llm")  # Ray's LLM app asks for its own resources
    have = ray.cluster_resources()
    for resource, field in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(part.min_replicas * getattr(part, field) for part in parts.values())
        if need > have.get(resource, 0.0) + 1e-9:
            detail = ", ".join(
                f"{name} {part.min_replicas} × {getattr(part, field):g}" for name, part in parts.items()
                if getattr(part, field)
            )
            raise ServeError(
                f"the deployments need {need:g} {resource}s at their minimum replicas ({detail}); the cluster has "
                f"{have.get(resource, 0.0):g}: lower ray.serve.<deployment>.min_replicas or {field}, or add nodes"
            )


def absolute(settings: Settings) -> Settings:
    """The settings with their relative folders made absolute: replicas do not run in this directory."""
    updates: dict[str, Any] = {"data_dir": settings.data_dir.resolve()}
    model = Path(settings.embedder.model).expanduser()
    if model.is_dir():
        updates["embedder"] = settings.embedder.model_copy(update={"model": str(model.resolve())})
    rerank = settings.retrieve.rerank
    if rerank.model and Path(rerank.model).expanduser().is_dir():
        rerank = rerank.model_copy(update={"model": str(Path(rerank.model).expanduser().resolve())})
        updates["retrieve"] = settings.retrieve.model_copy(update={"rerank": rerank})
    return settings.model_copy(update=updates)


def _with(section: Any, **updates: Any) -> Any:
    """A settings section with `updates`, validated like the config (a secret becomes a SecretStr)."""
    return type(section).model_validate({**section.model_dump(), **updates})


def ingress_settings(settings: Settings, model_url: str, key: str, wanted: dict[str, bool], info: ModelInfo | None) -> Settings:
    """The API's settings with each deployed model reached over HTTP at `model_url`."""
    from ragline.embed.sentence_transformer import resolve_model_dir

    updates: dict[str, Any] = {}
    if wanted["embedder"] and info is not None:
        try:
            tokenizer: str | None = str(resolve_model_dir(settings.embedder.model) / "tokenizer.json")
        except Exception:
            tokenizer = None
        updates["embedder"] = _with(
            settings.embedder, backend="openai", model=info.name, base_url=f"{model_url}{PREFIXES['embedder']}/v1",
            api_key=key, dimensions=info.dim, max_tokens=info.max_tokens,
            tokenizer=tokenizer if tokenizer and Path(tokenizer).is_file() else settings.embedder.tokenizer,
        )
    if wanted["reranker"]:
        rerank = _with(
            settings.retrieve.rerank, backend="http", base_url=f"{model_url}{PREFIXES['reranker']}", api_key=key,
            model=None,
        )
        updates["retrieve"] = settings.retrieve.model_copy(update={"rerank": rerank})
    if wanted["llm"]:
        llm = settings.generate.llm
        remote = _with(
            llm, backend="openai", base_url=f"{model_url}{PREFIXES['llm']}/v1", api_key=key,
            context_window=llm.n_ctx if llm.backend == "llama-cpp" else llm.context_window,
        )
        updates["generate"] = settings.generate.model_copy(update={"llm": remote})
    return settings.model_copy(update=updates)


def vllm_app(settings: Settings) -> Any:
    """Ray's own OpenAI-compatible LLM app (vLLM on GPU replicas), built only when configured."""
    options = settings.ray.serve.llm
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise ServeError(
            "ray.serve.llm.engine vllm needs Ray's LLM library and vLLM: pip install 'ray[llm]' (on GPU nodes); "
            f"or set ray.serve.llm.engine: llama-cpp ({exc})"
        ) from exc
    model = settings.generate.llm.model
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": model, "model_source": options.model_source or model},
        "deployment_config": {
            "autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                   "target_ongoing_requests": options.target_ongoing_requests},
            "max_ongoing_requests": options.max_ongoing_requests,
        },
        "engine_kwargs": options.engine_kwargs,
    }
    if options.accelerator_type:
        config["accelerator_type"] = options.accelerator_type
    try:
        return build_openai_app({"llm_configs": [LLMConfig(**config)]})
    except Exception as exc:  # vLLM missing or a bad engine argument: say so before anything is deployed
        raise ServeError(f"cannot build the vLLM app for {model!r}: {exc}") from exc


def _model_info(url: str, key: str, timeout_s: float = 60.0) -> ModelInfo:
    response = httpx.get(f"{url}{PREFIXES['embedder']}/v1/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=timeout_s)
    response.raise_for_status()
    model = response.json()["data"][0]
    return ModelInfo(model["id"], int(model["dimensions"]), int(model["max_tokens"]))


def deploy(settings: Settings, host: str, port: int) -> Deployed:
    """Start Serve's proxy on host:port (in the Ray runtime this process is connected to) and deploy the models,
    then the API; returns once every application is running."""
    settings = absolute(settings)
    options = settings.ray.serve
    wanted = plan(settings)
    check_resources(settings, wanted)
    vllm = vllm_app(settings) if wanted["llm"] and options.llm.engine == "vllm" else None
    serve.start(http_options={"host": host, "port": port})
    model_url = options.model_url or f"http://127.0.0.1:{port}"
    key = options.model_api_key.get_secret_value() if options.model_api_key else secrets.token_urlsafe(24)
    apps: list[str] = []

    def run(name: str, app: Any) -> None:
        serve.run(app, name=APPS[name], route_prefix=PREFIXES[name])
        apps.append(APPS[name])

    info = None
    if wanted["embedder"]:
        run("embedder", EmbedderDeployment.options(**deployment_options("Embedder", options.embedder, settings))
            .bind(settings, key))
        info = _model_info(model_url, key)
    if wanted["reranker"]:
        run("reranker", RerankerDeployment.options(**deployment_options("Reranker", options.reranker, settings))
            .bind(settings, key))
    if wanted["llm"]:
        if vllm is not None:
            run("llm", vllm)
        else:
            llm = settings.generate.llm
            threads = llm.n_threads or max(1, math.ceil(options.llm.num_cpus))
            local = settings.model_copy(update={"generate": settings.generate.model_copy(
                update={"llm": llm.model_copy(update={"n_threads": threads})})})
            run("llm", LLMDeployment.options(**deployment_options("LLM", options.llm, settings)).bind(local, key))
    api_settings = ingress_settings(settings, model_url, key, wanted, info)
    run("api", APIDeployment.options(**deployment_options("API", options.api, settings)).bind(api_settings))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Deployed(f"http://{shown}:{port}", model_url, key, apps, api_settings)


def undeploy(deployed: Deployed | None) -> None:
    """Delete this run's applications (others on the cluster are left alone)."""
    for name in reversed(deployed.apps if deployed else []):
        try:
            serve.delete(name)
        except Exception:
            log.warning("could not delete Serve application %s", name, exc_info=True)


def run_until_stopped(
    settings: Settings, host: str, port: int, announce: Callable[[Deployed], None] = lambda _: None,
) -> None:
    """`ragline serve --engine ray`: connect to the cluster (or start a local runtime), deploy, serve until
    Ctrl-C or SIGTERM, then delete the applications and, for a local runtime, stop Serve and Ray."""
    import ray

    from ragline.cluster.ray_ingest import ray_connection

    started_here = not ray.is_initialized() and (
        settings.ray.address == "local" or (settings.ray.address is None and not os.environ.get("RAY_ADDRESS"))
    )
    stop = threading.Event()
    deployed: Deployed | None = None
    with ray_connection(settings.ray):
        # After ray.init, whose own SIGTERM handler would abort the process before anything is deleted.
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            deployed = deploy(settings, host, port)
            announce(deployed)
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            undeploy(deployed)
            if started_here:
                serve.shutdown()
