"""Synthetic questions for a corpus, so retrieval can be measured and tuned on the user's own documents.

Real users describe a goal or a symptom in their own words, so the LLM is asked
for exactly that, and its output is filtered: a question that copies the
heading or the passage would teach a reranker nothing. Heading → section pairs
are the cheap fallback when no LLM is available (or it is too slow).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ragline.generate.base import LLM, LLMError
from ragline.types import Chunk

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as `progress(accepted, n)` after each chunk the LLM was asked about (or read from the cache)."""

PROMPT_VERSION = 1
"""Part of the cache key: cached questions are reused only for the same model and prompt."""

MIN_PROSE_WORDS = 30
MIN_QUESTION_WORDS = 4
MAX_QUESTION_WORDS = 40
COPIED_RUN_WORDS = 6
"""A question sharing a run of this many words with its passage copies it instead of asking in the user's words."""

_SYSTEM = "You write the questions that users of a software project type into its documentation search."
_INSTRUCTIONS = (
    "Here is a passage from the documentation.\n\n"
    "Section: {heading}\n\n{passage}\n\n"
    "Write ONE question that a user would ask and that this passage answers. Write it the way users ask: "
    "describe what they want to achieve or the problem they see, in their own words. Do not repeat the section "
    "title, do not copy phrases from the passage, and do not mention 'the passage', 'the section' or "
    "'the documentation'. Reply with the question only, on one line."
)
_PASSAGE_CHARS = 1500
_WORD = re.compile(r"[a-z0-9_]+")
_PROSE_WORD = re.compile(r"[A-Za-z][a-z]+[.,;:!?)]?")
_REFERS_TO_TEXT = re.compile(r"\b(the|this) (passage|section|text|documentation|excerpt|paragraph)\b", re.I)
_LEAD_IN = re.compile(r"^(?:question\s*:|q\s*:|\d+[.)]|[-*•])\s*", re.I)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def usable(chunk: Chunk) -> bool:
    """Whether a chunk has enough prose to ask about: tiny chunks and code listings are skipped."""
    tokens = chunk.text.split()
    prose = sum(bool(_PROSE_WORD.fullmatch(token)) for token in tokens)
    return prose >= MIN_PROSE_WORDS and prose >= 0.5 * len(tokens)


def _heading(chunk: Chunk) -> str:
    return " > ".join(chunk.metadata.get("heading_path") or ()) or chunk.metadata.get("title", "")


def clean_question(reply: str) -> str:
    """The question in an LLM reply: its first non-empty line, without quotes or a 'Question:' lead-in."""
    for line in reply.strip().splitlines():
        line = _LEAD_IN.sub("", line.strip()).strip().strip("\"'`").strip()
        if line:
            return line
    return ""


def check_question(question: str, chunk: Chunk) -> str | None:
    """Why `question` is not a good synthetic question for `chunk`, or None when it is."""
    words = _words(question)
    if not question:
        return "empty"
    if not question.endswith("?"):
        return "not a question"
    if not MIN_QUESTION_WORDS <= len(words) <= MAX_QUESTION_WORDS:
        return "too short or too long"
    if _REFERS_TO_TEXT.search(question):
        return "refers to the passage instead of asking"
    title = _words(chunk.metadata.get("title", "") or (chunk.metadata.get("heading_path") or [""])[-1])
    if len(title) >= 2 and " ".join(title) in " ".join(words):
        return "copies the heading"
    passage = _words(chunk.text)
    runs = {tuple(passage[i : i + COPIED_RUN_WORDS]) for i in range(len(passage) - COPIED_RUN_WORDS + 1)}
    if any(tuple(words[i : i + COPIED_RUN_WORDS]) in runs for i in range(len(words) - COPIED_RUN_WORDS + 1)):
        return "copies the passage"
    return None


def _read_cache(path: Path | None, key: str) -> dict[str, str]:
    """Questions already asked (chunk id → reply, possibly rejected) by this model and prompt; a line torn
    by an interruption is ignored."""
    if path is None or not path.is_file():
        return {}
    cached = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("key") == key:
            cached[record["chunk_id"]] = record["reply"]
    return cached


def generate_questions(
    chunks: Sequence[Chunk],
    model: LLM,
    n: int,
    seed: int = 0,
    progress: Progress | None = None,
    cache: Path | None = None,
    max_tokens: int = 64,
    temperature: float = 0.3,
    deadline: float | None = None,
) -> list[dict[str, str]]:
    """Up to `n` synthetic questions, each `{"question", "source", "chunk_id"}`; `source` is the chunk's
    citation URL (url#anchor), the form of the eval JSONL files.

    Chunks are drawn at random (`seed`) among those with enough prose (`usable`); the model writes one
    question per chunk in a user's words, and replies that fail `check_question` or repeat an earlier
    question are dropped, so up to 2·n chunks are tried. With `cache` (a JSONL file), every reply is
    appended as it comes and replies already there (same model, same prompt) are reused, so an
    interrupted run resumes without asking again. No new question is asked once `time.monotonic()` passes
    `deadline`, though cached replies are still used (a local model on a small CPU takes seconds per
    question). Raises LLMError when the model fails.
    """
    key = f"{model.name}/v{PROMPT_VERSION}"
    cached = _read_cache(cache, key)
    candidates = [chunk for chunk in chunks if usable(chunk)]
    random.Random(seed).shuffle(candidates)
    candidates = candidates[: 2 * n]
    questions: list[dict[str, str]] = []
    seen: set[str] = set()
    rejected: dict[str, int] = {}
    writer = cache.open("a", encoding="utf-8") if cache is not None else None
    if writer is not None and writer.tell() and not cache.read_bytes().endswith(b"\n"):
        writer.write("\n")  # end the line an interrupted run left torn, so the next one starts whole
    try:
        for chunk in candidates:
            if len(questions) >= n:
                break
            reply = cached.get(chunk.chunk_id)
            if reply is None and deadline is not None and time.monotonic() > deadline:
                continue  # out of time for the model; later chunks may still have cached replies
            if reply is None:
                reply = _ask(model, chunk, max_tokens, temperature)
                if writer is not None:
                    writer.write(json.dumps({"key": key, "chunk_id": chunk.chunk_id, "reply": reply}) + "\n")
                    writer.flush()
            question = clean_question(reply)
            normalized = " ".join(_words(question))
            problem = check_question(question, chunk) or ("duplicate" if normalized in seen else None)
            if problem is None:
                seen.add(normalized)
                questions.append({"question": question, "source": chunk.citation_url, "chunk_id": chunk.chunk_id})
            else:
                rejected[problem] = rejected.get(problem, 0) + 1
            if progress is not None:
                progress(len(questions), n)
    finally:
        if writer is not None:
            writer.close()
    if rejected:
        log.info("synthetic questions rejected: %s", ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())))
    return questions


def _ask(model: LLM, chunk: Chunk, max_tokens: int, temperature: float) -> str:
    prompt = _INSTRUCTIONS.format(heading=_heading(chunk) or "(untitled)", passage=chunk.text[:_PASSAGE_CHARS])
    messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt}]
    try:
        return model.generate(messages, max_tokens=max_tokens, temperature=temperature).text
    except LLMError as exc:
        raise LLMError(f"could not generate a question for chunk {chunk.chunk_id}: {exc}") from exc


def heuristic_pairs(chunks: Iterable[Chunk]) -> list[dict[str, str]]:
    """Heading → section pairs, `{"question", "source", "chunk_id"}` like `generate_questions`: the heading
    path of each section (its first chunk with enough prose) stands in for the question. Cheap and
    LLM-free, but worded like the docs, so it flatters lexical search: a fallback, not a benchmark."""
    pairs: list[dict[str, str]] = []
    taken: set[str] = set()
    for chunk in chunks:
        heading = _heading(chunk)
        if chunk.citation_url in taken or len(_words(heading)) < 2 or not usable(chunk):
            continue
        taken.add(chunk.citation_url)
        pairs.append({"question": heading, "source": chunk.citation_url, "chunk_id": chunk.chunk_id})
    return pairs
