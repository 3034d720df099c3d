"""Plain text files, and the small text-assembly helpers the structured loaders share.

A plain text file has no structure we can trust, so it becomes one section named after
the file. The helpers below are used by the HTML, reStructuredText, Markdown and DOCX
loaders to turn their blocks and headings into `Section` text and heading paths the
same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ragline.ingest.loaders.base import LoadError, ParsedFile, clean_text, decode_text
from ragline.types import Section

# A piece of section text: (text, is_code). Code keeps its lines and indentation.
Block = tuple[str, bool]


def load_text(data: bytes, path: Path) -> ParsedFile:
    """Load a plain text file as a single section titled with the file name."""
    text = clean_text(decode_text(data, path))
    if not text:
        raise LoadError("empty file: no text to index")
    title = path.stem or path.name
    return ParsedFile(title, [Section(text, title, "", (title,))])


def trim_lines(code: str) -> str:
    """Trim trailing spaces and blank edge lines, but keep indentation: code needs it."""
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def join_blocks(blocks: Iterable[Block]) -> str:
    """Join blocks with blank lines; prose is cleaned with `clean_text`, code only trimmed."""
    parts = (trim_lines(text) if is_code else clean_text(text) for text, is_code in blocks)
    return "\n\n".join(part for part in parts if part)


class Outline:
    """The headings open at the current point of a document, giving each section its heading path.

    Call `enter(level, title)` for each heading in reading order (a deeper level means a
    subsection; nesting depth works as a level too). Paths always start with the document
    title, without repeating it when the first heading is the title itself.
    """

    def __init__(self, doc_title: str) -> None:
        self.doc_title = doc_title
        self._open: list[tuple[int, str]] = []

    def enter(self, level: int, title: str) -> tuple[str, ...]:
        """Open a heading, closing those at the same or a deeper level; return its path."""
        while self._open and self._open[-1][0] >= level:
            self._open.pop()
        self._open.append((level, title))
        return self.path()

    def path(self) -> tuple[str, ...]:
        """The heading path at the current point."""
        titles = tuple(title for _, title in self._open if title)
        if titles and titles[0] == self.doc_title:
            return titles
        return (self.doc_title, *titles)


class SectionCutter:
    """Cuts a document, read as a stream of headings and blocks, into sections.

    Text before the first heading forms a section named after the document (anchor "").
    A heading whose section has no text yields no section, but stays in the heading
    paths of the sections below it.
    """

    def __init__(self, doc_title: str) -> None:
        self.outline = Outline(doc_title)
        self.sections: list[Section] = []
        self._title, self._anchor = doc_title, ""
        self._path: tuple[str, ...] = (doc_title,)
        self._blocks: list[Block] = []

    def heading(self, level: int, title: str, anchor: str) -> None:
        """Start a new section at a heading of this level."""
        self._close()
        self._title, self._anchor = title, anchor
        self._path = self.outline.enter(level, title)

    def add(self, text: str, *, code: bool = False) -> None:
        """Add a block of text to the current section (`code` keeps its lines as they are)."""
        self._blocks.append((text, code))

    def finish(self) -> list[Section]:
        """The sections with text, in reading order."""
        self._close()
        return self.sections

    def _close(self) -> None:
        text = join_blocks(self._blocks)
        if text:
            self.sections.append(Section(text, self._title, self._anchor, self._path))
        self._blocks = []
