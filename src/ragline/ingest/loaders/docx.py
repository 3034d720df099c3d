"""Word (.docx) loader: sections start at paragraphs styled "Title" or "Heading N".

Body paragraphs and tables are read in document order; a table becomes one line per
row, cells separated by " | ". Word bookmarks are not URL fragments anyone can open,
so anchors are the docutils slug of the heading, as for the other formats.
"""

from __future__ import annotations

import io
from pathlib import Path

import docx
from docutils.nodes import make_id
from docx.table import Table
from docx.text.paragraph import Paragraph

from ragline.ingest.loaders.base import LoadError, ParsedFile
from ragline.ingest.loaders.text import SectionCutter

_TITLE_LEVEL = 0  # the "Title" style sits above "Heading 1"


def load_docx(data: bytes, path: Path) -> ParsedFile:
    """Load a .docx file as one section per heading."""
    try:
        document = docx.Document(io.BytesIO(data))
        core_title = document.core_properties.title or ""
        blocks = [_read(block) for block in document.iter_inner_content()]
    except Exception as exc:  # python-docx raises zip, XML and key errors on damaged files
        raise LoadError(f"not a readable .docx file (corrupt, or an old .doc?): {exc}") from exc

    headings = [(level, text) for level, text in blocks if level is not None and text]
    title_styled = next((text for level, text in headings if level == _TITLE_LEVEL), "")
    first_heading = headings[0][1] if headings else ""
    title = " ".join(core_title.split()) or title_styled or first_heading or path.stem

    cutter = SectionCutter(title)
    for level, text in blocks:
        if level is None:
            cutter.add(text)
        elif text:
            cutter.heading(level, text, make_id(text))
    sections = cutter.finish()
    if not sections:
        raise LoadError("no text in the document")
    return ParsedFile(title, sections)


def _read(block: Paragraph | Table) -> tuple[int | None, str]:
    """(heading level or None for body text, text) of a body paragraph or table."""
    if isinstance(block, Table):
        return None, _table_text(block)
    text = " ".join(block.text.split())
    return _heading_level(block.style.name if block.style is not None else ""), text


def _heading_level(style: str) -> int | None:
    if style == "Title":
        return _TITLE_LEVEL
    prefix, _, number = style.partition(" ")
    return int(number) if prefix == "Heading" and number.isdigit() else None


def _table_text(table: Table) -> str:
    """One line per row. A merged cell spans several grid columns but is written once."""
    rows = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            if cell is not previous:  # python-docx repeats a merged cell's object per column
                cells.append(" ".join(cell.text.split()))
            previous = cell
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)
