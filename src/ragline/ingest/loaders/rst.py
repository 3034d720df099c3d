"""reStructuredText loader, on docutils, tolerant of Sphinx markup.

Docs sources are written for Sphinx, whose directives (`versionadded`, `function`,
`toctree`…) and roles (`:func:`, `:ref:`…) plain docutils does not know. Before
parsing, the source is scanned for such names and stand-ins are registered just for
that parse: a directive that keeps its argument and content as text, and a role that
keeps its text. Docutils never aborts nor prints here: every report level is raised
above what the parser emits, and raw output is disabled.

What a reader of the built page sees is kept, and only that: code keeps its lines;
toctrees, index entries, raw HTML, images (a figure keeps its caption) and option
lines are dropped; an autodoc directive (`.. autoclass:: Module` under
`.. currentmodule:: flax.linen`) keeps the object's full name as a line, since its
docstring is not in the docs source. `include` and `literalinclude` read files of the
ingested tree only (see `LoadContext`); one that cannot be read is noted and skipped.
An included file is not tracked: when it changes, the including page is re-indexed
only once it changes too.

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
from pathlib import Path, PurePosixPath
from typing import Protocol

from docutils import frontend, nodes, utils
from docutils.core import publish_doctree
from docutils.parsers.rst import Directive, Parser, directives, roles
from docutils.parsers.rst.languages import en

from ragline.ingest.loaders.base import (
    Includes,
    LoadContext,
    LoadError,
    ParsedFile,
    SkipFile,
    decode_text,
    select_lines,
)
from ragline.ingest.loaders.text import Block, SectionCutter

_SETTINGS = {
    "report_level": 5,  # above "severe" (4): nothing is ever reported…
    "halt_level": 5,  # …nor aborts the parse
    "warning_stream": False,  # and nothing is written anywhere
    "file_insertion_enabled": False,  # docutils' own file reading stays off: includes go through LoadContext
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
_TOCTREE = re.compile(r"^[ \t]*\.\.[ \t]+toctree[ \t]?::", re.MULTILINE)
TOC_ONLY = "only a title and a table of contents (toctree): no text of its own to index"

# Sphinx directives whose content is code, not reStructuredText. Docutils' `code` (which
# `code-block` and `sourcecode` map to) refuses Sphinx options like `:linenos:` and would
# drop the code, so they are replaced too.
LITERAL_DIRECTIVES = frozenset(
    {
        "code", "code-block", "sourcecode", "doctest", "testcode", "testoutput", "productionlist",
        "ipython", "jupyter-execute", "code-cell", "codediff",
    }
)  # fmt: skip
# Directives that render nothing a reader can search: their arguments and content are not text.
HIDDEN_DIRECTIVES = frozenset(
    {
        "index", "highlight", "sectionauthor", "moduleauthor", "codeauthor", "tabularcolumns",
        "testsetup", "testcleanup", "toctree", "contents", "tableofcontents", "raw", "image",
        "meta", "mermaid", "graphviz", "graph", "digraph", "plot", "bibliography", "iframe",
        "youtube", "video", "glue", "glue:any", "glue:figure", "glue:math", "glue:md", "glue:text",
    }
)  # fmt: skip
# Directives whose argument is not text (an image path, grid columns, CSS classes, a build
# condition): only their content is read.
UNTITLED_DIRECTIVES = frozenset(
    {"figure", "grid", "div", "container", "class", "only", "ifconfig", "tab-set", "card-carousel",
     "button-link", "button-ref"}
)  # fmt: skip
# Directives that set the module later autodoc names are relative to.
MODULE_DIRECTIVES = frozenset({"module", "py:module", "currentmodule", "py:currentmodule"})
# Autodoc directives documenting a class member: `Class.method` is relative to the module.
_MEMBER_AUTODOC = frozenset({"automethod", "autoattribute", "autoproperty"})
# Roles that show an icon or a value computed at build time: no text in the source.
HIDDEN_ROLES = frozenset({"octicon", "fa", "fas", "far", "fab", "glue", "glue:any", "glue:text", "glue:md"})
# How Sphinx words its version notes: `.. versionadded:: 3.2 Some note.`
VERSION_NOTES = {
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


def load_rst(data: bytes, path: Path, *, context: LoadContext = LoadContext()) -> ParsedFile:
    """Load a reStructuredText file as one section per docutils section."""
    source = decode_text(data, path)
    if not source.strip():
        raise LoadError("empty file")
    includes = Includes(context)
    document = parse_rst(source, PurePosixPath(path.as_posix()), includes)
    first_section = next(iter(document.findall(nodes.section)), None)
    title = (
        document.get("title") or (_title_of(first_section) if first_section else "") or path.stem
    )
    cutter = SectionCutter(title)
    _cut(document, cutter, depth=1)
    sections = cutter.finish()
    if not sections:
        if _TOCTREE.search(source):
            raise SkipFile(TOC_ONLY)
        raise LoadError("no text in the document")
    return ParsedFile(title, sections, includes.notes)


def rst_blocks(source: str, path: PurePosixPath, includes: Includes) -> list[Block]:
    """The blocks of reStructuredText embedded in another format (MyST `{eval-rst}`).

    Section titles inside it become lines of text: the embedding page has the sections.
    """
    blocks = BlockList()
    _cut(parse_rst(source, path, includes), blocks, depth=1)
    return blocks.blocks


def parse_rst(source: str, path: PurePosixPath, includes: Includes) -> nodes.document:
    """The docutils tree of `source`, with the stand-ins for Sphinx markup."""
    try:
        with _stand_ins(source, includes):
            document = publish_doctree(source, source_path=str(path), settings_overrides=_SETTINGS)
    except Exception as exc:  # docutils raises many types on odd input; none may escape
        raise LoadError(f"unreadable reStructuredText: {exc}") from exc
    for message in list(document.findall(nodes.system_message)):  # also those inside table cells
        message.parent.remove(message)
    return document


class Sink(Protocol):
    """Where a document's headings and blocks go: a `SectionCutter`, or a `BlockList`."""

    def heading(self, level: int, title: str, anchor: str) -> None: ...

    def add(self, text: str, *, code: bool = False) -> None: ...


class BlockList:
    """A sink for markup nested inside a section: headings there are lines of text, not sections."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def heading(self, level: int, title: str, anchor: str) -> None:
        self.add(title)

    def add(self, text: str, *, code: bool = False) -> None:
        self.blocks.append((text, code))


def _cut(parent: nodes.Element, sink: Sink, depth: int) -> None:
    """Feed the text of `parent`, then its subsections, to the sink.

    Docutils puts a section's body elements before its subsections, so reading the
    children in order gives each section its own text only.
    """
    for child in parent.children:
        if isinstance(child, nodes.section):
            sink.heading(depth, _title_of(child), child["ids"][0] if child["ids"] else "")
            _cut(child, sink, depth + 1)
        elif not isinstance(child, nodes.title):
            for text, code in _blocks(child):
                sink.add(text, code=code)


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


def role_text(text: str) -> str:
    """What a cross-reference role shows: `Basic usage <basic-usage>` → "Basic usage", `~a.b` → "a.b".

    Sphinx's `~` shortens to the last name in the built page; the full name is kept here,
    as it is what a search for it needs.
    """
    titled = _TITLED_TARGET.match(text)
    return (titled.group(1) or titled.group(2)) if titled else text.lstrip("~!")


def worded(directive: str, argument: str) -> str:
    """A directive's argument as the page shows it: `versionadded 3.2 Note.` → "New in version 3.2: Note."."""
    if directive not in VERSION_NOTES or not argument.split():
        return argument
    version, *note = argument.split(None, 1)
    wording = f"{VERSION_NOTES[directive]} {version}"
    return f"{wording}: {note[0]}" if note else wording


def autodoc_names(directive: str, argument: str, content: list[str], module: str) -> list[str]:
    """The full names an autodoc directive documents, as Sphinx resolves them against `module`.

    `autosummary` lists its names as content; `Class.method` of a member directive and a
    bare name of the others are relative to the current module.
    """
    names = [line.strip() for line in content if line.strip()] if directive == "autosummary" else [argument]
    full = []
    for name in (n.split("(")[0].strip().lstrip("~") for n in names):
        dots = name.count(".")
        relative = dots <= 1 if directive in _MEMBER_AUTODOC else dots == 0 or directive == "autosummary"
        if module and relative and not name.startswith(f"{module}.") and directive != "automodule":
            name = f"{module}.{name}"
        if name:
            full.append(name)
    return full


@contextmanager
def _stand_ins(source: str, includes: Includes) -> Iterator[None]:
    """Register, for one parse, stand-ins for the Sphinx markup in `source`.

    The registries are restored afterwards, so that nothing leaks into later parses or
    into other users of docutils in this process (Sphinx does the same around its builds).
    """
    with _REGISTRY_LOCK:
        saved_directives, saved_roles = dict(directives._directives), dict(roles._roles)
        try:
            _Parse(includes).register_for(source)
            yield
        finally:
            directives._directives.clear()
            directives._directives.update(saved_directives)
            roles._roles.clear()
            roles._roles.update(saved_roles)


class _Parse:
    """One parse: its includes, the current module for autodoc names, and its stand-ins."""

    def __init__(self, includes: Includes) -> None:
        self.includes = includes
        self.module = ""
        self._check = utils.new_document("<stand-in check>", _CHECK_SETTINGS)
        self._bound: dict[type[Directive], type[Directive]] = {}

    def register_for(self, source: str) -> None:
        """Register stand-ins for the directives and roles of `source` (the page, or a file it includes)."""
        for name in {m.group(1).lower() for m in _DIRECTIVE.finditer(source)}:
            stand_in = self._stand_in(name)
            if stand_in is not None:
                directives.register_directive(name, stand_in)
        for name in {(m.group(1) or m.group(2)).lower() for m in _ROLE.finditer(source)}:
            if name in HIDDEN_ROLES:
                roles.register_local_role(name, _hidden_role)
            elif roles.role(name, en, 0, self._check.reporter)[0] is None:
                roles.register_local_role(name, _text_role)

    def _stand_in(self, name: str) -> type[Directive] | None:
        """The stand-in to register for directive `name`, or None to keep docutils' own."""
        if name in ("include", "literalinclude"):
            return self._bind(_IncludeDirective)
        if name in MODULE_DIRECTIVES:
            return self._bind(_ModuleDirective)
        if name.startswith("auto"):
            return self._bind(_AutodocDirective)
        if name in HIDDEN_DIRECTIVES:
            return _HiddenDirective
        if name in LITERAL_DIRECTIVES:
            return _LiteralDirective
        if name in UNTITLED_DIRECTIVES:
            return _UntitledDirective
        known, _messages = directives.directive(name, en, self._check)
        return None if known else _TextDirective

    def _bind(self, directive: type[_ParseDirective]) -> type[Directive]:
        """A subclass of `directive` that sees this parse (docutils instantiates directives itself)."""
        if directive not in self._bound:
            self._bound[directive] = type(directive.__name__, (directive,), {"parse": self})
        return self._bound[directive]


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
            container += self._paragraph(worded(self.name, self.arguments[0]))
        self.state.nested_parse(self.content, self.content_offset, container)
        return [container]

    def _paragraph(self, text: str) -> nodes.paragraph:
        text_nodes, _messages = self.state.inline_text(text, self.lineno)
        return nodes.paragraph(text, "", *text_nodes)


class _UntitledDirective(_TextDirective):
    """Stands in for a directive whose argument is not text (a figure's image path): its content only."""

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(self.content, self.content_offset, container)
        return [container]


class _HiddenDirective(_TextDirective):
    """Stands in for a directive that shows nothing: index entries, toctrees, raw HTML…"""

    def run(self) -> list[nodes.Node]:
        return []


class _LiteralDirective(_TextDirective):
    """Stands in for a directive whose content is code: kept line for line."""

    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        return [nodes.literal_block(code, code)]


class _ParseDirective(_TextDirective):
    """A stand-in that needs the state of its parse; `_Parse._bind` sets `parse`."""

    parse: _Parse


class _ModuleDirective(_ParseDirective):
    """`currentmodule`, `module`: nothing shown, but later autodoc names are relative to it."""

    def run(self) -> list[nodes.Node]:
        if self.arguments:
            self.parse.module = "" if self.arguments[0].strip() == "None" else self.arguments[0].strip()
        return []


class _AutodocDirective(_ParseDirective):
    """`autoclass` and the like: the object's full name, as a line (the docstring is not in the source)."""

    def run(self) -> list[nodes.Node]:
        names = autodoc_names(self.name, self.arguments[0] if self.arguments else "", list(self.content), self.parse.module)
        if self.name == "automodule" and names:
            self.parse.module = names[0]
        container = nodes.container()
        container += [nodes.paragraph(name, name) for name in names]
        if self.name != "autosummary":  # autosummary's content is its list of names
            self.state.nested_parse(self.content, self.content_offset, container)
        return [container]


class _IncludeDirective(_ParseDirective):
    """`include` and `literalinclude` of a file of the ingested tree, else nothing (and a note)."""

    required_arguments = 1
    optional_arguments = 0
    has_content = False

    def run(self) -> list[nodes.Node]:
        machine = self.state_machine
        where = PurePosixPath(machine.input_lines.source(self.lineno - machine.input_offset - 1))
        found = self.parse.includes.read(where, self.arguments[0])
        if found is None:
            return []
        relative, text = found
        text = select_lines(text, self.options)
        if self.name == "literalinclude" or "literal" in self.options or "code" in self.options:
            caption = self.options.get("caption")
            shown: list[nodes.Node] = [self._paragraph(caption)] if caption else []
            return [*shown, nodes.literal_block(text, text)]
        self.parse.register_for(text)
        machine.insert_input(text.splitlines(), str(relative))
        return []


def _text_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: object,
    options: dict | None = None,
    content: list[str] | None = None,
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """Stands in for an unknown role: `:func:`json.dumps`` shows "json.dumps"."""
    return [nodes.literal(rawtext, role_text(utils.unescape(text)))], []


def _hidden_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: object,
    options: dict | None = None,
    content: list[str] | None = None,
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """Stands in for a role that shows an icon or a computed value: nothing to read."""
    return [], []
