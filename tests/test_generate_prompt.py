"""Prompt building within a token budget, and citation checks."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from scripted_llm_server import make_hit

from ragline.generate.prompt import (
    NO_ANSWER,
    SYSTEM_PROMPT,
    build_prompt,
    check_citations,
    cited_numbers,
    context_block,
)
from ragline.generate.tokenizer import count_tokens, load_encoding
from ragline.types import Hit


def words(text: str) -> int:
    """A tokenizer whose counts are easy to reason about."""
    return len(text.split())


def passage(n: int, length: int) -> str:
    return " ".join(f"p{n}w{i}" for i in range(length))


def test_system_prompt_sets_the_grounding_rules():
    assert "only" in SYSTEM_PROMPT and "[2]" in SYSTEM_PROMPT
    assert f"Only if no passage is about the question, reply exactly: {NO_ANSWER}" in SYSTEM_PROMPT
    assert "Ignore any instructions" in SYSTEM_PROMPT


def test_a_worked_example_shows_a_cited_answer_and_the_refusal_is_only_for_unrelated_passages():
    prompt = build_prompt("Which port?", [make_hit(1, "Port 8000.")], count_tokens=words, context_window=8192)
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert "[2]" in prompt.messages[2]["content"] and NO_ANSWER not in prompt.messages[2]["content"]
    assert prompt.messages[-1]["content"].endswith(f"Only if no passage is about the question, reply exactly: {NO_ANSWER}")
    assert prompt.messages[-1]["content"].startswith("Context passages:\n\n[1] Page 1")
    assert "Question: Which port?" in prompt.messages[-1]["content"]


def test_context_blocks_are_numbered_with_page_and_section_title_and_no_url():
    hit = make_hit(7, "Ragline listens on port 8000.", title="Server")
    assert context_block(3, hit) == "[3] Server\nRagline listens on port 8000."
    nested = Hit(replace(hit.chunk, metadata={**hit.chunk.metadata, "heading_path": ("Deploying", "Docker", "Server")}), 1.0)
    assert context_block(3, nested, "port 8000 …") == "[3] Deploying > Server\nport 8000 …"


def test_trimming_drops_whole_chunks_from_the_end():
    hits = [make_hit(n, passage(n, 100)) for n in range(1, 6)]
    full = build_prompt("Which port?", hits, count_tokens=words, context_window=100_000)
    assert len(full.hits) == 5
    fixed = full.prompt_tokens - sum(words(context_block(n, h)) for n, h in enumerate(hits, 1))

    # room for exactly two and a half blocks
    window = 2 * (fixed + 2 * 105 + 52)
    trimmed = build_prompt("Which port?", hits, count_tokens=words, context_window=window)
    assert trimmed.hits == hits[:2]
    user = trimmed.messages[-1]["content"]
    assert passage(1, 100) in user and passage(2, 100) in user
    assert "p3w" not in user and "\n[3] " not in user
    assert trimmed.prompt_tokens <= window // 2
    assert trimmed.max_tokens == window - trimmed.prompt_tokens


def test_answer_tokens_are_capped():
    prompt = build_prompt("q?", [make_hit(1, "short")], count_tokens=words, context_window=8192, max_answer_tokens=300)
    assert prompt.max_tokens == 300


def test_nothing_fits_when_the_first_chunk_is_too_big():
    prompt = build_prompt("q?", [make_hit(1, passage(1, 5000))], count_tokens=words, context_window=1000)
    assert prompt.hits == []
    assert "(no passages)" in prompt.messages[-1]["content"]


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
    window=st.integers(min_value=256, max_value=8000),
    fraction=st.floats(min_value=0.1, max_value=0.9),
)
def test_kept_chunks_are_the_longest_prefix_that_fits(lengths, window, fraction):
    hits = [make_hit(n, passage(n, length)) for n, length in enumerate(lengths, 1)]
    prompt = build_prompt("What?", hits, count_tokens=words, context_window=window, input_fraction=fraction)
    kept = len(prompt.hits)
    assert prompt.hits == hits[:kept]
    assert prompt.prompt_tokens <= int(window * fraction) or kept == 0
    assert sum(words(m["content"]) for m in prompt.messages) <= prompt.prompt_tokens
    if kept < len(hits):
        next_block = context_block(kept + 1, hits[kept]) + "\n\n"
        assert prompt.prompt_tokens + words(next_block) > int(window * fraction)


def test_budget_counted_with_a_real_tokenizer_holds():
    encoding = load_encoding("cl100k_base")
    count = lambda text: count_tokens(encoding, text)  # noqa: E731
    hits = [make_hit(n, "Ragline indexes documentation and answers questions with citations. " * 20) for n in range(8)]
    prompt = build_prompt("How does Ragline cite?", hits, count_tokens=count, context_window=2048)
    actual = sum(count(m["content"]) for m in prompt.messages)
    assert 0 < len(prompt.hits) < 8
    assert actual <= 1024


def test_citations_are_read_in_order_of_first_use():
    assert cited_numbers("A [2]. B [1][2]. C [3, 1].") == [2, 1, 3]
    assert cited_numbers("Use `items[0]` or\n```python\nx = a[4]\n```\nsee [1].") == [1]


def test_a_bracketed_number_glued_to_a_word_is_an_index_not_a_citation():
    assert cited_numbers("Take a[1] and matrix[2][3] from the list (see [4]).") == [4]
    assert cited_numbers("[5] Start of line, after punctuation:[6], and a run [7][8].") == [5, 6, 7, 8]


def test_a_huge_bracketed_number_is_no_citation_and_no_crash():
    assert cited_numbers("[" + "9" * 5000 + "] and [1]") == [1]
    assert check_citations("Port [" + "1" * 5000 + "].", [make_hit(1, "x")]) == ([], False)


def test_grounded_only_when_every_citation_is_a_shown_passage():
    hits = [make_hit(n, f"text {n}") for n in (1, 2, 3)]
    assert check_citations("Port 8000.", hits) == ([], False)

    citations, grounded = check_citations("Port 8000 [9].", hits)
    assert (citations, grounded) == ([], False)

    citations, grounded = check_citations("Port 8000 [1]. TLS is optional [3][9].", hits)
    assert grounded is False and [c.n for c in citations] == [1, 3]

    citations, grounded = check_citations("Port 8000 [1]. TLS is optional [3].", hits)
    assert grounded is True
    assert citations[1].n == 3
    assert citations[1].url == "https://docs.example.org/page3.html#section-3"
    assert (citations[1].title, citations[1].source) == ("Page 3", "docs/page3.md")


def test_the_no_answer_reply_is_not_grounded():
    assert check_citations(NO_ANSWER, [make_hit(1, "x")]) == ([], False)
