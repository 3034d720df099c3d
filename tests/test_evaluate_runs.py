"""`ragline eval` runs end to end: indexes on disk, real HTTP model servers on loopback, real processes."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from scripted_llm_server import Reply, ScriptedLLMServer, Stream, completion

from ragline.app import Ragline
from ragline.cli import run
from ragline.config import LLMSettings, Settings, SourceSettings, load_settings
from ragline.evaluate.answers import evaluate_answers
from ragline.evaluate.judge import Judge
from ragline.evaluate.records import read_lines
from ragline.evaluate.sweep import run_sweep
from ragline.generate.openai_compat import OpenAICompatLLM

pytestmark = pytest.mark.slow

URL = "https://docs.example.org/{path}.html"

TOPICS = {
    "cache": ("Caching", "The semantic cache answers repeated questions from Redis without calling the model."),
    "limits": ("Rate limits", "Each API key may send 120 requests per minute before it is throttled."),
    "auth": ("Authentication", "Clients authenticate with a bearer token sent in the Authorization header."),
    "deploy": ("Deployment", "The service ships as a container image that listens on port 8080."),
    "logging": ("Logging", "Logs are written as JSON lines to standard output for the collector to read."),
    "backup": ("Backups", "A nightly job copies the database snapshot to object storage and keeps thirty days."),
}
QUESTIONS = [
    ("do repeated questions come from redis?", "cache", "caching"),
    ("how many requests per minute may one key send?", "limits", "rate-limits"),
    ("which header carries the bearer token?", "auth", "authentication"),
    ("what port does the container image listen on?", "deploy", "deployment"),
    ("where are the JSON logs written?", "logging", "logging"),
    ("how many days of database snapshots are kept?", "backup", "backups"),
]


def write_corpus(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir(parents=True)
    for name, (title, text) in TOPICS.items():
        (docs / f"{name}.md").write_text(f"# {title}\n\n{text}\n\n## Notes\n\nSee the operations guide for {name}.\n")
    return docs


def write_questions(path: Path, copies: int = 1) -> Path:
    lines = [
        {"question": f"{question}{' (again %d)' % n if n else ''}", "source": f"https://docs.example.org/{page}.html#{anchor}"}
        for n in range(copies) for question, page, anchor in QUESTIONS
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def bag_of_words(text: str, dim: int = 64) -> list[float]:
    vector = [0.0] * dim
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        vector[zlib.crc32(word.encode()) % dim] += 1.0
    return vector


def embedding_server(delay_s: float = 0.0) -> ScriptedLLMServer:
    """An OpenAI-compatible /embeddings server whose vectors are hashed bags of words (deterministic)."""
    def reply(body: dict) -> Reply:
        data = [{"index": i, "embedding": bag_of_words(text)} for i, text in enumerate(body["input"])]
        return Reply(body={"data": data}, delay_s=delay_s)

    return ScriptedLLMServer(fallback=reply)


def ragline(config: Path) -> list[str]:
    """The real command line, in its own process."""
    return [sys.executable, "-m", "ragline", "--config", str(config)]


def remote_embedder(url: str) -> dict:
    return {"backend": "openai", "model": "bag-of-words", "base_url": url, "dimensions": 64}


# ---- retrieval: kill a run midway, resume, compare with an uninterrupted run


def test_a_killed_retrieval_run_resumes_without_duplicates_and_same_figures(tmp_path):
    docs = write_corpus(tmp_path)
    questions = write_questions(tmp_path / "questions.jsonl", copies=3)  # 18 questions
    with embedding_server(delay_s=0.25) as server:
        config = tmp_path / "ragline.yaml"
        config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "index"), "embedder": remote_embedder(server.url)}))
        app = Ragline(load_settings(config))
        app.indexer().run([SourceSettings(path=docs, url_template=URL)])
        app.close()
        results = tmp_path / "results.jsonl"
        command = [*ragline(config), "eval", "retrieval", str(questions), "--batch-size", "1", "--json"]
        process = subprocess.Popen([*command, "--results", str(results)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not results.is_file() or len(results.read_text().splitlines()) < 5:
            assert process.poll() is None, process.stderr.read().decode()
            if time.monotonic() > deadline:  # a guard against a hung run, not a speed check
                raise TimeoutError("the eval run wrote fewer than 5 results in 120 s")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = len(read_lines(results))
        assert 5 <= killed_at < 18

        resumed = subprocess.run([*command, "--results", str(results)], capture_output=True, text=True, check=True)
        fresh = subprocess.run(
            [*command, "--results", str(tmp_path / "fresh.jsonl")], capture_output=True, text=True, check=True
        )
    lines = read_lines(results)
    assert len(lines) == 18 == len({line["question"] for line in lines})
    resumed_report, fresh_report = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert resumed_report["page"] == fresh_report["page"] and resumed_report["anchor"] == fresh_report["anchor"]
    assert resumed_report["questions"] == 18 and resumed_report["page"]["hit@10"] > 0.5


# ---- answers: graded by a judge that sometimes writes nonsense


def answer_reply(body: dict) -> Stream:
    return Stream(["Repeated questions come from Redis [1]. ", "The moon is made of cheese [2]."],
                  usage={"prompt_tokens": 300, "completion_tokens": 14})


def judge_reply(body: dict) -> Reply:
    prompt = body["messages"][1]["content"]
    if "REFERENCE:" in prompt:
        text = '{"score": 4, "reason": "close to the reference"}'
    elif "CLAIM:" in prompt:
        text = json.dumps({"supported": "cheese" not in prompt.split("CLAIM:")[1]})
    elif "port" in prompt:  # the relevance of the answer to the port question
        text = "What a lovely answer."  # never JSON, even when asked again
    else:
        text = '{"score": 5}'
    return Reply(body=completion(text, {"prompt_tokens": 100, "completion_tokens": 10}))


def test_answers_are_graded_malformed_verdicts_unscored_and_a_rerun_resumes(tmp_path, embedder):
    from conftest import build_index

    index = build_index(tmp_path, {f"{name}.md": f"# {title}\n\n{text}\n" for name, (title, text) in TOPICS.items()},
                        embedder, URL)
    questions = [
        {"question": "do repeated questions come from redis?", "reference_answer": "Yes, from Redis.",
         "source": "https://docs.example.org/cache.html#caching"},
        {"question": "what port does the container listen on?", "reference_answer": "8080",
         "source": "https://docs.example.org/deploy.html"},
        {"question": "how are logs written?"},
    ]
    with ScriptedLLMServer(fallback=answer_reply) as answers, ScriptedLLMServer(fallback=judge_reply) as judges:
        settings = Settings(data_dir=index, generate={  # the judge grades the model's own claims: no rewriting
            "llm": LLMSettings(backend="openai", model="answer-model", base_url=answers.url),
            "verify": {"enabled": False},
        })
        app = Ragline(settings)
        app.__dict__["embedder"] = embedder
        judge = Judge(OpenAICompatLLM("judge-model", base_url=judges.url, max_tries=1))
        results = tmp_path / "answers.jsonl"
        report = evaluate_answers(app, questions, judge, results)

        lines = read_lines(results)
        assert [line["question"] for line in lines] == [q["question"] for q in questions]
        first, port, logs = lines
        assert first["correctness"]["value"] == 4 and first["relevance"]["value"] == 5
        assert [c["supported"]["value"] for c in first["claims"]] == [True, False] and first["faithfulness"] == 0.5
        assert first["cited_gold"] is True and first["usage"]["prompt_tokens"] == 300
        assert port["relevance"]["value"] is None and "could not be read" in port["relevance"]["note"]
        assert logs["correctness"] is None and logs["cited_gold"] is None
        relevance_asks = [r for r in judges.received if "ANSWER address" in r.body["messages"][1]["content"]
                          and "port" in r.body["messages"][1]["content"]]
        assert len(relevance_asks) == 2  # asked once more, then unscored
        assert first["judge_usage"]["prompt_tokens"] == 4 * 100  # correctness, relevance, two claims

        figures = report.figures
        assert figures["correctness"] == 4.0 and figures["relevance"] == 5.0 and figures["faithfulness"] == 0.5
        assert figures["unscored"] == 1 and figures["claims"] == 6 and figures["cited_gold"] is not None

        answers.script()  # forget what was received
        judges.script()
        again = evaluate_answers(app, questions, judge, results)
        assert answers.received == [] and judges.received == []
        assert again.figures == figures and len(read_lines(results)) == 3
        app.close()


# ---- sweep: two chunkings × two modes on a tiny corpus


def test_sweep_writes_csv_markdown_and_a_plot_per_parameter_and_skips_finished_points(tmp_path):
    docs = write_corpus(tmp_path)
    questions = [json.loads(line) for line in write_questions(tmp_path / "q.jsonl").read_text().splitlines()]
    grid = {"chunker.chunk_tokens": [32, 128], "retrieve.mode": ["dense", "keyword"]}
    out = tmp_path / "sweep"
    with embedding_server() as server:
        settings = Settings(data_dir=tmp_path / "unused", embedder=remote_embedder(server.url),
                            chunker={"overlap_tokens": 8})
        sources = [SourceSettings(path=docs, url_template=URL)]
        rows = run_sweep(settings, sources, questions, grid, out)

        assert [(row["chunker.chunk_tokens"], row["retrieve.mode"]) for row in rows] == [
            (32, "dense"), (32, "keyword"), (128, "dense"), (128, "keyword")]
        assert len(list((out / "indexes").iterdir())) == 2  # one index per chunking
        with (out / "results.csv").open() as handle:
            table = list(csv.DictReader(handle))
        assert len(table) == 4 and float(table[1]["page hit@5"]) == rows[1]["page hit@5"]
        assert {"page mrr", "page ndcg@10", "anchor hit@1", "questions"} <= set(table[0])
        markdown = (out / "results.md").read_text().splitlines()
        assert markdown[2].startswith("| chunker.chunk_tokens | retrieve.mode | page hit@1")
        assert len([line for line in markdown if line.startswith("| 32") or line.startswith("| 128")]) == 4
        for name in ("chunker.chunk_tokens", "retrieve.mode"):
            assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert all(row["page hit@10"] > 0.5 for row in rows)

        server.script()
        again = run_sweep(settings, sources, questions, grid, out)
        assert server.received == [] and again == rows
        assert len((out / "points.jsonl").read_text().splitlines()) == 4


# ---- the command line, in process


def test_eval_retrieval_and_sweep_from_the_command_line(tmp_path, capsys):
    docs = write_corpus(tmp_path)
    questions = write_questions(tmp_path / "q.jsonl")
    with embedding_server() as server:
        config = tmp_path / "ragline.yaml"
        config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "index"), "embedder": remote_embedder(server.url),
                                          "chunker": {"overlap_tokens": 8}}))
        assert run(["--config", str(config), "ingest", str(docs), "--url-template", URL]) == 0
        capsys.readouterr()
        assert run(["--config", str(config), "eval", "retrieval", str(questions), "--retrieve", "mode=keyword"]) == 0
        printed = capsys.readouterr().out
        assert "q.jsonl: 6 questions" in printed and "hit@5" in printed and "anchor" in printed
        assert (tmp_path / "index" / "eval" / "q.retrieval.jsonl").is_file()

        out = tmp_path / "sweep"
        assert run(["--config", str(config), "eval", "sweep", str(questions), "--out", str(out),
                    "--param", "retrieve.mode=dense,keyword", "--source", str(docs), "--url-template", URL]) == 0
        assert "| dense |" in capsys.readouterr().out and (out / "retrieve.mode.png").is_file()
        assert run(["--config", str(config), "eval", "sweep", str(questions), "--out", str(out),
                    "--param", "retrieve.moda=dense", "--source", str(docs)]) == 1
        assert "'retrieve.moda' is not a setting" in capsys.readouterr().err


def test_eval_generate_questions_writes_the_eval_format(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    prose = ("Workers pull jobs from the queue and retry them with exponential backoff when the upstream service "
             "answers slowly, and every retry is logged with its reason so that operators can see why a job took "
             "longer than expected and decide whether the limits need raising for their own deployment. ")
    for i in range(4):
        (docs / f"p{i}.md").write_text(f"# Page {i}\n\n## Part {i}\n\n{prose * 2}\n")
    asked = iter(range(100))

    def reply(body: dict) -> Reply:
        return Reply(body=completion(f"Question: why does my worker number {next(asked)} keep stalling for ages?"))

    with ScriptedLLMServer(fallback=reply) as server:
        config = tmp_path / "ragline.yaml"
        config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "index"), "generate": {
            "llm": {"backend": "openai", "model": "writer", "base_url": server.url}}}))
        assert run(["--config", str(config), "ingest", str(docs), "--url-template", URL]) == 0
        output = tmp_path / "synthetic.jsonl"
        assert run(["--config", str(config), "eval", "generate-questions", str(output), "-n", "3"]) == 0
    assert "3 questions (of 3 wanted)" in capsys.readouterr().out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["question"] for line in lines] == [f"why does my worker number {n} keep stalling for ages?" for n in range(3)]
    assert all(re.fullmatch(r"https://docs\.example\.org/p\d\.html#part-\d", line["source"]) for line in lines)
