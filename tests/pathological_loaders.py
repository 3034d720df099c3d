"""Loaders that misbehave as real ones do on pathological files, for test suffixes.

Named in `ingest.loader_modules`, this module is imported by every parse
worker, so the misbehaviour happens where a real loader's would: in a worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ragline.ingest.loaders import LOADERS, ParsedFile
from ragline.ingest.loaders.text import load_text

HOG_BYTES = 1 << 30
"""What `.hog` files ask for: far over the test's memory budget, yet zero pages that cost no RAM if granted."""


def load_forever(data: bytes, path: Path) -> ParsedFile:
    """Like a parser caught in a loop on a malformed file."""
    while True:
        time.sleep(0.5)


def load_greedily(data: bytes, path: Path) -> ParsedFile:
    """Like a decompressor inflating a bomb: asks for a gigabyte."""
    hog = bytes(HOG_BYTES)
    return load_text(data + hog[:0], path)


def load_and_crash(data: bytes, path: Path) -> ParsedFile:
    """Like a C extension crashing on odd input: the process dies."""
    os.abort()


LOADERS[".hang"] = ("text", load_forever)
LOADERS[".hog"] = ("text", load_greedily)
LOADERS[".crash"] = ("text", load_and_crash)
