"""`ragline serve` as real processes over the real PostgreSQL and Redis: a server killed mid-job resumes the
job after a restart, several worker processes share one index, `ragline cache warm` fills the cache the
server reads, and the server refuses to expose an unauthenticated API beyond loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from scripted_llm_server import free_port

RAGLINE = [sys.executable, "-m", "ragline"]
HTTP_TIMEOUT_S = 30.0  # a guard against a hung server on a loaded machine, far beyond a request's length


def ragline(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RAGLINE, "--config", str(config), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


class Server:
    def __init__(self, config: Path, port: int, *args: str):
        self.url = f"http://127.0.0.1:{port}"
        # Its log goes to a file: a pipe nobody reads fills up (64 KiB of request logs) and blocks the server.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [*RAGLINE, "--config", str(config), "serve", "--port", str(port), *args],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def ready(self, deadline_s: float = 180) -> None:
        deadline = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited: {self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"the server did not get ready: {last}; {self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server's process group with `sig`; one that outlasts a SIGTERM's grace is killed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture
def config(tmp_path, postgres_url) -> Path:
    path = tmp_path / "ragline.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "generate": {"llm": {"backend": "extractive"}},
        "serve": {
            "auth": {"enabled": True}, "database_url": postgres_url, "redis_url": "redis://127.0.0.1:6379/0",
            "job_lease_s": 2, "rate_limits": {"enabled": False},
        },
    }))
    return path


def admin_token(config: Path, tenant: str) -> dict[str, str]:
    created = ragline(config, "keys", "create", "--tenant", tenant, "--admin", "--json")
    assert created.returncode == 0, created.stderr
    return {"Authorization": f"Bearer {json.loads(created.stdout)['token']}"}


@pytest.mark.slow
def test_a_job_interrupted_by_kill_9_is_resumed_by_the_next_server(config, tmp_path):
    headers = admin_token(config, "acme")
    sections = "\n\n".join(
        f"## Topic {n}\n\n" + " ".join(f"Fact {n}.{i} says the widget number {n * 100 + i} is blue." for i in range(40))
        for n in range(120)
    )
    port = free_port()
    server = Server(config, port)
    client = httpx.Client(base_url=server.url, headers=headers, timeout=HTTP_TIMEOUT_S)
    try:
        server.ready()
        upload = client.post("/v1/documents", files={"file": ("widgets.md", f"# Widgets\n\n{sections}\n".encode())})
        assert upload.status_code == 202, upload.text
        job_id = upload.json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued":
            if time.monotonic() > deadline:
                pytest.fail("the job was never claimed")
            time.sleep(0.05)
        server.kill()  # mid-job: the lease stops being renewed
    finally:
        server.kill()
    server = Server(config, port, "--workers", "2")
    try:
        server.ready()
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
            assert job["status"] != "failed", job
            if time.monotonic() > deadline:
                pytest.fail(f"the job did not finish: {job}")
            time.sleep(0.2)
        assert job["attempts"] >= 2  # claimed again after the kill
        documents = client.get("/v1/documents").json()
        assert documents["total"] == 1 and documents["items"][0]["status"] == "indexed"
        search = client.post("/v1/search", json={"query": "widget number 4711", "k": 3})
        assert search.status_code == 200 and search.json()["hits"]
        # both worker processes serve, and /metrics adds up their requests
        for _ in range(20):
            assert client.get("/v1/documents").status_code == 200
        metrics = client.get("/metrics").text
        served = sum(
            float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("ragline_requests_total{") and 'route="/v1/documents"' in line and 'method="GET"' in line
        )
        assert served >= 21
    finally:
        client.close()
        server.kill(signal.SIGTERM)


@pytest.mark.slow
def test_cache_warm_fills_the_cache_the_server_answers_from(config, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "deploy.md").write_text("# Deploying\n\n## Docker\n\nThe Docker image listens on port 8000 by default.\n")
    settings = yaml.safe_load(config.read_text())
    settings["ingest"] = {"sources": [{"path": str(docs), "tenant": "acme"}]}
    config.write_text(yaml.safe_dump(settings))
    assert ragline(config, "ingest").returncode == 0
    question = f"Which port does the Docker image listen on? ({uuid.uuid4().hex[:6]})"
    (tmp_path / "questions.txt").write_text(f"# warm these\n{question}\n")
    warmed = ragline(config, "cache", "warm", str(tmp_path / "questions.txt"), "--tenant", "acme")
    assert warmed.returncode == 0, warmed.stderr
    assert "1 answers cached" in warmed.stdout
    headers = admin_token(config, "acme")
    server = Server(config, free_port())
    try:
        server.ready()
        answer = httpx.post(f"{server.url}/v1/query", headers=headers, json={"query": question}, timeout=60).json()
        assert answer["cached"] is True and "8000" in answer["answer"]
    finally:
        server.kill(signal.SIGTERM)


def test_serve_refuses_a_public_address_without_authentication(tmp_path):
    path = tmp_path / "ragline.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    refused = ragline(path, "serve", "--host", "0.0.0.0", timeout=60)
    assert refused.returncode != 0
    assert "authentication off" in refused.stderr and "--insecure" in refused.stderr
