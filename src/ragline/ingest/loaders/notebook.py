"""Jupyter notebook loader: the notebook is rendered to Markdown, then split like MyST Markdown.

Markdown cells are read as MyST (directives, roles, includes: see `markdown`); code
cells become fenced blocks in the kernel's language; their short text outputs (stdout
and text/plain results) follow as plain fenced blocks, cut to 20 lines and 500
characters. Images, HTML, widgets, errors and stderr (warnings, progress bars) are
dropped: they carry no searchable text. Cells tagged as the built page hides them
(myst-nb's `remove-cell`, `remove-input`, `remove-output`) are left out likewise. The
JSON is read directly: nbformat would be a heavy dependency for a plain JSON document.

A jupytext pair (this .ipynb and an .md twin with a `jupytext` header) is indexed
from the .ipynb; the .md twin is skipped (see `markdown`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from ragline.ingest.loaders.base import Includes, LoadContext, LoadError, ParsedFile, decode_text
from ragline.ingest.loaders.markdown import fence, split_markdown

MAX_OUTPUT_CHARS = 500
MAX_OUTPUT_LINES = 20
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_WIDGET = "application/vnd.jupyter.widget-view+json"


def load_notebook(data: bytes, path: Path, *, context: LoadContext = LoadContext()) -> ParsedFile:
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
    title = str(metadata.get("title") or path.stem)
    return split_markdown(markdown, PurePosixPath(path.as_posix()), title, Includes(context), language)


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
    tags = _tags(cell)
    if "remove-cell" in tags:
        return []
    source = _text(cell.get("source"))
    if cell.get("cell_type") == "markdown":
        return [source]
    if cell.get("cell_type") != "code":
        return []  # raw cells are for nbconvert, not readers
    parts = [fence(source, language)] if source.strip() and "remove-input" not in tags else []
    if "remove-output" in tags:
        return parts
    for output in cell.get("outputs") or ():
        text = _output_text(output) if isinstance(output, dict) else ""
        if text.strip():
            parts.append(fence(_shortened(text), ""))
    return parts


def _tags(cell: dict[str, Any]) -> set[str]:
    metadata = cell.get("metadata")
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return {tag for tag in tags if isinstance(tag, str)} if isinstance(tags, list) else set()


def _output_text(output: dict[str, Any]) -> str:
    """Text of a stdout stream or a text/plain result.

    A plot's text/plain is only "<Figure size 640x480 with 1 Axes>" and a widget's is its
    Python repr, so outputs holding an image or a widget are dropped whole; a table's
    text/plain (beside its HTML) is kept.
    """
    if output.get("output_type") == "stream":
        return _ANSI_ESCAPE.sub("", _text(output.get("text"))) if output.get("name") != "stderr" else ""
    data = output.get("data")
    if not isinstance(data, dict) or _WIDGET in data or any(kind.startswith("image/") for kind in data):
        return ""
    return _ANSI_ESCAPE.sub("", _text(data.get("text/plain")))


def _shortened(text: str) -> str:
    lines = text.rstrip().split("\n")
    short = "\n".join(lines[:MAX_OUTPUT_LINES])
    if len(short) > MAX_OUTPUT_CHARS:
        short = short[:MAX_OUTPUT_CHARS]
    return short + "…" if short != text.rstrip() else short


def _text(value: Any) -> str:
    """Notebook text fields are a string or a list of lines."""
    if isinstance(value, list):
        return "".join(str(line) for line in value)
    return value if isinstance(value, str) else ""
