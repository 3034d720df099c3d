"""Jupyter notebook loader: the notebook is rendered to Markdown, then split like Markdown.

Markdown cells are kept as written; code cells become fenced blocks in the kernel's
language; their text outputs (stream and text/plain results) follow as plain fenced
blocks, cut to 500 characters. Images, HTML and other rich outputs are dropped: they
carry no searchable text. The JSON is read directly: nbformat would be a heavy
dependency for what is a plain JSON document.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ragline.ingest.loaders.base import LoadError, ParsedFile, decode_text
from ragline.ingest.loaders.markdown import split_markdown

MAX_OUTPUT_CHARS = 500
_BACKTICK_RUN = re.compile(r"`{3,}")


def load_notebook(data: bytes, path: Path) -> ParsedFile:
    """Load a .ipynb file as Markdown sections, code and outputs included."""
    try:
        notebook = json.loads(decode_text(data, path))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or absurdly deep nesting
        raise LoadError(f"not a notebook: invalid JSON ({exc})") from exc
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list):
        raise LoadError("not a Jupyter notebook (nbformat 4): no list of cells")
    metadata = notebook.get("metadata") if isinstance(notebook.get("metadata"), dict) else {}
    language = _language(metadata)
    markdown = "\n\n".join(
        part for cell in cells if isinstance(cell, dict) for part in _render(cell, language)
    )
    return split_markdown(markdown, str(metadata.get("title") or path.stem))


def _language(metadata: dict[str, Any]) -> str:
    """The kernel's language, for the code fences; Python unless the notebook says otherwise."""
    for key, field in (("kernelspec", "language"), ("language_info", "name")):
        info = metadata.get(key)
        name = info.get(field) if isinstance(info, dict) else None
        if isinstance(name, str) and name.strip():
            return name.strip().lower()
    return "python"


def _render(cell: dict[str, Any], language: str) -> list[str]:
    """The Markdown for one cell: its source, then its text outputs for a code cell."""
    source = _text(cell.get("source"))
    if cell.get("cell_type") == "markdown":
        return [source]
    if cell.get("cell_type") != "code":
        return []  # raw cells are for nbconvert, not readers
    parts = [_fence(source, language)] if source.strip() else []
    for output in cell.get("outputs") or ():
        text = _output_text(output) if isinstance(output, dict) else ""
        if text.strip():
            if len(text) > MAX_OUTPUT_CHARS:
                text = text[:MAX_OUTPUT_CHARS] + "…"
            parts.append(_fence(text, ""))
    return parts


def _output_text(output: dict[str, Any]) -> str:
    """Text of a stream or text/plain output.

    A plot's text/plain is only "<Figure size 640x480 with 1 Axes>", so outputs holding an
    image are dropped whole; a table's text/plain (beside its HTML) is kept.
    """
    if output.get("output_type") == "stream":
        return _text(output.get("text"))
    data = output.get("data")
    if not isinstance(data, dict) or any(kind.startswith("image/") for kind in data):
        return ""
    return _text(data.get("text/plain"))


def _text(value: Any) -> str:
    """Notebook text fields are a string or a list of lines."""
    if isinstance(value, list):
        return "".join(str(line) for line in value)
    return value if isinstance(value, str) else ""


def _fence(content: str, language: str) -> str:
    """A fenced block that its content cannot close early, however many backticks it holds."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(content)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}{language}\n{content.rstrip()}\n{fence}"
