"""The cheap/strong router trained on the bundled labelled examples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ragline.generate.router import DEFAULT_EXAMPLES, Router, RouterError, read_examples


def test_the_bundled_examples_are_valid_and_balanced():
    queries, labels = read_examples(DEFAULT_EXAMPLES)
    assert len(queries) >= 60
    assert min(labels.count("cheap"), labels.count("strong")) >= 30


def test_simple_and_complex_questions_are_routed_differently():
    router = Router.train()
    assert router.choose("What is the default timeout?") == "cheap"
    assert router.choose("Where are the logs stored?") == "cheap"
    assert router.choose("Compare dense and hybrid retrieval and explain which one suits API docs.") == "strong"
    assert router.choose("Write a Python function that re-indexes only the changed files.") == "strong"
    assert router.strong_probability("Why is ingestion slow and how do I fix it?") > 0.5


def test_a_saved_router_is_reused_until_the_examples_change(tmp_path: Path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text(DEFAULT_EXAMPLES.read_text())
    model_path = tmp_path / "models" / "router.joblib"

    first = Router.load_or_train(model_path, examples)
    saved_at = model_path.stat().st_mtime_ns
    again = Router.load_or_train(model_path, examples)
    assert model_path.stat().st_mtime_ns == saved_at
    assert again.choose("What is the default port?") == first.choose("What is the default port?")

    # flip every label: a retrained router must flip its decisions
    flipped = [json.loads(line) for line in examples.read_text().splitlines()]
    for example in flipped:
        example["label"] = "cheap" if example["label"] == "strong" else "strong"
    examples.write_text("\n".join(json.dumps(e) for e in flipped))
    os.utime(examples, ns=(saved_at + 10**9, saved_at + 10**9))
    retrained = Router.load_or_train(model_path, examples)
    assert retrained.choose("What is the default port?") == "strong"
    assert Router.load(model_path).choose("What is the default port?") == "strong"


def test_a_bad_example_names_its_line(tmp_path: Path):
    examples = tmp_path / "bad.jsonl"
    examples.write_text('{"query": "What is X?", "label": "cheap"}\n{"query": "Why?", "label": "medium"}\n')
    with pytest.raises(RouterError, match=r"bad.jsonl:2: needs a non-empty query and a label in"):
        read_examples(examples)
