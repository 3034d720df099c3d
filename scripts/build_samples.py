"""Build the sample PDF and DOCX files in samples/docs/ that demos and loader tests use.

Binary samples are generated rather than hand-made so that anyone can see, and change,
exactly what they contain. Run from the repository root:

    python scripts/build_samples.py

Needs the dev extras (fpdf2; python-docx is a core dependency).
"""

from __future__ import annotations

import zipfile
from datetime import UTC, datetime
from pathlib import Path

import docx
from fpdf import FPDF

OUT_DIR = Path(__file__).resolve().parent.parent / "samples" / "docs"
# A fixed date keeps rebuilt files identical when their content has not changed.
BUILD_DATE = datetime(2024, 1, 15, 9, 0, tzinfo=UTC)

PDF_TITLE = "Ragline Operations Handbook"
# (page heading, paragraphs): one entry per page.
PDF_PAGES = [
    (
        "1. Deployment overview",
        [
            "Ragline runs as three cooperating services: the ingest worker, which loads "
            "and chunks source files; the embedding service, which turns chunks into "
            "vectors; and the query API, which retrieves passages and writes grounded "
            "answers with citations.",
            "A single laptop can run all three in one process. In production each service "
            "scales on its own: ingest workers are added while a large corpus is being "
            "indexed, and query replicas follow the request rate during the day.",
            "Every service reads the same configuration file, ragline.yaml. Settings can "
            "be overridden with environment variables that start with RAGLINE_, which is "
            "the recommended way to pass secrets such as API keys.",
        ],
    ),
    (
        "2. Rate limits and quotas",
        [
            "The query API protects itself and the language model behind it with rate "
            "limits. The default rate limit is 120 requests per minute per API key. "
            "Requests above the limit receive HTTP status 429 with a Retry-After header "
            "that tells the client how many seconds to wait.",
            "Ingest has a separate quota: a single API key may queue at most 5,000 "
            "documents per hour. Larger migrations should use the bulk ingest command, "
            "which bypasses the queue and reads files directly from object storage.",
            "Operators can raise the limit for one key with the command "
            "ragline keys set-limit KEY --per-minute 600. Limits are enforced per "
            "replica and shared through the cache, so a restart does not reset them.",
        ],
    ),
    (
        "3. Backups and recovery",
        [
            "The vector store is rebuilt from the source files, so only the manifest and "
            "the configuration need regular backups. A nightly snapshot of the manifest "
            "is kept for 30 days.",
            "To recover from a lost index, restore the manifest and run ragline ingest "
            "with the --resume flag: files whose content hash did not change are skipped, "
            "and the rest are embedded again.",
        ],
    ),
]

DOCX_TITLE = "Ragline Ingest Guide"
DOCX_FORMATS = [
    ("Format", "Suffixes", "Sections"),
    ("HTML", ".html, .htm", "Sphinx sections and API entries, else headings"),
    ("Markdown", ".md, .markdown", "One per heading"),
    ("reStructuredText", ".rst, .rest", "One per section"),
    ("Jupyter notebook", ".ipynb", "One per Markdown heading"),
    ("PDF", ".pdf", "One per page"),
    ("Word", ".docx", "One per Heading style"),
    ("Plain text", ".txt, .text", "The whole file"),
]


def build_pdf(path: Path) -> None:
    """A three-page handbook with a searchable fact on page 2 (the default rate limit)."""
    pdf = FPDF(format="A4")
    pdf.set_title(PDF_TITLE)
    pdf.set_author("Ragline maintainers")
    pdf.set_creation_date(BUILD_DATE)
    pdf.set_margins(20, 20, 20)
    for heading, paragraphs in PDF_PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 16)
        pdf.multi_cell(0, 10, heading)
        pdf.ln(4)
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(4)
    pdf.output(str(path))


def build_docx(path: Path) -> None:
    """A short guide: a Title, Heading 1/2 sections, and a table of supported formats."""
    document = docx.Document()
    properties = document.core_properties
    properties.title = DOCX_TITLE
    properties.author = "Ragline maintainers"
    properties.created = properties.modified = BUILD_DATE.replace(tzinfo=None)

    document.add_heading(DOCX_TITLE, level=0)
    document.add_paragraph(
        "This guide explains how Ragline turns your files into searchable sections, "
        "and what to check when a file is skipped."
    )
    document.add_heading("Supported formats", level=1)
    document.add_paragraph(
        "Ragline picks a loader from the file suffix. Each loader splits a file into "
        "sections that a citation can point to."
    )
    table = document.add_table(rows=0, cols=3)
    table.style = "Table Grid"
    for row in DOCX_FORMATS:
        cells = table.add_row().cells
        for cell, text in zip(cells, row, strict=True):
            cell.text = text
    document.add_heading("Skipped files", level=1)
    document.add_paragraph(
        "A file that cannot be read is reported with a reason and skipped; the rest of "
        "the corpus is still indexed."
    )
    document.add_heading("Encrypted PDFs", level=2)
    document.add_paragraph(
        "PDFs protected with a password are skipped. Save an unprotected copy and ingest it again."
    )
    document.add_heading("Scanned documents", level=2)
    document.add_paragraph(
        "A scanned PDF has no text layer. Run OCR on it first, for example with ocrmypdf."
    )
    document.save(str(path))
    _pin_zip_dates(path)


def _pin_zip_dates(path: Path) -> None:
    """Date every entry of a zip archive BUILD_DATE: python-docx stamps the current time."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            info.date_time = BUILD_DATE.timetuple()[:6]
            archive.writestr(info, data)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in (("ragline-architecture.pdf", build_pdf), ("ingest-guide.docx", build_docx)):
        path = OUT_DIR / name
        build(path)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
