"""Markdown loader (CommonMark with tables, YAML front matter and MyST `(label)=` targets).

The file is cut at each heading. A section's text is the Markdown source of its body,
block by block, so code fences stay exactly as written; front matter, MyST targets,
comments and block breaks are left out. Anchors follow what Sphinx/MyST publish: the
explicit `(label)=` target right before a heading, else the docutils slug of its text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from docutils.nodes import make_id
from markdown_it import MarkdownIt
from markdown_it.token import Token
from mdit_py_plugins.front_matter import front_matter_plugin
from mdit_py_plugins.myst_blocks import myst_block_plugin

from ragline.ingest.loaders.base import LoadError, ParsedFile, decode_text
from ragline.ingest.loaders.text import SectionCutter

_PARSER = MarkdownIt("commonmark").enable("table").use(front_matter_plugin).use(myst_block_plugin)
# Top-level blocks that are markup, not content.
_SKIPPED_BLOCKS = frozenset(
    {"front_matter", "myst_target", "myst_line_comment", "myst_block_break"}
)
_NEWLINE = re.compile(r"\r\n?|\n")
_LINE_BREAKS = frozenset({"softbreak", "hardbreak"})


def load_markdown(data: bytes, path: Path) -> ParsedFile:
    """Load a Markdown file as one section per heading."""
    return split_markdown(decode_text(data, path), path.stem)


def split_markdown(source: str, fallback_title: str) -> ParsedFile:
    """Cut Markdown source into sections; also used for notebooks once rendered to Markdown.

    The document title is the first h1, else the front matter `title`, else `fallback_title`.
    Text before the first heading becomes a section named after the document, anchor "".
    """
    lines = _NEWLINE.split(source)  # numbered as markdown-it numbers them, for token.map
    blocks = _top_level_blocks(_PARSER.parse(source))
    title = _first_h1(blocks) or _front_matter_title(blocks) or fallback_title
    cutter = SectionCutter(title)
    for index, block in enumerate(blocks):
        token = block.token
        if token.type == "heading_open":
            anchor = _target_before(blocks, index) or make_id(block.heading)
            cutter.heading(int(token.tag[1]), block.heading, anchor)
        elif token.type not in _SKIPPED_BLOCKS and token.map:
            start, end = token.map
            cutter.add("\n".join(lines[start:end]), code=True)  # source kept as written
    sections = cutter.finish()
    if not sections:
        raise LoadError("no text: the file is empty or holds only headings")
    return ParsedFile(title, sections)


@dataclass(frozen=True, slots=True)
class _Block:
    """A top-level block token, with the plain text of the heading when it is one."""

    token: Token
    heading: str = ""


def _top_level_blocks(tokens: list[Token]) -> list[_Block]:
    """The blocks at the top of the document: headings quoted or inside lists don't cut sections."""
    return [
        _Block(token, _inline_text(tokens[i + 1]) if token.type == "heading_open" else "")
        for i, token in enumerate(tokens)
        if token.level == 0 and token.map
    ]


def _inline_text(inline: Token) -> str:
    """Plain text of inline Markdown: `code` and *emphasis* lose their markup."""
    parts = [
        " " if child.type in _LINE_BREAKS else child.content for child in inline.children or ()
    ]
    return " ".join("".join(parts).split())


def _target_before(blocks: list[_Block], index: int) -> str:
    """The id of a MyST `(label)=` target right before the heading at `index`, if any."""
    before = blocks[index - 1].token if index else None
    if before is not None and before.type == "myst_target":
        return make_id(before.content)
    return ""


def _first_h1(blocks: list[_Block]) -> str:
    return next((b.heading for b in blocks if b.token.tag == "h1" and b.heading), "")


def _front_matter_title(blocks: list[_Block]) -> str:
    """The `title:` of YAML front matter; a malformed header is ignored, not fatal."""
    if not blocks or blocks[0].token.type != "front_matter":
        return ""
    try:
        meta = yaml.safe_load(blocks[0].token.content)
    except yaml.YAMLError:
        return ""
    title = meta.get("title") if isinstance(meta, dict) else None
    return " ".join(str(title).split()) if title else ""
