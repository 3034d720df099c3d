"""What every loader returns, the errors a loader raises, and what a loader may read besides its file."""

from __future__ import annotations

import ast
import os
import re
import textwrap
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from stat import S_ISREG
from typing import Callable

from charset_normalizer import from_bytes

from ragline.ingest.scan import first_match
from ragline.types import Section


class LoadError(Exception):
    """A file that cannot be indexed; the message says why, in words a user can act on."""


class SkipFile(LoadError):
    """A file left out on purpose, because another file of the tree publishes the same page."""


class IncludeError(Exception):
    """An included file that is not read; the page is indexed without it and a note says why."""


@dataclass(slots=True)
class ParsedFile:
    """A loader's result: the document title, its sections in reading order, and notes for the user.

    Notes report what was left out of an otherwise good file, e.g. an include that was not read.
    """

    title: str
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


Loader = Callable[[bytes, Path], ParsedFile]
"""`(data, path) -> ParsedFile`. Loaders that read other files of the tree also take a keyword
`context: LoadContext` (see `loaders.run_loader`)."""

_PRIVATE_KEY = re.compile(rb"\A\s*(-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|PuTTY-User-Key-File-)")


def refuse_private_key(data: bytes) -> None:
    if _PRIVATE_KEY.match(data[:256]):
        raise LoadError("the file holds a private key: never indexed")


@dataclass(frozen=True, slots=True)
class LoadContext:
    """The ingested tree a file belongs to, for pages that include other files of it.

    Only files inside `root` are read (symbolic links are resolved first), never those
    whose names match `secrets` (`ingest.exclude_secrets`) or that hold a private key,
    nor any over `max_bytes`. Without a root, includes are not resolved.
    """

    root: Path | None = None
    secrets: tuple[str, ...] = ()
    max_bytes: int = 50 * 1024 * 1024
    looked_at: dict[str, str] = field(default_factory=dict)
    """Every file of the tree the page looked for or read, by path from the root, with its `file_stamp` then:
    the page must be parsed again when one of them changes, appears or goes."""

    def locate(self, including: PurePosixPath, target: str) -> PurePosixPath:
        """The path from the root of `target` as written in the file `including`.

        Relative targets start at the including file's folder; absolute ones (`/snippets/x.md`)
        at the root, as Sphinx reads them from its source folder.
        """
        if self.root is None:
            raise IncludeError("the ingest root is unknown here")
        root = Path(os.path.realpath(self.root))
        target = target.strip()
        start = root if target.startswith("/") else root / including.parent
        found = Path(os.path.realpath(start / target.lstrip("/")))
        if not found.is_relative_to(root):
            raise IncludeError("it is outside the ingested folder")
        return PurePosixPath(found.relative_to(root).as_posix())

    def exists(self, relative: PurePosixPath) -> bool:
        if self.root is None:
            return False
        self._look_at(relative)
        return (self.root / relative).is_file()

    def _look_at(self, relative: PurePosixPath) -> None:
        assert self.root is not None
        self.looked_at.setdefault(relative.as_posix(), file_stamp(self.root / relative))

    def read_text(self, relative: PurePosixPath) -> str:
        """The decoded text of a file of the tree, refused as the ingest itself would refuse it."""
        if self.root is None:
            raise IncludeError("the ingest root is unknown here")
        if pattern := first_match(relative.as_posix(), relative.name, list(self.secrets)):
            raise IncludeError(f"its name matches ingest.exclude_secrets {pattern!r}")
        path = self.root / relative
        self._look_at(relative)
        try:
            if path.stat().st_size > self.max_bytes:
                raise IncludeError(f"it is over the {self.max_bytes / 1048576:g} MB limit (ingest.max_file_mb)")
            data = path.read_bytes()
            refuse_private_key(data)
            return decode_text(data, path)
        except FileNotFoundError:
            raise IncludeError("no such file") from None
        except OSError as exc:
            raise IncludeError(f"cannot read it: {exc.strerror}") from exc
        except LoadError as exc:
            raise IncludeError(str(exc)) from exc


def file_stamp(path: Path) -> str:
    """What says a file changed without reading it: its size and modification time, or "missing"."""
    try:
        info = path.stat()
    except OSError:
        return "missing"
    return f"{info.st_size}:{info.st_mtime_ns}" if S_ISREG(info.st_mode) else "missing"


def decode_text(data: bytes, path: Path) -> str:
    """Decode bytes of unknown encoding, refusing binary content disguised as text."""
    if b"\x00" in data[:8192]:
        raise LoadError("binary content (NUL bytes) in a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    best = from_bytes(data).best()
    if best is None:
        raise LoadError("binary content: no text encoding fits")
    guess = str(best)
    if _latin_script(guess):
        # On short Western text the detector often picks a rarer Latin code page
        # (cp775, cp1250, mac_iceland); cp1252, a superset of latin-1, is far likelier.
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            pass
    return guess


_OTHER_SCRIPTS = ("CYRILLIC", "GREEK", "HEBREW", "ARABIC", "CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI",
                  "ARMENIAN", "GEORGIAN", "DEVANAGARI")


def _latin_script(text: str) -> bool:
    """True when no letter of the detector's reading belongs to a non-Latin script."""
    return not any(
        script in unicodedata.name(ch, "")
        for ch in set(text) if not ch.isascii() and ch.isalpha()
        for script in _OTHER_SCRIPTS
    )


_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*(\n\s*)*")


def clean_text(text: str) -> str:
    """Fold runs of spaces, keep paragraph breaks (one blank line), strip the ends."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


MAX_INCLUDES = 100
"""Most files one page may include, nested includes counted: a fan-out of includes stops here."""


@dataclass(slots=True)
class Includes:
    """Reads the files that one page includes; `notes` say which were not read, and why."""

    context: LoadContext
    notes: list[str] = field(default_factory=list)
    _parents: dict[PurePosixPath, PurePosixPath] = field(default_factory=dict)

    def read(self, including: PurePosixPath, target: str) -> tuple[PurePosixPath, str] | None:
        """(path from the root, text) of `target` as included from `including`; None when not read."""
        try:
            if len(self._parents) >= MAX_INCLUDES:
                raise IncludeError(f"the page already includes {MAX_INCLUDES} files")
            relative = self.context.locate(including, target)
            if relative in self._chain(including):
                raise IncludeError("it includes itself")
            text = self.context.read_text(relative)
        except IncludeError as exc:
            self.notes.append(f"{including}: include {target.strip()!r} not read: {exc}")
            return None
        self._parents[relative] = including
        return relative, text

    def _chain(self, path: PurePosixPath) -> list[PurePosixPath]:
        chain = [path]
        while chain[-1] in self._parents and len(chain) <= MAX_INCLUDES:
            chain.append(self._parents[chain[-1]])
        return chain


def select_lines(text: str, options: Mapping[str, object]) -> str:
    """The part of an included file that Sphinx's `include`/`literalinclude` options select.

    `pyobject`, then `start-after`/`start-at`, `end-before`/`end-at`, then `lines` ("1,3,5-7,9-")
    and `dedent`, in Sphinx's order; `start-line`/`end-line` (docutils `include`) slice first.
    An option that matches nothing leaves the text as it is.
    """
    lines = text.splitlines()
    start_line, end_line = _int_option(options, "start-line"), _int_option(options, "end-line")
    lines = lines[start_line or 0:end_line]
    if pyobject := str(options.get("pyobject") or ""):
        lines = _python_object(lines, pyobject) or lines
    for key, inclusive in (("start-after", False), ("start-at", True)):
        marker = str(options.get(key) or "")
        found = next((i for i, line in enumerate(lines) if marker and marker in line), None)
        if found is not None:
            lines = lines[found if inclusive else found + 1:]
    for key, inclusive in (("end-before", False), ("end-at", True)):
        marker = str(options.get(key) or "")
        found = next((i for i, line in enumerate(lines) if marker and marker in line), None)
        if found is not None:
            lines = lines[:found + 1 if inclusive else found]
    if spec := str(options.get("lines") or ""):
        lines = [lines[i] for i in _line_numbers(spec, len(lines))] or lines
    dedent = options.get("dedent")
    if dedent is not None:
        amount = _int_option(options, "dedent")
        lines = textwrap.dedent("\n".join(lines)).splitlines() if amount is None else [
            line[amount:] if line[:amount].isspace() else line.lstrip() for line in lines
        ]
    return "\n".join(lines)


def _int_option(options: Mapping[str, object], key: str) -> int | None:
    try:
        return int(str(options[key]).strip())
    except (KeyError, ValueError):
        return None


def _line_numbers(spec: str, count: int) -> list[int]:
    """0-based indices of a Sphinx `:lines:` spec (1-based, "-" ranges, open ends allowed)."""
    found: list[int] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            start = int(first) if first.strip() else 1
            end = (int(last) if last.strip() else count) if dash else start
        except ValueError:
            return []
        found.extend(i - 1 for i in range(max(start, 1), min(end, count) + 1))
    return found


def _python_object(lines: list[str], name: str) -> list[str]:
    """The lines of the class or function `name` ("Class.method" too), or [] when not found."""
    try:
        scope: list[ast.stmt] = ast.parse("\n".join(lines)).body
    except SyntaxError:
        return []
    node: ast.stmt | None = None
    for part in name.split("."):
        node = next(
            (n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
             and n.name == part),
            None,
        )
        if node is None:
            return []
        scope = node.body
    if node is None or node.end_lineno is None:
        return []
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    return lines[first - 1:node.end_lineno]
