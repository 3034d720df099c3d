"""Ingest on a Ray cluster (`engine: ray`): the local engine's steps, with parsing and embedding spread out.

The driver scans the sources and diffs them against the manifest exactly as
the local engine does (it is the local `Indexer`, with only its parse-and-
embed step replaced), and it writes every file through the store itself, the
file's chunks and manifest row in one `upsert_document`: so the incremental
manifest and crash safety are the local engine's, and a killed job re-run
ends in the state of an uninterrupted run. In between, a Ray Dataset parses
and chunks the files in CPU tasks, each through a parse worker process
(`ParsePool`: the same per-file time and memory budgets as locally), and
embeds them in a pool of actors that load the model once each
(`embed_files`, the local engine's call). Results come back in submission
order, so the index is that of a local run. A task or actor lost with its
node is run again by Ray.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ragline.config import RaySettings, Settings
from ragline.embed.base import Embedder, EmbedderUnavailable
from ragline.ingest.chunker import Chunker
from ragline.ingest.parse import ParseJob, ParseResult
from ragline.ingest.workers import ParsePool, WorkerSetup
from ragline.pipeline import Candidate, Indexer, IngestError, IngestReport, Progress, embed_files, embedder_down
from ragline.store.base import VectorStore

RAY_MISSING = "engine ray needs Ray: pip install 'ragline[ray]'"
RAY_SOCKET_SUFFIX = len("/ray/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")
UNIX_SOCKET_MAX = 107


def where_jobs_run(settings: RaySettings) -> str:
    """The cluster a job connects to, in words (`ragline config show` prints it)."""
    if settings.address not in (None, "local"):
        return settings.address
    if settings.address is None and os.environ.get("RAY_ADDRESS"):
        return f"{os.environ['RAY_ADDRESS']} (RAY_ADDRESS)"
    cpus = settings.num_cpus or os.cpu_count()
    return f"a local Ray runtime started for the job ({cpus} CPUs)"


def keep_ray_sockets_short() -> None:
    """Point Ray's temporary folder (`RAY_TMPDIR`, inherited by the processes it starts) at /tmp when the
    default, under $TMPDIR, would make its socket paths longer than the 107 bytes a Unix socket path may have."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    if len(base) + RAY_SOCKET_SUFFIX > UNIX_SOCKET_MAX:
        os.environ["RAY_TMPDIR"] = "/tmp"


@contextmanager
def ray_connection(settings: RaySettings) -> Iterator[None]:
    """Connect to the configured cluster (or start a local runtime) for the job, and leave it afterwards;
    a process already connected (a Ray job, the tests) keeps its connection, and its runtime_env."""
    try:
        import ray
    except ImportError as exc:
        raise IngestError(RAY_MISSING) from exc
    if ray.is_initialized():
        yield
        return
    start_local = settings.address == "local" or (settings.address is None and not os.environ.get("RAY_ADDRESS"))
    options: dict[str, Any] = {
        "runtime_env": settings.runtime_env or None, "log_to_driver": False, "logging_level": logging.WARNING,
    }
    if start_local:
        keep_ray_sockets_short()
        options.update(address="local", num_cpus=settings.num_cpus, include_dashboard=False)
    else:
        options["address"] = settings.address
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise IngestError(
            f"cannot reach the Ray cluster at {where_jobs_run(settings)}: {exc}; start it (`ray start --head`) or "
            "set ray.address (--address)"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


class RayIndexer(Indexer):
    """The local indexer with its parse-and-embed step run on Ray; everything else, writes included, is its own."""

    def __init__(
        self,
        settings: Settings,
        chunker: Chunker,
        embedder: Embedder,
        store: VectorStore,
        progress: Progress | None = None,
        wait_s: float | None = None,
    ) -> None:
        super().__init__(settings.ingest, chunker, embedder, store, settings.data_dir, progress, wait_s)
        self.job_settings = settings

    def _index(self, jobs: Iterator[tuple[Candidate, ParseJob]], report: IngestReport) -> None:
        """Hand the files to Ray in one Dataset (the driver has read them to hash them), then write each
        result as it comes back, in order."""
        candidates: list[Candidate] = []
        rows: list[dict[str, Any]] = []
        for candidate, job in jobs:
            rows.append({"index": len(candidates), "job": pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)})
            candidates.append(candidate)
        if not rows:
            return
        with ray_connection(self.job_settings.ray):
            for index, result, vectors, down in self._results(rows):
                candidate = candidates[index]
                self.progress.advance(candidate.record.source)
                if not self._settle(candidate, result, report):
                    continue
                if down:
                    raise embedder_down(EmbedderUnavailable(down))
                self._store(candidate, vectors, report)

    def _results(self, rows: list[dict[str, Any]]) -> Iterator[tuple[int, ParseResult, np.ndarray | str, str]]:
        """Each file's index, parse result, and vectors (or why it has none) with, when the embedder was down,
        its error, in the order of `rows`."""
        import ray
        import ray.data

        options = self.job_settings.ray
        context = ray.data.DataContext.get_current()
        saved = context.execution_options.preserve_order, context.enable_progress_bars
        context.execution_options.preserve_order = True  # files are written, and reported, in scan order
        context.enable_progress_bars = False  # the indexer's progress (the CLI's bar) counts written files
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        workers = max(1, math.floor(options.parse_cpus))
        setup = WorkerSetup.of(self.settings.model_copy(update={"parse_workers": workers}), self.chunker)
        resources = options.resources or None
        try:
            dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / options.parse_batch_files))
            rows.clear()  # the bytes now live in Ray's object store
            parsed = dataset.map_batches(
                parse_batch, batch_size=options.parse_batch_files, fn_kwargs={"setup": setup},
                num_cpus=options.parse_cpus, resources=resources, ray_remote_args_fn=no_more_options,
            )
            embedded = parsed.map_batches(
                EmbeddingActor, batch_size=options.embed_batch_files,
                compute=ray.data.ActorPoolStrategy(size=options.embed_actors),
                fn_constructor_kwargs={"settings": self.job_settings, "expected": self.embedder.name},
                num_cpus=options.embed_cpus, num_gpus=options.embed_gpus or None, resources=resources,
            )
            for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                for index, result, vectors, down in zip(batch["index"], batch["result"], batch["vectors"], batch["down"]):
                    yield int(index), pickle.loads(result), pickle.loads(vectors) if vectors else "", str(down)
        except ray.exceptions.RayError as exc:
            raise IngestError(f"the Ray job failed: {exc}; the files written so far are kept: re-run it") from exc
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved


def no_more_options() -> dict[str, Any]:
    """The parse tasks' options beyond the step's own: none. Given as a function, they keep Ray Data from fusing
    parsing into the embedding actors (it cannot tell that they match), so files are parsed in tasks of their
    own while others are embedded. (A task lost with its node is retried by Ray Data's default.)"""
    return {}


_pool: tuple[str, ParsePool] | None = None


def parse_batch(batch: dict[str, np.ndarray], setup: WorkerSetup) -> dict[str, np.ndarray]:
    """A Ray task: parse a batch of files in this worker's parse processes (kept for the next batch)."""
    global _pool
    key = hashlib.sha256(pickle.dumps(setup)).hexdigest()
    if _pool is None or _pool[0] != key:
        if _pool is not None:
            _pool[1].close()
        _pool = key, ParsePool(setup.settings, setup.chunker())
    jobs = ((int(index), pickle.loads(job)) for index, job in zip(batch["index"], batch["job"]))
    results = [pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL) for _, result in _pool[1].map(jobs)]
    return {"index": batch["index"], "result": np.array(results, dtype=object)}


class EmbeddingActor:
    """A Ray actor that loads the embedding model once and embeds batches of parsed files."""

    def __init__(self, settings: Settings, expected: str) -> None:
        from ragline.app import Ragline  # the composition root: the model is built as everywhere else

        threads = settings.embedder.threads or max(1, math.ceil(settings.ray.embed_cpus))
        embedder_settings = settings.embedder.model_copy(update={"threads": threads})
        self.embedder = Ragline(settings.model_copy(update={"embedder": embedder_settings})).embedder
        if self.embedder.name != expected:
            raise IngestError(
                f"the embedding actor on {socket.gethostname()} loaded model {self.embedder.name!r}, the job uses {expected!r}: "
                "give every node the same embedder.model"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results: list[ParseResult] = [pickle.loads(result) for result in batch["result"]]
        wanted = [i for i, result in enumerate(results) if not result.error and not result.skipped]
        vectors, down = [b""] * len(results), [""] * len(results)
        try:
            for i, embedded in zip(wanted, embed_files(self.embedder, [results[i].chunks for i in wanted])):
                vectors[i] = pickle.dumps(embedded, protocol=pickle.HIGHEST_PROTOCOL)
        except EmbedderUnavailable as exc:  # the files not embedded yet wait for a re-run
            down = ["" if vectors[i] or i not in wanted else str(exc) for i in range(len(results))]
        return {
            "index": batch["index"], "result": batch["result"], "vectors": np.array(vectors, dtype=object),
            "down": np.array(down, dtype=object),
        }
