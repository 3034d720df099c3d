"""File loaders: turn the bytes of a source file into a title and sections.

`loader_for(path)` picks the loader from the file suffix; each loader is a function
`(data: bytes, path: Path) -> ParsedFile` that raises `LoadError` for input it cannot use.
Loaders of documentation sources also take a keyword `context` (`LoadContext`): the tree
the file belongs to, from which they read the files a page includes. `run_loader` passes
it to the loaders that take it, so that loaders registered by plugins keep the plain form.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path

from ragline.ingest.loaders.base import Loader, LoadContext, LoadError, ParsedFile, SkipFile
from ragline.ingest.loaders.docx import load_docx
from ragline.ingest.loaders.html import load_html
from ragline.ingest.loaders.markdown import load_markdown
from ragline.ingest.loaders.notebook import load_notebook
from ragline.ingest.loaders.pdf import load_pdf
from ragline.ingest.loaders.rst import load_rst
from ragline.ingest.loaders.text import load_text

# Suffix (lower case; "" for files without one) → (format name, loader).
LOADERS: dict[str, tuple[str, Loader]] = {
    ".html": ("html", load_html),
    ".htm": ("html", load_html),
    ".md": ("markdown", load_markdown),
    ".markdown": ("markdown", load_markdown),
    ".rst": ("rst", load_rst),
    ".rest": ("rst", load_rst),
    ".ipynb": ("notebook", load_notebook),
    ".pdf": ("pdf", load_pdf),
    ".docx": ("docx", load_docx),
    ".txt": ("text", load_text),
    ".text": ("text", load_text),
    "": ("text", load_text),
}


def loader_for(path: Path) -> tuple[str, Loader] | None:
    """The (format name, loader) for a file, or None when its suffix is not supported."""
    return LOADERS.get(path.suffix.lower())


def run_loader(load: Loader, data: bytes, path: Path, context: LoadContext) -> ParsedFile:
    """Call a loader, with `context` when it takes one."""
    if _takes_context(load):
        return load(data, path, context=context)  # type: ignore[call-arg]
    return load(data, path)


@cache
def _takes_context(load: Loader) -> bool:
    return "context" in inspect.signature(load).parameters


__all__ = [
    "LOADERS", "LoadContext", "LoadError", "Loader", "ParsedFile", "SkipFile", "loader_for", "run_loader",
]
