"""Markdown loader: CommonMark with tables and YAML front matter, and the MyST markup of Sphinx docs.

The file is cut at each heading. A section's text is the Markdown source of its body,
block by block, so code fences, lists and tables stay as written, while MyST markup is
rendered to what a reader of the built page sees:

* directives (```` ```{name} ```` and `:::{name}` fences, at any depth): admonitions,
  dropdowns, tabs and cards keep their title and content, read as MyST in turn; code
  directives (`code-block`, `code-cell`…) become plain code fences (a `code-cell` tagged
  `remove-input` or `remove-cell` is left out, as the page shows no code); `eval-rst`
  content is read as reStructuredText; `include`/`literalinclude` are replaced by the file
  they name when it is inside the ingested tree (see `LoadContext`; others are noted and
  skipped); figures keep their caption; autodoc directives keep the object's full name;
  toctrees, images, raw HTML and the like are dropped, and so are option lines;
* roles show their text (`{py:func}`jax.jit`` → `jax.jit`, `{ref}`Title <label>`` → Title);
* HTML blocks keep their visible text; inline tags, HTML and MyST comments, targets and
  block breaks are dropped.

A MyST notebook (front matter with `jupytext` or `kernelspec`) is read the same way, its
`{code-cell}`s in the kernel's language. One with a `jupytext` header and an .ipynb of
the same name beside it (a jupytext pair) is skipped: the .ipynb is indexed instead, as it
carries the outputs, and Sphinx builds it when `.ipynb` precedes `.md` in `source_suffix`,
as paired projects (Flax) configure it.

Anchors follow what Sphinx/MyST publish: the explicit `(label)=` target right before a
heading, else the docutils slug of its text.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from docutils.nodes import make_id
from lxml import etree, html
from markdown_it import MarkdownIt
from markdown_it.token import Token
from mdit_py_plugins.colon_fence import colon_fence_plugin
from mdit_py_plugins.front_matter import front_matter_plugin
from mdit_py_plugins.myst_blocks import myst_block_plugin
from mdit_py_plugins.myst_role import myst_role_plugin

from ragline.ingest.loaders.base import (
    Includes,
    LoadContext,
    LoadError,
    ParsedFile,
    SkipFile,
    decode_text,
    select_lines,
)
from ragline.ingest.loaders.rst import (
    HIDDEN_DIRECTIVES,
    HIDDEN_ROLES,
    LITERAL_DIRECTIVES,
    MODULE_DIRECTIVES,
    TOC_ONLY,
    UNTITLED_DIRECTIVES,
    BlockList,
    Sink,
    autodoc_names,
    role_text,
    rst_blocks,
    worded,
)
from ragline.ingest.loaders.text import SectionCutter, join_blocks

_PARSER = (
    MarkdownIt("commonmark")
    .enable("table")
    .use(front_matter_plugin)
    .use(myst_block_plugin)
    .use(myst_role_plugin)
    .use(colon_fence_plugin)
)
# Blocks that are markup, not content.
_SKIPPED_BLOCKS = frozenset({"front_matter", "myst_target", "myst_line_comment", "myst_block_break"})
_NEWLINE = re.compile(r"\r\n?|\n")
_LINE_BREAKS = frozenset({"softbreak", "hardbreak"})
_DIRECTIVE_HEAD = re.compile(r"^\{([^}\s]+)\}\s*(.*)$", re.DOTALL)
_TOCTREE = re.compile(r"^[ \t>]*(?:`{3,}|~{3,}|:{3,})\{toctree\}", re.MULTILINE)
_OPTION = re.compile(r"^:([\w.-]+):(?:\s+(.*))?$")
# The container markers (quote, list item) in front of a nested block, and their width.
_CONTAINER_PREFIX = re.compile(r"^(?:[ \t]*(?:>[ \t]?|[-*+][ \t]+|\d{1,9}[.)][ \t]+))*[ \t]*")
_HTML_TAGS = (
    "a|abbr|b|big|blockquote|br|center|code|dd|del|details|div|dl|dt|em|font|hr|i|img|ins|kbd|li|"
    "ol|p|pre|s|small|span|strong|sub|summary|sup|table|tbody|td|th|thead|tr|u|ul|video|source|"
    "iframe|figure|figcaption|h[1-6]|input|label|button|svg|path"
)
# Inline markup, scanned left to right: a code span (kept as written), a MyST role, an
# HTML comment, a script or style element, or an HTML tag (dropped, its text kept).
_INLINE = re.compile(
    r"(?P<code>(?P<ticks>`+).+?(?P=ticks))"
    r"|\{(?P<role>[\w:.+-]+)\}(?P<rticks>`+)(?P<body>.+?)(?P=rticks)"
    r"|(?P<drop><!--.*?-->|<(?P<element>script|style)\b.*?</(?P=element)\s*>"
    rf"|</?(?:{_HTML_TAGS})\b[^<>]*>)",
    re.DOTALL | re.IGNORECASE,
)
_BACKTICK_RUN = re.compile(r"`{3,}")
_INVISIBLE_HTML = ("script", "style", "noscript", "template", "svg", "iframe")
_MAX_NESTING = 20  # directives inside directives (a deeper page is pathological)
_REMOVED_CODE_TAGS = frozenset({"remove-cell", "remove-input"})


def load_markdown(data: bytes, path: Path, *, context: LoadContext = LoadContext()) -> ParsedFile:
    """Load a Markdown or MyST file as one section per heading."""
    source = decode_text(data, path)
    relative = PurePosixPath(path.as_posix())
    meta = _front_matter(_PARSER.parse(source))
    if "jupytext" in meta and context.exists(relative.with_suffix(".ipynb")):
        raise SkipFile(f"jupytext twin of {relative.with_suffix('.ipynb').name}, which is indexed instead")
    return split_markdown(source, relative, path.stem, Includes(context), _kernel_language(meta))


def split_markdown(
    source: str, path: PurePosixPath, fallback_title: str, includes: Includes, language: str = "python"
) -> ParsedFile:
    """Cut Markdown source into sections; also used for notebooks once rendered to Markdown.

    The document title is the first h1, else the front matter `title`, else `fallback_title`.
    Text before the first heading becomes a section named after the document, anchor "".
    `language` is that of `{code-cell}`s without one (the notebook's kernel).
    """
    tokens = _PARSER.parse(source)
    title = _first_h1(tokens) or _front_matter_title(tokens) or fallback_title
    cutter = SectionCutter(title)
    _Renderer(includes, language).render(tokens, _NEWLINE.split(source), path, cutter, depth=0)
    sections = cutter.finish()
    if not sections:
        if _TOCTREE.search(source):
            raise SkipFile(TOC_ONLY)
        raise LoadError("no text: the file is empty or holds only headings")
    return ParsedFile(title, sections, includes.notes)


def fence(content: str, language: str) -> str:
    """A fenced code block that its content cannot close early, however many backticks it holds."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(content)), default=2)
    marks = "`" * (longest + 1)
    return f"{marks}{language}\n{content.rstrip()}\n{marks}"


class _Renderer:
    """Renders the blocks of one page (and of the files it includes) into a sink."""

    def __init__(self, includes: Includes, language: str) -> None:
        self.includes = includes
        self.language = language
        self.module = ""  # the current module, for autodoc names

    def render(self, tokens: list[Token], lines: list[str], path: PurePosixPath, sink: Sink, depth: int) -> None:
        """Feed the top-level blocks of a parsed page to the sink: headings cut sections there."""
        top = [i for i, token in enumerate(tokens) if token.level == 0 and token.map]
        for n, i in enumerate(top):
            token = tokens[i]
            if token.type == "heading_open":
                title = _inline_text(tokens[i + 1])
                before = tokens[top[n - 1]] if n else None
                target = before.content if before is not None and before.type == "myst_target" else ""
                sink.heading(int(token.tag[1]), title, make_id(target or title))
            elif token.type in _SKIPPED_BLOCKS:
                continue
            elif _is_directive(token):
                self.directive(token, path, sink, depth)
            elif token.type == "html_block":
                sink.add(_html_text(token.content))
            elif token.type in ("fence", "code_block") and token.map:
                sink.add("\n".join(lines[token.map[0]:token.map[1]]), code=True)  # kept as written
            else:
                end = top[n + 1] if n + 1 < len(top) else len(tokens)
                sink.add(self.block_source(tokens[i:end], lines, path, depth), code=True)

    def render_source(self, source: str, path: PurePosixPath, sink: Sink, depth: int) -> None:
        if depth > _MAX_NESTING:
            return
        self.render(_PARSER.parse(source), _NEWLINE.split(source), path, sink, depth)

    def nested(self, source: str, path: PurePosixPath, depth: int) -> str:
        """The text of MyST inside a directive: its headings are text, not sections."""
        blocks = BlockList()
        self.render_source(source, path, blocks, depth + 1)
        return join_blocks(blocks.blocks)

    def block_source(self, tokens: list[Token], lines: list[str], path: PurePosixPath, depth: int) -> str:
        """The source of a top-level block (paragraph, list, quote, table) as a reader sees it.

        Roles and inline HTML are rendered; directives, HTML blocks and MyST markup nested
        in lists and quotes are replaced by their rendering, behind the same list or quote
        markers; plain code fences inside are kept verbatim.
        """
        start, end = tokens[0].map or (0, 0)
        out: list[str] = []
        line = start
        for token in tokens[1:]:
            if not token.map or token.map[0] < line:
                continue
            first, last = token.map
            verbatim = token.type in ("fence", "code_block") and not _is_directive(token)
            special = _is_directive(token) or token.type == "html_block" or token.type in _SKIPPED_BLOCKS
            if not (verbatim or special):
                continue
            if first > line:
                out.extend(_inline_prose("\n".join(lines[line:first])).split("\n"))
            if verbatim:
                out.extend(lines[first:last])
            else:
                out.extend(_behind_markers(lines[first], self._replacement(token, path, depth)))
            line = last
        if end > line:
            out.extend(_inline_prose("\n".join(lines[line:end])).split("\n"))
        return "\n".join(out)

    def _replacement(self, token: Token, path: PurePosixPath, depth: int) -> str:
        if token.type == "html_block":
            return _html_text(token.content)
        if token.type in _SKIPPED_BLOCKS:
            return ""
        blocks = BlockList()
        self.directive(token, path, blocks, depth + 1)
        return join_blocks(blocks.blocks)

    def directive(self, token: Token, path: PurePosixPath, sink: Sink, depth: int) -> None:
        """Render a directive fence: what the built page shows of it, nothing of its syntax."""
        head = _DIRECTIVE_HEAD.match(token.info.strip())
        name, argument = (head.group(1).lower(), head.group(2).strip()) if head else ("", token.info.strip())
        options, body = _options(token.content)
        if name in ("include", "literalinclude"):
            self.include(name, argument, options, path, sink, depth)
        elif name == "eval-rst":
            try:
                for text, code in rst_blocks(body, path, self.includes):
                    sink.add(text, code=code)
            except LoadError as exc:
                self.includes.notes.append(f"{path}: an eval-rst block was left out: {exc}")
        elif name in MODULE_DIRECTIVES:
            self.module = argument
        elif name.startswith("auto"):
            names = autodoc_names(name, argument, body.split("\n"), self.module)
            if name == "automodule" and names:
                self.module = names[0]
            for full_name in names:
                sink.add(full_name)
            if name != "autosummary":
                sink.add(self.nested(body, path, depth))
        elif name in HIDDEN_DIRECTIVES:
            return
        elif name == "math":
            sink.add(body, code=True)
        elif name in LITERAL_DIRECTIVES:
            if name != "code-cell" or not _REMOVED_CODE_TAGS & _tags(options):
                sink.add(fence(body.strip("\n"), self._code_language(name, argument)), code=True)
        elif name == "csv-table":
            sink.add(_inline_prose(argument))
            sink.add(body, code=True)
        else:
            if argument and name not in UNTITLED_DIRECTIVES:
                sink.add(_inline_prose(worded(name, argument)))
            sink.add(self.nested(body, path, depth))

    def include(
        self, name: str, argument: str, options: dict[str, Any], path: PurePosixPath, sink: Sink, depth: int
    ) -> None:
        """An included file of the tree: as code for `literalinclude`, else as MyST (or reST with `:parser: rst`)."""
        found = self.includes.read(path, argument)
        if found is None:
            return
        relative, text = found
        text = select_lines(text, options)
        if name == "literalinclude" or "literal" in options or "code" in options:
            if caption := str(options.get("caption") or ""):
                sink.add(_inline_prose(caption))
            suffix = relative.suffix.lstrip(".").lower()
            language = str(options.get("language") or options.get("code") or "") or _SUFFIX_LANGUAGES.get(suffix, suffix)
            sink.add(fence(text, language), code=True)
        elif "rst" in str(options.get("parser") or ""):
            try:
                for block_text, code in rst_blocks(text, relative, self.includes):
                    sink.add(block_text, code=code)
            except LoadError as exc:
                self.includes.notes.append(f"{path}: include {argument!r} left out: {exc}")
        else:
            self.render_source(text, relative, sink, depth + 1)

    def _code_language(self, name: str, argument: str) -> str:
        language = argument.split()[0].lower() if argument.split() else ""
        if name in ("code-cell", "ipython", "jupyter-execute"):
            return "python" if language.startswith(("ipython", "python")) else language or self.language
        if name in ("doctest", "testcode", "codediff"):
            return "python"
        return language


_SUFFIX_LANGUAGES = {"py": "python", "sh": "bash", "yml": "yaml", "md": "markdown", "txt": ""}


def _is_directive(token: Token) -> bool:
    return token.type == "colon_fence" or (token.type == "fence" and token.info.strip().startswith("{"))


def _options(content: str) -> tuple[dict[str, Any], str]:
    """A directive's options and its content: options are `:key: value` lines or a `---` YAML block."""
    lines = content.split("\n")
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        if end is not None:
            try:
                meta = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError:
                meta = None
            return (meta if isinstance(meta, dict) else {}), "\n".join(lines[end + 1:])
    options: dict[str, Any] = {}
    for index, line in enumerate(lines):
        option = _OPTION.match(line.strip())
        if option is None:
            return options, "\n".join(lines[index:])
        options[option.group(1)] = option.group(2) or ""
    return options, ""


def _tags(options: dict[str, Any]) -> set[str]:
    """A code cell's tags, from `:tags: [a, b]` or a YAML list."""
    tags = options.get("tags") or []
    if isinstance(tags, str):
        tags = tags.strip("[] ").split(",")
    return {str(tag).strip().strip("'\"") for tag in tags} if isinstance(tags, list) else set()


def _behind_markers(first_line: str, text: str) -> list[str]:
    """The lines of `text` placed where a nested block was: behind the list or quote markers of its first line."""
    if not text:
        return []
    prefix = _CONTAINER_PREFIX.match(first_line)
    marker = prefix.group(0) if prefix else ""
    continuation = re.sub(r"[^\s>]", " ", marker)
    first, *rest = text.split("\n")
    return [marker + first, *((continuation + line) if line else continuation.rstrip() for line in rest)]


def _inline_prose(text: str) -> str:
    """Markdown prose with its roles rendered and inline HTML dropped (tags only: their text stays)."""
    return _INLINE.sub(_render_inline, text)


def _render_inline(match: re.Match[str]) -> str:
    if match.group("code"):
        return match.group("code")
    if match.group("drop"):
        return ""
    return _role(match.group("role"), match.group("body"))


def _role(name: str, text: str) -> str:
    name = name.lower()
    if name in HIDDEN_ROLES:
        return ""
    return text if name == "math" else role_text(text)


def _html_text(source: str) -> str:
    """The visible text of an HTML block: no scripts, styles, comments nor tags."""
    try:
        root = html.fragment_fromstring(source, create_parent="div")
    except (etree.LxmlError, ValueError):
        return ""
    for element in root.iter(*_INVISIBLE_HTML):
        element.drop_tree()
    for comment in root.xpath("//comment()"):
        comment.drop_tree()
    return " ".join(root.text_content().split())


def _inline_text(inline: Token) -> str:
    """Plain text of inline Markdown: `code` and *emphasis* lose their markup, roles show their text."""
    parts = []
    for child in inline.children or ():
        if child.type in _LINE_BREAKS:
            parts.append(" ")
        elif child.type == "myst_role":
            parts.append(_role(str(child.meta.get("name", "")), child.content))
        elif child.type != "html_inline":
            parts.append(child.content)
    return " ".join("".join(parts).split())


def _first_h1(tokens: list[Token]) -> str:
    return next(
        (
            title for i, token in enumerate(tokens)
            if token.type == "heading_open" and token.tag == "h1" and token.level == 0
            and (title := _inline_text(tokens[i + 1]))
        ),
        "",
    )


def _front_matter(tokens: list[Token]) -> dict[str, Any]:
    """The YAML front matter; a malformed header is ignored, not fatal."""
    if not tokens or tokens[0].type != "front_matter":
        return {}
    try:
        meta = yaml.safe_load(tokens[0].content)
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _front_matter_title(tokens: list[Token]) -> str:
    title = _front_matter(tokens).get("title")
    return " ".join(str(title).split()) if title else ""


def _kernel_language(meta: dict[str, Any]) -> str:
    """The language of a MyST notebook's kernel, from its front matter; Python by default."""
    kernel = meta.get("kernelspec")
    language = kernel.get("language") if isinstance(kernel, dict) else None
    return language.strip().lower() if isinstance(language, str) and language.strip() else "python"
