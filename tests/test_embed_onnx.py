"""The onnx embedder gives the PyTorch embedder's vectors, from an export made once and kept safe on disk.

Exports go to a temporary cache folder of this module (the first one takes a
few seconds of torch.onnx.export); the reference is the session's PyTorch
`embedder` on the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragline import registry
from ragline.config import EmbedderSettings
from ragline.embed.base import Embedder, EmbedderError
from ragline.embed.onnx import OnnxEmbedder, _write_atomically

PARAGRAPH = (
    "The json module encodes Python objects as JSON text and decodes JSON documents back into dictionaries, "
    "lists, strings, numbers, booleans and None. Custom encoders subclass JSONEncoder and override default(); "
    "object_hook turns decoded dictionaries into other objects. "
)
QUERIES = [
    "how do I parse JSON?",
    "install",
    "What does asyncio.gather return when one task fails?",
    "Wie öffne ich eine Datei im Binärmodus?",
    "comment lire un fichier ligne par ligne ?",
    "如何在 Python 中读取文件？",
    "ファイルを開く方法",
    "Как отсортировать словарь по значению?",
    "regex for an email address 📧",
    "",
]
PASSAGES = [
    "Ragline indexes Markdown, HTML, PDF and DOCX files into a local vector store.",
    "Ray Serve scales model replicas across a cluster.",
    "def read(path):\n    with open(path, encoding='utf-8') as f:\n        return f.read()",
    "   leading and trailing whitespace   \n\n",
    "naïve café déjà vu — «quotes» and ‘curly’ ones",
    "数据库连接池的大小应当与工作线程数相匹配。",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "SELECT chunk_id, text FROM chunks WHERE doc_id = ? ORDER BY seq;",
    "A" * 40,
    "Ελληνικά: το γρήγορο καφέ αλεπού πηδάει πάνω από το τεμπέλικο σκυλί.",
    "Tabelle: Größe | Gewicht | Höhe\n1 | 2 | 3",
    "emoji 🚀🔥 in a sentence about deployment 🎉",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares of even numbers",
    PARAGRAPH * 2,  # ~135 tokens
    PARAGRAPH * 3 + "Encoders may also be registered for Decimal numbers, dates and times.",  # ~220: near the limit
    PARAGRAPH * 4,  # ~270 tokens: just past it
    PARAGRAPH * 20,  # far past it: truncated
    "\n".join(f"line {n}: Überprüfung der Einträge Nummer {n}" for n in range(40)),
    "ok",
    "http://example.com/path?query=1&other=two#fragment",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_fp32(cache_dir) -> OnnxEmbedder:
    return OnnxEmbedder(EmbedderSettings(backend="onnx"), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def onnx_int8(cache_dir, onnx_fp32) -> OnnxEmbedder:
    return OnnxEmbedder(EmbedderSettings(backend="onnx", precision="int8"), cache_dir=cache_dir)


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_sample_spans_short_texts_and_texts_past_the_token_limit(embedder):
    lengths = [len(embedder.tokenizer.encode(text).ids) for text in PASSAGES]
    assert min(lengths) <= 4 and max(lengths) > 2 * embedder.max_tokens
    assert any(embedder.max_tokens - 50 <= n <= embedder.max_tokens for n in lengths)


def test_the_registry_resolves_onnx():
    assert registry.resolve("embedder", "onnx") is OnnxEmbedder
    assert "onnx" in registry.names("embedder")


def test_same_identity_as_the_pytorch_embedder(embedder, onnx_fp32, onnx_int8):
    for onnx in (onnx_fp32, onnx_int8):
        assert isinstance(onnx, Embedder)
        assert (onnx.name, onnx.dim, onnx.max_tokens) == (embedder.name, embedder.dim, embedder.max_tokens)
        assert onnx.tokenizer.encode(PASSAGES[-4]).ids == embedder.tokenizer.encode(PASSAGES[-4]).ids


@pytest.mark.parametrize("precision, floor", [("fp32", 0.9999), ("int8", 0.99)])
def test_vectors_match_pytorch(embedder, onnx_fp32, onnx_int8, precision, floor):
    onnx = onnx_fp32 if precision == "fp32" else onnx_int8
    for embed, reference in [(onnx.embed_documents, embedder.embed_documents),
                             (onnx.embed_queries, embedder.embed_queries)]:
        texts = QUERIES + PASSAGES
        vectors = embed(texts)
        assert vectors.shape == (len(texts), embedder.dim) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cosines = rowwise_cosine(vectors, reference(texts))
        assert cosines.min() >= floor, [(texts[i][:30], float(cosines[i])) for i in np.argsort(cosines)[:3]]


def test_truncation_at_max_tokens_and_batching_do_not_change_vectors(onnx_fp32):
    long = PARAGRAPH * 20
    kept_ids = onnx_fp32.tokenizer.encode(long).ids[1 : onnx_fp32.max_tokens - 1]  # without [CLS] and [SEP]
    kept = onnx_fp32.tokenizer.decode(kept_ids)
    together = onnx_fp32.embed_documents([long, kept, "short"])
    assert float(together[0] @ together[1]) > 0.9999
    one_by_one = np.concatenate([onnx_fp32.embed_documents([text]) for text in [long, kept, "short"]])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert onnx_fp32.embed_documents([]).shape == (0, onnx_fp32.dim)


def test_query_and_document_prefixes_are_applied(embedder, cache_dir):
    onnx = OnnxEmbedder(
        EmbedderSettings(backend="onnx", query_prefix="query: ", document_prefix="passage: "), cache_dir=cache_dir
    )
    queries, documents = onnx.embed_queries(["json"]), onnx.embed_documents(["json"])
    assert rowwise_cosine(queries, embedder.embed_queries(["query: json"]))[0] > 0.9999
    assert rowwise_cosine(documents, embedder.embed_documents(["passage: json"]))[0] > 0.9999
    assert float(queries[0] @ documents[0]) < 0.999  # the prefixes change the vectors


def test_a_cached_export_is_reused(cache_dir, onnx_fp32, onnx_int8):
    before = {path.name: path.stat() for path in onnx_int8.model_path.parent.iterdir()}
    assert set(before) == {"model-fp32.onnx", "model-int8.onnx"}  # no temporary file left behind
    OnnxEmbedder(EmbedderSettings(backend="onnx"), cache_dir=cache_dir)
    OnnxEmbedder(EmbedderSettings(backend="onnx", precision="int8"), cache_dir=cache_dir)
    after = {path.name: path.stat() for path in onnx_int8.model_path.parent.iterdir()}
    assert {name: (s.st_ino, s.st_mtime_ns) for name, s in after.items()} == {
        name: (s.st_ino, s.st_mtime_ns) for name, s in before.items()
    }
    assert onnx_fp32.model_path.parent.name.startswith(f"{onnx_fp32.name}-")


def truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_a_truncated_fp32_export_is_made_again(embedder, onnx_fp32, tmp_path):
    shutil.copytree(onnx_fp32.model_path.parent, tmp_path / onnx_fp32.model_path.parent.name)
    damaged = tmp_path / onnx_fp32.model_path.parent.name / "model-fp32.onnx"
    full_size = damaged.stat().st_size
    truncate(damaged)
    onnx = OnnxEmbedder(EmbedderSettings(backend="onnx"), cache_dir=tmp_path)
    assert onnx.model_path == damaged and damaged.stat().st_size == full_size
    assert rowwise_cosine(onnx.embed_documents(PASSAGES), embedder.embed_documents(PASSAGES)).min() > 0.9999


def test_a_truncated_int8_export_is_quantized_again_without_exporting(embedder, onnx_int8, tmp_path):
    folder = tmp_path / onnx_int8.model_path.parent.name
    shutil.copytree(onnx_int8.model_path.parent, folder)
    fp32_before = (folder / "model-fp32.onnx").stat()
    int8_size = (folder / "model-int8.onnx").stat().st_size
    truncate(folder / "model-int8.onnx")
    onnx = OnnxEmbedder(EmbedderSettings(backend="onnx", precision="int8"), cache_dir=tmp_path)
    assert (folder / "model-int8.onnx").stat().st_size == int8_size
    fp32_after = (folder / "model-fp32.onnx").stat()
    assert (fp32_after.st_ino, fp32_after.st_mtime_ns) == (fp32_before.st_ino, fp32_before.st_mtime_ns)
    assert rowwise_cosine(onnx.embed_documents(PASSAGES), embedder.embed_documents(PASSAGES)).min() > 0.99


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model-fp32.onnx"
    target.write_bytes(b"complete old export")

    def fail_midway(path: Path) -> None:
        path.write_bytes(b"half of a new exp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_atomically(target, fail_midway)
    assert target.read_bytes() == b"complete old export"
    assert [path.name for path in tmp_path.iterdir()] == ["model-fp32.onnx"]


def test_a_killed_export_leaves_only_a_temporary_file_which_a_later_export_removes(tmp_path):
    """A process killed while writing (SIGKILL: no cleanup runs) never touches the target name."""
    script = (
        "import os, sys; from pathlib import Path; from ragline.embed.onnx import _write_atomically\n"
        "def write(path):\n"
        "    path.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
        "_write_atomically(Path(sys.argv[1]), write)\n"
    )
    target = tmp_path / "model-fp32.onnx"
    finished = subprocess.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert finished.returncode == -9 and not target.exists()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model-fp32.") and left.name.endswith(".tmp")
    os.utime(left, (0, 0))  # older than any export can take
    _write_atomically(target, lambda path: path.write_bytes(b"new export"))
    assert [path.name for path in tmp_path.iterdir()] == ["model-fp32.onnx"]


def test_a_cached_export_loads_without_torch_and_a_missing_one_asks_for_it(onnx_fp32, cache_dir, tmp_path):
    script = (
        "import json, sys\n"
        "for name in ('torch', 'transformers', 'sentence_transformers'):\n"
        "    sys.modules[name] = None  # importing them now fails, as where they are not installed\n"
        "from pathlib import Path\n"
        "from ragline.config import EmbedderSettings\n"
        "from ragline.embed.base import EmbedderError\n"
        "from ragline.embed.onnx import OnnxEmbedder\n"
        "vector = OnnxEmbedder(EmbedderSettings(backend='onnx'), cache_dir=Path(sys.argv[1])).embed_queries(['json'])\n"
        "try:\n"
        "    OnnxEmbedder(EmbedderSettings(backend='onnx'), cache_dir=Path(sys.argv[2]))\n"
        "    error = ''\n"
        "except EmbedderError as exc:\n"
        "    error = str(exc)\n"
        "print(json.dumps({'vector': vector[0].tolist(), 'error': error}))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script, str(cache_dir), str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    answer = json.loads(finished.stdout)
    np.testing.assert_allclose(answer["vector"], onnx_fp32.embed_queries(["json"])[0], atol=1e-6)
    assert "ragline[local]" in answer["error"] and "PyTorch" in answer["error"]
    assert not any((tmp_path / "empty").rglob("*.onnx"))


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now fails, as where it is not installed
    with pytest.raises(EmbedderError, match=r"ragline\[onnx\]"):
        OnnxEmbedder(EmbedderSettings(backend="onnx"), cache_dir=tmp_path)


def test_a_missing_model_folder_is_reported(tmp_path):
    with pytest.raises(EmbedderError, match="not found"):
        OnnxEmbedder(EmbedderSettings(backend="onnx", model=str(tmp_path / "no-such-model")), cache_dir=tmp_path)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path, onnx_fp32):
    shutil.copytree(onnx_fp32.model_path.parent, tmp_path / "onnx" / onnx_fp32.model_path.parent.name)
    monkeypatch.setenv("RAGLINE_CACHE_DIR", str(tmp_path))
    onnx = OnnxEmbedder(EmbedderSettings(backend="onnx"))
    assert onnx.model_path == tmp_path / "onnx" / onnx_fp32.model_path.parent.name / "model-fp32.onnx"
