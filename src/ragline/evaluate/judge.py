"""LLM-as-judge: grade an answer against a reference, its relevance, and each cited claim.

Any `LLM` can judge. It is asked for one small JSON object; a reply that
cannot be read is asked for once more (with the bad reply shown back), and
after that the item is recorded as unscored with the reply that failed:
a confused judge never ends an evaluation run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ragline.generate.base import LLM, Message, Usage
from ragline.generate.prompt import cited_numbers

T = TypeVar("T")

SYSTEM = "You are a strict grader of answers to questions about documentation. Reply with one JSON object only."

CORRECTNESS = """Grade the ANSWER against the REFERENCE answer to the QUESTION.
5: same facts as the reference, nothing wrong; 4: right, minor omissions; 3: partly right;
2: mostly wrong or missing the point; 1: wrong, or says it cannot answer.

QUESTION: {question}

REFERENCE: {reference}

ANSWER: {answer}

Reply with JSON: {{"score": <1-5>, "reason": "<one sentence>"}}"""

RELEVANCE = """How well does the ANSWER address the QUESTION (whether or not it is correct)?
5: answers exactly what was asked; 3: partly, or buried in unrelated text; 1: does not address it.

QUESTION: {question}

ANSWER: {answer}

Reply with JSON: {{"score": <1-5>, "reason": "<one sentence>"}}"""

SUPPORT = """Is the CLAIM fully supported by the PASSAGES? Answer no if any part of it is not stated there.

PASSAGES:
{passages}

CLAIM: {claim}

Reply with JSON: {{"supported": true or false}}"""

RETRY = "That reply could not be read. Reply with the JSON object only, exactly in the format asked for."

_SENTENCE = re.compile(r"(?:[^.!?\n]|[.!?](?=\S))+[.!?]*(?:\s*\[\d+(?:\s*,\s*\d+)*\])*")
"""A sentence: up to end punctuation that is followed by a space (so `os.path.join` stays whole),
then any citations written after the full stop (`… works. [2]`)."""


def claims(answer: str) -> list[tuple[str, list[int]]]:
    """The answer's sentences that cite passages, each with the passage numbers it cites."""
    found = []
    for match in _SENTENCE.finditer(answer):
        sentence = match.group().strip()
        if numbers := cited_numbers(sentence):
            found.append((sentence, numbers))
    return found


@dataclass(slots=True)
class Verdict:
    """A judge's reading of one item: `value` None means unscored, and `note` says why."""

    value: Any
    reason: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "reason": self.reason, **({"note": self.note} if self.note else {})}


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in the reply (models wrap it in prose or code fences)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            found, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(found, dict):
            return found
    return None


def _score(reply: dict[str, Any]) -> int | None:
    value = reply.get("score")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5 else None


def _supported(reply: dict[str, Any]) -> bool | None:
    value = reply.get("supported")
    if isinstance(value, str) and value.strip().lower() in ("yes", "no", "true", "false"):
        return value.strip().lower() in ("yes", "true")
    return value if isinstance(value, bool) else None


@dataclass(slots=True)
class Judge:
    """Grades through `llm`; `usage` adds up the tokens of every call made."""

    llm: LLM
    max_tokens: int = 256
    temperature: float = 0.0
    usage: Usage = field(default_factory=Usage)

    def _ask(self, prompt: str, read: Callable[[dict[str, Any]], T | None]) -> Verdict:
        messages: list[Message] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        for attempt in range(2):
            completion = self.llm.generate(messages, max_tokens=self.max_tokens, temperature=self.temperature)
            self.usage.prompt_tokens += completion.usage.prompt_tokens
            self.usage.completion_tokens += completion.usage.completion_tokens
            reply = _json_object(completion.text)
            value = read(reply) if reply is not None else None
            if value is not None:
                return Verdict(value, str(reply.get("reason", "")) if reply else "")
            messages += [{"role": "assistant", "content": completion.text}, {"role": "user", "content": RETRY}]
        return Verdict(None, note=f"unscored: the judge's reply could not be read twice; last: {completion.text[:200]!r}")

    def correctness(self, question: str, answer: str, reference: str) -> Verdict:
        """1–5 against the reference answer."""
        return self._ask(CORRECTNESS.format(question=question, reference=reference, answer=answer), _score)

    def relevance(self, question: str, answer: str) -> Verdict:
        """1–5: does the answer address the question."""
        return self._ask(RELEVANCE.format(question=question, answer=answer), _score)

    def supported(self, claim: str, passages: Sequence[str]) -> Verdict:
        """True when the cited passages state the claim."""
        text = "\n\n".join(passages)
        return self._ask(SUPPORT.format(passages=text, claim=claim), _supported)
