"""The part of a chat model that retrieval uses, and a careful way to ask it something.

Retrieval comes before generation in the pipeline, so it cannot import
`ragline.generate`; the LLMs there satisfy `ChatModel` structurally. They raise
`LLMError`, a `RuntimeError`, for every failure, which is what callers here catch.
"""

from __future__ import annotations

import json
import re
from typing import Protocol, runtime_checkable


class ChatError(RuntimeError):
    """The model failed or said nothing; the message names the model and the reason."""


class ChatReply(Protocol):
    @property
    def text(self) -> str: ...


@runtime_checkable
class ChatModel(Protocol):
    """Any `ragline.generate.base.LLM`: retrieval only needs one plain, non-streamed call."""

    name: str

    def generate(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0) -> ChatReply: ...


def ask(model: ChatModel, system: str, user: str, *, max_tokens: int) -> str:
    """The model's reply at temperature 0, stripped; `ChatError` (a RuntimeError) if it failed or was empty."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = model.generate(messages, max_tokens=max_tokens, temperature=0.0).text.strip()
    if not text:
        raise ChatError(f"model {model.name} returned an empty reply")
    return text


_FENCE = re.compile(r"```[\w-]*\n?(.*?)```", re.DOTALL)


def find_json(text: str) -> object | None:
    """The first JSON object or array in a reply, ignoring code fences and any text around it; else None."""
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1), text] if fenced else [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start, char in enumerate(candidate):
            if char in "{[":
                try:
                    return decoder.raw_decode(candidate, start)[0]
                except ValueError:
                    continue
    return None
