"""`ragline tune` on a real corpus: wall time per phase, seconds per LLM question, and what it bought.

    python benchmarks/tune.py [--target embedder|reranker] [--set flax|python] [--docs DIR]
                              [--data-dir DIR] [--questions N] [--max-minutes M] [--no-llm] [--epochs E]
                              [--generate-share F] [--eval-questions N] [--max-length T]
                              [--batch-size B] [--negatives N] [--learning-rate LR]

The corpus is indexed (or the index in --data-dir reused, the same one
benchmarks/retrieval.py builds), then `ragline.evaluate.tune.tune` runs with the
set's dev file as the judge: synthetic questions from the configured LLM (the
bundled qwen2.5-coder-1.5b through llama.cpp by default; --no-llm: heading
pairs only), hard negatives, then within --max-minutes either the embedding
model fine-tuned (--target embedder; "after" searches a temporary copy of the
index re-embedded by it) or a cross-encoder trained from it (--target reranker;
"after" is the same pipeline with it as reranker). Prints one JSON object:
chunks, phase timings, seconds per generated question, page/anchor figures
before (the configured pipeline, no reranker by default) and after, and
whether the model was kept. Generated questions are cached in the index folder
(tune/questions.jsonl), so a rerun measures generation only for new ones.
Target (issue 7): a 5,000-chunk corpus within 60 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, PYTHON_DOCS, PYTHON_DOCS_URL, require_python_docs
from corpora import fetch

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings
from ragline.evaluate.tune import TARGETS, TuneOptions, figures, tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=TARGETS, default=TuneOptions().target)
    parser.add_argument("--set", choices=("python", "flax"), default="flax", dest="dev_set")
    parser.add_argument("--docs", type=Path, help="the corpus folder (default: per set)")
    parser.add_argument("--data-dir", type=Path, default=Path(".ragline-bench"))
    parser.add_argument("--questions", type=int, default=200, help="synthetic questions to generate")
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--generate-share", type=float, default=0.5, help="of the budget, for new LLM questions")
    parser.add_argument("--eval-questions", type=int, default=100, help="held-out pairs measured per kind")
    parser.add_argument("--max-length", type=int, help="training tokens per text (default: what the model reads)")
    parser.add_argument("--batch-size", type=int, default=TuneOptions().batch_size)
    parser.add_argument("--negatives", type=int, default=TuneOptions().negatives, help="hard negatives per question")
    parser.add_argument("--learning-rate", type=float, help="default: per target (LEARNING_RATES)")
    parser.add_argument("--no-llm", action="store_true", help="heading pairs only")
    args = parser.parse_args()

    if args.dev_set == "flax":
        corpus = fetch("flax")
        docs, url_template, name = args.docs or corpus.path, corpus.url_template, "flax-docs"
    else:
        docs, url_template, name = require_python_docs(args.docs or PYTHON_DOCS), PYTHON_DOCS_URL, "python-docs"
    app = Ragline(Settings(data_dir=args.data_dir / name))
    started = time.monotonic()
    app.indexer().run([SourceSettings(path=docs, url_template=url_template)])
    index_s = time.monotonic() - started
    cache = app.settings.data_dir / "tune" / "questions.jsonl"
    cached = len(cache.read_text().splitlines()) if cache.is_file() else 0
    llm = None if args.no_llm else app.query_llm()
    if llm is not None:
        llm.load()
    options = TuneOptions(
        target=args.target, questions=0 if llm is None else args.questions, max_minutes=args.max_minutes,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, negatives=args.negatives,
        generate_share=args.generate_share, eval_questions=args.eval_questions, max_length=args.max_length,
        dev_sets=[DATA / f"{args.dev_set}_docs_dev.jsonl"],
    )
    try:
        report = tune(app, options, llm)
        chunks = app.store.count()
    finally:
        app.close()
    asked = (len(cache.read_text().splitlines()) if cache.is_file() else 0) - cached
    print(json.dumps({
        "target": report.target, "corpus": name, "chunks": chunks, "index_s (reused if ~0)": round(index_s, 1),
        "llm": getattr(llm, "name", None), "pairs": report.pairs,
        "llm_questions_asked": asked,
        "seconds_per_llm_question": round(report.timings["generate"] / asked, 1) if asked else None,
        "training_examples": report.training_examples, "steps": report.steps, "timings_s": report.timings,
        "before": {set_name: figures(result) for set_name, result in report.before.items()},
        "after": {set_name: figures(result) for set_name, result in report.after.items()},
        "kept": report.kept, "reason": report.reason, "model_dir": str(report.model_dir or ""),
        "notes": report.notes,
    }, indent=2))


if __name__ == "__main__":
    main()
