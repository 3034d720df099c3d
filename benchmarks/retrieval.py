"""Retrieval quality on the Python docs: Ragline's section-aware pipeline vs the naive reference one.

    python benchmarks/retrieval.py [--docs DIR] [--samples] [--data-dir DIR]

Questions: benchmarks/data/python_docs_dev.jsonl (each with the page#anchor
that answers it). Reports hit@1/5/7 and MRR at page and anchor level for:

- ragline: section-aware loading and token-bounded chunking, heading paths,
  the embedded default model, exact cosine search;
- naive: the references' pipeline — LangChain RecursiveCharacterTextSplitter
  (500 chars, 50 overlap) over the raw text of each page, the same model,
  exact cosine top-k. It knows pages only, so it has no anchor-level score.

With --samples only the bundled sample pages and their questions are used
(a quick run). Indexes are kept in --data-dir and reused on the next run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import DATA, PYTHON_DOCS, PYTHON_DOCS_URL, read_jsonl, require_python_docs

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings

KS = (1, 5, 7)
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "python-docs"
URL_PREFIX = PYTHON_DOCS_URL.split("{path}")[0]


def page_of(url: str) -> str:
    return url.removeprefix(URL_PREFIX).split("#")[0]


def score(ranked: list[list[str]], gold: list[str]) -> dict[str, float]:
    """hit@k and MRR (over the top max(KS)) of ranked keys against one gold key per question."""
    ranks = []
    for keys, want in zip(ranked, gold):
        ranks.append(next((i + 1 for i, key in enumerate(keys[: max(KS)]) if key == want), None))
    n = len(gold)
    figures = {f"hit@{k}": round(sum(1 for r in ranks if r and r <= k) / n, 3) for k in KS}
    figures["mrr"] = round(sum(1 / r for r in ranks if r) / n, 3)
    return figures


def ragline_rankings(app: Ragline, questions: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    results = app.retriever.search_many([q["question"] for q in questions], k=max(KS))
    pages = [[page_of(h.chunk.metadata["url"]) for h in r.hits] for r in results]
    anchors = [[f"{page_of(h.chunk.metadata['url'])}#{h.chunk.metadata['anchor']}" for h in r.hits] for r in results]
    return pages, anchors


def naive_rankings(app: Ragline, docs: Path, questions: list[dict], cache: Path) -> list[list[str]]:
    from bs4 import BeautifulSoup
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        vectors, chunk_pages = saved["vectors"], saved["pages"].tolist()
    else:
        splitter = RecursiveCharacterTextSplitter(chunk_size=500, chunk_overlap=50)
        texts, chunk_pages = [], []
        for page in sorted(docs.rglob("*.html")):
            rel = page.relative_to(docs).as_posix()
            if rel.startswith("_") or rel.startswith("genindex") or rel in ("search.html", "py-modindex.html"):
                continue
            text = BeautifulSoup(page.read_bytes(), "lxml").get_text()
            for chunk in splitter.split_text(text):
                texts.append(chunk)
                chunk_pages.append(rel)
        vectors = app.embedder.embed_documents(texts)
        np.savez(cache, vectors=vectors, pages=np.array(chunk_pages))
    queries = app.embedder.embed_queries([q["question"] for q in questions])
    rankings = []
    for scores in queries @ vectors.T:
        top = np.argsort(-scores)[: max(KS)]
        rankings.append([chunk_pages[i] for i in top])
    return rankings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=PYTHON_DOCS)
    parser.add_argument("--samples", action="store_true", help="only the bundled sample pages and their questions")
    parser.add_argument("--data-dir", type=Path, default=Path(".ragline-bench"))
    args = parser.parse_args()

    questions = read_jsonl(DATA / "python_docs_dev.jsonl")
    if args.samples:
        docs, name = SAMPLES, "samples"
        questions = [q for q in questions if q["answerable_in_samples"]]
    else:
        docs, name = require_python_docs(args.docs), "python-docs"
    data_dir = args.data_dir / name
    app = Ragline(Settings(data_dir=data_dir))
    report = app.indexer().run([SourceSettings(path=docs, url_template=PYTHON_DOCS_URL)])
    print(f"index: {app.store.count()} chunks ({len(report.new) + len(report.changed)} files (re)indexed)")

    gold_pages = [q["page"] for q in questions]
    gold_anchors = [f"{q['page']}#{q['anchor']}" for q in questions]
    pages, anchors = ragline_rankings(app, questions)
    naive = naive_rankings(app, docs, questions, data_dir / "naive.npz")
    app.close()

    results = {
        "questions": len(questions),
        "ragline": {"page": score(pages, gold_pages), "anchor": score(anchors, gold_anchors)},
        "naive": {"page": score(naive, gold_pages), "anchor": "n/a (page URLs only)"},
    }
    ours, theirs = results["ragline"]["page"], results["naive"]["page"]
    results["page_level_gain"] = {key: round(ours[key] - theirs[key], 3) for key in ours}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
