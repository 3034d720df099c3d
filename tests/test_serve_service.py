"""The multi-tenant service end to end in process: keys and JWTs, uploads through jobs, per-group access,
PATCH without re-embedding, chat memory, the OpenAI-compatible endpoint, caches, limits and feedback.

The service database is SQLite here (and PostgreSQL in test_serve_postgres.py); Redis is the real one.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager
import time
import uuid

import jwt
import pytest
from fastapi.testclient import TestClient
from scripted_llm_server import wait_until_ready

from ragline.app import Ragline
from ragline.config import Settings
from ragline.serve.api import create_app
from ragline.serve.db import Database

EXTRACTIVE = {"llm": {"backend": "extractive"}}
SECRET = "test-secret-for-hs256-tokens-0123456789"
DEPLOY = (
    "# Deploying\n\n## Kubernetes\n\nUse the KubeRay operator to run the Ray cluster on Kubernetes.\n\n"
    "## Docker\n\nThe Docker image listens on port 8000 by default.\n"
)
SALARIES = "# Salaries\n\nThe salary bands for 2026 are kept by finance: band F3 pays 91,000 euros.\n"


def make_keys(settings: Settings, specs: dict[str, tuple[str, list[str], bool]]) -> dict[str, str]:
    """API keys by name: (tenant, groups, admin) → token."""

    async def create() -> dict[str, str]:
        db = Database.from_settings(settings)
        try:
            await db.migrate()
            tokens = {}
            for name, (tenant, groups, admin) in specs.items():
                _, tokens[name] = await db.keys.create(tenant, groups, admin=admin, name=name)
            return tokens
        finally:
            await db.close()

    return asyncio.run(create())


@contextmanager
def running(settings: Settings, embedder, keys: dict[str, tuple[str, list[str], bool]] | None = None):
    """The app, started and ready, with API keys by name (default: an admin of acme) → their headers."""
    tokens = make_keys(settings, keys or {"admin": ("acme", [], True)})
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        wait_until_ready(client.get)
        yield client, {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}


def service_settings(tmp_path, generate=EXTRACTIVE, ingest=None, **serve) -> Settings:
    auth = {"enabled": True, "jwt": {"algorithm": "HS256", "secret": SECRET, "audience": "ragline"}}
    return Settings(
        data_dir=tmp_path / "data", generate=generate, ingest=ingest or {},
        serve={"auth": auth, "rate_limits": {"enabled": False}, **serve},
    )


@pytest.fixture
def service(tmp_path, embedder, service_database_url):
    """The service over SQLite and over the real PostgreSQL, with keys of two tenants and their groups, and
    a configured source of tenant acme."""
    handbook = tmp_path / "handbook"
    handbook.mkdir()
    (handbook / "leave.md").write_text("# Leave\n\nStaff get 30 days of paid leave a year, booked in HRdesk.\n")
    settings = service_settings(
        tmp_path, database_url=service_database_url,
        ingest={"sources": [{"path": str(handbook), "name": "handbook", "tenant": "acme", "groups": ["staff"]}]},
    )
    keys = {
        "admin": ("acme", [], True),
        "eng": ("acme", ["eng"], False),
        "sales": ("acme", ["sales"], False),
        "other": ("globex", ["eng"], False),
    }
    with running(settings, embedder, keys) as started:
        yield started


def upload(client, headers, name: str, text: str, groups: str | None = None) -> dict:
    data = {"groups": groups} if groups is not None else {}
    response = client.post("/v1/documents", headers=headers, files={"file": (name, text.encode())}, data=data)
    assert response.status_code in (200, 202), response.text
    return response.json()


def finished(client, headers, job_id: str, deadline_s: float = 60) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not finish")


def search_texts(client, headers, query: str) -> list[str]:
    response = client.post("/v1/search", headers=headers, json={"query": query, "k": 10})
    assert response.status_code == 200, response.text
    return [hit["text"] for hit in response.json()["hits"]]


def test_every_v1_route_needs_credentials_and_says_how(service):
    client, _ = service
    for method, path in [("post", "/v1/search"), ("post", "/v1/query"), ("get", "/v1/documents"),
                         ("post", "/v1/chat/completions"), ("get", "/v1/jobs")]:
        response = client.post(path, json={"query": "x"}) if method == "post" else client.get(path)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert set(response.json()) == {"code", "message"}
    forged = {"Authorization": "Bearer rl_0123456789abcdef_notarealsecret"}
    assert client.get("/v1/documents", headers=forged).status_code == 401
    assert client.get("/healthz").status_code == 200


def test_jwt_bearer_tokens_are_checked(service):
    client, _ = service
    now = int(time.time())
    claims = {"tenant": "acme", "groups": ["eng"], "sub": "ann", "aud": "ragline", "exp": now + 60}
    good = jwt.encode(claims, SECRET, algorithm="HS256")
    assert client.get("/v1/documents", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    for bad in (
        jwt.encode({**claims, "exp": now - 3600}, SECRET, algorithm="HS256"),
        jwt.encode({**claims, "aud": "someone-else"}, SECRET, algorithm="HS256"),
        jwt.encode(claims, "another-secret-of-sufficient-length-000", algorithm="HS256"),
    ):
        response = client.get("/v1/documents", headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == 401, response.text


def test_uploads_are_indexed_by_jobs_and_read_only_by_their_groups(service):
    client, keys = service
    job = upload(client, keys["admin"], "salaries.md", SALARIES, groups="sales")
    assert job["status"] in ("queued", "running", "succeeded")
    done = finished(client, keys["admin"], job["id"])
    assert done["status"] == "succeeded", done
    doc_id = done["doc_id"]
    assert any("F3" in text for text in search_texts(client, keys["sales"], "what does band F3 pay?"))
    assert not any("F3" in text for text in search_texts(client, keys["eng"], "what does band F3 pay?"))
    assert not any("F3" in text for text in search_texts(client, keys["other"], "what does band F3 pay?"))
    assert [d["id"] for d in client.get("/v1/documents", headers=keys["sales"]).json()["items"]] == [doc_id]
    assert client.get("/v1/documents", headers=keys["eng"]).json()["items"] == []
    assert client.get(f"/v1/documents/{doc_id}", headers=keys["eng"]).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=keys["eng"]).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=keys["other"]).status_code == 404


def test_patching_groups_changes_access_at_once_without_reembedding(service, embedder, monkeypatch):
    client, keys = service
    doc_id = finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")["id"])["doc_id"]
    calls = []
    original = embedder.embed_documents
    monkeypatch.setattr(embedder, "embed_documents", lambda texts: calls.append(len(texts)) or original(texts))
    assert client.patch(f"/v1/documents/{doc_id}", headers=keys["eng"], json={"groups": ["sales"]}).status_code == 403
    response = client.patch(f"/v1/documents/{doc_id}", headers=keys["admin"], json={"groups": ["sales"]})
    assert response.status_code == 200 and response.json()["groups"] == ["sales"]
    assert any("KubeRay" in text for text in search_texts(client, keys["sales"], "how do I run ray on kubernetes?"))
    assert not any("KubeRay" in text for text in search_texts(client, keys["eng"], "how do I run ray on kubernetes?"))
    assert calls == []


def test_the_same_upload_twice_is_one_document_and_delete_removes_it(service):
    client, keys = service
    first = finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")["id"])
    again = upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")
    assert again["id"] == first["id"] and again["doc_id"] == first["doc_id"]
    assert client.get("/v1/documents", headers=keys["admin"]).json()["total"] == 1
    assert client.delete(f"/v1/documents/{first['doc_id']}", headers=keys["eng"]).status_code == 403
    assert client.delete(f"/v1/documents/{first['doc_id']}", headers=keys["admin"]).status_code == 204
    assert client.get("/v1/documents", headers=keys["admin"]).json()["total"] == 0
    assert search_texts(client, keys["eng"], "which port does the docker image use?") == []


def test_uploads_are_checked_and_named_by_the_server(service):
    client, keys = service
    refused = client.post("/v1/documents", headers=keys["admin"], files={"file": ("tool.exe", b"MZ")})
    assert refused.status_code == 415 and refused.json()["code"] == "unsupported_type"
    empty = client.post("/v1/documents", headers=keys["admin"], files={"file": ("empty.md", b"")})
    assert empty.status_code == 422
    sneaky = upload(client, keys["admin"], "../../../etc/cron.d/evil.md", DEPLOY)
    assert sneaky["filename"] == "evil.md"
    done = finished(client, keys["admin"], sneaky["id"])
    name = client.get(f"/v1/documents/{done['doc_id']}", headers=keys["admin"]).json()["name"]
    assert name == "evil.md"
    assert client.post("/v1/documents", headers=keys["eng"], files={"file": ("x.md", b"# x\n\ny\n")},
                       data={"groups": "finance"}).status_code == 403


def test_answers_are_cached_per_scope_and_retired_when_the_index_changes(service):
    client, keys = service
    finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")["id"])
    question = {"query": "Which port does the Docker image listen on?", "k": 2}
    first = client.post("/v1/query", headers=keys["eng"], json=question).json()
    second = client.post("/v1/query", headers=keys["eng"], json=question).json()
    assert first["cached"] is False and second["cached"] is True and second["answer"] == first["answer"]
    assert second["answer_id"] == first["answer_id"]  # the recorded answer, not a new row per cache hit
    reworded = client.post("/v1/query", headers=keys["eng"], json={**question, "query": "which port does the docker image listen on"})
    assert reworded.json()["cached"] is True
    assert client.post("/v1/query", headers=keys["sales"], json=question).json()["cached"] is False
    finished(client, keys["admin"], upload(client, keys["admin"], "salaries.md", SALARIES, "sales")["id"])
    assert client.post("/v1/query", headers=keys["eng"], json=question).json()["cached"] is False


def test_answers_stream_as_ndjson_or_sse_by_accept(service):
    client, keys = service
    finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")["id"])
    question = {"query": "Which port does the Docker image listen on?", "k": 2}
    ndjson = client.post("/v1/query", headers={**keys["eng"], "Accept": "application/x-ndjson"}, json=question)
    events = [json.loads(line) for line in ndjson.text.splitlines()]
    assert ndjson.headers["content-type"].startswith("application/x-ndjson")
    assert events[-1]["type"] == "answer" and events[-1]["answer_id"]
    sse = client.post("/v1/query", headers={**keys["eng"], "Accept": "text/event-stream"}, json=question)
    assert sse.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in sse.text.split("\n\n") if block]
    assert blocks[-1].startswith("event: answer\ndata: ")
    assert json.loads(blocks[-1].split("data: ", 1)[1])["type"] == "answer"


def test_chat_sessions_keep_history_per_user(service):
    client, keys = service
    finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")["id"])
    first = client.post("/v1/chat", headers=keys["eng"], json={"message": "How do I run Ray on Kubernetes?"}).json()
    session = first["session_id"]
    follow = client.post("/v1/chat", headers=keys["eng"], json={"message": "and which port?", "session_id": session})
    assert follow.status_code == 200 and follow.json()["session_id"] == session
    detail = client.get(f"/v1/chat/sessions/{session}", headers=keys["eng"]).json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant", "user", "assistant"]
    assert detail["messages"][2]["content"] == "and which port?"
    assert client.get(f"/v1/chat/sessions/{session}", headers=keys["sales"]).status_code == 404
    assert client.post("/v1/chat", headers=keys["sales"], json={"message": "hi", "session_id": session}).status_code == 404
    assert [s["id"] for s in client.get("/v1/chat/sessions", headers=keys["eng"]).json()] == [session]
    assert client.delete(f"/v1/chat/sessions/{session}", headers=keys["eng"]).status_code == 204


def test_openai_compatible_chat_completions(service):
    client, keys = service
    finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY, "eng")["id"])
    request = {"model": "ragline", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Which port does the Docker image use?"},
    ]}
    body = client.post("/v1/chat/completions", headers=keys["eng"], json=request).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert "8000" in body["choices"][0]["message"]["content"] and body["citations"]
    streamed = client.post("/v1/chat/completions", headers=keys["eng"], json={**request, "stream": True})
    lines = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert "8000" in text and chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["citations"]
    # the other groups' caller gets no citation of a document it may not read
    sales = client.post("/v1/chat/completions", headers=keys["sales"], json=request).json()
    assert sales["citations"] == [] and "8000" not in sales["choices"][0]["message"]["content"]


def test_feedback_is_tied_to_an_answer_of_the_tenant(service):
    client, keys = service
    finished(client, keys["admin"], upload(client, keys["admin"], "deploy.md", DEPLOY)["id"])
    answer = client.post("/v1/query", headers=keys["eng"], json={"query": "which port?", "k": 2}).json()
    given = client.post("/v1/feedback", headers=keys["eng"], json={"answer_id": answer["answer_id"], "rating": 1,
                                                                   "comment": "right port"})
    assert given.status_code == 201 and given.json()["rating"] == 1
    foreign = client.post("/v1/feedback", headers=keys["other"], json={"answer_id": answer["answer_id"], "rating": -1})
    assert foreign.status_code == 404
    listed = client.get("/v1/feedback", headers=keys["admin"]).json()
    assert [item["comment"] for item in listed] == ["right port"]
    assert client.get("/v1/feedback", headers=keys["eng"]).status_code == 403


def test_input_limits_are_clear_4xx(service):
    client, keys = service
    too_long = client.post("/v1/search", headers=keys["eng"], json={"query": "x" * 2001})
    assert too_long.status_code == 422 and "2000" in too_long.json()["message"]
    control = client.post("/v1/search", headers=keys["eng"], json={"query": "port\x00?"})
    assert control.status_code == 422 and "U+0000" in control.json()["message"]
    big_k = client.post("/v1/search", headers=keys["eng"], json={"query": "port", "k": 500})
    assert big_k.status_code == 422 and "max_k" in big_k.json()["message"]
    huge = client.post("/v1/search", headers={**keys["eng"], "Content-Type": "application/json"},
                       content=b'{"query": "' + b"a" * (2 * 1048576) + b'"}')
    assert huge.status_code == 413 and huge.json()["code"] == "too_large"


def test_rate_limits_answer_429_with_retry_after(tmp_path, embedder):
    prefix = uuid.uuid4().hex
    settings = service_settings(
        tmp_path, redis_url="redis://127.0.0.1:6379/0",
        rate_limits={"enabled": True, "per_key": {"rate_per_s": 0.01, "burst": 3},
                     "per_ip": {"rate_per_s": 100, "burst": 100}},
    )
    with running(settings, embedder, {f"k{prefix}": ("acme", ["eng"], False)}) as (client, keys):
        headers = keys[f"k{prefix}"]
        statuses = [client.get("/v1/documents", headers=headers).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = client.get("/v1/documents", headers=headers)
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["code"] == "rate_limited"


def test_a_redis_that_is_down_degrades_readiness_and_nothing_else(tmp_path, embedder):
    settings = service_settings(tmp_path, redis_url="redis://127.0.0.1:1/0",
                                rate_limits={"enabled": True, "per_key": {"rate_per_s": 1, "burst": 1}})
    with running(settings, embedder) as (client, keys):
        headers = keys["admin"]
        report = client.get("/readyz").json()
        assert report["components"]["database"]["status"] == "ready"
        assert report["components"]["redis"]["status"] == "failed"
        assert report["status"] == "degraded"
        finished(client, headers, upload(client, headers, "deploy.md", DEPLOY)["id"])  # limits let requests through
        question = {"query": "Which port does the Docker image listen on?", "k": 2}
        answers = [client.post("/v1/query", headers=headers, json=question).json() for _ in range(2)]
        assert [a["cached"] for a in answers] == [False, False] and "8000" in answers[1]["answer"]


def test_admins_reindex_a_configured_source_by_name(service):
    client, keys = service
    assert client.post("/v1/ingest", headers=keys["eng"], json={"source": "handbook"}).status_code == 403
    unknown = client.post("/v1/ingest", headers=keys["admin"], json={"source": "nope"})
    assert unknown.status_code == 404 and "handbook" in unknown.json()["message"]
    assert client.post("/v1/ingest", headers=keys["other"], json={"source": "handbook"}).status_code == 403
    job = client.post("/v1/ingest", headers=keys["admin"], json={"source": "handbook"})
    assert job.status_code in (200, 202)
    done = finished(client, keys["admin"], job.json()["id"])
    assert done["status"] == "succeeded" and done["report"]["new"] == 1
    # the source's groups: staff only (eng and sales are not staff)
    assert not any("HRdesk" in text for text in search_texts(client, keys["eng"], "how many days of leave?"))
    assert any("HRdesk" in text for text in search_texts(client, keys["admin"], "how many days of leave?"))


def test_a_file_that_cannot_be_read_fails_its_job_with_a_reason_and_no_host_path(service, tmp_path):
    client, keys = service
    job = upload(client, keys["admin"], "broken.pdf", "%PDF-1.4 this is not really a pdf")
    done = finished(client, keys["admin"], job["id"])
    assert done["status"] == "failed" and done["error"]
    assert str(tmp_path) not in json.dumps(done)


def test_an_upload_over_the_limit_is_refused_before_it_is_stored(tmp_path, embedder):
    settings = service_settings(tmp_path, limits={"max_upload_mb": 0.01})
    with running(settings, embedder) as (client, keys):
        response = client.post("/v1/documents", headers=keys["admin"],
                               files={"file": ("big.md", b"# Big\n\n" + b"word " * 40_000)})
        assert response.status_code == 413 and response.json()["code"] == "too_large"
    uploads = settings.data_dir / "uploads"
    assert not uploads.exists() or not any(path.is_file() for path in uploads.rglob("*"))


def test_a_slow_model_meets_the_request_deadline(tmp_path, embedder):
    from scripted_llm_server import ScriptedLLMServer, Stream

    with ScriptedLLMServer() as llm:
        llm.script(*[Stream(pieces=["The port ", "is 8000 [1]."], piece_delay_s=5.0) for _ in range(3)])
        generate = {"llm": {"backend": "openai", "model": "slow", "base_url": llm.url}, "verify": {"enabled": False}}
        settings = service_settings(tmp_path, generate=generate, request_timeout_s=1.0)
        with running(settings, embedder) as (client, keys):
            headers = keys["admin"]
            finished(client, headers, upload(client, headers, "deploy.md", DEPLOY)["id"])
            question = {"query": "Which port does the Docker image listen on?", "k": 2}
            response = client.post("/v1/query", headers=headers, json=question)
            assert response.status_code == 504 and response.json()["code"] == "timeout"
            streamed = client.post("/v1/query", headers={**headers, "Accept": "application/x-ndjson"}, json=question)
            assert json.loads(streamed.text.splitlines()[-1])["code"] == "timeout"


def test_a_database_that_is_down_fails_readiness_but_not_search_or_answers(tmp_path, embedder, indexed_docs):
    settings = Settings(
        data_dir=indexed_docs, generate=EXTRACTIVE,
        serve={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/none", "rate_limits": {"enabled": False}},
    )
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        report = wait_until_ready(client.get)
        assert report["status"] == "failed" and report["components"]["database"]["status"] == "failed"
        assert client.post("/v1/search", json={"query": "which port?"}).status_code == 200
        answer = client.post("/v1/query", json={"query": "Which port does the Docker image listen on?"})
        assert answer.status_code == 200 and answer.json()["answer_id"] is None and "8000" in answer.json()["answer"]
        chat = client.post("/v1/chat", json={"message": "which port?"})
        assert chat.status_code == 503 and chat.json()["code"] == "database_unavailable"


@pytest.fixture
def indexed_docs(tmp_path, embedder):
    from conftest import build_index

    return build_index(tmp_path / "corpus", {"deploy.md": DEPLOY}, embedder)


def test_a_chat_follow_up_is_rewritten_with_the_stored_history_before_retrieval(tmp_path, embedder):
    from scripted_llm_server import Reply, ScriptedLLMServer, Stream, completion

    with ScriptedLLMServer() as llm:
        generate = {"llm": {"backend": "openai", "model": "m", "base_url": llm.url}, "verify": {"enabled": False}}
        settings = service_settings(tmp_path, generate=generate)
        with running(settings, embedder) as (client, keys):
            headers = keys["admin"]
            finished(client, headers, upload(client, headers, "deploy.md", DEPLOY)["id"])
            llm.script(Stream(["Use the KubeRay operator [1]."]))
            first = client.post("/v1/chat", headers=headers, json={"message": "How do I run Ray on Kubernetes?"})
            session = first.json()["session_id"]
            llm.script(
                Reply(200, completion("Standalone question: Which port does the Docker image of Ray use?")),
                Stream(["Port 8000 [1]."]),
            )
            follow = client.post("/v1/chat", headers=headers, json={"message": "and which port?", "session_id": session})
            assert follow.status_code == 200 and follow.json()["answer"].startswith("Port 8000")
            rewrite = llm.received[0].body["messages"][-1]["content"]
            assert "user: How do I run Ray on Kubernetes?" in rewrite
            assert "assistant: Use the KubeRay operator" in rewrite
            assert "Follow-up question: and which port?" in rewrite


def test_a_route_can_have_its_own_limit(tmp_path, embedder):
    settings = service_settings(
        tmp_path, rate_limits={"enabled": True, "per_key": {"rate_per_s": 100, "burst": 100},
                               "per_ip": {"rate_per_s": 100, "burst": 100},
                               "routes": {"/v1/jobs/{job_id}": {"rate_per_s": 0.01, "burst": 1}}},
    )
    with running(settings, embedder) as (client, keys):
        headers = keys["admin"]
        assert [client.get("/v1/jobs/nope", headers=headers).status_code for _ in range(2)] == [404, 429]
        assert [client.get("/v1/jobs", headers=headers).status_code for _ in range(3)] == [200, 200, 200]


ANSWER_SPANS_SCRIPT = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from ragline.config import Settings
from ragline.serve.api import create_app
from ragline.serve.observability import configure_tracing

settings = Settings(data_dir=Path(sys.argv[1]), generate={"llm": {"backend": "extractive"}},
                    serve={"telemetry": {"traces": "console"}})
memory = InMemorySpanExporter()
with TestClient(create_app(settings)) as client:
    configure_tracing(settings.serve.telemetry).add_span_processor(SimpleSpanProcessor(memory))
    while client.get("/readyz").status_code != 200:
        pass
    answer = client.post("/v1/query", json={"query": "Which port does the Docker image listen on?"}).json()
    client.post("/v1/search", json={"query": "which port?"})
print("RESULT " + json.dumps(sorted(span.name for span in memory.get_finished_spans())))
"""


def test_an_answer_is_traced_stage_by_stage(indexed_docs):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ANSWER_SPANS_SCRIPT, str(indexed_docs)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    spans = json.loads(result[len("RESULT "):])
    assert {"ragline.cache", "ragline.retrieve", "ragline.generate", "ragline.search"} <= set(spans)
