"""Query transformations through a chat model, each optional, none able to fail a search.

Users ask in their own words and in conversation ("and how do I save it?");
documentation uses other words. These turn a query into something closer to
the passage that answers it. On any failure (the model errs, says nothing or
says something unusable) each returns the query as given, logs why, and adds
the reason to `notes` when the caller passes a list (the retrieval's notes).
"""

from __future__ import annotations

import logging
import re

from ragline.retrieve.chat import ChatModel, ask, find_json

log = logging.getLogger(__name__)

HISTORY_MESSAGES = 6
"""The last turns a rewrite sees: enough to resolve "it", short enough for a small model."""

HISTORY_CHARS = 800
"""Each earlier message is cut to this many characters; answers can be long and only their topic matters."""

REWRITE_PROMPT = (
    "Rewrite the user's follow-up question as one standalone question that can be understood without "
    "the conversation: replace words like 'it', 'that' or 'this' with what they refer to, keep names of "
    "libraries, functions and options exactly as written, and add nothing else. "
    "If the question already stands alone, repeat it unchanged. Reply with the question only."
)
HYDE_PROMPT = (
    "Write a short passage, as it would appear in the technical documentation, that answers the question. "
    "Use the words the documentation would use: names of functions, classes, options and commands. "
    "At most 120 words, no preamble."
)
MULTI_QUERY_PROMPT = (
    "Write {n} different search queries that would find the documentation answering the question. "
    "Vary them: use the terms the documentation would use, name likely functions or options, "
    "and state the goal in other words. Reply with a numbered list, one query per line, and nothing else."
)

_LABEL = re.compile(r"^(standalone question|question|rewritten question|query)\s*:\s*", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s+")


def _fall_back(notes: list[str] | None, reason: str) -> None:
    log.warning(reason)
    if notes is not None:
        notes.append(reason)


def _clean_line(text: str) -> str:
    """One line of a reply without list markers, labels or quotes around it."""
    text = _LABEL.sub("", _BULLET.sub("", text.strip()))
    return text.strip().strip("\"'`").strip()


def rewrite_with_history(
    model: ChatModel, query: str, history: list[dict[str, str]] | None, notes: list[str] | None = None
) -> str:
    """A standalone question from a follow-up and the conversation before it; no history, no call."""
    turns = [m for m in history or () if m.get("role") in ("user", "assistant") and m.get("content", "").strip()]
    if not turns:
        return query
    conversation = "\n".join(
        f"{m['role']}: {' '.join(m['content'].split())[:HISTORY_CHARS]}" for m in turns[-HISTORY_MESSAGES:]
    )
    user = f"Conversation:\n{conversation}\n\nFollow-up question: {query}\n\nStandalone question:"
    try:
        reply = ask(model, REWRITE_PROMPT, user, max_tokens=96)
    except RuntimeError as exc:  # LLMError or ChatError
        _fall_back(notes, f"query rewrite failed, searched for the question as asked: {exc}")
        return query
    rewritten = next((line for line in map(_clean_line, reply.splitlines()) if line and not line.endswith(":")), "")
    if not rewritten:
        _fall_back(
            notes, f"query rewrite failed, searched for the question as asked: {model.name} said {reply[:200]!r}"
        )
        return query
    return rewritten


def hyde(model: ChatModel, query: str, notes: list[str] | None = None) -> str:
    """A hypothetical passage answering the query (HyDE), to embed in its place for the dense search."""
    try:
        return ask(model, HYDE_PROMPT, query, max_tokens=192)
    except RuntimeError as exc:
        _fall_back(notes, f"HyDE failed, embedded the question itself: {exc}")
        return query


def parse_queries(reply: str) -> list[str]:
    """Queries from a JSON array (or an object holding one) or from a numbered or bulleted list."""
    found = find_json(reply)
    if isinstance(found, dict):
        found = next((value for value in found.values() if isinstance(value, list)), None)
    if isinstance(found, list) and found and all(isinstance(item, str) for item in found):
        return [_clean_line(item) for item in found]
    lines = [_clean_line(line) for line in reply.splitlines()]
    return [line for line in lines if line and not line.endswith(":")]  # "Here are three queries:"


def multi_query(model: ChatModel, query: str, n: int, notes: list[str] | None = None) -> list[str]:
    """Up to n rephrasings of the query, other than the query itself; [] when the model fails."""
    if n < 1:
        return []
    try:
        reply = ask(model, MULTI_QUERY_PROMPT.format(n=n), query, max_tokens=min(48 * n, 400))
    except RuntimeError as exc:
        _fall_back(notes, f"multi-query expansion failed, searched for the question alone: {exc}")
        return []
    seen = {query.strip().casefold()}
    queries = []
    for candidate in parse_queries(reply):
        if candidate and candidate.casefold() not in seen:
            seen.add(candidate.casefold())
            queries.append(candidate)
    if not queries:
        _fall_back(notes, f"multi-query expansion failed: {model.name} gave no new query in {reply[:200]!r}")
    return queries[:n]
