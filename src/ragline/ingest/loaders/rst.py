"""reStructuredText loader, on docutils, tolerant of Sphinx markup.

Docs sources are written for Sphinx, whose directives (`versionadded`, `function`,
`toctree`…) and roles (`:func:`, `:ref:`…) plain docutils does not know. Before
parsing, the source is scanned for such names and generic stand-ins are registered
just for that parse: a directive that keeps its argument and content as text, and a
role that keeps its text. Docutils never aborts nor prints here: every report level is
raised above what the parser emits, and file insertion and raw output are disabled.

One Section per docutils `section` node. Its anchor is `section['ids'][0]`: the id that
both docutils' and Sphinx's HTML writers put on the `<section>` element (the title's slug
in plain docutils; explicit `.. _label:` targets add more ids, rendered as extra
`<span id>` anchors, which are valid too but not the element's own).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from docutils import frontend, nodes, utils
from docutils.core import publish_doctree
from docutils.parsers.rst import Directive, Parser, directives, roles
from docutils.parsers.rst.languages import en

from ragline.ingest.loaders.base import LoadError, ParsedFile, decode_text
from ragline.ingest.loaders.text import Block, SectionCutter

_SETTINGS = {
    "report_level": 5,  # above "severe" (4): nothing is ever reported…
    "halt_level": 5,  # …nor aborts the parse
    "warning_stream": False,  # and nothing is written anywhere
    "file_insertion_enabled": False,  # `.. include::` must not read the indexing host's files
    "raw_enabled": False,
    "doctitle_xform": False,  # keep the title section a section, with its id, as Sphinx does
    "syntax_highlight": "none",
    "smart_quotes": True,  # "---" → "—" and curly quotes, as Sphinx renders them
    "_disable_config": True,  # ignore docutils.conf files on the host
}

_NAME = r"(?:(?!_)\w)+(?:[-._+:](?:(?!_)\w)+)*"  # docutils' "simplename"
_DIRECTIVE = re.compile(rf"^[ \t]*\.\.[ \t]+(?:\|[^|\n]+\|[ \t]+)?({_NAME})[ \t]?::", re.MULTILINE)
_ROLE = re.compile(rf"(?<![\w:`]):({_NAME}):`|`:({_NAME}):")
_TITLED_TARGET = re.compile(r"^(.*?)\s*<(.+)>$", re.DOTALL)

# Sphinx directives whose content is code, not reStructuredText. Docutils maps `code-block`
# and `sourcecode` to its `code` directive, which refuses Sphinx options like `:linenos:`
# and would drop the code, so they are replaced too.
_LITERAL_DIRECTIVES = frozenset(
    {"code-block", "sourcecode", "doctest", "testcode", "testoutput", "productionlist"}
)
# Sphinx directives that render nothing a reader sees: their arguments are not text.
_HIDDEN_DIRECTIVES = frozenset(
    {
        "index", "highlight", "module", "py:module", "currentmodule", "py:currentmodule",
        "sectionauthor", "moduleauthor", "codeauthor", "tabularcolumns", "testsetup",
        "testcleanup",
    }
)  # fmt: skip
# How Sphinx words its version notes: `.. versionadded:: 3.2 Some note.`
_VERSION_NOTES = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
}
# Settings for the empty document that markup names are looked up against: silent too.
_CHECK_SETTINGS = frontend.get_default_settings(Parser)
_CHECK_SETTINGS.report_level = _CHECK_SETTINGS.halt_level = 5
_CHECK_SETTINGS.warning_stream = False
# Docutils' directive and role registries are module globals: one parse at a time changes them.
_REGISTRY_LOCK = threading.Lock()


def load_rst(data: bytes, path: Path) -> ParsedFile:
    """Load a reStructuredText file as one section per docutils section."""
    source = decode_text(data, path)
    if not source.strip():
        raise LoadError("empty file")
    try:
        with _stand_ins_for_unknown_markup(source):
            document = publish_doctree(source, source_path=str(path), settings_overrides=_SETTINGS)
    except Exception as exc:  # docutils raises many types on odd input; none may escape
        raise LoadError(f"unreadable reStructuredText: {exc}") from exc

    first_section = next(iter(document.findall(nodes.section)), None)
    title = (
        document.get("title") or (_title_of(first_section) if first_section else "") or path.stem
    )
    cutter = SectionCutter(title)
    _cut(document, cutter, depth=1)
    sections = cutter.finish()
    if not sections:
        raise LoadError("no text in the document")
    return ParsedFile(title, sections)


def _cut(parent: nodes.Element, cutter: SectionCutter, depth: int) -> None:
    """Feed the text of `parent`, then its subsections, to the cutter.

    Docutils puts a section's body elements before its subsections, so reading the
    children in order gives each section its own text only.
    """
    for child in parent.children:
        if isinstance(child, nodes.section):
            cutter.heading(depth, _title_of(child), child["ids"][0] if child["ids"] else "")
            _cut(child, cutter, depth + 1)
        elif not isinstance(child, nodes.title):
            for text, code in _blocks(child):
                cutter.add(text, code=code)


def _blocks(node: nodes.Node) -> Iterator[Block]:
    """The readable blocks of a body element: paragraphs, code, table rows, list items…"""
    if isinstance(node, (nodes.Invisible, nodes.system_message, nodes.raw)):
        return  # comments, targets, substitution definitions, parser messages
    if isinstance(node, nodes.FixedTextElement):  # literal and doctest blocks, math, addresses
        yield node.astext(), True
    elif isinstance(node, nodes.row):
        yield " | ".join(_one_line(entry) for entry in node.children), False
    elif isinstance(node, nodes.TextElement):
        yield _one_line(node), False  # unwrap the source's line breaks, as a browser does
    elif isinstance(node, nodes.Element):
        for child in node.children:
            yield from _blocks(child)


def _one_line(node: nodes.Node) -> str:
    return " ".join(node.astext().split())


def _title_of(section: nodes.section) -> str:
    first = section.children[0] if section.children else None
    return _one_line(first) if isinstance(first, nodes.title) else ""


@contextmanager
def _stand_ins_for_unknown_markup(source: str) -> Iterator[None]:
    """Register stand-ins for the directives and roles in `source` that docutils lacks.

    The registries are restored afterwards, so that nothing leaks into later parses or
    into other users of docutils in this process (Sphinx does the same around its builds).
    """
    with _REGISTRY_LOCK:
        saved_directives, saved_roles = dict(directives._directives), dict(roles._roles)
        try:
            document = utils.new_document("<stand-in check>", _CHECK_SETTINGS)
            for name in {m.group(1).lower() for m in _DIRECTIVE.finditer(source)}:
                stand_in = _directive_stand_in(name, document)
                if stand_in is not None:
                    directives.register_directive(name, stand_in)
            for name in {(m.group(1) or m.group(2)).lower() for m in _ROLE.finditer(source)}:
                if roles.role(name, en, 0, document.reporter)[0] is None:
                    roles.register_local_role(name, _text_role)
            yield
        finally:
            directives._directives.clear()
            directives._directives.update(saved_directives)
            roles._roles.clear()
            roles._roles.update(saved_roles)


def _directive_stand_in(name: str, document: nodes.document) -> type[Directive] | None:
    """The stand-in to register for directive `name`, or None to keep docutils' own."""
    if name in _HIDDEN_DIRECTIVES:
        return _HiddenDirective
    if name in _LITERAL_DIRECTIVES:
        return _LiteralDirective
    known, _messages = directives.directive(name, en, document)
    return None if known else _TextDirective


class _AnyOption(dict):
    """An option spec accepting every option (`:maxdepth: 2`, `:noindex:`…) as plain text."""

    def __missing__(self, key: str) -> object:
        return directives.unchanged


class _TextDirective(Directive):
    """Stands in for an unknown directive: its argument, then its content as body elements."""

    optional_arguments = 1
    final_argument_whitespace = True
    has_content = True
    option_spec = _AnyOption(name=directives.unchanged)  # non-empty: docutils skips empty specs

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        if self.arguments:
            wording = self._worded(self.arguments[0])
            text_nodes, _messages = self.state.inline_text(wording, self.lineno)
            container += nodes.paragraph(wording, "", *text_nodes)
        self.state.nested_parse(self.content, self.content_offset, container)
        return [container]

    def _worded(self, argument: str) -> str:
        if self.name not in _VERSION_NOTES:
            return argument
        version, *note = argument.split(None, 1)
        wording = f"{_VERSION_NOTES[self.name]} {version}"
        return f"{wording}: {note[0]}" if note else wording


class _HiddenDirective(_TextDirective):
    """Stands in for a directive that shows nothing: index entries, highlighting defaults…"""

    def run(self) -> list[nodes.Node]:
        return []


class _LiteralDirective(_TextDirective):
    """Stands in for an unknown directive whose content is code: kept line for line."""

    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        return [nodes.literal_block(code, code)]


def _text_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: object,
    options: dict | None = None,
    content: list[str] | None = None,
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """Stands in for an unknown role: `:func:`json.dumps`` shows "json.dumps".

    Cross-reference roles may carry an explicit title (`:ref:`Basic usage <basic-usage>``),
    which is what a reader sees; Sphinx's `~` and `!` prefixes are dropped.
    """
    shown = utils.unescape(text)
    titled = _TITLED_TARGET.match(shown)
    shown = titled.group(1) or titled.group(2) if titled else shown.lstrip("~!")
    return [nodes.literal(rawtext, shown)], []
