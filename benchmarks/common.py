"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
from pathlib import Path

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html")
PYTHON_DOCS_URL = "https://docs.python.org/3.11/{path}.html"
DATA = Path(__file__).resolve().parent / "data"


def require_python_docs(path: Path) -> Path:
    if not (path / "library" / "json.html").is_file():
        raise SystemExit(f"{path} has no Python docs: apt-get install python3.11-doc (or pass --docs)")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A free port on 127.0.0.1 for a server the benchmark starts."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
