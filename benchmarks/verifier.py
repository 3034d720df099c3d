"""Precision and recall of the answer verifier (`ragline.generate.verify`) on hand-labelled claim/passage pairs.

    python benchmarks/verifier.py [--data benchmarks/data/verifier_claims.jsonl] [--window N]
                                  [--cross-encoder DIR] [--weights]
    python benchmarks/verifier.py collect --out answers.jsonl [--questions 50] [--backend extractive]
                                  [--model smollm2-135m-instruct] [--threads 1]
    python benchmarks/verifier.py pairs --answers answers.jsonl --out unlabelled.jsonl

Each line of the labelled set is one claim of a real answer (Ragline on the
sample corpus answering dev-set questions: the bundled qwen2.5-coder-1.5b,
the extractive answerer, smollm2-135m; `model` says which) paired with one
passage the answer was given, labelled by reading: does the passage state
what the claim says (`supported`)? Every passage of an answer is paired with
every claim, so the negatives are hard: same question, same topic.

For each scorer (lexical, embedding, combined, cross-encoder when a folder is
given) the script scores each pair as `Verifier.support` does (the passage's
best span of up to `window` sentences, all the answer's passages scored at
once) and prints precision, recall and F1 at the scorer's best threshold, at
its configured default, and at a threshold chosen on the other half of the
answers (no peeking), next to two baselines in the same run: "every pair
supported" and "the pairs the model cited" (what `grounded` checked before).
Then claim-level figures at the defaults: a claim is supported when any of
its passages is. `--weights` sweeps the combined scorer's lexical weight.
Milliseconds per answer are wall time on this machine, whatever else runs.

`collect` indexes the samples and writes real answers with their passages,
one line per answer as it comes (a rerun skips the questions done); `pairs`
turns them into unlabelled claim/passage lines to label by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import DATA, read_jsonl

from ragline.config import EmbedderSettings, LLMSettings, VerifySettings, load_settings
from ragline.generate.verify import (
    COMBINED_WEIGHTS,
    DEFAULT_THRESHOLDS,
    CombinedScorer,
    CrossEncoderScorer,
    EmbeddingScorer,
    LexicalScorer,
    SupportScorer,
    Verifier,
    split_claims,
    without_citations,
)
from ragline.types import Chunk, Hit

REPO = Path(__file__).resolve().parent.parent
LABELLED = DATA / "verifier_claims.jsonl"


# --- collecting real answers ------------------------------------------------------------------------


def collect(args: argparse.Namespace) -> None:
    from ragline.app import Ragline
    from ragline.store.base import Scope

    settings = load_settings(
        REPO / "samples" / "ragline.yaml",
        data_dir=args.data_dir,
        generate={"max_answer_tokens": 256, "llm": {"backend": args.backend, "model": args.model, "n_threads": args.threads}},
    )
    app = Ragline(settings)
    sources = [source.model_copy(update={"path": REPO / source.path}) for source in settings.ingest.sources]
    app.indexer().run(sources)
    answerable = [q["question"] for q in read_jsonl(DATA / "python_docs_dev.jsonl") if q["answerable_in_samples"]]
    questions = answerable[args.offset :: args.stride][: args.questions]
    questions += [q["question"] for q in read_jsonl(DATA / "python_docs_unanswerable.jsonl")][: args.unanswerable]
    done = {json.loads(line)["question"] for line in args.out.read_text().splitlines()} if args.out.exists() else set()
    with args.out.open("a") as out:
        for question in questions:
            if question in done:
                continue
            answer = app.answer(question, scope=Scope.everything()).to_dict()
            record = {
                "question": question,
                "answer": answer["answer"],
                "model": answer["model"],
                "note": answer["note"],
                "passages": [{"n": n, "title": h["title"], "url": h["url"], "text": h["text"]}
                             for n, h in enumerate(answer["hits"], start=1)],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"{len(done) + 1}/{len(questions)} {question[:60]!r}", file=sys.stderr, flush=True)
            done.add(question)
    app.close()


def pairs(args: argparse.Namespace) -> None:
    """Every claim of every collected answer with every passage, `supported` left for a human to fill in."""
    with args.out.open("w") as out:
        for a, record in enumerate(read_jsonl(args.answers)):
            for c, claim in enumerate(split_claims(record["answer"])):
                for passage in record["passages"]:
                    out.write(json.dumps({
                        "answer_id": a, "claim_id": c, "question": record["question"], "answer": record["answer"],
                        "claim": without_citations(claim.span.text), "kind": claim.kind,
                        "cited": passage["n"] in claim.cited, "n": passage["n"], "passage": passage["text"],
                        "supported": None,
                    }) + "\n")


# --- measuring ---------------------------------------------------------------------------------------


class Cached:
    """A scorer that remembers its matrices, so the combined scorer's weight sweep embeds nothing twice."""

    def __init__(self, scorer: SupportScorer) -> None:
        self.scorer, self.name = scorer, scorer.name
        self._seen: dict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = {}

    def scores(self, claims, evidence) -> np.ndarray:  # type: ignore[no-untyped-def]
        key = (tuple(claims), tuple(evidence))
        if key not in self._seen:
            self._seen[key] = self.scorer.scores(claims, evidence)
        return self._seen[key]


def group_by_answer(rows: list[dict]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["answer_id"], []).append(i)
    return groups


def pair_scores(verifier: Verifier, rows: list[dict]) -> tuple[np.ndarray, float]:
    """Each pair's score as the verifier sees it (the passage's best span for the claim, scored with all
    of the answer's passages at once), and the median milliseconds per answer."""
    scores = np.zeros(len(rows), dtype=np.float32)
    times = []
    for indices in group_by_answer(rows).values():
        claims = list(dict.fromkeys(rows[i]["claim"] for i in indices))
        passages = {rows[i]["n"]: rows[i]["passage"] for i in indices}
        hits = [Hit(Chunk(str(n), "", passages[n], {}), 0.0) for n in sorted(passages)]
        started = time.perf_counter()
        ranked = verifier.support(claims, hits)
        times.append((time.perf_counter() - started) * 1000)
        score_of = {(claim, span.n): span.score for claim, spans in zip(claims, ranked) for span in spans}
        for i in indices:
            scores[i] = score_of.get((rows[i]["claim"], rows[i]["n"]), 0.0)
    return scores, statistics.median(times)


def prf(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    true_positives = float(np.sum(predicted & labels))
    precision = true_positives / max(int(predicted.sum()), 1)
    recall = true_positives / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(max(np.unique(scores), key=lambda t: (prf(scores >= t, labels)[2], -t)))


def held_out(scores: np.ndarray, labels: np.ndarray, answer_ids: np.ndarray, folds: int) -> tuple[float, float, float]:
    """Figures over all pairs, each fold judged at the threshold best on the other folds (split by answer)."""
    ids = sorted(set(answer_ids.tolist()))
    random.Random(0).shuffle(ids)
    fold_of = {answer: i % folds for i, answer in enumerate(ids)}
    fold = np.array([fold_of[a] for a in answer_ids.tolist()])
    predicted = np.zeros(len(scores), dtype=bool)
    for k in range(folds):
        train = fold != k
        predicted[~train] = scores[~train] >= best_threshold(scores[train], labels[train])
    return prf(predicted, labels)


def claim_level(scores: np.ndarray, labels: np.ndarray, rows: list[dict], threshold: float) -> tuple[float, float, float]:
    """A claim is supported when any of its passages is: the verifier's `supported` against the labels."""
    keys = sorted({(row["answer_id"], row["claim_id"]) for row in rows})
    index = {key: k for k, key in enumerate(keys)}
    best, truth = np.full(len(keys), -np.inf), np.zeros(len(keys), dtype=bool)
    for score, label, row in zip(scores, labels, rows):
        k = index[(row["answer_id"], row["claim_id"])]
        best[k], truth[k] = max(best[k], score), truth[k] or label
    return prf(best >= threshold, truth)


def line(name: str, threshold: float | str, figures: tuple[float, float, float], extra: str = "") -> str:
    shown = threshold if isinstance(threshold, str) else f"{threshold:.3f}"
    return f"{name:38} {shown:>9} {figures[0]:9.3f} {figures[1]:7.3f} {figures[2]:6.3f}  {extra}"


def measure(args: argparse.Namespace) -> None:
    rows = [row for row in read_jsonl(args.data) if row["kind"] == "sentence"]
    labels = np.array([bool(row["supported"]) for row in rows])
    answer_ids = np.array([row["answer_id"] for row in rows])
    claims = {(row["answer_id"], row["claim_id"]) for row in rows}
    models = Counter(row["model"] for row in rows if row["n"] == 1 and row["claim_id"] == 0)
    print(f"{len(rows)} pairs ({int(labels.sum())} supported), {len(claims)} claims, "
          f"{len(set(answer_ids.tolist()))} answers {dict(models)}; window {args.window}")
    print(f"{'pairs: scorer':38} {'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6}")
    print(line("baseline: every pair supported", "-", prf(np.ones_like(labels), labels)))
    print(line("baseline: the pairs the model cited", "-", prf(np.array([r["cited"] for r in rows]), labels)))

    from ragline.embed.sentence_transformer import SentenceTransformerEmbedder

    lexical, embedding = Cached(LexicalScorer()), Cached(EmbeddingScorer(SentenceTransformerEmbedder(EmbedderSettings())))
    w_lexical, w_embedding = COMBINED_WEIGHTS
    scorers: dict[str, SupportScorer] = {
        "lexical": lexical, "embedding": embedding,
        "combined": CombinedScorer([(lexical, w_lexical), (embedding, w_embedding)]),
    }
    if args.cross_encoder:
        scorers["cross-encoder"] = CrossEncoderScorer(args.cross_encoder)
    scored = {}
    for method, scorer in scorers.items():
        scores, ms = pair_scores(Verifier(scorer, threshold=0.0, window=args.window), rows)
        scored[method] = scores
        best, default = best_threshold(scores, labels), DEFAULT_THRESHOLDS[method]
        cost = "(cost: lexical + embedding)" if method == "combined" else f"{ms:.0f} ms/answer"
        print(line(f"{method} (best threshold)", best, prf(scores >= best, labels), cost))
        print(line(f"{method} (default)", default, prf(scores >= default, labels)))
        print(line(f"{method} (threshold from other half)", "-", held_out(scores, labels, answer_ids, 2)))
    if args.weights:
        for weight in np.linspace(0, 1, 11):
            mixed = CombinedScorer([(lexical, weight), (embedding, 1 - weight)])
            scores, _ = pair_scores(Verifier(mixed, threshold=0.0, window=args.window), rows)
            best = best_threshold(scores, labels)
            print(line(f"combined, lexical weight {weight:.1f}", best, prf(scores >= best, labels)))
    print(f"\n{'claims: scorer at its default':38} {'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6}")
    for method, scores in scored.items():
        default = DEFAULT_THRESHOLDS[method]
        print(line(method, default, claim_level(scores, labels, rows, default)))
    print(f"configured default method: {VerifySettings().method}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    collect_parser = sub.add_parser("collect", help="write real answers with their passages")
    collect_parser.add_argument("--out", type=Path, required=True)
    collect_parser.add_argument("--questions", type=int, default=50)
    collect_parser.add_argument("--unanswerable", type=int, default=6)
    collect_parser.add_argument("--offset", type=int, default=1, help="first dev question (0-based)")
    collect_parser.add_argument("--stride", type=int, default=2, help="take every stride-th dev question")
    collect_parser.add_argument("--data-dir", type=Path, default=Path(".ragline-bench/generation"))
    collect_parser.add_argument("--backend", default=LLMSettings().backend, help="e.g. extractive")
    collect_parser.add_argument("--model", default=LLMSettings().model, help="e.g. smollm2-135m-instruct")
    collect_parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    pairs_parser = sub.add_parser("pairs", help="claim/passage pairs of collected answers, to label")
    pairs_parser.add_argument("--answers", type=Path, required=True)
    pairs_parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=LABELLED)
    parser.add_argument("--window", type=int, default=VerifySettings().window)
    parser.add_argument("--cross-encoder", type=Path, help="a cross-encoder folder, e.g. made by `ragline tune`")
    parser.add_argument("--weights", action="store_true", help="also sweep the combined scorer's lexical weight")
    args = parser.parse_args()
    {"collect": collect, "pairs": pairs}.get(args.command, measure)(args)


if __name__ == "__main__":
    main()
