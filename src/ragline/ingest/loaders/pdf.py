"""PDF loader: one section per page with text, anchored with the standard `#page=N` fragment.

PDFs have no reliable heading structure, but every viewer opens `file.pdf#page=N` at that
page, so a page is the unit a citation can point to. Scanned PDFs (images only) have no
text layer and are refused, so that the user knows to run OCR first.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from pypdf import PdfReader

from ragline.ingest.loaders.base import LoadError, ParsedFile, clean_text
from ragline.types import Section

# pypdf logs warnings, and even errors, for the defects it works around ("Advanced
# encoding … not implemented"); for ingest they are noise: what fails raises instead.
logging.getLogger("pypdf").setLevel(logging.CRITICAL)


def load_pdf(data: bytes, path: Path) -> ParsedFile:
    """Load a PDF's pages that have text as sections."""
    if not data.strip():
        raise LoadError("empty file")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LoadError("encrypted PDF: it needs a password; save an unprotected copy")
        title = _metadata_title(reader) or path.stem
        pages = [clean_text(page.extract_text() or "") for page in reader.pages]
    except LoadError:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files; none may escape
        raise LoadError(f"corrupt PDF: {exc}") from exc

    sections = [
        Section(text, title, f"page={number}", (title, f"Page {number}"), page=number)
        for number, text in enumerate(pages, start=1)
        if text
    ]
    if not sections:
        raise LoadError("no extractable text in the PDF (a scan? run OCR on it first)")
    return ParsedFile(title, sections)


def _metadata_title(reader: PdfReader) -> str:
    metadata = reader.metadata
    title = metadata.title if metadata else None
    return " ".join(str(title).split()) if title else ""
