"""Tests for the file loaders: structure (anchors, titles, heading paths), text, and refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader, PdfWriter

from ragline.ingest.loaders import LOADERS, LoadError, loader_for
from ragline.ingest.loaders.docx import load_docx
from ragline.ingest.loaders.html import load_html
from ragline.ingest.loaders.markdown import load_markdown
from ragline.ingest.loaders.notebook import load_notebook
from ragline.ingest.loaders.pdf import load_pdf
from ragline.ingest.loaders.rst import load_rst
from ragline.ingest.loaders.text import load_text

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "docs"
SAMPLE_PDF = SAMPLES / "ragline-architecture.pdf"
SAMPLE_DOCX = SAMPLES / "ingest-guide.docx"
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html")


def by_anchor(parsed):
    return {section.anchor: section for section in parsed.sections}


# --- registry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("page.html", "html"),
        ("page.HTM", "html"),
        ("notes.md", "markdown"),
        ("notes.markdown", "markdown"),
        ("guide.rst", "rst"),
        ("guide.rest", "rst"),
        ("analysis.ipynb", "notebook"),
        ("report.pdf", "pdf"),
        ("report.docx", "docx"),
        ("notes.txt", "text"),
        ("notes.text", "text"),
        ("README", "text"),
    ],
)
def test_loader_for_known_suffixes(name, fmt):
    found = loader_for(Path(name))
    assert found is not None
    assert found[0] == fmt


@pytest.mark.parametrize("name", ["photo.png", "archive.tar.gz", "old.doc", "data.csv"])
def test_loader_for_unsupported_suffix_is_none(name):
    assert loader_for(Path(name)) is None


# --- HTML -------------------------------------------------------------------------------

SPHINX_PAGE = b"""<!DOCTYPE html>
<html><head>
<meta charset="utf-8">
<title>json \xe2\x80\x94 JSON encoder and decoder &#8212; Python 3.11 documentation</title>
<script>var tracking = "do not index me";</script>
<style>body { color: red }</style>
</head><body>
<div class="related" role="navigation"><h3>Navigation</h3><ul><li>index</li></ul></div>
<nav class="menu"><h3>Table of Contents</h3><a href="#basic-usage">Basic Usage</a></nav>
<div class="document"><div class="body" role="main">
<section id="module-json">
<span id="json-json-encoder-and-decoder"></span><h1><code>json</code> \xe2\x80\x94 JSON encoder and decoder<a class="headerlink" href="#module-json">\xc2\xb6</a></h1>
<p><strong>Source code:</strong> <a href="x">Lib/json/__init__.py</a></p>
<p>JSON is a <em>lightweight</em> data
   interchange format.</p>
<div class="highlight"><pre>&gt;&gt;&gt; import json
&gt;&gt;&gt; def f():
...     return 1
</pre></div>
<section id="basic-usage">
<h2>Basic Usage<a class="headerlink" href="#basic-usage">\xc2\xb6</a></h2>
<dl class="py function">
<dt class="sig sig-object py" id="json.dumps"><span class="sig-prename">json.</span><span class="sig-name">dumps</span><span class="sig-paren">(</span><em>obj</em>, <em>*</em>, <em>indent=None</em><span class="sig-paren">)</span><a class="headerlink" href="#json.dumps">\xc2\xb6</a></dt>
<dd><p>Serialize <em>obj</em> to a JSON formatted <code>str</code>.</p></dd>
</dl>
</section>
<section id="encoders-and-decoders">
<h2>Encoders and Decoders<a class="headerlink" href="#encoders-and-decoders">\xc2\xb6</a></h2>
<p>Two classes do the work.</p>
<dl class="py class">
<dt class="sig sig-object py" id="json.JSONEncoder"><em class="property">class </em><span class="sig-prename">json.</span><span class="sig-name">JSONEncoder</span>()</dt>
<dd><p>Extensible JSON encoder.</p>
<table><tr><th>Python</th><th>JSON</th></tr><tr><td><p>dict</p></td><td>object</td></tr></table>
<dl class="py method">
<dt class="sig sig-object py" id="json.JSONEncoder.encode"><span class="sig-name">encode</span>(<em>o</em>)</dt>
<dd><p>Return a JSON string representation of <em>o</em>.</p></dd>
</dl>
<p>Encoders are reusable.</p>
</dd>
</dl>
<dl class="glossary"><dt id="term-a">term a</dt><dd>first</dd><dt id="term-b">term b</dt><dd>second</dd></dl>
</section>
</section>
</div></div>
<div class="sphinxsidebar" role="navigation"><h4>Previous topic</h4><p>email</p></div>
<div class="footer">&copy; Copyright 2001-2023.</div>
<footer>Built with Sphinx.</footer>
</body></html>
"""

GENERIC_PAGE = b"""<html><head><title>Widget Manual | ACME Docs</title></head>
<body>
<header><a href="/">ACME</a> site header</header>
<main>
<p>Welcome to the manual.<br>Second line.</p>
<h1 id="widget-manual">Widget Manual</h1>
<p>Widgets are <b>great</b>.</p>
<h2><a id="setup-anchor"></a>Setting Up</h2>
<ul><li>Unpack the box</li><li>Plug it in</li></ul>
<a name="legacy-name"></a>
<h3>Power Supply</h3>
<p>Use 12V.</p>
<h2>Frequently Asked Questions</h2>
<p>Nobody asks.</p>
<h2>Empty Heading</h2>
<h3>Child Of Empty</h3>
<p>Still has a path.</p>
</main>
<footer>ACME footer</footer>
</body></html>
"""


def test_html_sphinx_sections_and_api_entries():
    parsed = load_html(SPHINX_PAGE, Path("json.html"))
    assert parsed.title == "json — JSON encoder and decoder"
    assert [s.anchor for s in parsed.sections] == [
        "module-json",
        "basic-usage",
        "json.dumps",
        "encoders-and-decoders",
        "json.JSONEncoder",
        "json.JSONEncoder.encode",
    ]
    sections = by_anchor(parsed)

    top = sections["module-json"]
    assert top.title == "json — JSON encoder and decoder"
    assert top.heading_path == ("json — JSON encoder and decoder",)
    assert "JSON is a lightweight data interchange format." in top.text
    assert ">>> def f():\n...     return 1" in top.text  # code keeps lines and indentation
    assert "Serialize" not in top.text  # belongs to the nested entry

    dumps = sections["json.dumps"]
    assert dumps.title == "json.dumps()"  # the name, not the whole signature, heads the entry
    assert dumps.heading_path == ("json — JSON encoder and decoder", "Basic Usage", "json.dumps()")
    assert dumps.text == "json.dumps(obj, *, indent=None)\n\nSerialize obj to a JSON formatted str."

    # A section emptied by its API entries lists them rather than disappearing.
    assert sections["basic-usage"].text == "json.dumps()"

    encoder = sections["json.JSONEncoder"]
    assert encoder.title == "json.JSONEncoder"
    assert "Python | JSON\ndict | object" in encoder.text
    assert "Encoders are reusable." in encoder.text
    assert "Return a JSON string" not in encoder.text  # innermost entry wins

    method = sections["json.JSONEncoder.encode"]
    assert method.heading_path[-2:] == ("json.JSONEncoder", "encode")
    assert method.text == "encode(o)\n\nReturn a JSON string representation of o."

    # A glossary (many dd) stays text of its section instead of becoming entries.
    assert "term a\n\nfirst\n\nterm b\n\nsecond" in sections["encoders-and-decoders"].text


def test_html_drops_page_chrome_and_permalinks():
    parsed = load_html(SPHINX_PAGE, Path("json.html"))
    everything = "\n".join(s.text + s.title + "".join(s.heading_path) for s in parsed.sections)
    for dropped in (
        "¶",
        "Navigation",
        "Table of Contents",
        "Previous topic",
        "Copyright",
        "Built with Sphinx",
        "do not index me",
        "color: red",
    ):
        assert dropped not in everything


def test_html_generic_headings():
    parsed = load_html(GENERIC_PAGE, Path("widgets.html"))
    assert parsed.title == "Widget Manual"
    assert [(s.anchor, s.heading_path) for s in parsed.sections] == [
        ("", ("Widget Manual",)),
        ("widget-manual", ("Widget Manual",)),
        ("setup-anchor", ("Widget Manual", "Setting Up")),
        ("legacy-name", ("Widget Manual", "Setting Up", "Power Supply")),
        ("frequently-asked-questions", ("Widget Manual", "Frequently Asked Questions")),
        ("child-of-empty", ("Widget Manual", "Empty Heading", "Child Of Empty")),
    ]
    intro, manual, setup = parsed.sections[:3]
    assert intro.text == "Welcome to the manual.\nSecond line."
    assert manual.text == "Widgets are great."
    assert setup.text == "Unpack the box\n\nPlug it in"
    everything = "\n".join(s.text for s in parsed.sections)
    assert "site header" not in everything and "ACME footer" not in everything


def test_html_without_title_uses_first_h1_then_file_name():
    page = b"<html><body><h1>Only Heading</h1><p>Body text.</p></body></html>"
    assert load_html(page, Path("x.html")).title == "Only Heading"
    assert load_html(b"<p>Just text.</p>", Path("notes.html")).title == "notes"


def test_html_latin1_page_with_meta_charset():
    page = (
        "<html><head><meta charset='iso-8859-1'><title>Café</title></head>"
        "<body><p>Crème brûlée</p></body></html>"
    )
    parsed = load_html(page.encode("latin-1"), Path("menu.html"))
    assert parsed.title == "Café"
    assert parsed.sections[0].text == "Crème brûlée"


@pytest.mark.parametrize(
    "data", [b"", b"   \n", b"<html><body><nav>menu</nav><script>x()</script></body></html>"]
)
def test_html_without_text_is_refused(data):
    with pytest.raises(LoadError):
        load_html(data, Path("empty.html"))


@pytest.mark.skipif(
    not (PYTHON_DOCS / "library" / "json.html").exists(), reason="Python docs not installed"
)
def test_html_real_python_docs_page():
    path = PYTHON_DOCS / "library" / "json.html"
    parsed = load_html(path.read_bytes(), path)
    anchors = [s.anchor for s in parsed.sections]
    assert anchors[:3] == ["module-json", "basic-usage", "json.dump"]
    assert {"json.dumps", "json.JSONDecoder.decode", "character-encodings"} <= set(anchors)
    dumps = by_anchor(parsed)["json.dumps"]
    assert dumps.heading_path[:2] == ("json — JSON encoder and decoder", "Basic Usage")
    for section in parsed.sections:
        assert "¶" not in section.text
        assert "Previous topic" not in section.text and "Navigation" not in section.text


# --- Markdown ---------------------------------------------------------------------------

MARKDOWN = """---
title: Front Matter Title
tags: [demo]
---
Some intro before any heading.

(install-target)=
# Install `ragline`

Run the installer.

% a MyST comment
+++

```python
def main():
    return 0


print(main())
```

## Configure *it*

| key | value |
|-----|-------|
| a   | 1     |

> # Quoted heading
> stays text

### Deep Dive
Details.

## Empty

### Under Empty
Child text.
"""


def test_markdown_sections():
    parsed = load_markdown(MARKDOWN.encode(), Path("guide.md"))
    assert parsed.title == "Install ragline"
    assert [(s.title, s.anchor, s.heading_path) for s in parsed.sections] == [
        ("Install ragline", "", ("Install ragline",)),
        ("Install ragline", "install-target", ("Install ragline",)),
        ("Configure it", "configure-it", ("Install ragline", "Configure it")),
        ("Deep Dive", "deep-dive", ("Install ragline", "Configure it", "Deep Dive")),
        ("Under Empty", "under-empty", ("Install ragline", "Empty", "Under Empty")),
    ]
    intro, install, configure = parsed.sections[:3]
    assert intro.text == "Some intro before any heading."
    assert install.text == (
        "Run the installer.\n\n```python\ndef main():\n    return 0\n\n\nprint(main())\n```"
    )
    assert "| a   | 1     |" in configure.text
    assert "> # Quoted heading\n> stays text" in configure.text
    everything = "\n".join(s.text for s in parsed.sections)
    for dropped in ("(install-target)=", "tags:", "Front Matter Title", "a MyST comment", "+++"):
        assert dropped not in everything


def test_markdown_title_from_front_matter_then_stem():
    front = b"---\ntitle: From Front Matter\n---\n## Part\ntext\n"
    parsed = load_markdown(front, Path("doc.md"))
    assert parsed.title == "From Front Matter"
    assert parsed.sections[0].heading_path == ("From Front Matter", "Part")
    assert load_markdown(b"plain text", Path("notes.md")).title == "notes"


@pytest.mark.parametrize("data", [b"", b"# Only\n## Headings\n", b"---\ntitle: x\n---\n"])
def test_markdown_without_text_is_refused(data):
    with pytest.raises(LoadError):
        load_markdown(data, Path("empty.md"))


# --- reStructuredText -------------------------------------------------------------------

RST = """\
:mod:`json` --- JSON encoder
============================

.. module:: json

Intro with :func:`~json.dumps`, :ref:`the usage <usage-label>` and *emphasis*.

.. _usage-label:

Basic usage
-----------

.. function:: dumps(obj)

   Serialize *obj* to a string.

   .. versionadded:: 3.2
      The *indent* parameter.

.. index:: single: serialization; index entry

.. code-block:: python
   :linenos:
   :emphasize-lines: 2

   def f():
       return 1

.. toctree::
   :maxdepth: 2

   tutorial/index

.. include:: /etc/passwd

.. raw:: html

   <script>raw html</script>

* first item
* second item

.. This is a comment.

Details
~~~~~~~

:py:class:`json.JSONEncoder` does the work.

.. _usage-label-2:

Second top
==========

Text of the second top-level section.
"""


def test_rst_sections_anchors_and_paths():
    parsed = load_rst(RST.encode(), Path("json.rst"))
    assert parsed.title == "json — JSON encoder"
    assert [(s.anchor, s.heading_path) for s in parsed.sections] == [
        ("json-json-encoder", ("json — JSON encoder",)),
        ("basic-usage", ("json — JSON encoder", "Basic usage")),
        ("details", ("json — JSON encoder", "Basic usage", "Details")),
        ("second-top", ("json — JSON encoder", "Second top")),
    ]
    assert parsed.sections[1].title == "Basic usage"


def test_rst_explicit_target_gives_extra_id_but_anchor_is_the_section_id():
    source = "Title\n=====\n\n.. _basic-usage:\n\nBasic Usage\n-----------\n\ntext\n"
    parsed = load_rst(source.encode(), Path("doc.rst"))
    # The label took the title's slug, so docutils (and Sphinx) give the <section> "basic-usage-1"
    # and render the label as an extra <span id="basic-usage">: both are valid anchors.
    assert [s.anchor for s in parsed.sections] == ["basic-usage-1"]
    assert parsed.sections[0].text == "text"


def test_rst_unknown_directives_and_roles_keep_their_text():
    parsed = load_rst(RST.encode(), Path("json.rst"))
    top, usage, details, _ = parsed.sections
    assert "Intro with json.dumps, the usage and emphasis." in top.text
    assert "dumps(obj)\n\nSerialize obj to a string." in usage.text
    assert "New in version 3.2: The indent parameter." in usage.text
    assert "def f():\n    return 1" in usage.text  # code keeps its indentation
    assert "tutorial/index" not in usage.text  # toctrees are navigation, not content
    assert "first item\n\nsecond item" in usage.text
    assert details.text == "json.JSONEncoder does the work."
    everything = "\n".join(s.text for s in parsed.sections)
    for dropped in ("root:", "raw html", "This is a comment", "maxdepth", "linenos", "index entry"):
        assert dropped not in everything


def test_rst_stand_ins_do_not_leak_into_docutils():
    from docutils.core import publish_doctree
    from docutils.parsers.rst import directives, roles

    load_rst(RST.encode(), Path("json.rst"))
    assert "versionadded" not in directives._directives
    assert "func" not in roles._roles
    document = publish_doctree(
        ".. versionadded:: 3.2\n", settings_overrides={"report_level": 5, "warning_stream": False}
    )
    assert "Unknown directive" in document.astext()


def test_rst_parses_silently(capsys):
    load_rst(
        b"Title\n=====\n\n.. unknown:: x\n\n`unclosed\n\n:bad:role\n\n* list\nnot indented\n",
        Path("x.rst"),
    )
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("data", [b"", b"\n\n", b".. only a comment\n"])
def test_rst_without_text_is_refused(data):
    with pytest.raises(LoadError):
        load_rst(data, Path("empty.rst"))


# --- Jupyter notebooks ------------------------------------------------------------------


def notebook(cells, metadata=None):
    return json.dumps(
        {"nbformat": 4, "nbformat_minor": 5, "metadata": metadata or {}, "cells": cells}
    ).encode()


def test_notebook_cells_and_outputs():
    data = notebook(
        [
            {
                "cell_type": "markdown",
                "metadata": {},
                "source": ["# Sales Analysis\n", "We look at sales."],
            },
            {
                "cell_type": "code",
                "metadata": {},
                "source": "# a comment, not a heading\nprint('total')",
                "outputs": [
                    {"output_type": "stream", "name": "stdout", "text": ["total\n"]},
                    {
                        "output_type": "display_data",
                        "data": {"image/png": "iVBORw0KGgo=", "text/plain": ["<Figure>"]},
                    },
                    {
                        "output_type": "execute_result",
                        "data": {"text/html": ["<b>x</b>"], "text/plain": ["z" * 800]},
                    },
                ],
            },
            {"cell_type": "raw", "metadata": {}, "source": "raw cell for nbconvert"},
            {"cell_type": "markdown", "metadata": {}, "source": "## Results\nSales went up."},
        ],
        metadata={"kernelspec": {"name": "ir", "language": "R"}},
    )
    parsed = load_notebook(data, Path("sales.ipynb"))
    assert parsed.title == "Sales Analysis"
    assert [(s.anchor, s.heading_path) for s in parsed.sections] == [
        ("sales-analysis", ("Sales Analysis",)),
        ("results", ("Sales Analysis", "Results")),
    ]
    first = parsed.sections[0].text
    assert first.startswith(
        "We look at sales.\n\n```r\n# a comment, not a heading\nprint('total')\n```"
    )
    assert "```\ntotal\n```" in first
    assert "z" * 500 + "…" in first and "z" * 501 not in first
    for dropped in ("<Figure>", "iVBORw0KGgo", "<b>x</b>", "raw cell"):
        assert dropped not in first
    assert parsed.sections[1].text == "Sales went up."


def test_notebook_fences_cannot_be_closed_by_cell_content():
    data = notebook(
        [
            {
                "cell_type": "code",
                "metadata": {},
                "source": 'doc = """\n```\n# not a heading\n```"""',
                "outputs": [],
            }
        ]
    )
    parsed = load_notebook(data, Path("fences.ipynb"))
    assert parsed.title == "fences"
    assert len(parsed.sections) == 1
    assert parsed.sections[0].text.startswith("````python\n")


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[" * 100_000,
        b"[1, 2]",
        b'{"nbformat": 4}',
        notebook([]),
        notebook([{"cell_type": "markdown", "source": ""}]),
    ],
)
def test_notebook_invalid_is_refused(data):
    with pytest.raises(LoadError):
        load_notebook(data, Path("bad.ipynb"))


# --- PDF --------------------------------------------------------------------------------


def test_pdf_sample_pages():
    parsed = load_pdf(SAMPLE_PDF.read_bytes(), SAMPLE_PDF)
    assert parsed.title == "Ragline Operations Handbook"
    assert [(s.page, s.anchor, s.heading_path) for s in parsed.sections] == [
        (n, f"page={n}", ("Ragline Operations Handbook", f"Page {n}")) for n in (1, 2, 3)
    ]
    page2 = parsed.sections[1].text
    assert "rate limit is 120 requests per minute per API key" in " ".join(page2.split())
    assert "120 requests" not in parsed.sections[0].text


def test_pdf_title_falls_back_to_file_stem(tmp_path):
    writer = PdfWriter(clone_from=PdfReader(SAMPLE_PDF))
    writer.metadata = None
    buffer = io.BytesIO()
    writer.write(buffer)
    parsed = load_pdf(buffer.getvalue(), tmp_path / "handbook.pdf")
    assert parsed.title == "handbook"


def test_pdf_truncated_is_refused(tmp_path):
    path = tmp_path / "truncated.pdf"
    path.write_bytes(SAMPLE_PDF.read_bytes()[:400])
    with pytest.raises(LoadError, match="PDF"):
        load_pdf(path.read_bytes(), path)


def test_pdf_encrypted_is_refused():
    writer = PdfWriter(clone_from=PdfReader(SAMPLE_PDF))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    with pytest.raises(LoadError, match="encrypted"):
        load_pdf(buffer.getvalue(), Path("locked.pdf"))


def test_pdf_with_only_an_owner_password_loads():
    writer = PdfWriter(clone_from=PdfReader(SAMPLE_PDF))
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    parsed = load_pdf(buffer.getvalue(), Path("restricted.pdf"))
    assert [s.page for s in parsed.sections] == [1, 2, 3]


def test_pdf_without_text_is_refused():
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    buffer = io.BytesIO()
    writer.write(buffer)
    with pytest.raises(LoadError, match="no extractable text"):
        load_pdf(buffer.getvalue(), Path("scan.pdf"))


# --- DOCX -------------------------------------------------------------------------------


def test_docx_sample_sections():
    parsed = load_docx(SAMPLE_DOCX.read_bytes(), SAMPLE_DOCX)
    assert parsed.title == "Ragline Ingest Guide"
    assert [(s.title, s.anchor, s.heading_path) for s in parsed.sections] == [
        ("Ragline Ingest Guide", "ragline-ingest-guide", ("Ragline Ingest Guide",)),
        ("Supported formats", "supported-formats", ("Ragline Ingest Guide", "Supported formats")),
        ("Skipped files", "skipped-files", ("Ragline Ingest Guide", "Skipped files")),
        (
            "Encrypted PDFs",
            "encrypted-pdfs",
            ("Ragline Ingest Guide", "Skipped files", "Encrypted PDFs"),
        ),
        (
            "Scanned documents",
            "scanned-documents",
            ("Ragline Ingest Guide", "Skipped files", "Scanned documents"),
        ),
    ]
    formats = parsed.sections[1].text
    assert formats.startswith("Ragline picks a loader from the file suffix.")
    assert "Format | Suffixes | Sections\nHTML | .html, .htm |" in formats
    assert "PDF | .pdf | One per page" in formats


def test_docx_title_without_core_properties(tmp_path):
    import docx

    document = docx.Document()
    document.core_properties.title = ""
    document.add_paragraph("Opening words.")
    document.add_heading("First Heading", level=1)
    document.add_paragraph("Body.")
    path = tmp_path / "untitled.docx"
    document.save(str(path))
    parsed = load_docx(path.read_bytes(), path)
    assert parsed.title == "First Heading"
    assert [(s.anchor, s.heading_path) for s in parsed.sections] == [
        ("", ("First Heading",)),
        ("first-heading", ("First Heading",)),
    ]


def test_docx_merged_table_cell_is_written_once(tmp_path):
    import docx

    document = docx.Document()
    table = document.add_table(rows=2, cols=3)
    table.cell(0, 0).merge(table.cell(0, 1)).text = "merged"
    table.cell(0, 2).text = "c"
    for column, text in enumerate("xyz"):
        table.cell(1, column).text = text
    path = tmp_path / "merged.docx"
    document.save(str(path))
    assert load_docx(path.read_bytes(), path).sections[0].text == "merged | c\nx | y | z"


@pytest.mark.parametrize("data", [b"", b"\x00\x01garbage" * 50, b"%PDF-1.7 not a zip archive"])
def test_docx_corrupt_is_refused(tmp_path, data):
    path = tmp_path / "broken.docx"
    path.write_bytes(data)
    with pytest.raises(LoadError, match="docx"):
        load_docx(path.read_bytes(), path)


# --- plain text -------------------------------------------------------------------------


def test_text_single_section():
    parsed = load_text(b"First   line\n\n\n\nSecond paragraph.\n", Path("notes.txt"))
    assert parsed.title == "notes"
    assert [(s.title, s.anchor, s.heading_path, s.text) for s in parsed.sections] == [
        ("notes", "", ("notes",), "First line\n\nSecond paragraph.")
    ]


def test_text_latin1_is_decoded(tmp_path):
    text = "Señor Muñoz pidió una canción en la reunión del año pasado. ¿Qué pasó después?"
    path = tmp_path / "legacy.txt"
    path.write_bytes(text.encode("latin-1"))
    parsed = load_text(path.read_bytes(), path)
    assert parsed.sections[0].text == text


@pytest.mark.parametrize(
    "text",
    [
        "Le café était très chaud, à côté de la crème brûlée.",
        "Müller, Jürgen - Straße 5, München. Grüße aus Köln!",
        "Ce n’était pas « facile » — mais ça a marché…",
    ],
)
def test_text_short_western_codepage_is_decoded(text):
    parsed = load_text(text.encode("cp1252"), Path("legacy.txt"))
    assert parsed.sections[0].text == text


@pytest.mark.parametrize("data", [b"", b"  \n\t\n", bytes(range(256)) * 4])
def test_text_empty_or_binary_is_refused(tmp_path, data):
    path = tmp_path / "file.txt"
    path.write_bytes(data)
    with pytest.raises(LoadError):
        load_text(path.read_bytes(), path)


# --- every loader -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(LOADERS))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2000))
def test_loaders_raise_only_load_error(suffix, data):
    """Whatever the bytes, a loader returns sections with text or raises LoadError, nothing else."""
    _format, load = LOADERS[suffix]
    try:
        parsed = load(data, Path(f"fuzz{suffix}"))
    except LoadError as exc:
        assert str(exc)
    else:
        assert parsed.title
        assert all(section.text.strip() for section in parsed.sections)
