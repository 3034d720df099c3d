"""Docs sources as Sphinx projects write them: MyST Markdown, reStructuredText and notebooks.

Most tests read real pages of xarray and Flax (tests/fixtures/docs_sources, see its
README); small pages written here cover markup those pages lack (dropdowns, tabs, colon
fences) and includes that try to leave the ingested folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ragline.ingest.loaders import LoadContext, LoadError, SkipFile, loader_for, run_loader
from ragline.ingest.loaders.markdown import load_markdown
from ragline.ingest.loaders.notebook import MAX_OUTPUT_LINES, load_notebook
from ragline.ingest.loaders.rst import load_rst

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "docs_sources"
XARRAY_DOC = FIXTURES / "xarray" / "doc"
FLAX_DOCS = FIXTURES / "flax" / "docs"

# Markup that must never reach an index: directive fences and markers, option lines, raw HTML, roles.
MARKUP = re.compile(
    r"```\{|^\s*:::|^\s*\.\. [\w:-]+::|\{eval-rst\}|:maxdepth:|:tags:|:members:|^\(\S+\)=$"
    r"|<(?:details|summary|div|br|img|span)\b|\{(?:ref|py:func|py:class|func|class)\}`",
    re.MULTILINE,
)


def load(root: Path, relative: str, *, with_root: bool = True):
    """Load a page as ingest does: its path relative to the ingested folder, and that folder."""
    _format, loader = loader_for(Path(relative))
    context = LoadContext(root) if with_root else LoadContext()
    return run_loader(loader, (root / relative).read_bytes(), Path(relative), context)


def by_anchor(parsed):
    return {section.anchor: section for section in parsed.sections}


def everything(parsed) -> str:
    return "\n".join(section.text for section in parsed.sections)


@pytest.mark.parametrize(
    ("root", "relative"),
    [
        (XARRAY_DOC, "get-help/faq.md"),
        (XARRAY_DOC, "internals/extending-xarray.md"),
        (XARRAY_DOC, "getting-started-guide/installing.rst"),
        (XARRAY_DOC, "gallery.rst"),
        (FLAX_DOCS, "guides/training_techniques/transfer_learning.ipynb"),
        (FLAX_DOCS, "api_reference/flax.linen/module.rst"),
    ],
)
def test_real_pages_index_no_markup(root, relative):
    parsed = load(root, relative)
    assert parsed.sections
    for section in parsed.sections:
        found = MARKUP.search(section.text)
        assert found is None, f"{relative}#{section.anchor}: {found.group(0)!r} in {section.text!r}"


def test_myst_page_eval_rst_roles_code_cells_and_anchors():
    parsed = load(XARRAY_DOC, "get-help/faq.md")
    assert parsed.title == "Frequently Asked Questions"
    sections = by_anchor(parsed)
    # `(approach-to-metadata)=` before the heading is the anchor; other headings get their slug.
    assert sections["approach-to-metadata"].title == "What is your approach to metadata?"
    assert "why-is-pandas-not-enough" in sections
    # An {eval-rst} csv-table is read as reST: its rows are text, its parser messages are not.
    formats = sections["how-do-i-open-format-x-file-as-an-xarray-dataset"].text
    assert "NetCDF (.nc, .nc4, .cdf) | open_dataset() OR open_mfdataset() | netCDF4, cdms2" in formats
    assert "Duplicate name" not in formats and "csv-table" not in formats
    # Roles show their text; a titled {ref} its title.
    assert "accessible with xarray.set_options," in sections["approach-to-metadata"].text
    assert "You can read about switching from Panels to xarray here." in everything(parsed)
    # A code cell is code; one tagged remove-input is not on the page, so not in the index.
    assert "arr = xr.DataArray([1, 2, 3])" in sections["why-don-t-aggregations-return-python-scalars"].text
    assert "np.random.seed(123456)" not in everything(parsed)


def test_myst_literalinclude_inside_the_tree_is_resolved():
    parsed = load(XARRAY_DOC, "internals/extending-xarray.md")
    writing = by_anchor(parsed)["internals-accessors-writing-accessors"].text
    assert '@xr.register_dataset_accessor("geo")\nclass GeoAccessor:' in writing
    assert parsed.notes == []

    unrooted = load(XARRAY_DOC, "internals/extending-xarray.md", with_root=False)
    assert "class GeoAccessor" not in everything(unrooted)
    assert unrooted.notes == [
        "internals/extending-xarray.md: include '../examples/_code/accessor_example.py' not read: "
        "the ingest root is unknown here"
    ]


def test_rst_literalinclude_outside_the_ingested_folder_is_refused():
    # doc/getting-started-guide/installing.rst includes ../../pyproject.toml: outside doc/.
    parsed = load(XARRAY_DOC, "getting-started-guide/installing.rst")
    assert "accel = [" not in everything(parsed)
    assert parsed.notes == [
        "getting-started-guide/installing.rst: include '../../pyproject.toml' not read: "
        "it is outside the ingested folder"
    ]
    # Ingesting the project folder instead, the same file is inside: read, cut by :start-at: and :end-before:.
    whole = load(FIXTURES / "xarray", "doc/getting-started-guide/installing.rst")
    text = everything(whole)
    assert "[project.optional-dependencies]\naccel = [" in text
    assert "[build-system]" not in text and "Excerpt of xarray" not in text
    assert whole.notes == []


def test_rst_missing_includes_are_noted_and_toctrees_dropped():
    parsed = load(XARRAY_DOC, "gallery.rst")
    assert [note.split(" not read: ")[1] for note in parsed.notes] == ["no such file", "no such file"]
    text = everything(parsed)
    assert "examples/weather-data" not in text and "maxdepth" not in text


def test_rst_autodoc_keeps_full_object_names():
    parsed = load(FLAX_DOCS, "api_reference/flax.linen/module.rst")
    lines = parsed.sections[0].text.split("\n\n")
    assert lines[:3] == ["flax.linen", "flax.linen.Module", "flax.linen.apply"]
    assert "flax.linen.share_scope" in lines
    assert "setup, variable" not in parsed.sections[0].text  # the :members: option


def test_rst_page_with_only_a_toctree_is_skipped():
    with pytest.raises(SkipFile, match="table of contents"):
        load(FLAX_DOCS, "guides/training_techniques/index.rst")


def test_jupytext_pair_is_indexed_once_from_the_notebook():
    pair = "guides/training_techniques/transfer_learning"
    with pytest.raises(SkipFile, match="jupytext twin of transfer_learning.ipynb"):
        load(FLAX_DOCS, f"{pair}.md")
    notebook = load(FLAX_DOCS, f"{pair}.ipynb")
    sections = by_anchor(notebook)
    assert "Performance Note\n\nDepending on your task" in sections["transfer-learning"].text
    assert "def load_model():" in sections["create-a-function-for-model-loading"].text
    # Alone (no notebook beside it, here: no root to look in), the MyST twin is read as a notebook.
    twin = load(FLAX_DOCS, f"{pair}.md", with_root=False)
    assert [s.anchor for s in twin.sections] == [s.anchor for s in notebook.sections]
    assert "```python\n%%capture" in by_anchor(twin)["create-a-function-for-model-loading"].text


MYST_PAGE = """\
---
myst:
  substitutions:
    x: 1
---
(start)=
# Guide

```{toctree}
:maxdepth: 2

intro
```

:::{note}
Remember to call {py:func}`jax.jit <jax.jit>` first.
:::

```{dropdown} Advanced options
:open:

Set `max_workers` to the number of cores.
```

::::{tab-set}
:::{tab-item} pip
```{code-block} bash
:linenos:
pip install thing
```
:::
:::{tab-item} conda
Use conda-forge.
:::
::::

```{figure} ../img/diagram.png
---
width: 50%
name: fig-diagram
---
The pipeline at a glance.
```

```{raw} html
<script>alert("not text")</script>
```

<div class="warning-box"><b>Heads up:</b> slow on Windows.</div>

1. Install.
   ```{warning}
   Never as root.
   ```
2. Run {octicon}`rocket` it. <!-- a hidden comment -->

```{include} parts/snippet.md
```

```{include} ../../outside.md
```

```{literalinclude} parts/link.py
```
"""


def test_myst_directives_render_as_the_page_shows_them(tmp_path):
    docs = tmp_path / "docs"
    (docs / "parts").mkdir(parents=True)
    (docs / "guide.md").write_text(MYST_PAGE)
    (docs / "parts" / "snippet.md").write_text("## Included part\n\nText from the snippet.\n")
    (tmp_path / "outside.md").write_text("OUTSIDE TEXT\n")
    (tmp_path / "secret.py").write_text("SECRET = 1\n")
    (docs / "parts" / "link.py").symlink_to(tmp_path / "secret.py")  # escapes through a link

    parsed = load_markdown(MYST_PAGE.encode(), Path("guide.md"), context=LoadContext(docs))
    assert [(s.anchor, s.heading_path) for s in parsed.sections] == [
        ("start", ("Guide",)),
        ("included-part", ("Guide", "Included part")),  # an include's headings are sections
    ]
    guide, part = (s.text for s in parsed.sections)
    assert guide == (
        "Remember to call jax.jit first.\n\n"
        "Advanced options\n\nSet `max_workers` to the number of cores.\n\n"
        "pip\n\n```bash\npip install thing\n```\n\nconda\n\nUse conda-forge.\n\n"
        "The pipeline at a glance.\n\n"
        "Heads up: slow on Windows.\n\n"
        "1. Install.\n   Never as root.\n2. Run  it."
    )
    assert part == "Text from the snippet."
    assert [note.split(" not read: ")[1] for note in parsed.notes] == [
        "it is outside the ingested folder", "it is outside the ingested folder",
    ]


def test_rst_includes_admonitions_tabs_and_code(tmp_path):
    (tmp_path / "snippets").mkdir()
    (tmp_path / "snippets" / "usage.rst").write_text(
        "Ignored header.\n\n.. start-here\n\nIncluded *usage* text.\n\n.. end-here\n\nIgnored footer.\n"
    )
    (tmp_path / "snippets" / "example.py").write_text(
        "import os\n\n\ndef helper():\n    return 1\n\n\nclass Tool:\n    def run(self):\n        return os.sep\n"
    )
    source = """\
Guide
=====

.. include:: snippets/usage.rst
   :start-after: .. start-here
   :end-before: .. end-here

.. note::

   Admonition text stays.

.. tab-set::

   .. tab-item:: Linux

      Use apt.

.. literalinclude:: snippets/example.py
   :pyobject: Tool.run

.. literalinclude:: snippets/example.py
   :lines: 4-5

|version| substitution and :sub:`x` role.

.. |version| replace:: 1.0
"""
    parsed = load_rst(source.encode(), Path("guide.rst"), context=LoadContext(tmp_path))
    assert parsed.sections[0].text == (
        "Included usage text.\n\nAdmonition text stays.\n\nLinux\n\nUse apt.\n\n"
        "    def run(self):\n        return os.sep\n\n"  # as Sphinx shows it: indented
        "def helper():\n    return 1\n\n"
        "1.0 substitution and x role."
    )
    assert parsed.notes == []


def test_notebook_outputs_are_short_text_only():
    long = "".join(f"row {n}\n" for n in range(100))
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": "# Run\n```{note}\nA *note* cell.\n```"},
        {
            "cell_type": "code", "metadata": {}, "source": "train()",
            "outputs": [
                {"output_type": "stream", "name": "stdout", "text": long},
                {"output_type": "stream", "name": "stderr", "text": "UserWarning: noisy\n"},
                {"output_type": "display_data", "data": {
                    "application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "HBox(...)"}},
                {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["\x1b[31mbad"]},
            ],
        },
        {"cell_type": "code", "metadata": {"tags": ["remove-input"]}, "source": "hidden_setup()",
         "outputs": [{"output_type": "execute_result", "data": {"text/plain": "\x1b[1m42\x1b[0m"}}]},
        {"cell_type": "code", "metadata": {"tags": ["remove-cell"]}, "source": "secret()", "outputs": []},
    ]
    data = json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}).encode()
    text = load_notebook(data, Path("run.ipynb")).sections[0].text
    assert text.startswith("A *note* cell.\n\n```python\ntrain()\n```")
    shown = "".join(f"row {n}\n" for n in range(MAX_OUTPUT_LINES)).rstrip()
    assert f"```\n{shown}…\n```" in text and f"row {MAX_OUTPUT_LINES}" not in text
    assert text.endswith("```\n42\n```")
    for dropped in ("UserWarning", "HBox", "ValueError", "hidden_setup", "secret", "\x1b"):
        assert dropped not in text


def test_run_loader_passes_the_context_only_to_loaders_that_take_it(tmp_path):
    (tmp_path / "part.md").write_text("Included.\n")
    page = b"# T\n\n```{include} part.md\n```\n"
    text_loader = loader_for(Path("notes.txt"))[1]
    assert run_loader(text_loader, page, Path("notes.txt"), LoadContext(tmp_path)).sections[0].text.startswith("# T")
    parsed = run_loader(load_markdown, page, Path("page.md"), LoadContext(tmp_path))
    assert parsed.sections[0].text == "Included."


def test_include_cycles_and_secrets_are_not_read(tmp_path):
    (tmp_path / "a.md").write_text("A text.\n\n```{include} b.md\n```\n")
    (tmp_path / "b.md").write_text("B text.\n\n```{include} a.md\n```\n")
    (tmp_path / ".env").write_text("TOKEN=abc\n")
    page = (tmp_path / "a.md").read_bytes() + b"\n```{literalinclude} .env\n```\n"
    context = LoadContext(tmp_path, secrets=(".env",))
    parsed = load_markdown(page, Path("a.md"), context=context)
    assert parsed.sections[0].text == "A text.\n\nB text."
    assert [note.split(" not read: ")[1] for note in parsed.notes] == [
        "it includes itself", "its name matches ingest.exclude_secrets '.env'",
    ]
    with pytest.raises(LoadError):
        load_markdown(b"```{toctree}\nintro\n```\n", Path("index.md"))
