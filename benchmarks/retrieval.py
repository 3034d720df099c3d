"""Retrieval quality on a dev set: Ragline's pipeline (through `ragline.evaluate`) vs a naive one.

    python benchmarks/retrieval.py [--set python|flax] [--samples] [--docs DIR] [--data-dir DIR]
                                   [--retrieve key=value ...]

Dev sets (benchmarks/data/*_dev.jsonl, `{question, source: URL#anchor}`):
- python: the Python 3.11 HTML docs (apt-get install python3.11-doc); with
  --samples only the bundled sample pages and their questions (a quick run);
- flax: the Flax NNX documentation sources (MyST, reST, notebooks), fetched
  from the PyPI sdist by benchmarks/corpora.py.

Reports hit@1/3/5/7/10, MRR and nDCG@10 at page and anchor level for:
- ragline: the configured pipeline (defaults, or --retrieve options such as
  mode=dense or rerank.backend=llm), measured by `evaluate_retrieval`;
- naive: the references' pipeline — LangChain RecursiveCharacterTextSplitter
  (500 chars, 50 overlap) over the raw text of each page, the same embedding
  model, exact cosine top-k. It knows pages only: no anchor-level score.

Indexes are kept in --data-dir and reused on the next run; the per-question
results are written afresh beside them (<set>.retrieval.jsonl).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from common import DATA, PYTHON_DOCS, PYTHON_DOCS_URL, read_jsonl, require_python_docs
from corpora import fetch

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings, retrieve_options
from ragline.evaluate.matching import same_page
from ragline.evaluate.metrics import DEPTH, first_rank, rank_metrics
from ragline.evaluate.retrieval import evaluate_retrieval

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "python-docs"
NAIVE_SUFFIXES = (".html", ".md", ".rst", ".ipynb")


def page_text(path: Path) -> str:
    """What a naive pipeline reads: the text of an HTML page, the cells of a notebook, other files raw."""
    if path.suffix == ".html":
        from bs4 import BeautifulSoup

        return BeautifulSoup(path.read_bytes(), "lxml").get_text()
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        return "\n\n".join("".join(cell.get("source", "")) for cell in cells)
    return path.read_text(encoding="utf-8", errors="replace")


def naive_ranks(app: Ragline, docs: Path, questions: list[dict], cache: Path) -> list[int | None]:
    """Page ranks of the gold page among the naive pipeline's top `DEPTH` chunks."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        vectors, chunk_pages = saved["vectors"], saved["pages"].tolist()
    else:
        splitter = RecursiveCharacterTextSplitter(chunk_size=500, chunk_overlap=50)
        texts, chunk_pages = [], []
        for page in sorted(docs.rglob("*")):
            rel = page.relative_to(docs).as_posix()
            if page.suffix not in NAIVE_SUFFIXES or rel.startswith(("_", ".")) or "/." in rel:
                continue
            if rel.startswith("genindex") or rel in ("search.html", "py-modindex.html"):
                continue
            for chunk in splitter.split_text(page_text(page)):
                texts.append(chunk)
                chunk_pages.append(rel)
        vectors = app.embedder.embed_documents(texts)
        np.savez(cache, vectors=vectors, pages=np.array(chunk_pages))
    queries = app.embedder.embed_queries([q["question"] for q in questions])
    ranks = []
    for question, scores in zip(questions, queries @ vectors.T):
        top = np.argsort(-scores)[:DEPTH]
        ranks.append(first_rank([same_page(question["source"], chunk_pages[i]) for i in top]))
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("python", "flax"), default="python", dest="dev_set")
    parser.add_argument("--docs", type=Path, help="the corpus folder (default: per set)")
    parser.add_argument("--samples", action="store_true", help="python set: only the bundled sample pages")
    parser.add_argument("--data-dir", type=Path, default=Path(".ragline-bench"))
    parser.add_argument("--retrieve", action="append", default=[], help="a retrieval setting, e.g. mode=dense")
    args = parser.parse_args()

    if args.dev_set == "flax":
        corpus = fetch("flax")
        docs, url_template, name = args.docs or corpus.path, corpus.url_template, "flax-docs"
        questions = read_jsonl(DATA / "flax_docs_dev.jsonl")
    else:
        questions = read_jsonl(DATA / "python_docs_dev.jsonl")
        url_template = PYTHON_DOCS_URL
        if args.samples:
            docs, name = SAMPLES, "samples"
            questions = [q for q in questions if q["answerable_in_samples"]]
        else:
            docs, name = require_python_docs(args.docs or PYTHON_DOCS), "python-docs"
    overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.retrieve)}

    data_dir = args.data_dir / name
    app = Ragline(Settings(data_dir=data_dir))
    options = retrieve_options(app.settings.retrieve, overrides)
    report = app.indexer().run([SourceSettings(path=docs, url_template=url_template)])
    print(f"index: {app.store.count()} chunks ({len(report.new) + len(report.changed)} files (re)indexed)")
    results = data_dir / f"{name}.retrieval.jsonl"
    results.unlink(missing_ok=True)  # a benchmark measures the code as it is now: never resume
    ours = evaluate_retrieval(app, questions, results, options=options)
    naive = rank_metrics(naive_ranks(app, docs, questions, data_dir / "naive.npz"))
    app.close()

    print(json.dumps({
        "questions": len(questions),
        "retrieve": overrides or "defaults",
        "ragline": {"page": ours.page, "anchor": ours.anchor},
        "naive": {"page": naive, "anchor": "n/a (page URLs only)"},
        "page_level_gain": {key: round(ours.page[key] - naive[key], 4) for key in naive},
        "per_question": str(results),
    }, indent=2))


if __name__ == "__main__":
    main()
