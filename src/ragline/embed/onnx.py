"""A sentence-transformers model run by ONNX Runtime: the same vectors as PyTorch, faster on CPU.

The transformer is exported to ONNX once (that first run needs PyTorch, the
`local` extra) into a cache folder keyed by a hash of the model's weights and
config; later runs load the cached file with onnxruntime and `tokenizers`
only. `precision: int8` quantizes the weights (dynamic quantization); what
that gains depends on the CPU's int8 instructions: on an AVX2 CPU without
VNNI, int8 matrix products are only ~1.3x fp32's, and MiniLM encodes 1.17x
faster than with PyTorch (fp32: 1.08x; benchmarks/embed_onnx.py).
Tokenization, truncation, pooling and normalization follow the model's own
sentence-transformers files, so the vectors match the PyTorch embedder's
within rounding (fp32, cosine > 0.99999) or quantization error (int8,
cosine > 0.99).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from ragline.config import EmbedderSettings
from ragline.embed.base import EmbedderError, load_tokenizer, normalize
from ragline.embed.sentence_transformer import resolve_model_dir

CACHE_DIR_VARIABLE = "RAGLINE_CACHE_DIR"
"""Environment variable: root of Ragline's caches (default ~/.cache/ragline); exports go to its `onnx` folder."""

EXPORT_VERSION = 1
"""Part of every cache key: bump it when the export changes, so older exports are not reused."""

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
STALE_TEMP_S = 3600.0
"""A temporary file older than this was left by an export that was killed: removed by the next export."""

WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
"""Pooling modes this backend computes, in the order sentence-transformers concatenates them."""
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def default_cache_dir() -> Path:
    """`$RAGLINE_CACHE_DIR/onnx`, or ~/.cache/ragline/onnx."""
    root = os.environ.get(CACHE_DIR_VARIABLE)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ragline") / "onnx"


@dataclass(frozen=True)
class ModelLayout:
    """What the sentence-transformers files of a model folder say about running it."""

    transformer_dir: Path
    max_tokens: int
    lower_case: bool
    pooling: tuple[str, ...]
    hidden_size: int

    @property
    def dim(self) -> int:
        return self.hidden_size * len(self.pooling)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmbedderError(f"cannot read {path}: {exc}") from exc


def read_layout(model_dir: Path) -> ModelLayout:
    """Transformer folder, token limit and pooling from modules.json (a plain transformer: mean pooling)."""
    modules = _read_json(model_dir / "modules.json") if (model_dir / "modules.json").is_file() else []
    transformer_dir, pooling_dir = model_dir, None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            transformer_dir = model_dir / module.get("path", "")
        elif kind == "Pooling":
            pooling_dir = model_dir / module["path"]
        elif kind != "Normalize":
            raise EmbedderError(
                f"{model_dir} has a {kind} module, which the onnx backend does not run: "
                "use embedder.backend sentence-transformers for this model"
            )
    config = _read_json(transformer_dir / "config.json")
    st_config_path = transformer_dir / "sentence_bert_config.json"
    st_config = _read_json(st_config_path) if st_config_path.is_file() else {}
    tokenizer_config_path = transformer_dir / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    # sentence-transformers: max_seq_length, else the tokenizer's limit, capped by the position table.
    limits = [st_config.get("max_seq_length") or tokenizer_config.get("model_max_length"),
              config.get("max_position_embeddings")]
    limits = [int(limit) for limit in limits if isinstance(limit, (int, float)) and 0 < limit < 1e9]
    if not limits:
        raise EmbedderError(f"{transformer_dir} states no token limit (sentence_bert_config.json max_seq_length)")
    pooling = _pooling_modes(_read_json(pooling_dir / "config.json")) if pooling_dir else ("mean",)
    return ModelLayout(
        transformer_dir=transformer_dir,
        max_tokens=min(limits),
        lower_case=bool(st_config.get("do_lower_case", False)),
        pooling=pooling,
        hidden_size=int(config["hidden_size"]),
    )


def _pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = {name for key, name in LEGACY_POOLING_KEYS.items() if config.get(key)} or {"mean"}
    else:
        modes = {mode} if isinstance(mode, str) else set(mode)
    unsupported = modes - set(POOLING_MODES)
    if unsupported:
        raise EmbedderError(
            f"pooling {', '.join(sorted(unsupported))} is not implemented by the onnx backend: "
            "use embedder.backend sentence-transformers for this model"
        )
    return tuple(name for name in POOLING_MODES if name in modes)


def pool(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Token vectors (batch, tokens, hidden) to one vector per text, as sentence-transformers' Pooling does."""
    weights = mask[:, :, None].astype(np.float32)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])  # right padding: the first token is always a real one
        elif mode == "max":
            parts.append(np.where(weights > 0, hidden, -np.inf).max(axis=1))
        else:
            lengths = np.maximum(weights.sum(axis=1), 1e-9)
            summed = (hidden * weights).sum(axis=1)
            parts.append(summed / (lengths if mode == "mean" else np.sqrt(lengths)))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def cache_key(layout: ModelLayout) -> str:
    """A short hash of the weights and config: a changed model never loads an old export."""
    digest = hashlib.sha256(f"ragline-onnx-export-{EXPORT_VERSION}-opset-{OPSET}".encode())
    files = sorted({path for pattern in WEIGHT_FILE_PATTERNS for path in layout.transformer_dir.glob(pattern)})
    if not files:
        raise EmbedderError(f"{layout.transformer_dir} has no weight file (*.safetensors or pytorch_model*.bin)")
    for path in [layout.transformer_dir / "config.json", *files]:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write` into a temporary file beside `target`, then rename it over `target`.

    Readers see the old file or the complete new one, never a partial one: two
    processes exporting at once each rename a complete file, and an export
    killed midway leaves only its temporary file (removed by a later export).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in target.parent.glob(".*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_TEMP_S:
                stale.unlink()
        except FileNotFoundError:
            pass  # another process removed it first
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def export_fp32(layout: ModelLayout, target: Path) -> None:
    """Export the transformer (token vectors out) with dynamic batch and sequence axes."""
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise EmbedderError(
            f"no ONNX export at {target} yet, and making it needs PyTorch once: `pip install 'ragline[local]'` "
            "(later runs load the export with onnxruntime alone), or copy the cache folder from a machine that has it"
        ) from exc

    model = AutoModel.from_pretrained(str(layout.transformer_dir), attn_implementation="eager").float().eval()
    accepted = inspect.signature(model.forward).parameters
    names = [name for name in INPUT_NAMES if name in accepted]

    class TokenVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    # Two rows, one padded: the traced graph must keep the attention mask as a real input.
    sample = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "token_type_ids": torch.zeros(2, 5, dtype=torch.long),
    }
    axes = {0: "batch", 1: "sequence"}

    def write(path: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                TokenVectors(),
                tuple(sample[name] for name in names),
                str(path),
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: axes for name in [*names, OUTPUT_NAME]},
                opset_version=OPSET,
                dynamo=False,  # the torch.export-based exporter needs onnxscript, which no extra installs
            )

    _write_atomically(target, write)


CALIBRATION_TEXTS = (
    "ok",
    "how do I parse JSON?",
    "The quick brown fox jumps over the lazy dog.",
    "def read(path):\n    with open(path) as f:\n        return f.read()",
    "数据库连接池的大小应当与工作线程数相匹配。",
    "Installation: pip install the package, then run the command line tool with a config file. " * 4,
)
"""Texts whose activations set the int8 smoothing scales: the outlier channels are the model's, not the text's."""


def quantize_int8(source: Path, target: Path, encoder: Tokenizer) -> None:
    """Dynamic int8 quantization of the fp32 export, made accurate enough to share an index with it.

    Plain `quantize_dynamic` gives cosines down to 0.90 to PyTorch on MiniLM, for three reasons, each met here:
    - A few input channels carry outliers (~28 where the rest stay below 3, on [CLS]) and the activations get
      one scale per tensor. As in SmoothQuant, each channel of a MatMul input is divided by
      s = sqrt(max|x| / max|w|) (x measured on CALIBRATION_TEXTS) and the weight row multiplied by it:
      the product is unchanged, the ranges even out.
    - The FFN down-projections (weights taller than wide) read GELU outputs whose outliers smoothing does not
      tame: they stay fp32 (about a third of the multiply-adds).
    - Weights are QUInt8: on x86 CPUs without VNNI, ONNX Runtime's u8×s8 kernel saturates its int16 sums.
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    weights = {initializer.name: initializer for initializer in model.graph.initializer}
    readers: dict[str, list[Any]] = {}  # activation tensor -> the quantized MatMuls that read it
    for node in model.graph.node:
        dims = weights[node.input[1]].dims if node.op_type == "MatMul" and node.input[1] in weights else []
        if len(dims) == 2 and dims[0] <= dims[1] and node.name:
            readers.setdefault(node.input[0], []).append(node)
    maxima = _activation_maxima(model, list(readers), encoder)
    smoothing = {}
    for index, (tensor, nodes) in enumerate(readers.items()):
        matrices = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        weight_max = np.max([np.abs(matrix).max(axis=1) for matrix in matrices], axis=0)
        scale = np.clip(np.sqrt(np.maximum(maxima[tensor], 1e-5) / np.maximum(weight_max, 1e-5)), 1e-2, 1e2)
        for node, matrix in zip(nodes, matrices):
            weights[node.input[1]].CopyFrom(
                numpy_helper.from_array((matrix * scale[:, None]).astype(np.float32), node.input[1])
            )
            node.input[0] = f"{tensor}/smoothed"
        inverse = numpy_helper.from_array((1 / scale).astype(np.float32), f"smoothing_{index}")
        model.graph.initializer.append(inverse)
        smoothing[f"{tensor}/smoothed"] = helper.make_node(
            "Mul", [tensor, inverse.name], [f"{tensor}/smoothed"], name=f"smoothing_{index}"
        )
    ordered = []
    for node in model.graph.node:  # each Mul goes right before the first node that reads it
        ordered += [smoothing.pop(name) for name in node.input if name in smoothing]
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)

    def write(path: Path) -> None:
        quiet = _DropMessage("pre-processing")  # its shape inference does not finish on these graphs
        logging.getLogger().addFilter(quiet)
        try:
            quantize_dynamic(
                model, path, weight_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                nodes_to_quantize=[node.name for nodes in readers.values() for node in nodes],
            )
        finally:
            logging.getLogger().removeFilter(quiet)

    _write_atomically(target, write)


def _activation_maxima(model: Any, tensors: list[str], encoder: Tokenizer) -> dict[str, np.ndarray]:
    """Per-channel max |value| of `tensors` over CALIBRATION_TEXTS, each text run alone (no padding)."""
    import onnx
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(tensor) for tensor in tensors)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    maxima = {tensor: np.zeros(1, dtype=np.float32) for tensor in tensors}
    for encoding in encoder.encode_batch(list(CALIBRATION_TEXTS)):
        length = sum(encoding.attention_mask)
        arrays = {
            "input_ids": encoding.ids[:length], "attention_mask": encoding.attention_mask[:length],
            "token_type_ids": encoding.type_ids[:length],
        }
        values = session.run(tensors, {name: np.array([arrays[name]], dtype=np.int64) for name in inputs})
        for tensor, value in zip(tensors, values):
            maxima[tensor] = np.maximum(maxima[tensor], np.abs(value).reshape(-1, value.shape[-1]).max(axis=0))
    return maxima


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


class OnnxEmbedder:
    """Batched, normalized embeddings of a local sentence-transformers model, run by ONNX Runtime.

    `name` is the PyTorch embedder's name for the same model, so an index built
    with either backend can be searched with the other: their vectors agree to
    cosine ≥ 0.99 (int8) or ~0.99999 (fp32). `cache_dir` holds the exports (default:
    `$RAGLINE_CACHE_DIR/onnx`, else ~/.cache/ragline/onnx); nothing is ever
    downloaded.
    """

    def __init__(self, settings: EmbedderSettings, cache_dir: Path | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise EmbedderError("onnxruntime is not installed: `pip install 'ragline[onnx]'`") from exc
        if settings.device != "cpu":
            raise EmbedderError(
                f"the onnx backend runs on the CPU, not {settings.device!r}: set embedder.device to cpu, "
                "or use embedder.backend sentence-transformers"
            )
        model_dir = resolve_model_dir(settings.model)
        layout = read_layout(model_dir)
        self.name = settings.model if not Path(settings.model).is_dir() else model_dir.name
        self.dim = layout.dim
        self.max_tokens = layout.max_tokens
        self.tokenizer = load_tokenizer(str(layout.transformer_dir / "tokenizer.json"))
        self.precision = settings.precision
        self._pooling = layout.pooling
        self._lower_case = layout.lower_case
        self._batch_size = settings.batch_size
        self._query_prefix = settings.query_prefix
        self._document_prefix = settings.document_prefix
        self._encoder = _batch_tokenizer(layout)

        folder = (cache_dir or default_cache_dir()) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}-{cache_key(layout)}"
        self.model_path = folder / f"model-{settings.precision}.onnx"
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if settings.threads is not None:
            options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        self._session = self._open(onnxruntime, options, layout)
        self._inputs = [i.name for i in self._session.get_inputs()]

    def _open(self, onnxruntime: Any, options: Any, layout: ModelLayout) -> Any:
        """The cached export, made first when missing; one that does not load (damaged on disk) is made again."""
        fp32 = self.model_path.with_name("model-fp32.onnx")

        def build() -> None:
            if self.precision == "fp32" or not fp32.is_file():
                export_fp32(layout, fp32)
            if self.precision == "int8":
                try:
                    quantize_int8(fp32, self.model_path, self._encoder)
                except Exception:  # a damaged fp32 export: make it again, then quantize that
                    export_fp32(layout, fp32)
                    quantize_int8(fp32, self.model_path, self._encoder)

        def load() -> Any:
            return onnxruntime.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])

        if not self.model_path.is_file():
            build()
        try:
            return load()
        except Exception:  # onnxruntime's load errors share no base class below Exception
            self.model_path.unlink(missing_ok=True)  # damaged on disk (truncated, overwritten): make it again
        build()
        try:
            return load()
        except Exception as exc:
            raise EmbedderError(
                f"the ONNX export {self.model_path} does not load even when made afresh ({exc}): "
                "this model cannot run on the onnx backend; use embedder.backend sentence-transformers"
            ) from exc

    def _encode(self, texts: Sequence[str], prefix: str) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        inputs = [prefix + text for text in texts]
        if self._lower_case:
            inputs = [text.lower() for text in inputs]
        # Longest first, as sentence-transformers does: batches of similar length pad little.
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        for start in range(0, len(order), self._batch_size):
            rows = order[start : start + self._batch_size]
            vectors[rows] = self._encode_batch([inputs[i] for i in rows])
        return vectors

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._encoder.encode_batch(texts)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": mask,
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (hidden,) = self._session.run([OUTPUT_NAME], {name: arrays[name] for name in self._inputs})
        return normalize(pool(hidden, mask, self._pooling))

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._document_prefix)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._query_prefix)


def _batch_tokenizer(layout: ModelLayout) -> Tokenizer:
    """The model's tokenizer truncating at its limit and padding each batch to its longest text."""
    encoder = Tokenizer.from_file(str(layout.transformer_dir / "tokenizer.json"))
    padding = encoder.padding or {}
    pad_id = padding.get("pad_id", _read_json(layout.transformer_dir / "config.json").get("pad_token_id") or 0)
    encoder.enable_padding(
        pad_id=pad_id,
        pad_type_id=padding.get("pad_type_id", 0),
        pad_token=padding.get("pad_token") or encoder.id_to_token(pad_id) or "[PAD]",
    )  # no fixed length: each batch pads to its longest text
    encoder.enable_truncation(max_length=layout.max_tokens)
    return encoder
