"""Throughput and latency of the HTTP service under concurrent clients (issue 9's load test).

    python benchmarks/load.py [--seconds 10] [--concurrency 16] [--workers 1,2] [--quick]

Indexes a small corpus (default: samples/python-docs, ~1,200 chunks) into a
temporary data folder (or `--data-dir`, reused: ingest is incremental) with
`ragline ingest`, creates one API key with `ragline keys create`, then for each
worker count starts a real `ragline serve --workers N` on loopback, waits for
`/readyz` to answer 200 and for a round of concurrent searches to all succeed
(/readyz is answered by one worker; another may still be loading), and drives
it for `--seconds` per scenario from `--concurrency` asyncio httpx clients,
each sending its next request as soon as the last one is answered
(a closed loop: the rate is what the server sustains, not an offered load):

- healthz: `GET /healthz` (no authentication, no index): the baseline, the
  floor of what one request costs in the server and this client;
- cached: `POST /v1/query` with a handful of questions answered once to warm
  the answer cache (Redis), then repeated: each answer must say "cached": true;
- search: `POST /v1/search` (k=5) with varied questions: query embedding, the
  hybrid store search, no generation;
- answers: `POST /v1/query` against a second server whose config turns the
  answer cache off, so every request retrieves, extracts and verifies an
  answer; it gets `--answer-concurrency` clients, since a worker generates
  `serve.max_concurrent_generations` answers at once and more clients only queue.

The config uses the extractive answerer (no LLM is loaded), authentication on,
Redis at `--redis-url` for the answer cache and the rate limiter, and rate
limits ON but at a million requests per second, so every request pays for its
two limiter round trips without ever being refused. The service database is
SQLite in the data folder (the default); every computed answer is recorded
there (a cached one keeps the id it was recorded under).

Per scenario: requests per second (answered / seconds from the first request to
the last answer), p50/p99 latency in ms, errors (non-2xx or exceptions) and
wrong (2xx whose body is not what the scenario expects, e.g. a cached
scenario's answer with "cached": false), beside the issue's targets. When the
time is up no new request is sent and those in flight are awaited (up to
`--drain-s`; one still running then counts as an error). The client shares the
machine's cores with the server, so on a small machine it takes a share of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml
from common import free_port

ROOT = Path(__file__).resolve().parent.parent
RAGLINE = [sys.executable, "-m", "ragline"]
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
CACHED_QUESTIONS = [
    "How do I read a JSON file into a Python dict?",
    "How do I sort a list of tuples by one of their fields?",
    "How do I count how many times each word appears in a list?",
    "How do I make a temporary directory that is deleted afterwards?",
    "How do I find all files matching a pattern like *.txt?",
]
SEARCH_QUESTIONS = [
    "How do I pretty-print JSON with indentation?",
    "sort a list in reverse order",
    "what does functools.partial do",
    "read rows from a CSV file as dictionaries",
    "split a string on a regular expression",
    "join two paths with pathlib",
    "pick a random element from a list",
    "default values for dataclass fields",
    "iterate over all combinations of a list",
    "how do exceptions propagate out of a function",
    "define a class with a class variable",
    "what is a virtual environment and how do I create one",
    "list comprehension with a condition",
    "format a float with two decimals",
    "why is 0.1 + 0.2 not equal to 0.3",
    "add a command-line option with argparse",
    "log messages to a file",
    "cache the results of a function",
    "check whether a path is a directory",
    "use a deque as a queue",
    "write a dictionary to a JSON file",
    "named tuples with field names",
    "match a pattern at the start of a string",
    "keyword arguments and default argument values",
    "import a module from a package",
    "glob recursively in subfolders",
    "shuffle a list in place",
    "the difference between a tuple and a list",
    "read a file line by line",
    "group consecutive items with itertools.groupby",
    "create a temporary file with a name",
    "handle a KeyError when a key is missing",
]
TARGETS = {"cached": 200.0, "search": 60.0}
"""Requests per second the issue asks for; every scenario must also have 0 errors."""


@dataclass
class Scenario:
    name: str
    method: str
    path: str
    bodies: list[dict] | None
    expected: Callable[[dict], bool] | None
    """Whether a 2xx body is what this scenario must return (None: any)."""
    authenticated: bool = True


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wrong: int = 0
    samples: list[str] = field(default_factory=list)
    """The first few errors and wrong answers, to say what went wrong."""
    seconds: float = 0.0

    def note(self, text: str) -> None:
        if len(self.samples) < 3:
            self.samples.append(text[:300])

    def row(self) -> dict:
        done = len(self.latencies_ms)
        return {
            "requests": done,
            "req_per_s": round(done / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(self.latencies_ms, 50)), 1) if done else None,
            "p99_ms": round(float(np.percentile(self.latencies_ms, 99)), 1) if done else None,
            "errors": self.errors,
            "wrong": self.wrong,
        }


def write_config(path: Path, data_dir: Path, corpus: Path, redis_url: str, cache: bool) -> Path:
    unlimited = {"rate_per_s": 1_000_000, "burst": 1_000_000}
    config = {
        "data_dir": str(data_dir),
        "ingest": {"sources": [{"path": str(corpus)}]},
        "generate": {"llm": {"backend": "extractive"}},
        "serve": {
            "auth": {"enabled": True},
            "redis_url": redis_url,
            "rate_limits": {"enabled": True, "per_key": unlimited, "per_ip": unlimited},
            "cache": {"enabled": cache},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def ragline(config: Path, *args: str, timeout_s: float) -> str:
    """Run a `ragline` command; its stdout, or exit naming the command and its error output."""
    command = [*RAGLINE, "--config", str(config), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"`ragline {' '.join(args)}` took over {timeout_s:g} s") from None
    if done.returncode != 0:
        raise SystemExit(f"`ragline {' '.join(args)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def prepare(config: Path) -> tuple[str, int]:
    """Index the corpus (incrementally: a reused --data-dir is quick) and create an API key: its token, the chunks."""
    ragline(config, "ingest", "--json", "--strict", timeout_s=1800)
    chunks = json.loads(ragline(config, "status", "--json", timeout_s=120))["chunks"]
    if not chunks:
        raise SystemExit("the corpus gave no chunks: pass a folder of documents with --corpus")
    created = json.loads(ragline(config, "keys", "create", "--tenant", "default", "--name", "load-benchmark", "--json",
                                 timeout_s=120))
    return created["token"], chunks


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM and wait for a clean exit; then SIGKILL whatever of its process group is left."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"the server did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM: killing it", file=sys.stderr)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # its worker processes, if any outlived it
    except ProcessLookupError:
        pass
    server.wait()


@contextmanager
def serving(config: Path, workers: int, log: Path) -> Iterator[str]:
    """A `ragline serve` in a process group of its own, ready (/readyz 200); its base URL. Stopped on exit."""
    port = free_port()
    with log.open("w") as output:
        server = subprocess.Popen(
            [*RAGLINE, "--config", str(config), "serve", "--workers", str(workers), "--port", str(port)],
            stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}) before it was ready; its log:\n{_tail(log)}")
            try:
                response = httpx.get(f"{base}/readyz", timeout=5)
                if response.status_code == 200:
                    break
                last = f"{response.status_code} {response.text[:500]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S:g} s: /readyz said {last}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(server)


async def drive(base: str, token: str, scenario: Scenario, seconds: float, concurrency: int, drain_s: float) -> Outcome:
    """`concurrency` clients in a closed loop for `seconds`, then the requests in flight awaited up to `drain_s`."""
    outcome = Outcome()
    headers = {"Authorization": f"Bearer {token}"} if scenario.authenticated else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sent = 0
    last_answer = 0.0
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=drain_s + seconds) as client:
        started = time.perf_counter()
        stop_at = started + seconds

        async def client_loop() -> None:
            nonlocal sent, last_answer
            while time.perf_counter() < stop_at:
                body = scenario.bodies[sent % len(scenario.bodies)] if scenario.bodies else None
                sent += 1
                began = time.perf_counter()
                try:
                    response = await client.request(scenario.method, scenario.path, json=body)
                except httpx.HTTPError as exc:
                    outcome.errors += 1
                    outcome.note(f"{type(exc).__name__}: {exc}")
                    continue
                finished = time.perf_counter()
                if not response.is_success:
                    outcome.errors += 1
                    outcome.note(f"{response.status_code} {response.text}")
                    continue
                outcome.latencies_ms.append((finished - began) * 1000)
                last_answer = max(last_answer, finished)
                if scenario.expected is not None and not _as_expected(scenario.expected, response):
                    outcome.wrong += 1
                    outcome.note(f"unexpected body: {response.text}")

        clients = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
        _, running = await asyncio.wait(clients, timeout=seconds + drain_s)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if running:
            outcome.errors += len(running)
            outcome.note(f"{len(running)} requests still unanswered {drain_s:g} s after the time was up")
        outcome.seconds = (last_answer or time.perf_counter()) - started
    return outcome


async def settle(base: str, token: str, connections: int) -> None:
    """Search until a round over `connections` new connections is answered 200 by all: /readyz is answered by
    one worker of several, and the others may still be loading their models (503) or running their first search."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=READY_TIMEOUT_S) as client:
        while True:
            responses = await asyncio.gather(*(
                client.post("/v1/search", json={"query": question, "k": 5})
                for question in SEARCH_QUESTIONS[:connections]
            ))
            refused = [response for response in responses if not response.is_success]
            if not refused:
                return
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{len(refused)} of {len(responses)} searches still failed {READY_TIMEOUT_S:g} s after /readyz "
                    f"said ready: {refused[0].status_code} {refused[0].text[:500]}"
                )
            await asyncio.sleep(0.5)


def _as_expected(expected: Callable[[dict], bool], response: httpx.Response) -> bool:
    try:
        return expected(response.json())
    except (ValueError, KeyError, TypeError):
        return False


async def warm_cache(base: str, token: str, questions: list[str], timeout_s: float) -> list[str]:
    """Ask each question twice (the first fills the cache); those whose second answer came from the cache
    (an answer with a note, such as an abstention, is never cached)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout_s) as client:

        async def ask(question: str) -> bool:
            response = await client.post("/v1/query", json={"query": question})
            response.raise_for_status()
            return response.json()["cached"]

        await asyncio.gather(*(ask(question) for question in questions))
        cached = await asyncio.gather(*(ask(question) for question in questions))
    return [question for question, hit in zip(questions, cached) if hit]


def print_table(rows: list[dict]) -> None:
    columns = [
        "workers", "scenario", "concurrency", "requests", "req_per_s", "p50_ms", "p99_ms", "errors", "wrong", "target",
    ]  # fmt: skip
    text = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in text)) for i, column in enumerate(columns)]
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for line in text:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def target(name: str, row: dict) -> str:
    wanted = TARGETS.get(name)
    met = row["errors"] == 0 and row["wrong"] == 0 and (wanted is None or row["req_per_s"] >= wanted)
    return ("met" if met else "MISSED") + (f" (>= {wanted:g}/s, 0 errors)" if wanted else " (0 errors)")


def _stopped(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers are stopped on the way out."""
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="load time of each scenario")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="clients of the healthz, cached and search scenarios"
    )
    parser.add_argument("--answer-concurrency", type=int, default=4, help="clients of the answers scenario")
    parser.add_argument("--workers", default="1,2", help="server process counts, comma separated")
    parser.add_argument("--corpus", type=Path, default=ROOT / "samples" / "python-docs", help="folder to index")
    parser.add_argument("--data-dir", type=Path, help="keep the index here and reuse it (default: a temporary one)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--drain-s", type=float, default=60.0, help="longest wait for requests in flight at the end")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per scenario, 1 worker")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.workers = 2.0, "1"
    worker_counts = [int(count) for count in args.workers.split(",") if count.strip()]
    signal.signal(signal.SIGTERM, _stopped)

    with tempfile.TemporaryDirectory(prefix="ragline-load-") as tmp:
        folder = Path(tmp)
        data_dir = (args.data_dir or folder / "data").resolve()
        corpus = args.corpus.resolve()
        cached_config = write_config(folder / "cached.yaml", data_dir, corpus, args.redis_url, cache=True)
        uncached_config = write_config(folder / "uncached.yaml", data_dir, corpus, args.redis_url, cache=False)
        started = time.perf_counter()
        token, chunks = prepare(cached_config)
        print(f"indexed {args.corpus} ({chunks} chunks) in {time.perf_counter() - started:.0f} s", file=sys.stderr)

        rows: list[dict] = []
        problems: list[str] = []

        def measure(base: str, workers: int, scenario: Scenario, concurrency: int) -> None:
            outcome = asyncio.run(drive(base, token, scenario, args.seconds, concurrency, args.drain_s))
            row = {"workers": workers, "scenario": scenario.name, "concurrency": concurrency, **outcome.row()}
            row["target"] = target(scenario.name, row)
            rows.append(row)
            problems.extend(f"{workers} worker(s), {scenario.name}: {sample}" for sample in outcome.samples)
            print(f"  {scenario.name}: {row['req_per_s']} req/s, p50 {row['p50_ms']} ms", file=sys.stderr)

        for workers in worker_counts:
            print(f"{workers} worker(s): starting the server", file=sys.stderr)
            with serving(cached_config, workers, folder / f"serve-{workers}.log") as base:
                asyncio.run(settle(base, token, args.concurrency))
                measure(base, workers, Scenario("healthz", "GET", "/healthz", None, None, authenticated=False),
                        args.concurrency)
                questions = asyncio.run(warm_cache(base, token, CACHED_QUESTIONS, args.drain_s))
                if not questions:
                    raise SystemExit("no answer was cached after its question was asked twice: is serve.cache working?")
                measure(base, workers, Scenario(
                    "cached", "POST", "/v1/query", [{"query": q} for q in questions],
                    lambda body: body["cached"] is True,
                ), args.concurrency)
                measure(base, workers, Scenario(
                    "search", "POST", "/v1/search", [{"query": q, "k": 5} for q in SEARCH_QUESTIONS],
                    lambda body: bool(body["hits"]),
                ), args.concurrency)
            with serving(uncached_config, workers, folder / f"serve-{workers}-uncached.log") as base:
                asyncio.run(settle(base, token, args.concurrency))
                measure(base, workers, Scenario(
                    "answers", "POST", "/v1/query", [{"query": q} for q in SEARCH_QUESTIONS],
                    lambda body: body["cached"] is False and bool(body["answer"]),
                ), args.answer_concurrency)

    print(f"\n{args.seconds:g} s per scenario; corpus {args.corpus.name} ({chunks} chunks); "
          "healthz is the baseline (no auth, no index)")
    print_table(rows)
    if problems:
        print("\nfirst errors / wrong answers:")
        for problem in problems:
            print(f"  {problem}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
