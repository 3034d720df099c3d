"""What every loader returns, and the error a loader raises for input it cannot use."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from charset_normalizer import from_bytes

from ragline.types import Section


class LoadError(Exception):
    """A file that cannot be indexed; the message says why, in words a user can act on."""


@dataclass(slots=True)
class ParsedFile:
    """A loader's result: the document title and its sections in reading order."""

    title: str
    sections: list[Section] = field(default_factory=list)


Loader = Callable[[bytes, Path], ParsedFile]


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
