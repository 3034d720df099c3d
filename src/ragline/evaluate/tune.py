"""`ragline tune`: adapt retrieval to the user's own corpus, offline, on CPU, and keep the model only if it helps.

Questions come from the corpus itself (LLM-written synthetic questions, plus
heading → section pairs); hard negatives come from keyword and dense search over
the index, never from the positive's own page (a neighbouring chunk of the same
page may answer the question too). Two targets:

- `embedder`: the local embedding model fine-tuned with MultipleNegativesRankingLoss
  (each question against its positive, its mined negatives and every other passage
  of the batch). Every vector changes, so it is measured on a temporary copy of the
  index re-embedded by the tuned model; using it means `ragline ingest --full`.
- `reranker`: a cross-encoder initialised from the local embedding model and
  trained with binary cross-entropy, measured as the configured reranker.

Both train within a wall-time budget. Fine-tuning on documentation can hurt, so
the model is measured through the configured retriever on held-out synthetic
questions and on the dev sets, and saved only when no set gets worse and at
least one gets better.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ragline.app import Ragline
from ragline.config import Settings, StoreSettings, retrieve_options
from ragline.embed.base import Embedder
from ragline.evaluate.records import read_questions
from ragline.evaluate.retrieval import RetrievalReport, evaluate_retrieval
from ragline.evaluate.synthetic import generate_questions, heuristic_pairs
from ragline.generate.base import LLM
from ragline.retrieve.rerank import CROSS_ENCODER_BATCH
from ragline.store.base import Scope, SearchRequest, VectorStore
from ragline.types import Chunk

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

Progress = Callable[[str, int, int], None]
"""Called as `progress(phase, done, total)`; phases: generate, mine, train, re-embed, evaluate."""

Target = Literal["embedder", "reranker"]
TARGETS: tuple[Target, ...] = ("embedder", "reranker")
LEARNING_RATES: dict[Target, float] = {"embedder": 2e-5, "reranker": 3e-5}
"""Default per target: the embedder starts from a trained model and must not forget it, so it moves less."""

Pair = dict[str, str]
"""`{"question", "source", "chunk_id"}`, as `generate_questions` and `heuristic_pairs` make them."""


def passage_text(chunk: Chunk) -> str:
    """What the reranker reads of a chunk: its heading path, then its text (as the embedder sees it)."""
    return chunk.embed_text


@dataclass(frozen=True, slots=True)
class TrainingPair:
    question: str
    positive: Chunk
    negatives: tuple[Chunk, ...]


@dataclass(slots=True)
class TuneReport:
    pairs: dict[str, int]
    target: Target = "embedder"
    training_examples: int = 0
    steps: int = 0
    before: dict[str, RetrievalReport] = field(default_factory=dict)
    after: dict[str, RetrievalReport] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    kept: bool = False
    reason: str = ""
    model_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def load_chunks(store: VectorStore) -> list[Chunk]:
    """Every indexed chunk, document by document in reading order."""
    return [chunk for record in store.documents() if record.status == "indexed"
            for chunk in store.document_chunks(record.doc_id)]


def _same_page(a: Chunk, b: Chunk) -> bool:
    return a.doc_id == b.doc_id or bool(a.metadata.get("url")) and a.metadata.get("url") == b.metadata.get("url")


def mine_negatives(
    pairs: Sequence[Pair],
    chunks_by_id: dict[str, Chunk],
    store: VectorStore,
    embedder: Embedder,
    per_question: int = 4,
    k: int = 30,
    progress: Progress | None = None,
) -> list[TrainingPair]:
    """For each question, the best-ranked chunks of keyword and dense search, taken in turn, that are not
    on the positive's page: the passages a first stage confuses with the answer."""
    usable = [pair for pair in pairs if pair["chunk_id"] in chunks_by_id]
    vectors = embedder.embed_queries([pair["question"] for pair in usable])
    mined = []
    for done, (pair, vector) in enumerate(zip(usable, vectors), 1):
        positive = chunks_by_id[pair["chunk_id"]]
        everything = Scope.everything()
        keyword = store.search(SearchRequest(everything, text=pair["question"], mode="keyword", k=k))
        dense = store.search(SearchRequest(everything, text=pair["question"], vector=vector, mode="dense", k=k))
        negatives: dict[str, Chunk] = {}
        for hit in _interleave(keyword, dense):
            if len(negatives) == per_question:
                break
            if not _same_page(hit.chunk, positive):
                negatives.setdefault(hit.chunk.chunk_id, hit.chunk)
        if negatives:
            mined.append(TrainingPair(pair["question"], positive, tuple(negatives.values())))
        if progress is not None:
            progress("mine", done, len(usable))
    return mined


def _interleave(*rankings: Sequence[Any]) -> list[Any]:
    """Rank by rank across several rankings: the first of each, then the second of each, and so on."""
    depth = max(map(len, rankings), default=0)
    return [ranking[i] for i in range(depth) for ranking in rankings if i < len(ranking)]


def new_cross_encoder(base_model: Path, max_length: int = 256) -> CrossEncoder:
    """A cross-encoder on the encoder of `base_model` (a local folder) with a new, untrained one-logit head."""
    from sentence_transformers import CrossEncoder
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # Both libraries warn that the head is new and untrained: here that is the point.
    loggers = [logging.getLogger("sentence_transformers"), logging.getLogger("transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return CrossEncoder(str(base_model), num_labels=1, max_length=max_length, device="cpu", local_files_only=True)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def train_cross_encoder(
    model: CrossEncoder,
    pairs: Sequence[TrainingPair],
    *,
    deadline: float,
    epochs: int = 1,
    batch_size: int = 16,
    learning_rate: float = LEARNING_RATES["reranker"],
    seed: int = 0,
    progress: Progress | None = None,
) -> int:
    """Train `model` with BCE on (question, passage, 1 or 0) until the epochs are done or `time.monotonic()`
    passes `deadline`; returns the steps taken. Positives are weighted by the negatives per question, so
    the loss does not favour saying "no"."""
    import torch
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    torch.manual_seed(seed)
    examples = [(p.question, passage_text(p.positive), 1.0) for p in pairs]
    examples += [(p.question, passage_text(negative), 0.0) for p in pairs for negative in p.negatives]
    negatives_per_positive = (len(examples) - len(pairs)) / max(len(pairs), 1)
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(max(negatives_per_positive, 1.0)))
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        rng.shuffle(examples)
        batches += [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]

    def batch_loss(batch: list[tuple[str, str, float]]) -> Any:
        return loss([[q for q, _, _ in batch], [p for _, p, _ in batch]], torch.tensor([y for _, _, y in batch]))

    return _fit(model, batches, batch_loss, deadline=deadline, learning_rate=learning_rate, progress=progress)


def _fit(model: Any, batches: Sequence[Any], batch_loss: Callable[[Any], Any], *, deadline: float,
         learning_rate: float, progress: Progress | None) -> int:
    """AdamW over `batches` with a linear warm-up (a tenth) and decay and gradient clipping at 1, until the
    batches are done or `time.monotonic()` passes `deadline`; returns the steps taken."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, len(batches) // 10), len(batches))
    model.train()
    steps = 0
    for batch in batches:
        if time.monotonic() > deadline:
            break
        batch_loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        steps += 1
        if progress is not None:
            progress("train", steps, len(batches))
    model.eval()
    return steps


def section_distinct_batches(
    pairs: Sequence[TrainingPair], batch_size: int, rng: random.Random
) -> list[list[TrainingPair]]:
    """Shuffled batches in which no two pairs have their positive in the same section: another pair's
    positive is an in-batch negative, and a section asked about twice (a synthetic question and its
    heading) would teach the model to push the right answer away."""
    queue = list(pairs)
    rng.shuffle(queue)
    batches = []
    while queue:
        batch: list[TrainingPair] = []
        sections: set[str] = set()
        rest = []
        for pair in queue:
            section = pair.positive.citation_url
            if len(batch) < batch_size and section not in sections:
                batch.append(pair)
                sections.add(section)
            else:
                rest.append(pair)
        batches.append(batch)
        queue = rest
    return batches


def train_embedder(
    model: SentenceTransformer,
    pairs: Sequence[TrainingPair],
    *,
    deadline: float,
    query_prefix: str = "",
    document_prefix: str = "",
    epochs: int = 1,
    batch_size: int = 16,
    learning_rate: float = LEARNING_RATES["embedder"],
    seed: int = 0,
    progress: Progress | None = None,
) -> int:
    """Train `model` with MultipleNegativesRankingLoss until the epochs are done or `time.monotonic()`
    passes `deadline`; returns the steps taken. Each question is scored against its positive, its mined
    negatives and every passage of the other pairs in its batch; texts carry the embedder's prefixes, as
    at search and ingest time."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    batches = [batch for _ in range(epochs) for batch in section_distinct_batches(pairs, batch_size, rng)]
    loss = MultipleNegativesRankingLoss(model)

    def batch_loss(batch: list[TrainingPair]) -> Any:
        negatives = min(len(pair.negatives) for pair in batch)  # every column as long as the batch
        columns = [[query_prefix + pair.question for pair in batch],
                   [document_prefix + passage_text(pair.positive) for pair in batch]]
        columns += [[document_prefix + passage_text(pair.negatives[i]) for pair in batch] for i in range(negatives)]
        return loss([model.preprocess(column) for column in columns], torch.zeros(len(batch)))

    return _fit(model, batches, batch_loss, deadline=deadline, learning_rate=learning_rate, progress=progress)


class StagedModel:
    """A model written to a hidden folder beside its target, to be measured from disk, then published by
    one rename (so the target is absent or complete, whatever happens) or discarded.

    Leaving the `with` block without `publish` discards it; a killed process leaves a hidden
    `.<name>.partial-<pid>` folder, removed by the next StagedModel in the same folder.
    """

    def __init__(self, model: CrossEncoder | SentenceTransformer, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(".*.partial-*"):
            pid = stale.name.rsplit("-", 1)[1]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
        self.path = target.parent / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            model.save_pretrained(str(self.path))
        except BaseException:
            self.discard()
            raise

    def publish(self, card: dict[str, Any]) -> Path:
        """Add `card` as card.json, flush everything to disk and rename the folder to the target."""
        (self.path / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        for path in self.path.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        os.rename(self.path, self.target)
        directory = os.open(self.target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _page(pair: Pair) -> str:
    return pair["source"].split("#", 1)[0]


def held_out_pages(pairs: Sequence[Pair], fraction: float, seed: int) -> set[str]:
    """`fraction` of the pages, drawn at random: their pairs are measured, never trained on, so that no
    held-out question has its page's sections among the training positives."""
    pages = sorted({_page(pair) for pair in pairs})
    random.Random(seed).shuffle(pages)
    return set(pages[: round(len(pages) * fraction)])


@dataclass(slots=True)
class TuneOptions:
    target: Target = "embedder"
    questions: int = 200
    negatives: int = 4
    holdout: float = 0.2
    max_minutes: float = 60.0
    generate_share: float = 0.5
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float | None = None
    """Default: LEARNING_RATES[target]."""
    max_length: int | None = None
    """Training tokens per text; default: what the model will read (the embedder's own limit,
    retrieve.rerank.max_length for a reranker's question + passage)."""
    eval_questions: int = 100
    """Held-out pairs measured per kind (every one costs a search, and a reranking for a reranker)."""
    seed: int = 0
    dev_sets: list[Path] = field(default_factory=list)


class _PhaseProgress:
    """E's evaluation progress protocol (start/advance) drawn as one phase of the tune progress."""

    def __init__(self, progress: Progress | None, phase: str) -> None:
        self.progress, self.phase = progress, phase
        self.done = self.total = 0

    def start(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self.advance(0)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.phase, self.done, self.total)


def figures(report: RetrievalReport) -> dict[str, float]:
    """The figures a tune run is judged on: page-level hit@5 and MRR, anchor-level hit@5."""
    return {"hit@5": report.page["hit@5"], "hit@7": report.page["hit@7"], "mrr": report.page["mrr"],
            "anchor hit@5": report.anchor["hit@5"], "questions": report.questions}


def verdict(before: dict[str, RetrievalReport], after: dict[str, RetrievalReport]) -> tuple[bool, str]:
    """Keep a model when page hit@5 and MRR drop on none of the sets and MRR rises on at least one."""
    worse = [name for name in before if after[name].page["hit@5"] < before[name].page["hit@5"]
             or after[name].page["mrr"] < before[name].page["mrr"]]
    better = [name for name in before if after[name].page["mrr"] > before[name].page["mrr"]]
    if worse:
        return False, f"worse on {', '.join(worse)}"
    return (True, f"better on {', '.join(better)}") if better else (False, "no gain")


def check_target(settings: Settings, target: str) -> None:
    """Fail before any work when the target cannot be trained with these settings."""
    if target not in TARGETS:
        raise ValueError(f"unknown tune target {target!r}: use one of {', '.join(TARGETS)}")
    if settings.embedder.backend != "sentence-transformers":
        raise ValueError(
            f"`ragline tune` starts from a local sentence-transformers model, but embedder.backend is "
            f"{settings.embedder.backend!r}: set embedder.backend to sentence-transformers with a local model"
        )


def _measure(app: Ragline, name: str, rows: list[Pair], work: Path, progress: Progress | None,
             options: Any = None) -> RetrievalReport:
    slug = "".join(c if c.isalnum() else "-" for c in name)
    phase = _PhaseProgress(progress, f"evaluate {name}")
    return evaluate_retrieval(app, rows, work / "eval" / f"{slug}.jsonl", options=options, progress=phase)


@contextmanager
def reindexed(app: Ragline, model_dir: Path, work: Path, progress: Progress | None = None) -> Iterator[Ragline]:
    """A Ragline over a temporary local store holding `app`'s indexed chunks embedded by the model in
    `model_dir`: retrieval as it will be after `ragline ingest --full` with that model (the chunks stay
    the same: the tokenizer and its limit do not change), while the index itself is left alone."""
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reindex-", dir=work) as folder:
        embedder = app.settings.embedder.model_copy(update={"model": str(model_dir)})
        other = Ragline(app.settings.model_copy(
            update={"data_dir": Path(folder), "store": StoreSettings(), "embedder": embedder}
        ))
        try:
            documents = [(record, app.store.document_chunks(record.doc_id))
                         for record in app.store.documents() if record.status == "indexed"]
            texts = [chunk.embed_text for _, chunks in documents for chunk in chunks]
            vectors = []
            for start in range(0, len(texts), 256):
                vectors.append(other.embedder.embed_documents(texts[start : start + 256]))
                if progress is not None:
                    progress("re-embed", min(start + 256, len(texts)), len(texts))
            matrix = np.concatenate(vectors) if vectors else np.zeros((0, other.embedder.dim), np.float32)
            other.store.set_meta("embedder", other.embedder.name)
            offset = 0
            for record, chunks in documents:
                other.store.upsert_document(record, chunks, matrix[offset : offset + len(chunks)])
                offset += len(chunks)
            yield other
        finally:
            other.close()


def _seconds_per_text(encode: Callable[[list[str]], Any], texts: list[str]) -> float:
    """Seconds one text takes through `encode`, timed on `texts` (a warm-up call first)."""
    encode(texts[:2])
    timer = time.monotonic()
    encode(texts)
    return (time.monotonic() - timer) / max(len(texts), 1)


def _train_reranker(app: Ragline, training: list[TrainingPair], options: TuneOptions, budget_end: float,
                    first_stage_s: float, questions: int, progress: Progress | None) -> tuple[CrossEncoder, int]:
    """A cross-encoder trained until what is left of the budget is what the evaluation after should take:
    the first stage again, plus reranking `candidates` passages per question."""
    from ragline.embed.sentence_transformer import resolve_model_dir

    rerank = app.settings.retrieve.rerank
    max_length = options.max_length or rerank.max_length
    model = new_cross_encoder(resolve_model_dir(app.settings.embedder.model), max_length)
    model.max_seq_length = rerank.max_length  # time scoring as the reranker will score
    probe = [(pair.question, passage_text(pair.positive)) for pair in training[:32]]
    seconds_per_pair = _seconds_per_text(
        lambda batch: model.predict(batch, batch_size=rerank.batch_size or CROSS_ENCODER_BATCH,
                                    show_progress_bar=False), probe)
    model.max_seq_length = max_length
    expected_eval_s = first_stage_s + questions * rerank.candidates * seconds_per_pair
    steps = train_cross_encoder(
        model, training, deadline=budget_end - expected_eval_s, epochs=options.epochs,
        batch_size=options.batch_size, learning_rate=options.learning_rate or LEARNING_RATES["reranker"],
        seed=options.seed, progress=progress,
    )
    return model, steps


def _train_embedder(app: Ragline, training: list[TrainingPair], chunks: int, options: TuneOptions,
                    budget_end: float, first_stage_s: float, progress: Progress | None,
                    ) -> tuple[SentenceTransformer, int]:
    """The embedding model fine-tuned until what is left of the budget is what the evaluation after should
    take: re-embedding every chunk, then the first stage again."""
    from sentence_transformers import SentenceTransformer

    from ragline.embed.sentence_transformer import resolve_model_dir

    embed = app.settings.embedder
    model = SentenceTransformer(str(resolve_model_dir(embed.model)), device="cpu", local_files_only=True)
    probe = [embed.document_prefix + passage_text(pair.positive) for pair in training[:32]]
    seconds_per_chunk = _seconds_per_text(
        lambda batch: model.encode(batch, batch_size=embed.batch_size, show_progress_bar=False), probe)
    if options.max_length:
        model.max_seq_length = options.max_length
    expected_eval_s = first_stage_s + chunks * seconds_per_chunk
    steps = train_embedder(
        model, training, deadline=budget_end - expected_eval_s, query_prefix=embed.query_prefix,
        document_prefix=embed.document_prefix, epochs=options.epochs, batch_size=options.batch_size,
        learning_rate=options.learning_rate or LEARNING_RATES["embedder"], seed=options.seed, progress=progress,
    )
    return model, steps


def tune(app: Ragline, options: TuneOptions, llm: LLM | None, progress: Progress | None = None) -> TuneReport:
    """Generate pairs, mine negatives, train, measure and keep (or drop) a model; see the module docstring.

    `llm` writes synthetic questions (None: heading pairs only). Generation stops at `generate_share` of the
    budget; training stops when what is left of the budget is what the final evaluation should take.
    The model is kept when, on the dev sets (else the held-out pairs), page hit@5 and MRR drop nowhere and
    MRR rises somewhere (`verdict`).
    """
    settings = app.settings
    check_target(settings, options.target)
    started = clock = time.monotonic()
    budget_end = started + options.max_minutes * 60
    work = settings.data_dir / "tune"
    report = TuneReport(pairs={}, target=options.target)

    def lap(phase: str) -> None:
        nonlocal clock
        report.timings[phase] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    dev_sets = {path.stem: read_questions(path, required=("question", "source")) for path in options.dev_sets}
    chunks = load_chunks(app.store)
    if not chunks:
        raise ValueError("the index is empty: run `ragline ingest` before `ragline tune`")
    headings = heuristic_pairs(chunks)
    synthetic: list[Pair] = []
    if llm is not None and options.questions > 0:
        work.mkdir(parents=True, exist_ok=True)
        synthetic = generate_questions(
            chunks, llm, options.questions, seed=options.seed, cache=work / "questions.jsonl",
            deadline=started + options.max_minutes * 60 * options.generate_share,
            progress=None if progress is None else lambda done, total: progress("generate", done, total),
        )
        if len(synthetic) < options.questions:
            report.notes.append(f"{len(synthetic)} of {options.questions} synthetic questions (time budget or filters)")
    report.pairs = {"synthetic": len(synthetic), "headings": len(headings)}
    lap("generate")

    held_pages = held_out_pages(synthetic + headings, options.holdout, options.seed)
    rng = random.Random(options.seed)
    held = {"held-out synthetic": synthetic, "held-out headings": headings}
    held = {name: [pair for pair in rows if _page(pair) in held_pages] for name, rows in held.items()}
    held = {name: rng.sample(rows, min(len(rows), options.eval_questions)) for name, rows in held.items()}
    evaluation = {name: rows for name, rows in [*held.items(), *dev_sets.items()] if rows}
    by_id = {chunk.chunk_id: chunk for chunk in chunks}
    trainable = [pair for pair in synthetic + headings if _page(pair) not in held_pages]
    training = mine_negatives(trainable, by_id, app.store, app.embedder, options.negatives, progress=progress)
    if not training:
        raise ValueError("no training pairs: the index has no sections with enough prose under a heading")
    report.training_examples = sum(1 + len(pair.negatives) for pair in training)
    lap("mine")

    report.before = {name: _measure(app, name, rows, work, progress) for name, rows in evaluation.items()}
    first_stage_s = time.monotonic() - clock
    lap("evaluate before")

    if options.target == "embedder":
        model, report.steps = _train_embedder(
            app, training, len(chunks), options, budget_end, first_stage_s, progress)
    else:
        questions = sum(map(len, evaluation.values()))
        model, report.steps = _train_reranker(
            app, training, options, budget_end, first_stage_s, questions, progress)
    lap("train")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    with StagedModel(model, settings.data_dir / "models" / f"{options.target}-{stamp}") as staged:
        if options.target == "embedder":
            with reindexed(app, staged.path, work, progress) as tuned:
                lap("re-embed")
                report.after = {name: _measure(tuned, name, rows, work, progress)
                                for name, rows in evaluation.items()}
        else:
            with_model = retrieve_options(
                settings.retrieve, {"rerank.backend": "cross-encoder", "rerank.model": str(staged.path)}
            )
            report.after = {name: _measure(app, name, rows, work, progress, with_model)
                            for name, rows in evaluation.items()}
        lap("evaluate after")
        judged = list(dev_sets) or list(evaluation)
        report.kept, report.reason = verdict(
            {name: report.before[name] for name in judged}, {name: report.after[name] for name in judged}
        )
        if report.kept:
            report.model_dir = staged.publish({
                "kind": {"embedder": "sentence-transformers embedding model",
                         "reranker": "cross-encoder reranker"}[options.target],
                "base_model": settings.embedder.model, "created_at": stamp,
                "pairs": report.pairs, "training_examples": report.training_examples, "steps": report.steps,
                "max_length": model.max_seq_length,
                "seed": options.seed,
                "passage_text": "Chunk.embed_text: the heading path, a blank line, then the chunk text",
                "before": {name: figures(result) for name, result in report.before.items()},
                "after": {name: figures(result) for name, result in report.after.items()},
            })
    return report
