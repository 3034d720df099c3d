"""Question files in, resumable results files out.

A results file is JSONL, one line per finished question, appended and
flushed as each finishes. Every line carries the hash of the configuration
that produced it, so a rerun with the same configuration skips what is done
and a rerun with another one starts afresh in the same file. A line cut
short by a crash is dropped when the file is next opened.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol


class EvalInputError(ValueError):
    """A question or price file that cannot be used; the message says which line and what to fix."""


def read_questions(path: Path, required: Iterable[str] = ("question",)) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, each checked for the `required` string fields."""
    if not path.is_file():
        raise EvalInputError(f"question file {path} does not exist")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}:{number} is not JSON ({exc.msg}): one JSON object per line") from None
        missing = [f for f in required if not isinstance(item, dict) or not isinstance(item.get(f), str) or not item[f]]
        if missing:
            raise EvalInputError(f"{path}:{number} has no {', '.join(missing)}: each line needs {', '.join(required)}")
        items.append(item)
    if not items:
        raise EvalInputError(f"{path} has no questions")
    return items


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a results file (all configurations), skipping a line cut short by a crash."""
    if not path.is_file():
        raise EvalInputError(f"results file {path} does not exist")
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable id of a configuration (any JSON-able mapping)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def question_key(item: Mapping[str, Any]) -> str:
    """What identifies a question in a results file: its text and its gold source."""
    return f"{item['question']}\x00{item.get('source') or ''}"


def pending(questions: Iterable[Mapping[str, Any]], done: Mapping[str, Any]) -> tuple[list[Any], int]:
    """The questions still to run, each once, and how many distinct questions there are."""
    unique = {question_key(item): item for item in questions}
    return [item for key, item in unique.items() if key not in done], len(unique)


class ResultsFile:
    """The lines of one configuration in a results file, and appending more."""

    def __init__(self, path: Path, config: str) -> None:
        self.path = path
        self.config = config
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_line()

    def _drop_torn_line(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def done(self) -> dict[str, dict[str, Any]]:
        """Finished questions of this configuration by `question_key` (the first line of each wins)."""
        found: dict[str, dict[str, Any]] = {}
        for record in read_lines(self.path) if self.path.is_file() else []:
            if record.get("config") == self.config:
                found.setdefault(question_key(record), record)
        return found

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({"config": self.config, **record}, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()


class Progress(Protocol):
    """Where a long evaluation reports how far it is (the CLI draws a bar)."""

    def start(self, total: int, done: int) -> None:
        """`total` questions, of which `done` were finished by an earlier run."""
        ...

    def advance(self, n: int = 1) -> None: ...


class Silent:
    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass
