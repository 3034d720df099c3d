"""Evaluate the fixed start of a chat prompt once, and keep it across requests and processes.

Every grounded-answer prompt starts the same way: the system rules and the
worked examples, some 400 tokens that a 1.5B model on two cores takes over
three seconds to read. llama.cpp already skips a prompt's start when it
matches what its context holds (the previous request's prompt), so a server
pays for it once; a new process, such as each `ragline ask`, would pay again.
This module makes the context hold that start before a generation: from a
session file saved the first time it was evaluated (llama.cpp's own state
format, written to a temporary file and renamed into place), or by
evaluating it and saving the file.

"The fixed start" is every message before the last one, rendered with the
model's own chat template. Only speed depends on that rendering: llama.cpp
compares the real prompt's tokens with what the context holds and evaluates
whatever differs, so a wrong guess costs time, never a wrong answer.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragline.generate.base import Message

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

MIN_PREFIX_TOKENS = 64
"""A shorter start is not worth a file: it is evaluated in well under a second."""
KEEP_FILES = 8
"""Session files kept per cache folder, newest first (each is ~30 kB per token of a 1.5B model)."""


def _formatter(llama: Llama) -> Any | None:
    """The Jinja chat formatter built from the template in the GGUF file, as llama-cpp-python builds it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos, bos = llama.token_eos(), llama.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        add_generation_prompt=False,
    )


def _tokens(llama: Llama, rendered: Any) -> list[int]:
    return llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_tokens(llama: Llama, messages: Sequence[Message]) -> list[int]:
    """The tokens of every message before the last, as they start the whole prompt; [] when there is no
    template or nothing worth keeping."""
    from jinja2 import TemplateError  # llama-cpp-python's dependency, like the model itself

    if len(messages) < 2:
        return []
    formatter = _formatter(llama)
    if formatter is None:
        return []
    try:
        head = _tokens(llama, formatter(messages=list(messages[:-1])))
        formatter.add_generation_prompt = True
        whole = _tokens(llama, formatter(messages=list(messages)))
    except (TemplateError, ValueError) as exc:  # the chat call itself will say what is wrong
        log.debug("no prompt cache: the chat template failed: %s", exc)
        return []
    shared = whole[: common_length(head, whole)]
    return shared if len(shared) >= MIN_PREFIX_TOKENS else []


class PrefixCache:
    """Session files of evaluated prompt starts for one model and context size, in `folder`."""

    def __init__(self, folder: Path, model_id: str) -> None:
        self.folder = folder
        self.model_id = model_id

    def path(self, tokens: Sequence[int]) -> Path:
        digest = hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]
        return self.folder / f"{self.model_id}-{digest}.session"

    def prepare(self, llama: Llama, tokens: Sequence[int]) -> int:
        """Make `llama`'s context start with `tokens`; returns how many of them it did not have to evaluate
        (all when the context held them or a file had them)."""
        tokens = list(tokens)
        held = common_length(llama._input_ids.tolist(), tokens)
        if held == len(tokens):
            return held
        path = self.path(tokens)
        if path.is_file():
            if self._load(llama, path, tokens):
                return len(tokens)
            held = 0  # a failed load may have left the context half-written
        llama.n_tokens = held  # llama.eval drops the context's cells from here on
        llama.eval(tokens[held:])
        self._save(llama, path, tokens)
        return held

    def _load(self, llama: Llama, path: Path, tokens: list[int]) -> bool:
        import llama_cpp

        found = (llama_cpp.llama_token * len(tokens))()
        count = ctypes.c_size_t(0)
        ok = llama_cpp.llama_state_load_file(llama.ctx, str(path).encode(), found, len(tokens), ctypes.byref(count))
        if not ok or list(found[: count.value]) != tokens:
            log.warning("ignoring prompt cache %s: unreadable or made for another prompt", path.name)
            return False
        llama.input_ids[: len(tokens)] = tokens
        llama.n_tokens = len(tokens)
        llama._requires_eval = True  # the next decode refreshes the logits before sampling
        path.touch()
        return True

    def _save(self, llama: Llama, path: Path, tokens: list[int]) -> None:
        """Write the context (it holds exactly `tokens`) atomically; a failure only costs the next process time."""
        import llama_cpp

        temp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            array = (llama_cpp.llama_token * len(tokens))(*tokens)
            if not llama_cpp.llama_state_save_file(llama.ctx, str(temp).encode(), array, len(tokens)):
                raise OSError("llama.cpp could not write the session file")
            os.replace(temp, path)
        except OSError as exc:
            log.warning("cannot save the prompt cache %s: %s", path, exc)
            temp.unlink(missing_ok=True)
            return
        self._prune()

    def _prune(self) -> None:
        """Keep the newest files (another process may be pruning too: a file gone already is fine)."""
        dated = []
        for file in self.folder.glob(f"{self.model_id}-*.session"):
            try:
                dated.append((file.stat().st_mtime_ns, file))
            except FileNotFoundError:
                continue
        for _, old in sorted(dated, reverse=True)[KEEP_FILES:]:
            old.unlink(missing_ok=True)
