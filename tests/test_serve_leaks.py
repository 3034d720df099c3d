"""Issue 9's leak test: no caller ever receives a word of a document it may not read, on any route.

Two tenants hold overlapping documents (the same content in both, under
different groups); every document matches every question, and carries marker
tokens (`LEAKMARK-<content>` in its text, `LEAKFILE-<document>` in its file
name) so each response body can be traced back to the documents it came
from. For every caller (admins, group keys, a key of two groups, a key of no
groups, JWTs) and every route that returns content, the markers and document
ids the caller may not read must be absent; bad credentials must get a JSON
401/403 and nothing else. The oracle is the access rule written out here, not
the service's own `Scope`: same tenant and (admin, or the document's groups
hold "*" or meet the caller's).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from scripted_llm_server import wait_until_ready
from test_serve_service import SECRET, finished, service_settings, upload

from ragline.app import Ragline
from ragline.serve.api import create_app
from ragline.serve.db import Database

MARKER = re.compile(r"LEAK(?:MARK|FILE)-[A-Za-z0-9-]+")
QUESTIONS = [
    "What torque does the zephyr quartz turbine calibration need?",
    "How often are the zephyr quartz turbine bearings oiled?",
]
SEARCH_MODES = [  # the documents' texts are near-duplicates of each other: without dedupe, a search returns them all
    None, {"mode": "keyword", "dedupe": False}, {"mode": "dense", "dedupe": False, "expand_neighbours": 1},
]


def content(tag: str) -> str:
    """A document every question matches, its every passage carrying the marker of its content."""
    marker = f"LEAKMARK-{tag}"
    return (
        f"# Zephyr quartz turbine {marker}\n\n"
        f"The zephyr quartz turbine calibration of {marker} needs a torque of 42 newton metres.\n\n"
        f"## Bearings of {marker}\n\n"
        f"Oil the zephyr quartz turbine bearings of {marker} every seven days.\n"
    )


@dataclass
class Doc:
    """An uploaded document: the marker in its file name is its own; its content's may be shared."""

    name: str
    tenant: str
    groups: list[str]
    text_tag: str
    doc_id: str = ""
    job_id: str = ""

    @property
    def markers(self) -> set[str]:
        return {f"LEAKFILE-{self.name}", f"LEAKMARK-{self.text_tag}", self.doc_id}


def planned_docs() -> list[Doc]:
    return [
        Doc("acme-eng", "acme", ["eng"], "acme-eng"),
        Doc("acme-sales", "acme", ["sales"], "acme-sales"),
        Doc("acme-everyone", "acme", ["*"], "acme-everyone"),
        Doc("acme-eng-sales", "acme", ["eng", "sales"], "acme-eng-sales"),
        Doc("acme-hr", "acme", ["hr"], "shared-1"),
        Doc("acme-ops", "acme", ["ops"], "shared-2"),
        Doc("acme-eng-twin", "acme", ["eng"], "shared-3"),
        Doc("acme-patch", "acme", ["eng", "sales"], "acme-patch"),
        Doc("acme-reupload", "acme", ["sales"], "acme-reupload"),
        Doc("globex-eng", "globex", ["eng"], "globex-eng"),
        Doc("globex-everyone", "globex", ["*"], "shared-2"),
        Doc("globex-sales", "globex", ["sales"], "shared-1"),
        Doc("globex-hr", "globex", ["hr"], "globex-hr"),
        Doc("globex-eng-twin", "globex", ["eng"], "shared-3"),
    ]


@dataclass(frozen=True)
class Caller:
    name: str
    tenant: str
    groups: frozenset[str]
    admin: bool
    headers: dict[str, str]

    def may_read(self, doc: Doc) -> bool:
        """The access rule, written out independently of the service's."""
        return doc.tenant == self.tenant and (self.admin or "*" in doc.groups or bool(self.groups & set(doc.groups)))


@dataclass
class World:
    client: TestClient
    callers: dict[str, Caller]
    docs: dict[str, Doc]
    bad_credentials: dict[str, dict[str, str]]

    def forbidden(self, caller: Caller) -> set[str]:
        """The markers and document ids of which the caller may read no document."""
        allowed = set().union(*(doc.markers for doc in self.docs.values() if caller.may_read(doc)))
        every = set().union(*(doc.markers for doc in self.docs.values()))
        return every - allowed

    def allowed_texts(self, caller: Caller) -> set[str]:
        return {f"LEAKMARK-{doc.text_tag}" for doc in self.docs.values() if caller.may_read(doc)}


def markers_in(body: str, ids: set[str]) -> set[str]:
    """The marker tokens in a body, and which of `ids` (document ids) occur in it."""
    return set(MARKER.findall(body)) | {doc_id for doc_id in ids if doc_id in body}


def token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm=algorithm)}"}


def unsigned(claims: dict[str, Any]) -> dict[str, str]:
    """A JWT with `alg: none` and no signature: must never be accepted."""
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return {"Authorization": f"Bearer {part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."}


KEYS = {
    "acme-admin": ("acme", [], True),
    "acme-eng": ("acme", ["eng"], False),
    "acme-sales": ("acme", ["sales"], False),
    "acme-eng+sales": ("acme", ["eng", "sales"], False),
    "acme-nogroups": ("acme", [], False),
    "globex-admin": ("globex", [], True),
    "globex-eng": ("globex", ["eng"], False),
    "globex-nogroups": ("globex", [], False),
    "acme-revoked": ("acme", [], True),
}


def create_keys(settings) -> dict[str, tuple[str, str]]:
    """(key id, token) by name; the key named acme-revoked is revoked at once."""

    async def create() -> dict[str, tuple[str, str]]:
        db = Database.from_settings(settings)
        try:
            await db.migrate()
            made = {}
            for name, (tenant, groups, admin) in KEYS.items():
                key, secret = await db.keys.create(tenant, groups, admin=admin, name=name)
                made[name] = (key.id, secret)
            assert await db.keys.revoke(made["acme-revoked"][0])
            return made
        finally:
            await db.close()

    return asyncio.run(create())


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedder) -> Iterator[World]:
    settings = service_settings(tmp_path_factory.mktemp("leaks"), redis_url="redis://127.0.0.1:6379/0")
    keys = create_keys(settings)
    bearer = {name: {"Authorization": f"Bearer {secret}"} for name, (_, secret) in keys.items()}
    now = int(time.time())
    claims = {"sub": "ann", "aud": "ragline", "exp": now + 3600, "tenant": "acme", "groups": ["hr", "ops"]}
    callers = {
        name: Caller(name, tenant, frozenset(groups), admin, bearer[name])
        for name, (tenant, groups, admin) in KEYS.items() if name != "acme-revoked"
    }
    callers["acme-eng"] = Caller("acme-eng", "acme", frozenset({"eng"}), False,
                                 {"X-API-Key": keys["acme-eng"][1]})  # the other header a key may come in
    callers["acme-jwt"] = Caller("acme-jwt", "acme", frozenset({"hr", "ops"}), False, token(claims))
    callers["globex-jwt"] = Caller(
        "globex-jwt", "globex", frozenset({"sales"}), False,
        token({**claims, "sub": "bob", "tenant": "globex", "groups": "sales"}),
    )
    admin_id, _ = keys["acme-admin"]
    bad_credentials = {
        "none": {},
        "forged key": {"Authorization": f"Bearer rl_{admin_id}_{'x' * 43}"},
        "forged X-API-Key": {"X-API-Key": f"rl_{admin_id}_{'x' * 43}"},
        "revoked key": bearer["acme-revoked"],
        "basic scheme": {"Authorization": "Basic YWRtaW46YWRtaW4="},
        "bearer without token": {"Authorization": "Bearer "},
        "truncated key": {"Authorization": bearer["acme-admin"]["Authorization"][:-5]},
        "key and X-API-Key": {**bearer["acme-admin"], "X-API-Key": keys["acme-eng"][1]},
        "expired jwt": token({**claims, "exp": now - 3600}),
        "jwt with a wrong signature": token(claims, "a-different-secret-of-sufficient-length-0"),
        "jwt of another audience": token({**claims, "aud": "someone-else"}),
        "jwt without a tenant": token({key: value for key, value in claims.items() if key != "tenant"}),
        "unsigned jwt": unsigned({**claims, "admin": True}),
    }
    components = Ragline(settings)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(settings, components)) as client:
        report = wait_until_ready(client.get)
        assert report["components"]["redis"]["status"] == "ready", report  # the shared answer cache is under test
        docs = {doc.name: doc for doc in planned_docs()}
        admins = {"acme": callers["acme-admin"].headers, "globex": callers["globex-admin"].headers}
        for doc in docs.values():
            name, groups = f"LEAKFILE-{doc.name}.md", ",".join(doc.groups)
            doc.job_id = upload(client, admins[doc.tenant], name, content(doc.text_tag), groups)["id"]
        for doc in docs.values():
            done = finished(client, admins[doc.tenant], doc.job_id)
            assert done["status"] == "succeeded", done
            doc.doc_id = done["doc_id"]
        assert len({doc.doc_id for doc in docs.values()}) == len(docs)
        yield World(client, callers, docs, bad_credentials)


@dataclass
class Probe:
    """Sends requests as one caller and keeps every body with the request that got it."""

    client: TestClient
    headers: dict[str, str]
    bodies: list[tuple[str, int, str]] = field(default_factory=list)

    def send(self, method: str, path: str, accept: str | None = None, **kwargs: Any) -> Any:
        headers = {**self.headers, **({"Accept": accept} if accept else {})}
        response = self.client.request(method, path, headers=headers, **kwargs)
        request = f"{method} {path} {accept or ''} {kwargs.get('json', '')}"
        self.bodies.append((request, response.status_code, response.text))
        return response

    def leaks(self, forbidden: set[str], doc_ids: set[str]) -> list[str]:
        return [
            f"{request} → {status}: {sorted(markers_in(body, doc_ids) & forbidden)}"
            for request, status, body in self.bodies if markers_in(body, doc_ids) & forbidden
        ]

    def seen(self, doc_ids: set[str]) -> set[str]:
        return set().union(*(markers_in(body, doc_ids) for _, _, body in self.bodies))


def ask_everywhere(probe: Probe, question: str) -> tuple[list[str], str]:
    """The question on every answering route and format: the answer ids it got, and the chat session it began."""
    ids = []
    body = {"query": question, "k": 20}
    answered = probe.send("POST", "/v1/query", json=body)
    assert answered.status_code == 200, answered.text
    ids.append(answered.json()["answer_id"])
    for accept in ("application/x-ndjson", "text/event-stream"):
        assert probe.send("POST", "/v1/query", accept, json=body).status_code == 200
    assert probe.send("POST", "/v1/query/stream", json=body).status_code == 200
    chat = probe.send("POST", "/v1/chat", json={"message": question, "k": 20})
    assert chat.status_code == 200, chat.text
    ids.append(chat.json()["answer_id"])
    completion = {"messages": [{"role": "user", "content": question}]}
    completed = probe.send("POST", "/v1/chat/completions", json=completion)
    assert completed.status_code == 200, completed.text
    ids.append(completed.json()["answer_id"])
    assert probe.send("POST", "/v1/chat/completions", json={**completion, "stream": True}).status_code == 200
    return ids, chat.json()["session_id"]


def test_no_caller_reads_a_document_outside_its_tenant_and_groups(world):
    client, doc_ids = world.client, {doc.doc_id for doc in world.docs.values()}
    probes = {name: Probe(client, caller.headers) for name, caller in world.callers.items()}
    sessions: dict[str, str] = {}
    answer_ids: dict[str, list[str]] = {}
    for name, caller in world.callers.items():
        probe = probes[name]
        for question in QUESTIONS:
            for options in SEARCH_MODES:
                found = probe.send("POST", "/v1/search", json={"query": question, "k": 20, "options": options})
                assert found.status_code == 200, found.text
        answer_ids[name], sessions[name] = ask_everywhere(probe, QUESTIONS[0])
        follow_up = probe.send("POST", "/v1/chat", json={"message": QUESTIONS[1], "session_id": sessions[name]})
        assert follow_up.status_code == 200, follow_up.text
        listed = probe.send("GET", "/v1/documents", params={"limit": 500})
        expected = {doc.doc_id for doc in world.docs.values() if caller.may_read(doc)}
        assert {item["id"] for item in listed.json()["items"]} == expected, name
        for doc in world.docs.values():
            status = probe.send("GET", f"/v1/documents/{doc.doc_id}").status_code
            assert status == (200 if caller.may_read(doc) else 404), (name, doc.name, status)
        jobs = probe.send("GET", "/v1/jobs", params={"limit": 500})
        assert {job["id"] for job in jobs.json()["items"]} == {
            doc.job_id for doc in world.docs.values() if caller.may_read(doc)
        }, name
        for doc in world.docs.values():
            status = probe.send("GET", f"/v1/jobs/{doc.job_id}").status_code
            assert status == (200 if caller.may_read(doc) else 404), (name, doc.name, status)
        assert probe.send("GET", "/v1/chat/sessions").status_code == 200
    for name, caller in world.callers.items():  # everyone else's conversations and answers
        probe = probes[name]
        for other, session_id in sessions.items():
            if other == name:
                continue
            assert probe.send("GET", f"/v1/chat/sessions/{session_id}").status_code == 404, (name, other)
            continued = probe.send("POST", "/v1/chat", json={"message": QUESTIONS[0], "session_id": session_id})
            assert continued.status_code == 404, (name, other)
            assert probe.send("DELETE", f"/v1/chat/sessions/{session_id}").status_code == 404
            for answer_id in answer_ids[other]:
                rated = probe.send("POST", "/v1/feedback", json={"answer_id": answer_id, "rating": 1})
                same_tenant = world.callers[other].tenant == caller.tenant
                assert rated.status_code == (201 if same_tenant else 404), (name, other, rated.text)
    leaks = {name: probe.leaks(world.forbidden(world.callers[name]), doc_ids) for name, probe in probes.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    for name, probe in probes.items():  # the positive side: each caller reads every document it may
        assert world.allowed_texts(world.callers[name]) <= probe.seen(doc_ids), name


COMPLETION = {"messages": [{"role": "user", "content": QUESTIONS[0]}]}
CONTENT_ROUTES = [
    ("POST", "/v1/search", {"json": {"query": QUESTIONS[0]}}),
    ("POST", "/v1/query", {"json": {"query": QUESTIONS[0]}}),
    ("POST", "/v1/query/stream", {"json": {"query": QUESTIONS[0]}}),
    ("POST", "/v1/chat", {"json": {"message": QUESTIONS[0]}}),
    ("POST", "/v1/chat/completions", {"json": COMPLETION}),
    ("POST", "/v1/chat/completions", {"json": {**COMPLETION, "stream": True}}),
    ("GET", "/v1/documents", {}),
    ("GET", "/v1/jobs", {}),
    ("GET", "/v1/chat/sessions", {}),
    ("GET", "/v1/feedback", {}),
]


def test_bad_credentials_get_a_json_401_or_403_and_nothing_else(world):
    doc_ids = {doc.doc_id for doc in world.docs.values()}
    routes = CONTENT_ROUTES + [("GET", f"/v1/documents/{doc.doc_id}", {}) for doc in world.docs.values()] + [
        ("GET", f"/v1/jobs/{doc.job_id}", {}) for doc in world.docs.values()
    ]
    for label, headers in world.bad_credentials.items():
        for method, path, kwargs in routes:
            for accept in ("application/json", "text/event-stream"):
                response = world.client.request(method, path, headers={**headers, "Accept": accept}, **kwargs)
                assert response.status_code in (401, 403), (label, method, path, response.status_code, response.text)
                assert response.headers["content-type"].startswith("application/json"), (label, path)
                body = response.json()
                assert set(body) == {"code", "message"} and body["code"] and body["message"], (label, path, body)
                assert not markers_in(response.text, doc_ids), (label, path, response.text)
        expected = 403 if label == "jwt without a tenant" else 401
        assert world.client.get("/v1/documents", headers=headers).status_code == expected, label


def test_a_cached_answer_reaches_no_one_outside_its_scope(world):
    """The privileged caller asks first, so the answer sits in the cache; then the others ask the same
    question, worded the same and slightly differently, in every format."""
    client, doc_ids = world.client, {doc.doc_id for doc in world.docs.values()}
    question = "Summarise all notes on the zephyr quartz turbine"
    body = {"query": question, "k": 20}
    admin = Probe(client, world.callers["acme-admin"].headers)
    admin.send("POST", "/v1/query", json=body)
    assert admin.send("POST", "/v1/query", json=body).json()["cached"] is True
    reworded = {**body, "query": question.lower().rstrip("?")}
    assert admin.send("POST", "/v1/query", json=reworded).json()["cached"] is True
    for name in ("acme-eng", "acme-nogroups", "acme-jwt", "globex-admin", "globex-eng", "globex-jwt", "acme-admin"):
        caller = world.callers[name]
        probe = Probe(client, caller.headers)
        for wording in (question, question.upper(), f"{question.rstrip('?')} exactly?"):
            for accept in (None, "application/x-ndjson", "text/event-stream"):
                assert probe.send("POST", "/v1/query", accept, json={**body, "query": wording}).status_code == 200
            completion = {"messages": [{"role": "user", "content": wording}]}
            assert probe.send("POST", "/v1/chat/completions", json=completion).status_code == 200
        assert probe.leaks(world.forbidden(caller), doc_ids) == [], name
        assert world.allowed_texts(caller) & probe.seen(doc_ids), name


def test_narrowing_a_documents_groups_takes_it_from_those_who_lost_it_cached_answers_too(world):
    client, doc_ids = world.client, {doc.doc_id for doc in world.docs.values()}
    doc = world.docs["acme-patch"]
    eng, sales = world.callers["acme-eng"], world.callers["acme-sales"]
    question = {"query": "Is a torque of 42 newton metres right for the zephyr quartz turbine?", "k": 20,
                "options": {"dedupe": False}}
    before = Probe(client, eng.headers)
    before.send("POST", "/v1/query", json=question)
    assert before.send("POST", "/v1/query", json=question).json()["cached"] is True
    before.send("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": question["query"]}]})
    assert doc.markers <= before.seen(doc_ids)
    patched = client.patch(f"/v1/documents/{doc.doc_id}", headers=world.callers["acme-admin"].headers,
                           json={"groups": ["sales"]})
    assert patched.status_code == 200 and patched.json()["groups"] == ["sales"], patched.text
    doc.groups = ["sales"]
    after = Probe(client, eng.headers)
    for accept in (None, "application/x-ndjson", "text/event-stream"):
        assert after.send("POST", "/v1/query", accept, json=question).status_code == 200
    after.send("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": question["query"]}]})
    after.send("POST", "/v1/search", json=question)
    after.send("GET", "/v1/documents", params={"limit": 500})
    assert after.send("GET", f"/v1/documents/{doc.doc_id}").status_code == 404
    assert after.leaks(world.forbidden(eng), doc_ids) == []
    assert world.allowed_texts(eng) & after.seen(doc_ids)
    kept = Probe(client, sales.headers)
    kept.send("POST", "/v1/query", json=question)
    assert f"LEAKMARK-{doc.text_tag}" in kept.seen(doc_ids)
    jobs = Probe(client, eng.headers)
    jobs.send("GET", "/v1/jobs", params={"limit": 500})
    jobs.send("GET", f"/v1/jobs/{doc.job_id}")
    assert jobs.leaks(world.forbidden(eng), doc_ids) == []  # a job follows its document's groups now


def test_a_non_admin_reuploading_a_documents_bytes_does_not_take_it_from_its_groups(world):
    """The same bytes uploaded again by a member of another group: under another name they are a document
    of the uploader's own; under the same name the document's readers keep it (only an admin changes who
    may read a document)."""
    client, doc_ids = world.client, {doc.doc_id for doc in world.docs.values()}
    doc = world.docs["acme-reupload"]
    eng, sales, admin = world.callers["acme-eng"], world.callers["acme-sales"], world.callers["acme-admin"]
    probe = Probe(client, eng.headers)
    copy = Doc(f"{doc.name}-copy", "acme", ["eng"], doc.text_tag)
    data = content(doc.text_tag).encode()
    response = probe.send("POST", "/v1/documents", files={"file": (f"LEAKFILE-{copy.name}.md", data)})
    assert response.status_code == 202, response.text
    done = finished(client, eng.headers, response.json()["id"])
    copy.doc_id, copy.job_id = done["doc_id"], done["id"]
    world.docs[copy.name] = copy
    assert copy.doc_id != doc.doc_id and done["groups"] == ["eng"]
    try:
        again = probe.send("POST", "/v1/documents", files={"file": (f"LEAKFILE-{doc.name}.md", data)})
        assert again.status_code == 202, again.text  # the same bytes and name for other groups: a document of its own
        own = Doc(doc.name, "acme", ["eng"], doc.text_tag)  # its file name is the uploader's to see
        done = finished(client, admin.headers, again.json()["id"])
        own.doc_id, own.job_id = done["doc_id"], done["id"]
        assert own.doc_id != doc.doc_id
        world.docs[f"{doc.name}-eng"] = own
        doc_ids.add(own.doc_id)
        groups = client.get(f"/v1/documents/{doc.doc_id}", headers=admin.headers).json()["groups"]
        assert groups == doc.groups, again.text  # only an admin's PATCH changes who may read a document
        assert client.get(f"/v1/documents/{doc.doc_id}", headers=sales.headers).status_code == 200
        assert probe.leaks(world.forbidden(eng), doc_ids | {copy.doc_id}) == []
    finally:
        client.patch(f"/v1/documents/{doc.doc_id}", headers=admin.headers, json={"groups": doc.groups})
