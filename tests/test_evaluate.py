"""The evaluation library's parts: rank metrics, URL matching, resumable results, the judge, the price table."""

from __future__ import annotations

import json
import math

import pytest
from scripted_llm_server import Reply, ScriptedLLMServer, completion, make_hit

from ragline.evaluate.cost import Price, cost_report, read_prices
from ragline.evaluate.judge import Judge, claims
from ragline.evaluate.matching import page_path, same_page, same_section
from ragline.evaluate.metrics import DEPTH, first_rank, rank_metrics
from ragline.evaluate.records import EvalInputError, ResultsFile, pending, read_questions
from ragline.evaluate.retrieval import judge_ranking
from ragline.generate.openai_compat import OpenAICompatLLM

# ---- metrics


def test_rank_metrics_on_hand_built_ranks():
    figures = rank_metrics([1, 3, None, 10, 2])
    assert figures["hit@1"] == 0.2
    assert figures["hit@3"] == figures["hit@5"] == figures["hit@7"] == 0.6
    assert figures["hit@10"] == 0.8
    assert figures["mrr"] == round((1 + 1 / 3 + 1 / 10 + 1 / 2) / 5, 4)
    assert figures["ndcg@10"] == round((1 + 1 / math.log2(4) + 1 / math.log2(11) + 1 / math.log2(3)) / 5, 4)


def test_first_rank_ignores_matches_beyond_the_depth():
    assert first_rank([False, False, True]) == 3
    assert first_rank([False] * DEPTH + [True]) is None
    assert rank_metrics([])["mrr"] == 0.0


def test_ranking_a_question_at_page_and_anchor_level():
    hits = [make_hit(3, "a"), make_hit(1, "b"), make_hit(2, "c"), make_hit(1, "d")]
    hits[1].chunk.metadata["anchor"] = "other-section"  # page 1, wrong section; hits[3] is the gold section
    line = judge_ranking({"question": "q", "source": "https://docs.example.org/page1.html#section-1"}, hits)
    assert line["rank"] == 2 and line["anchor_rank"] == 4
    assert line["ranked"][0] == "https://docs.example.org/page3.html#section-3"
    missing = judge_ranking({"question": "q", "source": "https://docs.example.org/page9.html"}, hits)
    assert missing["rank"] is None and missing["anchor_rank"] is None


# ---- URL matching

GOLD = "https://flax.readthedocs.io/en/latest/guides/rng_guide.html#Seeds"


@pytest.mark.parametrize(
    ("url", "source", "expected"),
    [
        ("https://flax.readthedocs.io/en/latest/guides/rng_guide.html", None, True),
        ("http://mirror.example.org/guides/rng_guide.md", None, True),  # another host, no version prefix
        ("file:///home/me/flax/docs/guides/rng_guide.md", "guides/rng_guide.md", True),  # no url_template
        ("file:///home/me/flax/docs/guides/rng_guide.md", None, False),  # the absolute path alone says nothing
        ("guides/rng_guide.ipynb", None, True),
        ("https://flax.readthedocs.io/en/latest/guides/old_rng_guide.html", None, False),  # not a segment boundary
        ("https://flax.readthedocs.io/en/v0.7/guides/rng_guide.html", None, False),  # another version
        ("https://flax.readthedocs.io/en/latest/rng_guide.html", None, False),
    ],
)
def test_same_page(url, source, expected):
    assert same_page(GOLD, url, source) is expected


def test_index_pages_and_folders_are_the_same_page():
    assert page_path("https://x.org/docs/api/") == ("docs", "api", "index")
    assert same_page("https://x.org/docs/api/", "https://x.org/docs/api/index.html")
    assert same_page("https://x.org/docs/api/index.html", "", "api/index.rst")
    assert same_page("https://x.org/", "https://x.org/index.html")
    assert not same_page("https://x.org/docs/api/", "https://x.org/docs/api.html")


def test_anchors_compare_exactly_after_decoding_and_case():
    url = "https://flax.readthedocs.io/en/latest/guides/rng_guide.html"
    assert same_section(GOLD, url, "seeds")
    assert same_section("https://x.org/a.html#caf%C3%A9", "https://x.org/a.html", "café")
    assert not same_section(GOLD, url, "seeds-and-keys")
    assert not same_section(GOLD, "https://flax.readthedocs.io/en/latest/other.html", "seeds")
    assert same_section("https://x.org/a.html", "https://x.org/a.html", "anything")  # no gold anchor: the page


# ---- question files and resumable results


def test_question_files_are_checked_line_by_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a?", "source": "x.html"}\n\n{"question": "b?"}\n')
    with pytest.raises(EvalInputError, match=r"q.jsonl:3 has no source"):
        read_questions(path, required=("question", "source"))
    assert len(read_questions(path)) == 2
    path.write_text("not json\n")
    with pytest.raises(EvalInputError, match=r"q.jsonl:1 is not JSON"):
        read_questions(path)


def test_results_keep_lines_per_config_and_drop_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    first = ResultsFile(path, "aaa")
    first.append({"question": "q1", "source": "s", "rank": 1})
    ResultsFile(path, "bbb").append({"question": "q1", "source": "s", "rank": 4})
    with path.open("a") as handle:
        handle.write('{"config": "aaa", "question": "q2", "sou')  # killed mid-write
    resumed = ResultsFile(path, "aaa")
    assert path.read_text().endswith("\n")
    assert {line["rank"] for line in resumed.done().values()} == {1}
    resumed.append({"question": "q2", "source": "s", "rank": 2})
    done = resumed.done()
    todo, total = pending([{"question": "q1", "source": "s"}, {"question": "q2", "source": "s"},
                           {"question": "q3", "source": "s"}, {"question": "q3", "source": "s"}], done)
    assert [item["question"] for item in todo] == ["q3"] and total == 3
    assert len(path.read_text().splitlines()) == 3


# ---- the judge, through a real HTTP client against a scripted server


@pytest.fixture(scope="module")
def server():
    with ScriptedLLMServer() as running:
        yield running


def judge_at(server: ScriptedLLMServer) -> Judge:
    return Judge(OpenAICompatLLM("judge-model", base_url=server.url, max_tries=1))


def test_a_judge_reply_in_prose_and_fences_is_read(server):
    server.script(Reply(body=completion('Sure!\n```json\n{"score": 4, "reason": "close"}\n```',
                                       {"prompt_tokens": 50, "completion_tokens": 9})))
    judge = judge_at(server)
    verdict = judge.correctness("q?", "an answer", "the reference")
    assert verdict.value == 4 and verdict.reason == "close"
    assert judge.usage.prompt_tokens == 50 and judge.usage.completion_tokens == 9
    prompt = server.received[0].body["messages"][-1]["content"]
    assert "the reference" in prompt and "an answer" in prompt


def test_a_malformed_judge_reply_is_retried_once_then_unscored(server):
    server.script(Reply(body=completion("I would say it is quite good")), Reply(body=completion('{"score": 9}')))
    verdict = judge_at(server).relevance("q?", "an answer")
    assert verdict.value is None and "could not be read" in verdict.note and "score" in verdict.note
    assert len(server.received) == 2
    retry = server.received[1].body["messages"]
    assert retry[-2] == {"role": "assistant", "content": "I would say it is quite good"}
    assert "JSON object only" in retry[-1]["content"]


def test_a_judge_that_corrects_itself_on_the_retry_is_scored(server):
    server.script(Reply(body=completion("yes")), Reply(body=completion('{"supported": "no"}')))
    assert judge_at(server).supported("The port is 8080 [1].", ["[1] The port is 9090."]).value is False
    assert len(server.received) == 2


def test_claims_are_the_sentences_with_citations():
    answer = ("The cache uses Redis [1]. Call os.path.join to build paths. [2] It is fast [1][3]. "
              "Nothing cited here.\nSee `a[0]` too.")
    assert claims(answer) == [
        ("The cache uses Redis [1].", [1]),
        ("Call os.path.join to build paths. [2]", [2]),
        ("It is fast [1][3].", [1, 3]),
    ]


# ---- price table


def test_cost_per_answer_from_the_price_table(tmp_path):
    table = tmp_path / "prices.yaml"
    table.write_text("gpt-x: {input: 2.0, output: 10.0}\njudge-model: {input: 1, output: 1}\n")
    prices = read_prices(table)
    assert prices["gpt-x"] == Price(2.0, 10.0)
    lines = [
        {"model": "gpt-x", "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
         "judge_model": "judge-model", "judge_usage": {"prompt_tokens": 3000, "completion_tokens": 0}},
        {"model": "gpt-x", "usage": {"prompt_tokens": 3000, "completion_tokens": 300},
         "judge_model": "judge-model", "judge_usage": {"prompt_tokens": 1000, "completion_tokens": 0}},
        {"model": "local-model", "usage": {"prompt_tokens": 10, "completion_tokens": 10}},
    ]
    rows = {(row.role, row.model): row for row in cost_report(lines, prices)}
    answer = rows["answer", "gpt-x"]
    assert (answer.answers, answer.prompt_tokens, answer.completion_tokens) == (2, 2000, 200)
    assert answer.usd_total == pytest.approx((4000 * 2 + 400 * 10) / 1e6)
    assert answer.usd_per_answer == pytest.approx(0.006)
    assert rows["judge", "judge-model"].usd_total == pytest.approx(0.004)
    assert rows["answer", "local-model"].usd_total is None


def test_a_bad_price_table_says_what_to_write(tmp_path):
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"gpt-x": {"input": 2.0}}))
    with pytest.raises(EvalInputError, match=r"'gpt-x' needs input and output"):
        read_prices(table)


# ---- the command line (cost needs no index)


def test_eval_cost_prints_a_table_or_json_and_names_unpriced_models(tmp_path, capsys):
    from ragline.cli import EXIT_RUN_FAILED, run

    results = tmp_path / "answers.jsonl"
    results.write_text(json.dumps({"config": "c", "question": "q", "model": "gpt-x", "judge_model": "judge-model",
                                   "usage": {"prompt_tokens": 1000, "completion_tokens": 500},
                                   "judge_usage": {"prompt_tokens": 10, "completion_tokens": 1}}) + "\n")
    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-x: {input: 1.0, output: 4.0}\n")
    assert run(["eval", "cost", str(results), "--prices", str(prices), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"role": "answer", "model": "gpt-x", "answers": 1, "prompt_tokens": 1000.0,
                       "completion_tokens": 500.0, "usd_per_answer": 0.003, "usd_total": 0.003}
    assert rows[1]["model"] == "judge-model" and rows[1]["usd_total"] is None
    assert run(["eval", "cost", str(results), "--prices", str(prices)]) == 0
    captured = capsys.readouterr()
    assert "gpt-x" in captured.out and "0.003" in captured.out and "judge-model is not in" in captured.err
    assert run(["eval", "cost", str(tmp_path / "missing.jsonl"), "--prices", str(prices)]) == EXIT_RUN_FAILED
    assert "does not exist" in capsys.readouterr().err
