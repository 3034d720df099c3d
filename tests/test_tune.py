"""`ragline tune`: synthetic questions (filtered, cached), hard negatives, training and the atomic save,
for both targets (the embedding model, a cross-encoder reranker).

The training tests build a tiny 2-layer BERT embedding model whose vocabulary
is the test corpus's words: it trains in seconds and starts out knowing nothing,
so what it learns is what the training taught. The LLM is a scripted
OpenAI-compatible server on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scripted_llm_server import Reply, ScriptedLLMServer, completion

from ragline.app import Ragline
from ragline.config import EmbedderSettings, RetrieveSettings, Settings, SourceSettings
from ragline.embed.sentence_transformer import SentenceTransformerEmbedder
from ragline.evaluate.synthetic import check_question, clean_question, generate_questions, heuristic_pairs
from ragline.evaluate.retrieval import RetrievalReport
from ragline.evaluate.tune import (
    StagedModel, TrainingPair, TuneOptions, load_chunks, mine_negatives, new_cross_encoder, passage_text,
    section_distinct_batches, train_cross_encoder, train_embedder, tune, verdict,
)
from ragline.generate.openai_compat import OpenAICompatLLM
from ragline.pipeline import IngestError
from ragline.types import Chunk

PAGES = {
    "caching": ("Caching", ["Configure the cache size", "Expire stale entries", "Share a cache between workers"]),
    "logging": ("Logging", ["Write logs to a file", "Rotate log files", "Filter noisy messages"]),
    "retries": ("Retries", ["Retry failed requests", "Back off between attempts", "Give up after a deadline"]),
    "auth": ("Authentication", ["Create an API token", "Revoke a leaked token", "Sign requests with a key"]),
    "export": ("Exporting data", ["Export tables to CSV", "Stream large exports", "Compress exported files"]),
    "plugins": ("Plugins", ["Install a plugin", "Write your own plugin", "Disable a broken plugin"]),
}


def section_body(page: str, title: str) -> str:
    task = title.lower()
    return (
        f"This part explains how to {task} in the {page.lower()} component. You can {task} whenever the "
        "service starts, and the change applies to every request that follows. Most people do this once, "
        "then check the result in the status view. If something looks wrong, undo the change and try again "
        f"with a smaller step. The settings for this live next to the other {page.lower()} options."
    )


def corpus() -> dict[str, str]:
    files = {}
    for name, (page, sections) in PAGES.items():
        parts = [f"# {page}\n\nAn overview of the {page.lower()} component and what it is for."]
        parts += [f"## {title}\n\n{section_body(page, title)}" for title in sections]
        files[f"{name}.md"] = "\n\n".join(parts) + "\n"
    return files


def tiny_model(folder: Path, texts: list[str]) -> Path:
    """A 2-layer BERT embedding model (random weights, mean pooling) whose vocabulary is the words of `texts`."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.base.modules import Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower())})
    raw = folder.parent / f"{folder.name}-raw"
    raw.mkdir(parents=True)
    (raw / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(raw / "vocab.txt"), do_lower_case=True).save_pretrained(raw)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=128)
    SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """The corpus indexed with the tiny model as embedder: (settings, model folder)."""
    root = tmp_path_factory.mktemp("tune")
    docs = root / "docs"
    for name, text in corpus().items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    model = tiny_model(root / "tiny", list(corpus().values()))
    settings = Settings(data_dir=root / "index", embedder=EmbedderSettings(model=str(model)))
    app = Ragline(settings)
    app.indexer().run([SourceSettings(path=docs, url_template="https://docs.example.org/{path}.html")])
    app.close()
    return settings, model


def chunk(text: str, heading: tuple[str, ...] = ("Caching", "Configure the cache size"), n: int = 0) -> Chunk:
    return Chunk(f"c{n}", f"d{n}", text, {
        "heading_path": list(heading), "title": heading[-1], "url": f"https://x.org/p{n}.html", "anchor": f"a{n}",
    })


PROSE = section_body("Caching", "Configure the cache size")


def test_questions_are_filtered_for_copies_and_non_questions():
    passage = chunk(PROSE)
    assert check_question("How do I stop my service from using too much memory?", passage) is None
    assert check_question("Configure the cache size?", passage) == "copies the heading"
    assert check_question("What does it mean that the change applies to every request that follows?", passage) == (
        "copies the passage"
    )
    assert check_question("Tell me about memory", passage) == "not a question"
    assert check_question("Why?", passage) == "too short or too long"
    assert check_question("What does this passage say about caches?", passage) == (
        "refers to the passage instead of asking"
    )
    assert clean_question('Question: "Why is my app slow after a restart?"\nBecause…') == (
        "Why is my app slow after a restart?"
    )


def test_heuristic_pairs_take_one_heading_per_section_and_skip_code():
    chunks = [
        chunk(PROSE, n=0),
        chunk(PROSE + " More.", n=0),  # a second chunk of the same section: one pair per section
        chunk("x = cache.get(key)\nif x is None:\n    x = load(key)\n" * 8, heading=("Caching", "Cache API"), n=1),
        chunk(PROSE, heading=("Retries",), n=2),  # a one-word heading says too little to stand in for a question
        chunk("Too short.", heading=("Logging", "Rotate log files"), n=3),
    ]
    assert heuristic_pairs(chunks) == [
        {"question": "Caching > Configure the cache size", "source": "https://x.org/p0.html#a0", "chunk_id": "c0"}
    ]


def questions_server_reply(body: dict) -> Reply:
    """Answers each prompt with a question about the section title it names, worded as a user would."""
    prompt = body["messages"][-1]["content"]
    title = re.search(r"Section: .*> (.*)", prompt).group(1)
    return Reply(body=completion(f"My app misbehaves, how can I {title.split()[0].lower()} things properly?"))


def test_generated_questions_are_cached_and_an_interrupted_run_resumes(tmp_path):
    chunks = [chunk(section_body(page, title), (page, title), n=i)
              for i, (page, title) in enumerate((p, t) for p, ts in PAGES.values() for t in ts)]
    cache = tmp_path / "questions.jsonl"
    with ScriptedLLMServer(fallback=questions_server_reply) as server:
        llm = OpenAICompatLLM("scripted", base_url=server.url, max_tries=1)
        server.script(Reply(body=completion("Configure the cache size?")))  # a copy of a heading: rejected
        first = generate_questions(chunks, llm, n=4, seed=1, cache=cache)
        asked = len(server.received)
        assert 4 <= len(first) and asked == len(cache.read_text().splitlines())
        assert all(q["question"].endswith("?") and q["source"].startswith("https://x.org/") for q in first)
        assert len({q["question"] for q in first}) == len(first)  # duplicates dropped

        server.script()
        again = generate_questions(chunks, llm, n=4, seed=1, cache=cache)
        assert again == first and len(server.received) == 0  # all from the cache

        lines = cache.read_text().splitlines()
        cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # killed while writing the third reply
        resumed = generate_questions(chunks, llm, n=4, seed=1, cache=cache)
        assert [q["chunk_id"] for q in resumed] == [q["chunk_id"] for q in first]
        assert len(server.received) == asked - 2  # only the replies lost were asked again

        server.script()
        assert generate_questions(chunks, llm, n=4, seed=1, cache=cache) == resumed and not server.received


def mined_pairs(settings: Settings) -> list[TrainingPair]:
    """The heading pairs of the tiny index with up to 4 mined negatives each."""
    app = Ragline(settings)
    try:
        chunks = load_chunks(app.store)
        pairs = heuristic_pairs(chunks)
        return mine_negatives(pairs, {c.chunk_id: c for c in chunks}, app.store, app.embedder, per_question=4)
    finally:
        app.close()


def copy_of_index(tiny_index, folder: Path, **changes) -> Settings:
    """Settings of a copy of the tiny index in `folder` (a tune run writes models and results beside it)."""
    settings, _ = tiny_index
    shutil.copytree(settings.data_dir, folder)
    return settings.model_copy(update={"data_dir": folder, **changes})


def untrained_model(tiny_index):
    return new_cross_encoder(tiny_index[1], max_length=128)


def pairwise_accuracy(model, pairs: list[TrainingPair]) -> float:
    """Share of pairs whose positive scores above every one of its negatives."""
    wins = 0
    for pair in pairs:
        texts = [passage_text(pair.positive), *map(passage_text, pair.negatives)]
        scores = model.predict([(pair.question, text) for text in texts], show_progress_bar=False)
        wins += bool(scores[0] > max(scores[1:]))
    return wins / len(pairs)


@pytest.mark.slow
def test_trained_cross_encoder_ranks_the_positive_above_mined_negatives(tiny_index, tmp_path):
    settings, model_dir = tiny_index
    mined = mined_pairs(settings)
    assert len(mined) == 18
    for pair in mined:  # never a chunk of the positive's own page
        assert pair.negatives and all(n.metadata["url"] != pair.positive.metadata["url"] for n in pair.negatives)

    model = new_cross_encoder(model_dir, max_length=64)  # the heading path, which tells sections apart, comes first
    untrained = pairwise_accuracy(model, mined)
    steps = train_cross_encoder(model, mined, deadline=float("inf"), epochs=15, learning_rate=1e-3, seed=0)
    trained = pairwise_accuracy(model, mined)
    assert steps == 15 * 6  # 90 examples in batches of 16
    assert untrained <= 0.3 and trained >= 0.7, (untrained, trained)  # most pairs, a margin untrained lacks

    with StagedModel(model, tmp_path / "models" / "reranker-x") as staged:
        folder = staged.publish({"steps": steps})
    from sentence_transformers import CrossEncoder

    reloaded = CrossEncoder(str(folder), local_files_only=True)
    assert reloaded.num_labels == 1 and json.loads((folder / "card.json").read_text()) == {"steps": steps}
    assert pairwise_accuracy(reloaded, mined) == trained


def untrained_embedder(tiny_index):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_index[1]), device="cpu")


@pytest.mark.parametrize("build", [untrained_model, untrained_embedder], ids=["reranker", "embedder"])
def test_a_failed_save_leaves_no_folder(tiny_index, tmp_path, build):
    target = tmp_path / "models" / "model-x"
    with pytest.raises(TypeError):
        with StagedModel(build(tiny_index), target) as staged:
            assert (staged.path / "config.json").is_file()  # written whole before publish is asked
            staged.publish({"not json": object()})
    assert list(target.parent.iterdir()) == []


@pytest.mark.slow  # the child process imports torch
def test_a_killed_save_leaves_no_folder_and_the_next_save_clears_it(tiny_index, tmp_path):
    target = tmp_path / "models" / "reranker-x"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ragline.evaluate.tune import StagedModel, new_cross_encoder
        staged = StagedModel(new_cross_encoder(Path({str(tiny_index[1])!r}), 128), Path({str(target)!r}))
        print("staged", flush=True)
        time.sleep(600)
        staged.publish({{}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "staged"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    leftovers = list(target.parent.iterdir())
    assert not target.exists() and [p.name for p in leftovers] == [f".reranker-x.partial-{child.pid}"]

    with StagedModel(untrained_model(tiny_index), target) as staged:
        staged.publish({})
    assert [p.name for p in target.parent.iterdir()] == ["reranker-x"]


def embedder_accuracy(encode, pairs: list[TrainingPair]) -> float:
    """Share of pairs whose positive is nearer the question than every one of its negatives; `encode` maps
    texts to normalized vectors."""
    wins = 0
    for pair in pairs:
        question = encode([pair.question])[0]
        scores = encode([passage_text(pair.positive), *map(passage_text, pair.negatives)]) @ question
        wins += bool(scores[0] > max(scores[1:]))
    return wins / len(pairs)


@pytest.mark.slow
def test_trained_embedder_brings_positives_nearer_and_its_folder_loads_as_the_embedder(tiny_index, tmp_path):
    from sentence_transformers import SentenceTransformer

    settings, model_dir = tiny_index
    mined = mined_pairs(settings)
    model = SentenceTransformer(str(model_dir), device="cpu")

    def encode(texts):
        return model.encode(texts, normalize_embeddings=True, show_progress_bar=False)

    untrained = embedder_accuracy(encode, mined)
    steps = train_embedder(model, mined, deadline=float("inf"), epochs=15, batch_size=6, learning_rate=1e-3)
    trained = embedder_accuracy(encode, mined)
    assert steps == 15 * 3  # 18 pairs, each about its own section, in batches of 6
    assert trained >= 0.7 and trained >= untrained + 0.3, (untrained, trained)

    with StagedModel(model, tmp_path / "models" / "embedder-x") as staged:
        folder = staged.publish({"steps": steps})
    assert [p.name for p in folder.parent.iterdir()] == ["embedder-x"]
    embedder = SentenceTransformerEmbedder(EmbedderSettings(model=str(folder)))
    texts = [passage_text(pair.positive) for pair in mined]
    assert embedder.name == "embedder-x" and embedder.dim == 32
    assert abs(embedder.embed_documents(texts) - encode(texts)).max() < 1e-5

    app = Ragline(settings.model_copy(update={"embedder": EmbedderSettings(model=str(folder))}))
    try:  # what the printed instructions say: the index built with the base model needs --full
        with pytest.raises(IngestError, match="--full"):
            app.indexer().run([SourceSettings(path=settings.data_dir.parent / "docs")])
    finally:
        app.close()


def test_batches_never_hold_two_questions_about_one_section():
    import random

    sections = [chunk(PROSE, heading=("Caching", title), n=n) for n, title in enumerate(["A b", "C d", "E f"])]
    positives = [sections[0]] * 3 + [sections[1]] * 2 + [sections[2]]
    pairs = [TrainingPair(f"q{i}", positive, (sections[2],)) for i, positive in enumerate(positives)]
    batches = section_distinct_batches(pairs, 2, random.Random(0))
    assert sorted(pair.question for batch in batches for pair in batch) == [f"q{i}" for i in range(6)]
    assert len(batches) >= 3 and all(
        0 < len(batch) == len({pair.positive.citation_url for pair in batch}) <= 2 for batch in batches
    )


def retrieval_report(hit5: float, mrr: float) -> RetrievalReport:
    return RetrievalReport(questions=10, page={"hit@5": hit5, "mrr": mrr}, anchor={}, config="", results=Path())


def test_a_model_is_kept_only_when_no_set_gets_worse_and_one_gets_better():
    before = {"dev": retrieval_report(0.8, 0.6), "held": retrieval_report(0.5, 0.4)}
    assert verdict(before, before) == (False, "no gain")
    assert verdict(before, {**before, "dev": retrieval_report(0.8, 0.7)}) == (True, "better on dev")
    assert verdict(before, {"dev": retrieval_report(0.9, 0.7), "held": retrieval_report(0.5, 0.39)}) == (
        False, "worse on held")
    assert verdict(before, {**before, "dev": retrieval_report(0.7, 0.7)}) == (False, "worse on dev")  # hit@5 fell


def tune_run(settings: Settings, options: TuneOptions):
    app = Ragline(settings)
    try:
        return tune(app, options, llm=None)
    finally:
        app.close()


def saved_models(settings: Settings) -> list[str]:
    models = settings.data_dir / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


@pytest.mark.slow
def test_tune_measures_a_reranker_before_and_after_and_keeps_it_only_if_it_helps(tiny_index, tmp_path):
    settings = copy_of_index(tiny_index, tmp_path / "index")
    report = tune_run(settings, TuneOptions(target="reranker", questions=0, max_minutes=2, epochs=2, holdout=0.34))
    assert report.pairs == {"synthetic": 0, "headings": 18} and report.steps > 0
    assert set(report.before) == set(report.after) == {"held-out headings"}
    assert report.before["held-out headings"].questions == 6
    if report.kept:  # the staged copy is gone either way
        assert saved_models(settings) == [report.model_dir.name] and (report.model_dir / "card.json").is_file()
    else:
        assert saved_models(settings) == [] and report.reason


@pytest.mark.slow
def test_an_embedder_that_cannot_change_the_ranking_is_discarded_and_the_index_left_alone(tiny_index, tmp_path):
    settings = copy_of_index(tiny_index, tmp_path / "index", retrieve=RetrieveSettings(mode="keyword"))
    store = settings.data_dir / "store.sqlite"
    stored = store.read_bytes()
    options = TuneOptions(target="embedder", questions=0, max_minutes=2, epochs=3, holdout=0.34, learning_rate=1e-3)
    report = tune_run(settings, options)
    assert report.steps > 0 and "re-embed" in report.timings
    assert {n: r.page for n, r in report.after.items()} == {n: r.page for n, r in report.before.items()}
    assert (report.kept, report.reason, report.model_dir) == (False, "no gain", None)
    assert saved_models(settings) == [] and not list((settings.data_dir / "tune").glob("reindex-*"))
    assert store.read_bytes() == stored


@pytest.mark.slow
@pytest.mark.parametrize("target", ["embedder", "reranker"])
def test_tune_command_reports_before_and_after(tiny_index, tmp_path, capsys, target):
    from ragline.cli import run

    settings, model = tiny_index
    shutil.copytree(settings.data_dir, tmp_path / "index")
    config = tmp_path / "ragline.yaml"
    config.write_text(f"data_dir: {tmp_path / 'index'}\nembedder:\n  model: {model}\n")
    command = ["--config", str(config), "tune", "--target", target, "--questions", "0", "--max-minutes", "1",
               "--holdout", "0.34"]
    assert run(command) == 0
    printed = capsys.readouterr().out
    assert "held-out headings" in printed and "18 heading" in printed
    assert ("re-embed" in printed) == (target == "embedder")  # only the embedder re-embeds the index
    selected = "embedder:\n  model:" if target == "embedder" else "backend: cross-encoder"
    assert "not kept" in printed or selected in printed


def test_tune_command_rejects_an_unknown_target(capsys):
    from ragline.cli import run

    assert run(["tune", "--target", "generator"]) == 2
    assert "generator" in capsys.readouterr().err
