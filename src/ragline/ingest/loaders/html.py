"""HTML loader: Sphinx pages split by section and API entry, other pages split by headings.

Only the main content counts (`div[role=main]`, `div.body`, `main`, `article`, else
`body`); navigation, page chrome, scripts, forms and Sphinx's "¶" permalinks are skipped.

* Sphinx mode (the content has `section[id]` or `div.section[id]`): each section element
  is a Section anchored at its id, and so is each API description (`<dl>` whose `<dt>`
  has an id, like `json.dumps`), down to methods inside a class. A section keeps only
  its own text; nested sections and descriptions become sections of their own, and a
  section left with no text of its own lists their titles instead.
* Generic mode: the page is cut at each h1-h6, anchored at the heading's id, an `<a>`
  id/name target at the heading, else the docutils slug of the heading text.

It is built on lxml rather than BeautifulSoup because the Python docs (530 pages) are an
ingest benchmark: parsing and walking a page with lxml takes a few milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from docutils.nodes import make_id
from lxml import etree

from ragline.ingest.loaders.base import LoadError, ParsedFile
from ragline.ingest.loaders.text import Block, Outline, join_blocks
from ragline.types import Section


def _class_is(name: str) -> str:
    """XPath test for an element whose class list holds `name`."""
    return f'contains(concat(" ", normalize-space(@class), " "), " {name} ")'


_MAIN_CONTENT = (
    '//div[@role="main"]',
    f"//div[{_class_is('body')}]",
    "//main",
    "//article",
    '//*[@role="main"]',
)
_SPHINX_SECTION = f".//section[@id] | .//div[@id][{_class_is('section')}]"  # older Sphinx: div
_NOISE_TAGS = frozenset(
    {"nav", "header", "footer", "aside", "script", "style", "noscript", "form", "template"}
)
_NOISE_ROLES = frozenset({"navigation", "search"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
# Elements that start and end a block of text. Everything else (span, a, code, em…)
# is inline: its text is joined to its neighbours exactly as written in the source.
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "blockquote", "caption", "center", "dd", "details", "dialog",
        "div", "dl", "dt", "fieldset", "figcaption", "figure", "h1", "h2", "h3", "h4", "h5",
        "h6", "hr", "li", "main", "ol", "p", "section", "summary", "ul",
    }
)  # fmt: skip
_TITLE_SEPARATORS = (" — ", " | ")
_SPACES = re.compile(r"\s+")

# Claims a child element for sectioning (returns True), or leaves it to text extraction.
Claim = Callable[[etree._Element], bool]


def load_html(data: bytes, path: Path) -> ParsedFile:
    """Load an HTML page as sections of its main content."""
    root = _parse(data)
    main = _main_content(root)
    title = _document_title(root, main, path)
    page = _PageSplitter(title, sphinx=bool(main.xpath(_SPHINX_SECTION)))
    collector = page.collector
    _collect(main, collector, page.claim)
    sections = collector.sections()
    if not sections:
        raise LoadError("no text in the page's main content")
    return ParsedFile(title, sections)


def _parse(data: bytes) -> etree._Element:
    """Parse bytes as HTML: UTF-8 when they decode as such, else what <meta charset> says."""
    if not data.strip():
        raise LoadError("empty file")
    try:
        data.decode("utf-8")
        encoding: str | None = "utf-8"
    except UnicodeDecodeError:
        encoding = None
    parser = etree.HTMLParser(encoding=encoding, remove_comments=True, remove_pis=True)
    try:
        root = etree.fromstring(data, parser)
    except (etree.LxmlError, ValueError) as exc:
        raise LoadError(f"unreadable HTML: {exc}") from exc
    if root is None:
        raise LoadError("unreadable HTML: no elements")
    return root


def _main_content(root: etree._Element) -> etree._Element:
    for query in _MAIN_CONTENT:
        found = root.xpath(query)
        if found:
            return found[0]
    body = root.find("body")
    return body if body is not None else root


def _document_title(root: etree._Element, main: etree._Element, path: Path) -> str:
    """The <title> less the site name after " — " or " | ", else the first h1, else the stem."""
    title_el = root.find(".//title")
    title = _squash(title_el.text or "") if title_el is not None else ""
    for separator in _TITLE_SEPARATORS:
        if separator in title:
            title = title.rsplit(separator, 1)[0].strip()
            break
    if not title:
        h1 = main.find(".//h1")
        title = _plain_text(h1) if h1 is not None else ""
    return title or path.stem


@dataclass(slots=True)
class _Part:
    """A section being collected."""

    title: str
    anchor: str
    heading_path: tuple[str, ...]
    depth: int = 0  # nesting of Sphinx sections and entries
    blocks: list[Block] = field(default_factory=list)


class _Collector:
    """Gathers text as blocks into the current part; sectioning switches the current part.

    Inline text accumulates into the current line; `end_block` closes the block with runs
    of spaces squashed, as a browser renders them (a <br> keeps its line break). `pre`
    content is kept verbatim as a code block.
    """

    def __init__(self, first: _Part) -> None:
        self.parts = [first]
        self.current = first
        self._lines: list[str] = []  # finished lines of the open block, ended by <br>
        self._line: list[str] = []

    def inline(self, text: str) -> None:
        self._line.append(text)

    def line_break(self) -> None:
        self._lines.append(_squash("".join(self._line)))
        self._line.clear()

    def end_block(self) -> None:
        if not (self._line or self._lines):
            return
        self.line_break()
        text = "\n".join(self._lines)
        self._lines.clear()
        if text.strip():
            self.current.blocks.append((text, False))

    def block(self, text: str, *, code: bool = False) -> None:
        self.end_block()
        if text.strip():
            self.current.blocks.append((text, code))

    def start(self, part: _Part) -> _Part:
        """Start collecting into a new part; return the previous one, for `resume`."""
        self.end_block()
        self.parts.append(part)
        previous, self.current = self.current, part
        return previous

    def resume(self, part: _Part) -> None:
        """Go back to an enclosing part once a nested section is done."""
        self.end_block()
        self.current = part

    def sections(self) -> list[Section]:
        self.end_block()
        sections = []
        for part in self.parts:
            text = join_blocks(part.blocks)
            if text:
                sections.append(Section(text, part.title, part.anchor, part.heading_path))
        return sections


def _plain_text(el: etree._Element) -> str:
    """The text of an element on one line, as for a heading or a table cell."""
    collector = _Collector(_Part("", "", ()))
    _collect(el, collector, claim=None)
    collector.end_block()
    return _squash(" ".join(text for text, _ in collector.current.blocks))


def _collect(el: etree._Element, out: _Collector, claim: Claim | None) -> None:
    """Add the text inside `el` to `out`; `claim` may take over children that start sections."""
    if el.text:
        out.inline(el.text)
    for child in el:
        if not (claim and claim(child)):
            _visit(child, out, claim)
        if child.tail:
            out.inline(child.tail)


def _visit(el: etree._Element, out: _Collector, claim: Claim | None) -> None:
    tag = el.tag
    if _is_noise(el):
        return
    if tag == "pre":
        out.block("".join(el.itertext()), code=True)
    elif tag == "br":
        out.line_break()
    elif tag == "table":
        out.block(_table_text(el))
    elif tag in _BLOCK_TAGS:
        out.end_block()
        _collect(el, out, claim)
        out.end_block()
    else:
        _collect(el, out, claim)


def _is_noise(el: etree._Element) -> bool:
    """Page chrome and markup that is not content: navigation, scripts, forms, "¶" links."""
    tag = el.tag
    if not isinstance(tag, str):  # entities and the like
        return True
    if tag == "aside":
        # docutils renders footnotes as <aside class="footnote">: they are content.
        return "footnote" not in el.get("class", "")
    if tag in _NOISE_TAGS or el.get("role") in _NOISE_ROLES:
        return True
    return tag == "a" and "headerlink" in el.get("class", "")


def _table_text(table: etree._Element) -> str:
    """One line per row, cells separated by " | "."""
    rows = []
    for row in table.iter("tr"):
        cells = [_plain_text(cell) for cell in row if cell.tag in ("td", "th")]
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


class _PageSplitter:
    """Decides where sections start: at Sphinx sections and API entries, or at headings."""

    def __init__(self, title: str, *, sphinx: bool) -> None:
        self.outline = Outline(title)
        self.collector = _Collector(_Part(title, "", (title,)))
        self.claim = self._claim_sphinx if sphinx else self._claim_heading
        self._title_headings: set[etree._Element] = set()

    def _claim_sphinx(self, el: etree._Element) -> bool:
        tag = el.tag
        if tag in _HEADINGS:
            return el in self._title_headings  # skip headings already used as titles
        if tag not in ("section", "div", "dl"):
            return False
        anchor = _sphinx_section_id(el)
        if anchor:
            heading = next((child for child in el if child.tag in _HEADINGS), None)
            if heading is not None:
                self._title_headings.add(heading)
            title = _plain_text(heading) if heading is not None else ""
        else:
            term = _description_term(el)
            if term is None:
                return False
            anchor, title = term.get("id"), _api_title(term)
        depth = self.collector.current.depth + 1
        part = _Part(title, anchor, self.outline.enter(depth, title), depth)
        parent = self.collector.start(part)
        first_nested = len(self.collector.parts)
        _collect(el, self.collector, self.claim)
        self.collector.resume(parent)
        if not part.blocks:
            _list_entries(part, self.collector.parts[first_nested:])
        return True

    def _claim_heading(self, el: etree._Element) -> bool:
        if el.tag not in _HEADINGS:
            return False
        title = _plain_text(el)
        if not title:
            return True  # an empty heading carries nothing
        anchor = _heading_anchor(el) or make_id(title)
        path = self.outline.enter(int(el.tag[1]), title)
        self.collector.start(_Part(title, anchor, path))
        return True


def _list_entries(part: _Part, nested: list[_Part]) -> None:
    """Give a section left without text of its own the titles of its direct entries.

    Splitting out API descriptions can empty a section ("Basic Usage" in json.html holds
    only `json.dump`, `json.dumps`…). Like Sphinx's local table of contents, the list keeps
    the section findable and citable instead of silently dropping it.
    """
    titles = [child.title for child in nested if child.depth == part.depth + 1]
    if titles:
        part.blocks.append(("\n".join(titles), False))


def _sphinx_section_id(el: etree._Element) -> str:
    tag = el.tag
    if tag == "section" or (tag == "div" and "section" in el.get("class", "").split()):
        return el.get("id", "")
    return ""


def _description_term(el: etree._Element) -> etree._Element | None:
    """The <dt id> of a Sphinx API description: a <dl> with one <dd> (glossaries have many)."""
    if el.tag != "dl" or len(el.findall("dd")) != 1:
        return None
    return next((dt for dt in el.iterchildren("dt") if dt.get("id")), None)


def _api_title(term: etree._Element) -> str:
    """`json.dumps()` rather than the whole signature, which the entry's text keeps anyway.

    A short title keeps the heading path, prepended to every chunk of the
    entry, from spending the embedding budget on a repeated parameter list.
    """
    names = [  # Sphinx marks the name with both older and newer classes; either will do
        _squash("".join(span.itertext()))
        for span in term.iter("span")
        if {"descclassname", "descname", "sig-prename", "sig-name"} & set(span.get("class", "").split())
    ]
    if not names:
        return _plain_text(term)
    has_parameters = any("sig-paren" in span.get("class", "").split() for span in term.iter("span"))
    return "".join(names) + ("()" if has_parameters else "")


def _heading_anchor(heading: etree._Element) -> str:
    """The heading's id, or an <a id>/<a name> target inside it or just before it."""
    if heading.get("id"):
        return heading.get("id")
    before = heading.getprevious()
    candidates = [
        *heading.iter("a"),
        *([before] if before is not None and before.tag == "a" else []),
    ]
    for link in candidates:
        anchor = link.get("id") or link.get("name")
        if anchor:
            return anchor
    return ""


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text).strip()
