"""Tokens per answer and what they cost, per model, from an answers results file and a price table.

The price table is YAML or JSON: `model: {input: $, output: $}`, dollars per
million prompt (input) and completion (output) tokens, e.g.
`gpt-4o-mini: {input: 0.15, output: 0.60}`. Answers and judge calls are
reported apart, since only the answers are what users pay for in production.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ragline.evaluate.records import EvalInputError


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float


@dataclass(slots=True)
class CostRow:
    """One model in one role (`answer` or `judge`); dollar figures are None when the model has no price."""

    role: str
    model: str
    answers: int
    prompt_tokens: float
    completion_tokens: float
    usd_per_answer: float | None
    usd_total: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_prices(path: Path) -> dict[str, Price]:
    """The price table, checked: every model needs non-negative `input` and `output` prices."""
    if not path.is_file():
        raise EvalInputError(f"price table {path} does not exist")
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EvalInputError(f"price table {path} is not YAML or JSON: {exc}") from None
    if not isinstance(table, dict):
        raise EvalInputError(f"price table {path} must map model names to {{input: $, output: $}} per 1M tokens")
    prices = {}
    for model, entry in table.items():
        values = entry if isinstance(entry, dict) else {}
        if not all(isinstance(values.get(f), (int, float)) and values[f] >= 0 for f in ("input", "output")):
            raise EvalInputError(
                f"price table {path}: {model!r} needs input and output, dollars per 1M tokens, e.g. "
                "{input: 0.15, output: 0.60}"
            )
        prices[str(model)] = Price(float(values["input"]), float(values["output"]))
    return prices


def cost_report(lines: Iterable[Mapping[str, Any]], prices: Mapping[str, Price]) -> list[CostRow]:
    """Mean tokens and dollars per answer, and the total, for each (role, model) in answers results lines."""
    usages: dict[tuple[str, str], list[Mapping[str, int]]] = {}
    for line in lines:
        if "usage" not in line:
            raise EvalInputError("not an answers results file: its lines have no usage (use `ragline eval answers`)")
        usages.setdefault(("answer", line["model"]), []).append(line["usage"])
        if line.get("judge_model"):
            usages.setdefault(("judge", line["judge_model"]), []).append(line.get("judge_usage") or {})
    rows = []
    for (role, model), found in sorted(usages.items()):
        prompt = sum(u.get("prompt_tokens", 0) for u in found)
        completion = sum(u.get("completion_tokens", 0) for u in found)
        price = prices.get(model)
        total = (prompt * price.input + completion * price.output) / 1e6 if price else None
        rows.append(CostRow(
            role, model, len(found), round(prompt / len(found), 1), round(completion / len(found), 1),
            round(total / len(found), 6) if total is not None else None,
            round(total, 6) if total is not None else None,
        ))
    return rows
