"""Answer generation with the local default model on the bundled sample corpus.

    python benchmarks/generation.py [--questions 20] [--unanswerable 5] [--max-answer-tokens 256]

For dev questions answerable from the samples and questions the corpus
cannot answer, prints time to first token, generation tokens/s, the share
of answers with valid citations (grounded), and the share of unanswerable
questions answered "The documents do not contain the answer". Then the
overhead of Ragline's streaming path (Answerer → LLM.stream) against
calling llama.cpp directly with the same messages: tokens/s ratio
(target ≥ 0.95).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import DATA, read_jsonl

from ragline.app import Ragline
from ragline.config import load_settings
from ragline.generate.prompt import NO_ANSWER, build_prompt

REPO = Path(__file__).resolve().parent.parent


def tokens_per_s(answer: dict) -> float:
    seconds = (answer["timings"]["generate_ms"] - answer["timings"].get("ttft_ms", 0)) / 1000
    return (answer["usage"]["completion_tokens"] - 1) / seconds if seconds > 0 else 0.0


def direct_tokens_per_s(llm, messages, max_tokens: int) -> tuple[float, int]:
    """llama.cpp's own streaming call, timed the same way: first token to last."""
    llama = llm._model()
    started = first = None
    count = 0
    started = time.perf_counter()
    for chunk in llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
            first = first or time.perf_counter()
    return (count - 1) / (time.perf_counter() - first), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--unanswerable", type=int, default=5)
    parser.add_argument("--max-answer-tokens", type=int, default=256)
    parser.add_argument("--overhead-runs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(".ragline-bench/generation"))
    args = parser.parse_args()

    settings = load_settings(
        REPO / "samples" / "ragline.yaml",
        data_dir=args.data_dir,
        generate={"max_answer_tokens": args.max_answer_tokens, "temperature": 0.0},
    )
    app = Ragline(settings)
    sources = [source.model_copy(update={"path": REPO / source.path}) for source in settings.ingest.sources]
    app.indexer().run(sources)
    answerable = [q["question"] for q in read_jsonl(DATA / "python_docs_dev.jsonl") if q["answerable_in_samples"]]
    unanswerable = [q["question"] for q in read_jsonl(DATA / "python_docs_unanswerable.jsonl")]

    def ask(question: str) -> dict:
        *_, answer = app.ask(question)
        return answer

    answered = [ask(q) for q in answerable[: args.questions]]
    refused = [ask(q) for q in unanswerable[: args.unanswerable]]

    llm = app.answerer.llm
    question = answerable[0]
    hits = app.retriever.search(question).hits
    prompt = build_prompt(question, hits, count_tokens=llm.count_tokens, context_window=llm.context_window,
                          input_fraction=0.5, max_answer_tokens=args.max_answer_tokens)
    ours, direct = [], []
    for _ in range(args.overhead_runs):
        ours.append(tokens_per_s(ask(question)))
        direct.append(direct_tokens_per_s(llm, prompt.messages, args.max_answer_tokens)[0])
    figures = {
        "model": answered[0]["model"],
        "questions": len(answered),
        "ttft_s_median": round(statistics.median(a["timings"]["ttft_ms"] for a in answered if "ttft_ms" in a["timings"]) / 1000, 2),
        "tokens_per_s_median": round(statistics.median(tokens_per_s(a) for a in answered), 2),
        "prompt_tokens_median": statistics.median(a["usage"].get("prompt_tokens", 0) for a in answered),
        "valid_citations_share": round(sum(a["grounded"] for a in answered) / len(answered), 3),
        "fallbacks": sum(bool(a["note"]) for a in answered + refused),
        "unanswerable": len(refused),
        "said_not_in_documents_share": round(sum(NO_ANSWER in a["answer"] for a in refused) / max(len(refused), 1), 3),
        "streaming_tokens_per_s": round(statistics.median(ours), 2),
        "direct_tokens_per_s": round(statistics.median(direct), 2),
        "streaming_over_direct": round(statistics.median(ours) / statistics.median(direct), 3),
    }
    print(json.dumps(figures, indent=2))
    app.close()


if __name__ == "__main__":
    main()
