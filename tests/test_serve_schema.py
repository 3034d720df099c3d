"""Property-based tests of the service against its own OpenAPI document (schemathesis, in process).

Every operation gets generated requests, valid and invalid, sent with an
admin key of a tenant that has a document and a chat session: no request may
make the server fail (5xx), and every refusal must be the API's JSON
`{"code", "message"}`. What the fuzzing found is pinned below as plain
requests, so a fix is proven by name and a regression cannot hide behind
generation luck.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from scripted_llm_server import wait_until_ready
from test_serve_service import DEPLOY, finished, service_settings, upload

from ragline.app import Ragline
from ragline.serve.api import create_app
from ragline.serve.db import Database

pytestmark = pytest.mark.slow
EXAMPLES = 50
"""Generated requests per operation and mode (valid, invalid): about a minute on two cores in all."""
BEYOND_INT64 = 2**70
@dataclass
class Service:
    client: TestClient
    headers: dict[str, str]
    ids: dict[str, str]
    """Real ids of each path parameter: a document, its job, a chat session of the admin."""

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        headers = {**self.headers, **({"Content-Type": "application/json"} if body is not None else {})}
        return self.client.request(method, path, headers=headers, content=body)

    def send(self, case: schemathesis.Case) -> Any:
        """A generated request, sent through the TestClient that runs the app's lifespan (schemathesis would
        start and stop the lifespan itself, and the app starts only once)."""
        kwargs = case.as_transport_kwargs(base_url=str(self.client.base_url), headers=self.headers)
        kwargs.pop("cookies", None)  # the API reads none
        body = kwargs.pop("data", None)
        if isinstance(body, bytes | str):
            kwargs["content"] = body
        elif body is not None:
            kwargs["data"] = body
        if kwargs.get("files"):  # invalid uploads may hold numbers or None where the client wants bytes
            kwargs["files"] = [(name, _file_part(part)) for name, part in kwargs["files"]]
        response = self.client.request(**kwargs)
        response.request.read()  # a multipart upload streams; schemathesis reads the request back
        return response


def _file_part(part: Any) -> Any:
    """A multipart part the HTTP client can send: (filename, bytes[, type]) or bytes."""
    def raw(value: Any) -> bytes | str:
        return value if isinstance(value, bytes | str) else json.dumps(value).encode()

    if isinstance(part, tuple):
        return (part[0], raw(part[1]), *part[2:])
    return raw(part)


def admin_token(settings) -> str:
    async def create() -> str:
        db = Database.from_settings(settings)
        try:
            await db.migrate()
            return (await db.keys.create("acme", [], admin=True, name="schemathesis"))[1]
        finally:
            await db.close()

    return asyncio.run(create())


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder):
    """The app started and ready, with an indexed document and a chat session; a 500 comes back as a response."""
    config = service_settings(tmp_path_factory.mktemp("schema"))
    headers = {"Authorization": f"Bearer {admin_token(config)}"}
    components = Ragline(config)
    components.__dict__["embedder"] = embedder
    with TestClient(create_app(config, components), raise_server_exceptions=False) as client:
        wait_until_ready(client.get)
        done = finished(client, headers, upload(client, headers, "deploy.md", DEPLOY, "eng")["id"])
        assert done["status"] == "succeeded", done
        chat = client.post("/v1/chat", headers=headers, json={"message": "Which port does the image use?"})
        assert chat.status_code == 200, chat.text
        yield Service(client, headers, {"doc_id": done["doc_id"], "job_id": done["id"],
                                        "session_id": chat.json()["session_id"]})


def error_body_problem(status: int, content_type: str, text: str) -> str:
    """Why an error response is not the API's JSON {code, message} ("" when it is)."""
    if status < 400:
        return ""
    if not content_type.startswith("application/json"):
        return f"not JSON ({content_type}): {text[:200]}"
    body = json.loads(text)
    if not isinstance(body, dict) or set(body) != {"code", "message"}:
        return f"not {{code, message}}: {text[:200]}"
    if not all(isinstance(value, str) and value for value in body.values()):
        return f"empty code or message: {text[:200]}"
    return ""


def problems_of(service: Service, operation, mode: GenerationMode, **fixed: Any) -> dict[tuple[str, str], str]:
    """What went wrong on the requests generated for one operation: (operation, problem) → the first request."""
    found: dict[tuple[str, str], str] = {}

    @given(case=operation.as_strategy(mode, **fixed))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None, phases=[Phase.explicit, Phase.generate])
    def probe(case) -> None:
        response = service.send(case)
        try:
            case.validate_response(response, checks=[not_a_server_error])
            problem = error_body_problem(response.status_code, response.headers.get("content-type", ""), response.text)
        except FailureGroup:
            problem = f"server error: {response.text[:100]}"
        if problem:
            kind = problem[:60]
            request = f"{response.status_code} {problem[:300]}\n    {case.as_curl_command()}"
            found.setdefault((operation.label, kind), request)

    try:
        probe()
    except Unsatisfiable:  # an operation without inputs has no invalid request
        assert mode is GenerationMode.NEGATIVE, operation.label
    return found


def test_no_generated_request_makes_the_server_fail_and_every_refusal_is_json(service):
    schema = schemathesis.openapi.from_dict(service.client.get("/openapi.json").json())
    schema.config.generation.update(with_security_parameters=False)  # the admin key is sent instead
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [operation.label for operation in operations]
    problems: dict[tuple[str, str], str] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            problems.update(problems_of(service, operation, mode))
        names = {parameter.name for parameter in operation.path_parameters}
        if names and operation.method.upper() != "DELETE":  # and on what exists, not only on unknown ids
            real = {name: service.ids[name] for name in names}
            problems.update(problems_of(service, operation, GenerationMode.POSITIVE, path_parameters=real))
    assert problems == {}, "\n".join(f"{label}: {request}" for (label, _), request in problems.items())


READ = {200, 422}
REFUSED = {422}


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    pytest.param("GET", f"/v1/jobs?offset={BEYOND_INT64}", None, READ),
    pytest.param("GET", f"/v1/feedback?offset={BEYOND_INT64}", None, READ),
    pytest.param("GET", f"/v1/chat/sessions?offset={BEYOND_INT64}", None, READ),
    pytest.param("GET", f"/v1/chat/sessions?limit={BEYOND_INT64}", None, READ),
    pytest.param("GET", f"/v1/documents?offset={BEYOND_INT64}", None, READ),
    pytest.param("POST", "/v1/search", '{"query": " "}', REFUSED),
    pytest.param("POST", "/v1/query", '{"query": "\\t\\n "}', REFUSED),
    pytest.param("POST", "/v1/query/stream", '{"query": " "}', REFUSED),
    pytest.param("POST", "/v1/chat", '{"message": " "}', REFUSED),
    pytest.param("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": " "}]}', REFUSED),
    pytest.param("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "port \\udfff"}]}',
                 REFUSED),
    pytest.param("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}, '
                 '{"role": "assistant", "content": "yes"}, {"role": "user", "content": "which port?"}]}', REFUSED),
    pytest.param("POST", "/v1/query", '{"query": "port?", "history": [{"role": "user", "content": "\\ud800"}]}',
                 REFUSED),
    pytest.param("POST", "/v1/search", '{"query": "port \\ud800"}', REFUSED),
    pytest.param("POST", "/v1/search", '{"query": "port", "filters": {"format": "\\ud800"}}', REFUSED),
    pytest.param("POST", "/v1/search", f'{{"query": "port", "filters": {{"chunk_index": {BEYOND_INT64}}}}}', REFUSED),
    pytest.param("POST", "/v1/search",
                 f'{{"query": "port", "filters": {{"chunk_index": {{"$in": [{BEYOND_INT64}]}}}}}}', REFUSED),
    pytest.param("POST", "/v1/search", '{"query": "NEAR(port docker) OR \\"", "options": {"mode": "keyword"}}', {200}),
])
def test_edge_inputs_found_by_fuzzing_get_a_json_answer_not_a_5xx(service, method, path, body, expected):
    response = service.request(method, path, body.encode() if body is not None else None)
    assert response.status_code in expected, response.text
    assert not error_body_problem(response.status_code, response.headers.get("content-type", ""), response.text)
