"""Answer quality on a question set, graded by an LLM judge.

Questions are `{"question", "reference_answer"?, "source"?}`. Each is
answered by the app (retrieval + the configured answerer), then the judge
scores correctness 1–5 against the reference answer (when there is one),
relevance 1–5 to the question, and says for every claim (a sentence with
[n] citations) whether the passages it cites support it. One line per
question is appended to the results file, with the answer's token usage
and the judge's (what `cost` prices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from ragline.app import Ragline
from ragline.config import RetrieveSettings, Settings
from ragline.evaluate.judge import Judge, claims
from ragline.evaluate.matching import same_page
from ragline.evaluate.records import Progress, ResultsFile, Silent, config_hash, pending, question_key
from ragline.generate.answerer import build_llm
from ragline.generate.base import LLMError
from ragline.store.base import Scope


def judge_from_settings(settings: Settings) -> Judge:
    """The judge of the `judge:` settings block (its LLM defaults to generate.llm)."""
    llm_settings = settings.judge.llm or settings.generate.llm
    llm = build_llm(llm_settings, settings.data_dir)
    if llm is None:
        raise LLMError("the judge needs an LLM, not the extractive answerer: set judge.llm (or generate.llm)")
    return Judge(llm, max_tokens=settings.judge.max_tokens, temperature=settings.judge.temperature)


def answers_config(app: Ragline, judge: Judge, options: RetrieveSettings) -> dict[str, Any]:
    """What decides the answers and grades: generation, retrieval, the index and the judge."""
    settings = app.settings
    return {
        "kind": "answers",
        "generate": settings.generate.model_dump(mode="json"),
        "retrieve": options.model_dump(mode="json"),
        "embedder": [settings.embedder.backend, settings.embedder.model, settings.embedder.query_prefix],
        "chunker": settings.chunker.model_dump(mode="json"),
        "chunks": app.store.count(),
        "judge": [judge.llm.name, judge.max_tokens, judge.temperature],
    }


def grade(judge: Judge, item: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """One results line: the answer, its usage, and the judge's verdicts."""
    question, text = item["question"], answer["answer"]
    before = judge.usage.as_dict()
    reference = item.get("reference_answer")
    correctness = judge.correctness(question, text, reference) if reference else None
    relevance = judge.relevance(question, text)
    hits = answer["hits"]
    graded_claims = []
    for sentence, numbers in claims(text):
        shown = [f"[{n}] {hits[n - 1]['text']}" for n in numbers if 1 <= n <= len(hits)]
        verdict = judge.supported(sentence, shown) if shown else None
        graded_claims.append({
            "claim": sentence,
            "cited": numbers,
            "supported": verdict.to_dict() if verdict else {"value": False, "reason": "cites no passage it was shown"},
        })
    scored = [c["supported"]["value"] for c in graded_claims if c["supported"]["value"] is not None]
    source = item.get("source")
    after = judge.usage.as_dict()
    return {
        "question": question,
        "source": source,
        "reference_answer": reference,
        "answer": text,
        "model": answer["model"],
        "usage": answer["usage"],
        "grounded": answer["grounded"],
        "note": answer["note"],
        "citations": [c["url"] for c in answer["citations"]],
        "correctness": correctness.to_dict() if correctness else None,
        "relevance": relevance.to_dict(),
        "claims": graded_claims,
        "faithfulness": round(sum(scored) / len(scored), 4) if scored else None,
        "cited_gold": any(same_page(source, c["url"], c["source"]) for c in answer["citations"]) if source else None,
        "retrieved_gold": any(same_page(source, h["url"], h["source"]) for h in hits) if source else None,
        "judge_model": judge.llm.name,
        "judge_usage": {key: after[key] - before[key] for key in after},
    }


@dataclass(slots=True)
class AnswersReport:
    questions: int
    figures: dict[str, Any]
    config: str
    results: Path

    def to_dict(self) -> dict[str, Any]:
        return {"questions": self.questions, **self.figures, "config": self.config, "results": str(self.results)}


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(mean(known), 3) if known else None


def summarize_answers(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the graded answers; unscored verdicts are counted, never averaged in as zeros."""
    verdicts = [line["relevance"] for line in lines] + [line["correctness"] for line in lines if line["correctness"]]
    claim_values = [c["supported"]["value"] for line in lines for c in line["claims"]]
    judged = [v for v in claim_values if v is not None]
    with_source = [line for line in lines if line["source"]]
    return {
        "correctness": _mean([line["correctness"]["value"] for line in lines if line["correctness"]]),
        "relevance": _mean([line["relevance"]["value"] for line in lines]),
        "faithfulness": round(sum(judged) / len(judged), 3) if judged else None,
        "claims": len(claim_values),
        "unscored": sum(v["value"] is None for v in verdicts) + len(claim_values) - len(judged),
        "grounded": _mean([float(line["grounded"]) for line in lines]),
        "cited_gold": _mean([float(line["cited_gold"]) for line in with_source]),
        "retrieved_gold": _mean([float(line["retrieved_gold"]) for line in with_source]),
        "prompt_tokens": _mean([line["usage"].get("prompt_tokens", 0) for line in lines]),
        "completion_tokens": _mean([line["usage"].get("completion_tokens", 0) for line in lines]),
    }


def evaluate_answers(
    app: Ragline,
    questions: Sequence[dict[str, Any]],
    judge: Judge,
    results: Path,
    *,
    options: RetrieveSettings | None = None,
    progress: Progress | None = None,
) -> AnswersReport:
    """Answer and grade every question not yet in `results` for this configuration; return the means.

    A judge reply that cannot be read leaves that verdict unscored; a judge
    that cannot be reached (LLMError) stops the run, and a rerun resumes.
    """
    options = options or app.settings.retrieve
    progress = progress or Silent()
    config = config_hash(answers_config(app, judge, options))
    log = ResultsFile(results, config)
    done = log.done()
    todo, total = pending(questions, done)
    progress.start(total, total - len(todo))
    for item in todo:
        record = grade(judge, item, app.answer(item["question"], options=options, scope=Scope.everything()).to_dict())
        log.append(record)
        done[question_key(item)] = record
        progress.advance()
    lines = [done[question_key(item)] for item in questions]
    return AnswersReport(len(lines), summarize_answers(lines), config, results)
