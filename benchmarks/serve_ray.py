"""Serving on Ray Serve (`ragline serve --engine ray`) against a local `ragline serve`, on the same machine and index.

    python benchmarks/serve_ray.py [--pages 8] [--duration 10] [--clients 16] [--cpus 2]

Indexes the first `--pages` pages of the bundled samples, then drives `--clients` concurrent HTTP clients
for `--duration` seconds per row and prints requests/s, p50 and p99 latency and errors of:

- search-only requests (`POST /v1/search`, k 5): a local `ragline serve` process (the baseline, same run),
  then the Ray Serve ingress (one API replica, the embedding model in its own deployment);
- single-text embedding requests (`POST /embedder/v1/embeddings`) to the embedding deployment with 1 and 2
  replicas, dynamic batching on (`max_batch_size` 32), and with 1 replica unbatched (`max_batch_size` 1):
  the gain from dynamic batching is batched ÷ unbatched requests/s, and the mean requests per model call
  (from the replicas' `/stats`) says how much batching happened.

The clients run in this process, on the same cores as the servers: on a small machine the figures are the
whole machine's throughput, not a server's alone. Every row is bounded by `--duration`; deployments load
their models before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from common import free_port

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "python-docs"
QUESTIONS = ROOT / "samples" / "questions.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8, help="sample pages indexed (0: all 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per row")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray runtime")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ragline.cluster.ray_ingest import keep_ray_sockets_short

    keep_ray_sockets_short()
    work = Path(tempfile.mkdtemp(prefix="ragline-bench-serve-ray-"))
    questions = [line.strip() for line in QUESTIONS.read_text().splitlines() if line.strip()]
    rows: dict[str, dict] = {}
    try:
        docs = copy_pages(work / "docs", args.pages)
        config = {
            "data_dir": str(work / "index"),
            "generate": {"llm": {"backend": "extractive"}},
            "serve": {"rate_limits": {"enabled": False}, "cache": {"enabled": False},
                      "telemetry": {"json_logs": False}},
            "ray": {"serve": {"model_api_key": "bench", "embedder": {"num_cpus": 0.5}, "api": {"num_cpus": 0.5}}},
        }
        (work / "ragline.yaml").write_text(yaml.safe_dump(config))
        settings = Settings(**config)
        app = Ragline(settings)
        report = app.indexer().run([SourceSettings(path=docs)])
        app.close()
        print(f"indexed {args.pages or 'all'} pages: {report.chunks} chunks", file=sys.stderr)

        search = lambda i: ("/v1/search", {"query": f"{questions[i % len(questions)]}", "k": 5})  # noqa: E731
        rows["search, local ragline serve (baseline)"] = local_search(work, search, args)
        with contextlib.redirect_stdout(sys.stderr):  # Ray's own messages (its shutdown's) stay off the JSON
            rows.update(on_ray(settings, search, questions, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"pages": args.pages or "all", "clients": args.clients, "duration_s": args.duration,
                      "rows": rows}, indent=2))
    base = rows["search, local ragline serve (baseline)"]["requests_per_s"]
    ray_search = rows["search, Ray Serve ingress"]["requests_per_s"]
    batched = rows["embeddings, 1 replica, batched"]["requests_per_s"]
    unbatched = rows["embeddings, 1 replica, unbatched (max_batch_size 1)"]["requests_per_s"]
    print(f"search on Ray ÷ local: {ray_search / base:.2f}; dynamic batching gain (1 replica): {batched / unbatched:.2f}×")


def local_search(work: Path, request, args) -> dict:
    """The baseline: `ragline serve` (one process) on the same index, under the same load."""
    port = free_port()
    env = {**os.environ, "RAGLINE_CONFIG": str(work / "ragline.yaml")}
    server = subprocess.Popen(
        [sys.executable, "-m", "ragline", "serve", "--port", str(port), "--engine", "local"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(work / "local-serve.log", "w"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        return asyncio.run(load(url, request, args.clients, args.duration))
    finally:
        server.terminate()
        server.wait(timeout=30)


def on_ray(settings: Settings, search, questions: list[str], args) -> dict[str, dict]:
    import ray
    from ray import serve

    from ragline.cluster.serve import APPS, PREFIXES, EmbedderDeployment, deploy, deployment_options

    rows: dict[str, dict] = {}
    port = free_port()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        deployed = deploy(settings, "127.0.0.1", port)
        wait_ready(deployed.url)
        rows["search, Ray Serve ingress"] = asyncio.run(load(deployed.url, search, args.clients, args.duration))
        embed = lambda i: (f"{PREFIXES['embedder']}/v1/embeddings", {"input": [questions[i % len(questions)]]})  # noqa: E731
        for label, replicas, batch in (
            ("embeddings, 1 replica, batched", 1, 32),
            ("embeddings, 2 replicas, batched", 2, 32),
            ("embeddings, 1 replica, unbatched (max_batch_size 1)", 1, 1),
        ):
            options = settings.ray.serve.embedder.model_copy(
                update={"min_replicas": replicas, "max_replicas": replicas, "max_batch_size": batch}
            )
            variant = settings.model_copy(update={"ray": settings.ray.model_copy(update={
                "serve": settings.ray.serve.model_copy(update={"embedder": options})})})
            serve.run(EmbedderDeployment.options(**deployment_options("Embedder", options, variant))
                      .bind(variant, deployed.key), name=APPS["embedder"], route_prefix=PREFIXES["embedder"])
            row = asyncio.run(load(deployed.model_url, embed, args.clients, args.duration, deployed.model_headers()))
            calls = model_calls(deployed, replicas)
            row["requests_per_model_call"] = round(sum(int(k) * v for k, v in calls.items()) / max(1, sum(calls.values())), 2)
            rows[label] = row
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def model_calls(deployed, replicas: int) -> dict[str, int]:
    """Model calls by requests per call, summed over the replicas (asked until each has answered)."""
    seen: dict[str, dict[str, int]] = {}
    for _ in range(20 * replicas):
        stats = httpx.get(f"{deployed.model_url}/embedder/stats", headers=deployed.model_headers(), timeout=30).json()
        seen[stats["replica"]] = stats["batches"]
        if len(seen) == replicas:
            break
    total: dict[str, int] = {}
    for batches in seen.values():
        for size, count in batches.items():
            total[size] = total.get(size, 0) + count
    return total


async def load(url: str, request, clients: int, duration: float, headers: dict | None = None) -> dict:
    """`clients` loops sending requests for `duration` seconds; latency of each, errors counted."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + duration
    counter = iter(range(10**9))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < end:
            path, body = request(next(counter))
            started = time.perf_counter()
            try:
                response = await http.post(path, json=body, headers=headers)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        for _ in range(min(clients, 4)):  # warm-up: connections, and the first request of each path
            path, body = request(0)
            await http.post(path, json=body, headers=headers)
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    quantile = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None  # noqa: E731
    return {"requests": len(latencies), "errors": errors, "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None}


def wait_ready(url: str, process: subprocess.Popen | None = None, deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server at {url} exited ({process.returncode})")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} was not ready within {deadline_s:g}s")


def copy_pages(target: Path, limit: int) -> Path:
    pages = sorted(SAMPLES.rglob("*.html"))
    for page in pages[: limit or len(pages)]:
        copied = target / page.relative_to(SAMPLES)
        copied.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, copied)
    return target


if __name__ == "__main__":
    main()
