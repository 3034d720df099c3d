"""Parse files in worker processes, each file under a time and a memory budget.

A loader that loops, crashes or eats memory on a pathological file must cost
that file only. Each worker is a fresh interpreter (`python -m
ragline.ingest.workers`: never a fork of the parent, which has torch loaded)
that imports only the ingest stage and rebuilds the tokenizer from its JSON.
It caps its own address space (RLIMIT_AS) at its baseline plus
`ingest.file_memory_mb`; the parent kills a worker whose file runs past
`ingest.file_timeout_s` and starts another. Jobs and results travel as
length-prefixed pickles over the worker's stdin and stdout, and results come
back in submission order, so the index is exactly that of a serial run.
"""

from __future__ import annotations

import importlib
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Generic, TypeVar

from tokenizers import Tokenizer

from ragline.config import IngestSettings
from ragline.ingest.chunker import Chunker
from ragline.ingest.parse import ParseJob, ParseResult, parse_file

Key = TypeVar("Key")

STARTUP_TIMEOUT_S = 120.0
"""Longest a worker may take to import the loaders and say it is ready (a loaded machine is slow)."""

_FRAME = struct.Struct("!Q")
_READY = "ready"
_PARENT_ENV = "RAGLINE_PARSE_PARENT"
_PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """The parse workers could not be started: the run cannot go on."""


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker needs to parse: the settings and the chunker, rebuilt on its side."""

    settings: IngestSettings
    tokenizer_json: str
    chunk_tokens: int
    overlap_tokens: int
    document_prefix: str

    @classmethod
    def of(cls, settings: IngestSettings, chunker: Chunker) -> WorkerSetup:
        return cls(
            settings, chunker.tokenizer.to_str(), chunker.chunk_tokens, chunker.overlap_tokens,
            chunker.document_prefix,
        )

    def chunker(self) -> Chunker:
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return Chunker(tokenizer, self.chunk_tokens, self.overlap_tokens, self.document_prefix)


def import_loader_modules(settings: IngestSettings) -> None:
    """Import the modules of `ingest.loader_modules`, which register extra loaders."""
    for name in settings.loader_modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise WorkerError(f"ingest.loader_modules: cannot import {name!r}: {exc}") from exc


def _write(stream: IO[bytes], message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME.pack(len(payload)) + payload)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the stream."""
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


class _Worker:
    """One worker process and the job it is parsing."""

    def __init__(self, setup: WorkerSetup) -> None:
        env = {
            **os.environ,
            "MALLOC_ARENA_MAX": "2",  # thread arenas would reserve address space the budget is for
            "RAYON_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            _PARENT_ENV: str(os.getpid()),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ragline.ingest.workers"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        self.job: int | None = None  # index of the job being parsed
        self.deadline = 0.0
        _write(self.process.stdin, setup)
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        ready = selector.select(STARTUP_TIMEOUT_S)
        selector.close()
        answer = _read(self.process.stdout) if ready else None
        if answer != _READY:
            self.kill()
            reason = answer if isinstance(answer, str) else f"no answer in {STARTUP_TIMEOUT_S:g} s"
            raise WorkerError(f"a parse worker failed to start: {reason}")

    def start(self, index: int, job: ParseJob, timeout_s: float) -> None:
        self.job, self.deadline = index, time.monotonic() + timeout_s
        _write(self.process.stdin, job)

    def result(self) -> ParseResult | None:
        """The finished job's result, or None when the worker died."""
        self.job = None
        return _read(self.process.stdout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass  # a pipe to a killed process may fail to flush


class ParsePool(Generic[Key]):
    """Parses jobs in `ingest.parse_workers` processes, started on first use; use it as a context manager."""

    def __init__(self, settings: IngestSettings, chunker: Chunker) -> None:
        self.settings = settings
        self._setup = WorkerSetup.of(settings, chunker)
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()
        # Results wait in order behind a slow file; bound how many (each holds its chunks).
        self._window = 16 * settings.parse_workers + 64

    def __enter__(self) -> ParsePool[Key]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers.clear()
        self._selector.close()

    def map(self, items: Iterable[tuple[Key, ParseJob]]) -> Iterator[tuple[Key, ParseResult]]:
        """Each item's key with the result of its job, in the items' order.

        Items are pulled lazily, only as workers free up, so that file contents are read
        just before they are parsed.
        """
        source = iter(items)
        keys: dict[int, Key] = {}
        done: dict[int, ParseResult] = {}
        queued: deque[tuple[int, ParseJob]] = deque()
        pulled = emitted = 0
        exhausted = False
        while True:
            while not exhausted and len(queued) < self.settings.parse_workers and pulled - emitted < self._window:
                try:
                    key, job = next(source)
                except StopIteration:
                    exhausted = True
                    break
                keys[pulled] = key
                queued.append((pulled, job))
                pulled += 1
            while queued and (worker := self._idle_worker()) is not None:
                index, job = queued.popleft()
                try:
                    worker.start(index, job, self.settings.file_timeout_s)
                except OSError:  # the worker died between jobs
                    done[index] = ParseResult(error=f"the parser died (worker exit code {self._replace(worker)})")
            while emitted in done:
                yield keys.pop(emitted), done.pop(emitted)
                emitted += 1
            if exhausted and emitted == pulled:
                return
            if any(worker.job is not None for worker in self._workers):
                done.update(self._wait())

    def _idle_worker(self) -> _Worker | None:
        for worker in self._workers:
            if worker.job is None:
                return worker
        if len(self._workers) < self.settings.parse_workers:
            worker = _Worker(self._setup)
            self._workers.append(worker)
            self._selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
            return worker
        return None

    def _wait(self) -> dict[int, ParseResult]:
        """Results of the jobs that finish (or run out of time) first."""
        busy = [worker for worker in self._workers if worker.job is not None]
        timeout = max(0.0, min(worker.deadline for worker in busy) - time.monotonic())
        finished: dict[int, ParseResult] = {}
        for selected, _ in self._selector.select(timeout):
            worker: _Worker = selected.data
            index = worker.job
            if index is None:
                continue
            result = worker.result()
            if result is None:
                code = self._replace(worker)
                result = ParseResult(
                    error=f"the parser crashed on this file (worker exit code {code}; out of ingest.file_memory_mb?)"
                )
            finished[index] = result
        now = time.monotonic()
        for worker in busy:
            if worker.job is not None and worker.job not in finished and worker.deadline <= now:
                finished[worker.job] = ParseResult(
                    error=f"parsing took longer than ingest.file_timeout_s ({self.settings.file_timeout_s:g} s)"
                )
                self._replace(worker)
        return finished

    def _replace(self, worker: _Worker) -> int:
        """Kill a worker (a new one starts when needed); return its exit code."""
        self._selector.unregister(worker.process.stdout)
        worker.kill()
        self._workers.remove(worker)
        return worker.process.returncode


def _limit_memory(megabytes: int) -> None:
    """Cap the address space at what the worker uses now plus the per-file budget (Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            baseline = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError):
        return
    limit = baseline + megabytes * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the ingest dies (even by SIGKILL): a looping loader must not outlive it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the worker still ends when its stdin closes, after the current file
    if str(os.getppid()) != os.environ.get(_PARENT_ENV):
        os._exit(0)  # the parent died before the request was made


def serve() -> None:
    """The worker's loop: read the setup, then answer each job with its result until stdin closes."""
    _die_with_parent()
    jobs, results = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a loader that prints must not corrupt the result stream
    setup: WorkerSetup = _read(jobs)
    try:
        import_loader_modules(setup.settings)
        chunker = setup.chunker()
    except Exception as exc:
        _write(results, f"{type(exc).__name__}: {exc}")
        return
    _limit_memory(setup.settings.file_memory_mb)
    _write(results, _READY)
    while (job := _read(jobs)) is not None:
        _write(results, parse_file(job, setup.settings, chunker))


if __name__ == "__main__":
    serve()
