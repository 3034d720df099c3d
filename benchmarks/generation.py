"""Answers of the default local model on two dev sets: verified citations, claim support, abstention, speed.

    python benchmarks/generation.py [--sets python,flax] [--questions 20] [--unanswerable 10]
                                    [--context-tokens none,400] [--max-answer-tokens 256] [--seed 0]
                                    [--out FILE] [--fresh] [--judge] [--overhead-runs 0]

Dev sets (answerable questions are `{question, source: URL#anchor}`):
- python: questions of python_docs_dev.jsonl answerable from the bundled
  samples, answered from them (samples/ragline.yaml), and
  python_docs_unanswerable.jsonl (off-topic, and on-topic Python questions the
  3.11 docs do not answer: `on_topic`);
- flax: flax_docs_dev.jsonl and flax_docs_unanswerable.jsonl over the Flax NNX
  docs (benchmarks/corpora.py downloads them from PyPI once).
Each set is indexed once under --data-dir/<set> and reused on later runs.

Every value of --context-tokens (`generate.context_tokens`; `none`: as many
whole passages as fit) is one configuration; the first is the baseline. All
configurations answer the same questions: a seeded sample of --questions
answerable and --unanswerable unanswerable ones per set (0: all), kept in file
order. Per set and configuration one JSON object of figures is printed as it
is done, and a table at the end:
- cited: share of answerable answers with >= 1 verified citation (a supported
  claim citing a passage); target >= 0.95;
- claims_supported (micro, over the claims of answerable answers) and
  supported_share_mean (mean of the answers' own supported_share);
- cited_page: share of answerable answers citing the question's source page;
- false_abstention on answerable (target <= 0.05) and abstention on
  unanswerable questions (target >= 0.90; also split on/off topic where the
  set says which): an answer abstains when `abstained` or its text is NO_ANSWER;
- ttft_s median/p90, gen tokens/s (first token to final answer, claim checks
  included) and prompt tokens evaluated per request (prompt - cached), over
  every answer of the configuration that has them;
- --judge: `ragline eval answers` grades of the answerable answers (relevance,
  faithfulness of cited claims) by the judge of the `judge:` settings
  (default: the same local model, loaded once more beside it).
--overhead-runs N also times Ragline's streaming path against calling
llama.cpp directly with the same messages (tokens/s ratio, target >= 0.95).

Every answer (and judge grade) is appended to --out as it is made, tagged with
a hash of the configuration; a rerun skips what that configuration already
answered, so a killed run resumes where it stopped. --fresh deletes the file
first: do that after changing the code, or the old answers are reused.

Time on 2 cores: 20-60 s per answer (up to 2 min when the cores are shared),
so `--sets python,flax --questions 20 --unanswerable 10 --context-tokens
none,400` (2 sets x 2 configurations x 30 questions = 120 answers) takes 1-2
hours, plus a few minutes for the first flax download and index; --judge
adds about half as much again.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import DATA, read_jsonl
from corpora import fetch

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings, load_settings
from ragline.evaluate.answers import grade, judge_from_settings, summarize_answers
from ragline.evaluate.judge import Judge
from ragline.evaluate.matching import same_page
from ragline.evaluate.records import ResultsFile, config_hash, question_key
from ragline.generate.prompt import NO_ANSWER
from ragline.store.base import Scope

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / ".ragline-bench" / "generation"


# --- figures: pure functions of answer dicts (`Answer.to_dict()`) ----------------------------------


def abstains(answer: dict) -> bool:
    return answer["abstained"] or answer["answer"] == NO_ANSWER


def has_verified_citation(answer: dict) -> bool:
    """At least one claim that a passage supports and that cites it."""
    return any(claim["supported"] and claim["citations"] for claim in answer["claims"])


def cites_page(answer: dict, source: str) -> bool:
    """A citation on the question's gold page (the anchor may differ)."""
    return any(same_page(source, citation["url"], citation["source"]) for citation in answer["citations"])


def tokens_per_s(answer: dict) -> float | None:
    """Generation speed after the first token; None when no model streamed text."""
    timings, completion = answer["timings"], answer["usage"].get("completion_tokens", 0)
    if "ttft_ms" not in timings or completion < 2:
        return None
    seconds = (timings["generate_ms"] - timings["ttft_ms"]) / 1000
    return (completion - 1) / seconds if seconds > 0 else None


def prompt_tokens_evaluated(answer: dict) -> int | None:
    """Prompt tokens the model read for this request: those not already in its context (prefix cache)."""
    usage = answer["usage"]
    return usage["prompt_tokens"] - usage.get("cached_tokens", 0) if "prompt_tokens" in usage else None


def share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 3) if flags else None


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def p90(values: Sequence[float]) -> float | None:
    """Nearest-rank 90th percentile (defined for one value too)."""
    return round(sorted(values)[math.ceil(0.9 * len(values)) - 1], 2) if values else None


def figures(answerable: Sequence[tuple[dict, dict]], unanswerable: Sequence[tuple[dict, dict]]) -> dict[str, Any]:
    """The figures of one configuration from its (question item, answer dict) pairs."""
    answers = [a for _, a in answerable]
    claims = [claim for a in answers for claim in a["claims"]]
    shares = [a["supported_share"] for a in answers if a["supported_share"] is not None]
    everything = answers + [a for _, a in unanswerable]
    ttft = [a["timings"]["ttft_ms"] / 1000 for a in everything if "ttft_ms" in a["timings"]]
    speeds = [s for s in map(tokens_per_s, everything) if s is not None]
    evaluated = [t for t in map(prompt_tokens_evaluated, everything) if t is not None]
    result = {
        "answerable": len(answers),
        "cited": share([has_verified_citation(a) for a in answers]),
        "claims": len(claims),
        "claims_supported": share([claim["supported"] for claim in claims]),
        "supported_share_mean": round(statistics.mean(shares), 3) if shares else None,
        "cited_page": share([cites_page(a, item["source"]) for item, a in answerable if item.get("source")]),
        "false_abstention": share([abstains(a) for a in answers]),
        "unanswerable": len(unanswerable),
        "abstention": share([abstains(a) for _, a in unanswerable]),
    }
    for label, wanted in (("abstention_on_topic", True), ("abstention_off_topic", False)):
        kind = [abstains(a) for item, a in unanswerable if item.get("on_topic") is wanted]
        if kind:
            result[label] = share(kind)
    return result | {
        "ttft_s_median": median(ttft),
        "ttft_s_p90": p90(ttft),
        "gen_tokens_per_s_median": median(speeds),
        "prompt_tokens_evaluated_median": median(evaluated),
        "models": dict(Counter(a["model"] for a in everything)),
    }


def self_check() -> None:
    """The figures of two hand-made answers, so a change of the answer format fails loudly here."""
    claim = {"text": "x [1]", "start": 0, "end": 5, "kind": "sentence", "supported": True, "score": 0.9,
             "citations": [{"n": 1, "text": "x", "start": 0, "end": 1, "score": 0.9}]}
    cited = {
        "answer": "x [1] y", "citations": [{"n": 1, "url": "https://d.org/a.html#s", "title": "", "source": "a.html"}],
        "hits": [], "model": "m", "usage": {"prompt_tokens": 900, "completion_tokens": 11, "cached_tokens": 400},
        "timings": {"ttft_ms": 2000.0, "generate_ms": 4000.0}, "grounded": True, "supported_share": 0.5,
        "abstained": False, "note": "",
        "claims": [claim, {**claim, "text": "y", "supported": False, "citations": []}],
    }
    refused = {**cited, "answer": NO_ANSWER, "citations": [], "claims": [], "supported_share": None,
               "usage": {}, "timings": {"generate_ms": 50.0}}
    got = figures([({"source": "https://d.org/a.html#t"}, cited)], [({"on_topic": True}, refused)])
    expected = {"cited": 1.0, "claims_supported": 0.5, "cited_page": 1.0, "false_abstention": 0.0, "abstention": 1.0,
                "ttft_s_median": 2.0, "gen_tokens_per_s_median": 5.0, "prompt_tokens_evaluated_median": 500}
    wrong = {key: got[key] for key in expected if got[key] != expected[key]}
    assert not wrong, f"self-check: {wrong} (expected {expected})"


# --- running the questions -------------------------------------------------------------------------


@dataclass(frozen=True)
class DevSet:
    name: str
    answerable: list[dict]
    unanswerable: list[dict]
    config_file: Path | None  # None: the defaults (and ./ragline.yaml if there is one)
    sources: list[SourceSettings]


def python_set() -> DevSet:
    samples = load_settings(REPO / "samples" / "ragline.yaml")
    return DevSet(
        "python",
        [q for q in read_jsonl(DATA / "python_docs_dev.jsonl") if q["answerable_in_samples"]],
        read_jsonl(DATA / "python_docs_unanswerable.jsonl"),
        REPO / "samples" / "ragline.yaml",
        [source.model_copy(update={"path": REPO / source.path}) for source in samples.ingest.sources],
    )


def flax_set() -> DevSet:
    corpus = fetch("flax")
    return DevSet(
        "flax",
        read_jsonl(DATA / "flax_docs_dev.jsonl"),
        read_jsonl(DATA / "flax_docs_unanswerable.jsonl"),
        None,
        [SourceSettings(path=corpus.path, url_template=corpus.url_template)],
    )


SETS = {"python": python_set, "flax": flax_set}


def sample(items: list[dict], n: int, seed: int) -> list[dict]:
    """`n` items drawn with `seed` (all when n is 0 or more than there are), in file order."""
    if n <= 0 or n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def parse_context_tokens(text: str) -> list[int | None]:
    return [None if value.strip().lower() == "none" else int(value) for value in text.split(",")]


def settings_for(dev_set: DevSet, context_tokens: int | None, args: argparse.Namespace) -> Settings:
    return load_settings(
        dev_set.config_file,
        data_dir=args.data_dir / dev_set.name,
        generate={"max_answer_tokens": args.max_answer_tokens, "temperature": 0.0, "context_tokens": context_tokens},
    )


def answers_config(app: Ragline, dev_set: DevSet) -> dict[str, Any]:
    """What decides the answers: the set, generation and retrieval settings, the embedder and the index."""
    settings = app.settings
    return {
        "set": dev_set.name,
        "generate": settings.generate.model_dump(mode="json"),
        "retrieve": settings.retrieve.model_dump(mode="json"),
        "embedder": [settings.embedder.backend, settings.embedder.model],
        "chunks": app.store.count(),
    }


def answer_all(app: Ragline, log: ResultsFile, items: list[tuple[dict, bool]], tags: dict) -> dict[str, dict]:
    """Answer the (item, answerable) pairs not in `log` yet, appending each with `tags`; return every record by
    question."""
    done = log.done()
    todo = [(item, answerable) for item, answerable in items if question_key(item) not in done]
    for number, (item, answerable) in enumerate(todo, start=1):
        started = time.perf_counter()
        answer = app.answer(item["question"], scope=Scope.everything()).to_dict()
        record = {"kind": "answer", **tags, "question": item["question"], "source": item.get("source"),
                  "answerable": answerable, "on_topic": item.get("on_topic"), "answer": answer}
        log.append(record)
        done[question_key(item)] = record
        verdict = "abstained" if abstains(answer) else "cited" if has_verified_citation(answer) else "uncited"
        print(f"{tags} {number}/{len(todo)} {time.perf_counter() - started:.0f}s {verdict}", file=sys.stderr)
    return done


def judge_all(judge: Judge, log: ResultsFile, records: list[dict], tags: dict) -> list[dict]:
    """`ragline eval answers` grades of the answer records not graded yet for this configuration."""
    done = log.done()
    todo = [record for record in records if question_key(record) not in done]
    for number, record in enumerate(todo, start=1):
        graded = {"kind": "judge", **tags, **grade(judge, record, record["answer"])}
        log.append(graded)
        done[question_key(record)] = graded
        print(f"{tags} judged {number}/{len(todo)}", file=sys.stderr)
    return [done[question_key(r)] for r in records]


def streaming_overhead(app: Ragline, question: str, runs: int, max_tokens: int) -> dict[str, float]:
    """Tokens/s of Ragline's streaming answer against llama.cpp's own streaming call on the same question."""
    from ragline.generate.prompt import build_prompt

    llm = app.answerer.llm
    hits = app.retriever.search(question, scope=Scope.everything()).hits
    prompt = build_prompt(question, hits, count_tokens=llm.count_tokens, context_window=llm.context_window,
                          input_fraction=app.settings.generate.input_fraction, max_answer_tokens=max_tokens)
    ours, direct = [], []
    for _ in range(runs):
        ours.append(tokens_per_s(app.answer(question, scope=Scope.everything()).to_dict()) or 0.0)
        llama = llm._model()
        first, count = None, 0
        for chunk in llama.create_chat_completion(messages=prompt.messages, max_tokens=max_tokens, temperature=0.0,
                                                  stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                count += 1
                first = first or time.perf_counter()
        direct.append((count - 1) / (time.perf_counter() - first))
    return {
        "streaming_tokens_per_s": round(statistics.median(ours), 2),
        "direct_tokens_per_s": round(statistics.median(direct), 2),
        "streaming_over_direct": round(statistics.median(ours) / statistics.median(direct), 3),
    }


TABLE = (
    ("set", "set", "{}"), ("context_tokens", "ctx", "{}"), ("answerable", "n", "{}"), ("cited", "cited", "{:.2f}"),
    ("claims_supported", "sup", "{:.2f}"), ("supported_share_mean", "sup/ans", "{:.2f}"),
    ("cited_page", "page", "{:.2f}"), ("false_abstention", "f.abst", "{:.2f}"), ("unanswerable", "n_u", "{}"),
    ("abstention", "abst", "{:.2f}"), ("ttft_s_median", "ttft50", "{:.1f}"), ("ttft_s_p90", "ttft90", "{:.1f}"),
    ("gen_tokens_per_s_median", "tok/s", "{:.1f}"), ("prompt_tokens_evaluated_median", "prompt", "{:.0f}"),
)
JUDGED = (("relevance", "rel", "{:.2f}"), ("faithfulness", "faith", "{:.2f}"))


def table(rows: list[dict]) -> str:
    """One line per set and configuration; the judge's means too when it graded."""
    columns = TABLE + JUDGED if any("judge" in row for row in rows) else TABLE

    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key, row.get("judge", {}).get(key))
        if value is None:
            return "none" if key == "context_tokens" else "-"
        return fmt.format(value)

    cells = [[header for _, header, _ in columns]] + [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="python,flax", help="comma-separated: python, flax")
    parser.add_argument("--questions", type=int, default=20, help="answerable questions per set (0: all)")
    parser.add_argument("--unanswerable", type=int, default=10, help="unanswerable questions per set (0: all)")
    parser.add_argument("--context-tokens", type=parse_context_tokens, default=[None],
                        help="generate.context_tokens values, comma-separated (none: whole passages); first = baseline")
    parser.add_argument("--max-answer-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="of the question sample")
    parser.add_argument("--data-dir", type=Path, default=BENCH, help="indexes, one folder per set")
    parser.add_argument("--out", type=Path, default=BENCH / "answers.jsonl", help="the resumable results file")
    parser.add_argument("--fresh", action="store_true", help="delete --out first (after a code change)")
    parser.add_argument("--judge", action="store_true", help="also grade answerable answers with the judge: settings")
    parser.add_argument("--overhead-runs", type=int, default=0, help="streaming vs direct llama.cpp runs (0: skip)")
    args = parser.parse_args()
    unknown = set(args.sets.split(",")) - set(SETS)
    if unknown:
        parser.error(f"unknown set(s) {', '.join(sorted(unknown))}; known: {', '.join(SETS)}")

    self_check()
    if args.fresh:
        args.out.unlink(missing_ok=True)
    rows, judge = [], None
    for set_number, name in enumerate(args.sets.split(",")):
        dev_set = SETS[name]()
        answerable = sample(dev_set.answerable, args.questions, args.seed)
        unanswerable = sample(dev_set.unanswerable, args.unanswerable, args.seed)
        items = [(q, True) for q in answerable] + [(q, False) for q in unanswerable]
        for config_number, context_tokens in enumerate(args.context_tokens):
            app = Ragline(settings_for(dev_set, context_tokens, args))
            if config_number == 0:
                report = app.indexer().run(dev_set.sources)
                print(f"{name}: {app.store.count()} chunks ({len(report.new) + len(report.changed)} files (re)indexed)",
                      file=sys.stderr)
            app.answerer.load()  # the model loads before the clock starts, as in a server
            config = config_hash(answers_config(app, dev_set))
            tags = {"set": name, "context_tokens": context_tokens}
            done = answer_all(app, ResultsFile(args.out, config), items, tags)
            row = {**tags, "config": config,
                   **figures([(q, done[question_key(q)]["answer"]) for q in answerable],
                             [(q, done[question_key(q)]["answer"]) for q in unanswerable])}
            if args.judge:
                judge = judge or judge_from_settings(app.settings)
                judged = [judge.llm.name, judge.max_tokens, judge.temperature]
                log = ResultsFile(args.out, config_hash({"answers": config, "judge": judged}))
                records = [done[question_key(q)] for q in answerable]
                row["judge"] = summarize_answers(judge_all(judge, log, records, tags))
            if args.overhead_runs and set_number == config_number == 0:
                row["streaming_overhead"] = streaming_overhead(app, answerable[0]["question"], args.overhead_runs,
                                                               args.max_answer_tokens)
            print(json.dumps(row, indent=2), flush=True)
            rows.append(row)
            app.close()
    print(table(rows))
    print(f"answers: {args.out}")


if __name__ == "__main__":
    main()
