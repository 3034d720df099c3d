"""Object-store sources (s3://bucket/prefix) against moto's real S3 server on loopback, one per module.

The same incremental ingest as for folders: first run, new, changed (by ETag) and deleted objects, the limits,
excludes and secrets on keys, a missing bucket (an error, never a deletion), the same ids as the same files in
a folder of the same name, the CLI, and `engine: ray` (the driver reads the objects).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import boto3  # the dev extra installs moto[server] and s3fs
import pytest

from ragline.app import Ragline
from ragline.cli import run
from ragline.config import Settings, SourceSettings
from ragline.ingest.sources import list_entries
from ragline.pipeline import IngestError, document_id
from ragline.store.base import Scope
from test_pipeline import make_app  # noqa: F401 (a fixture)

EVERYTHING = Scope.everything()
TEMPLATE = "https://docs.example.org/{path}.html"
FILES = {
    "guide/install.md": "# Installing\n\n## From PyPI\n\nRun pip install ragline to get the package.\n",
    "guide/tuning.md": "# Tuning\n\n## Batch size\n\nA larger embedding batch size raises throughput on CPUs.\n",
    "notes.txt": "The office cat is called Turing and sleeps on the server rack.\n",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port, for the module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint):
    """A bucket of the test's own, and a client to fill it."""
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    name = f"docs-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)

    class Bucket:
        endpoint = s3_endpoint

        def put(self, key: str, body: str | bytes) -> None:
            client.put_object(Bucket=name, Key=key, Body=body.encode() if isinstance(body, str) else body)

        def delete(self, key: str) -> None:
            client.delete_object(Bucket=name, Key=key)

        def source(self, prefix: str = "docs", **options) -> SourceSettings:
            return SourceSettings(
                path=f"s3://{name}/{prefix}", url_template=options.pop("url_template", TEMPLATE),
                storage_options=storage_options(s3_endpoint), **options,
            )

    Bucket.name = name
    return Bucket()


def storage_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1"}


def fill(bucket, prefix: str = "docs") -> None:
    for key, text in FILES.items():
        bucket.put(f"{prefix}/{key}", text)


def names(paths: list[str]) -> list[str]:
    return sorted(path.rsplit("/", 1)[-1] for path in paths)


def test_a_bucket_prefix_is_indexed_then_new_changed_and_deleted_objects_are_picked_up(bucket, make_app):
    fill(bucket)
    bucket.put("docs/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(64))  # unsupported
    bucket.put("docs/.github/workflows/ci.md", "# CI\n\nhidden folder: excluded\n")
    bucket.put("docs/keys/id_rsa", "not read")  # a secret's name: reported
    bucket.put("docs/broken.pdf", b"%PDF-1.4 this is no PDF")  # one bad object fails alone
    bucket.put("docs/empty-folder/", b"")  # a folder marker
    bucket.put("docs-other/outside.md", "# Outside\n\nnot under the prefix\n")
    app = make_app()
    source = bucket.source()
    report = app.indexer().run([source])
    assert names(report.new) == ["install.md", "notes.txt", "tuning.md"]
    assert all(path.startswith(f"s3://{bucket.name}/docs/") for path in report.new)
    assert [path for path, _ in report.failed] == [f"s3://{bucket.name}/docs/broken.pdf"]
    assert dict(report.skipped) == {f"s3://{bucket.name}/docs/keys/id_rsa": "name matches ingest.exclude_secrets 'id_rsa*'"}
    assert report.unsupported == 1
    records = {r.source: r for r in app.store.documents() if r.status == "indexed"}
    assert {r.root for r in records.values()} == {f"s3://{bucket.name}/docs"}
    hit = app.retriever.search("how big should the embedding batch be?", k=1, scope=EVERYTHING).hits[0]
    assert hit.chunk.citation_url == "https://docs.example.org/guide/tuning.html#batch-size"
    assert hit.chunk.metadata["source"] == "guide/tuning.md"
    assert hit.chunk.doc_id == document_id("docs", "guide/tuning.md")

    again = app.indexer().run([source])
    assert (again.new, again.changed, again.deleted, again.chunks, again.unchanged) == ([], [], [], 0, 3)

    bucket.put("docs/guide/faq.md", "# FAQ\n\nThe answer to the usual question is forty-two.\n")
    bucket.put("docs/guide/tuning.md", "# Tuning\n\n## Threads\n\nOne thread per core is the default.\n")
    bucket.put("docs/notes.txt", FILES["notes.txt"])  # written again, the same bytes: the same ETag
    bucket.delete("docs/guide/install.md")
    report = app.indexer().run([source])
    assert names(report.new) == ["faq.md"] and names(report.changed) == ["tuning.md"]
    assert report.deleted == [f"s3://{bucket.name}/docs/guide/install.md"] and report.unchanged == 1
    texts = " ".join(h.chunk.text for h in app.retriever.search("threads per core", k=3, scope=EVERYTHING).hits)
    assert "One thread per core" in texts and "batch size raises" not in texts
    hits = app.retriever.search("pip install ragline", k=10, scope=EVERYTHING).hits
    assert "guide/install.md" not in {h.chunk.metadata["source"] for h in hits}


def test_keys_with_spaces_unicode_and_dot_dot_are_indexed_and_includes_read_nothing_local(bucket, make_app, tmp_path):
    keys = {
        "docs/with space/Ünïcødé guide.md": "# Unicode\n\nThe glacier report covers the alpine valleys.\n",
        "docs/dots..in the name/v1..2 notes.md": "# Dots\n\nThe dotted page describes the lighthouse schedule.\n",
    }
    for key, text in keys.items():
        bucket.put(key, text)
    odd = ["docs/a/../b.md", "docs/./c.md", "docs/d//e.md"]  # keys no folder could hold: reported, not indexed
    for key in odd:
        bucket.put(key, "# Odd\n\nThe orchard harvest.\n")
    secret = tmp_path / "local-secret.md"
    secret.write_text("LOCAL FILE CONTENT that must never be indexed\n")
    bucket.put("docs/page.md", f"# Page\n\nThe page body.\n\n```{{include}} {secret}\n```\n\n```{{include}} ../x.md\n```\n")
    app = make_app()
    report = app.indexer().run([bucket.source(url_template=None)])
    assert report.failed == []
    assert sorted(path for path, _ in report.skipped) == sorted(f"s3://{bucket.name}/{key}" for key in odd)
    assert all("'..' part" in reason for _, reason in report.skipped)
    expected = {f"s3://{bucket.name}/{key}" for key in [*keys, "docs/page.md"]}
    assert set(report.new) == expected
    assert {r.source for r in app.store.documents()} == expected
    sources = {h.chunk.metadata["source"] for h in app.retriever.search("glacier alpine", k=3, scope=EVERYTHING).hits}
    assert "with space/Ünïcødé guide.md" in sources
    hit = next(h for h in app.retriever.search("glacier alpine", k=3, scope=EVERYTHING).hits
               if h.chunk.metadata["source"] == "with space/Ünïcødé guide.md")
    assert hit.chunk.citation_url.startswith(f"s3://{bucket.name}/docs/with%20space/")
    dots = app.retriever.search("lighthouse schedule", k=1, scope=EVERYTHING).hits[0]
    dotted = "dots..in the name/v1..2 notes.md"
    assert dots.chunk.metadata["source"] == dotted and dots.chunk.doc_id == document_id("docs", dotted)
    notes = [note for path, note in report.notes if path.endswith("/page.md")]
    assert len(notes) == 2 and all("not read" in note for note in notes)
    everything = " ".join(c.text for r in app.store.documents() for c in app.store.document_chunks(r.doc_id))
    assert "LOCAL FILE CONTENT" not in everything
    again = app.indexer().run([bucket.source(url_template=None)])
    assert again.unchanged == 3 and again.new == again.changed == again.deleted == []


def test_an_object_over_the_size_limit_is_reported_and_skipped(bucket, make_app):
    fill(bucket)
    bucket.put("docs/huge.md", "# Huge\n\n" + "word " * 600)  # 3 KB
    app = make_app(max_file_mb=0.002)  # about 2 KB
    report = app.indexer().run([bucket.source()])
    assert names(report.new) == ["install.md", "notes.txt", "tuning.md"]
    [(path, reason)] = report.failed
    assert path == f"s3://{bucket.name}/docs/huge.md" and "over the 0.002 MB limit (ingest.max_file_mb)" in reason


def test_a_missing_bucket_or_empty_prefix_or_dead_endpoint_is_an_error_that_deletes_nothing(bucket, make_app):
    fill(bucket)
    app = make_app()
    app.indexer().run([bucket.source(name="docs")])
    gone = SourceSettings(path=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/docs", name="docs",
                          storage_options=storage_options(bucket.endpoint))
    with pytest.raises(IngestError, match="no such bucket.*nothing was changed"):
        app.indexer().run([gone], prune_other_roots=True)
    with pytest.raises(IngestError, match="no objects under .*nothing was changed"):
        app.indexer().run([bucket.source("typo", name="docs")], prune_other_roots=True)
    dead = SourceSettings(
        path=f"s3://{bucket.name}/docs", storage_options={
            **storage_options("http://127.0.0.1:9"), "config_kwargs": {"retries": {"max_attempts": 1}},
        },
    )
    with pytest.raises(IngestError, match="cannot list .*127.0.0.1:9"):
        app.indexer().run([dead])
    assert len(app.store.documents()) == 3 and app.store.count() > 0


def test_the_same_files_in_a_bucket_and_a_folder_of_the_same_name_get_the_same_ids(bucket, make_app, tmp_path):
    fill(bucket)
    folder = tmp_path / "local" / "docs"
    for key, text in FILES.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_text(text)
    remote, local = make_app(data_dir=tmp_path / "remote-index"), make_app(data_dir=tmp_path / "local-index")
    remote.indexer().run([bucket.source()])
    local.indexer().run([SourceSettings(path=folder, url_template=TEMPLATE)])
    ids = [{r.doc_id: tuple(r.chunk_ids) for r in app.store.documents()} for app in (remote, local)]
    assert ids[0] == ids[1] and len(ids[0]) == 3

    # and an index whose folder moved to the bucket under the same name follows it without embedding again
    shutil.rmtree(folder)
    report = local.indexer().run([bucket.source()])
    assert (report.new, report.changed, report.deleted, report.chunks, report.unchanged) == ([], [], [], 0, 3)
    assert {r.root for r in local.store.documents()} == {f"s3://{bucket.name}/docs"}


def test_listing_gives_the_stamps_a_poller_compares(bucket):
    fill(bucket)
    settings = Settings(ingest={"sources": [bucket.source().model_dump()]}).ingest
    before = {e.relative: e for e in list_entries(settings.sources[0], settings)}
    assert sorted(before) == sorted(FILES) and all(e.stamp and e.size for e in before.values())
    bucket.put("docs/notes.txt", "The office cat moved to the kitchen.\n")
    after = {e.relative: e for e in list_entries(settings.sources[0], settings)}
    changed = {name for name in FILES if after[name].stamp != before[name].stamp}
    assert changed == {"notes.txt"}


def test_secrets_in_storage_options_are_masked_in_config_show(bucket, tmp_path, capsys, monkeypatch):
    config = tmp_path / "ragline.yaml"
    config.write_text(
        f"ingest:\n  sources:\n    - path: s3://{bucket.name}/docs\n      storage_options:\n"
        f"        endpoint_url: {bucket.endpoint}\n        key: AKIAEXAMPLE\n        secret: very-secret-value\n"
    )
    assert run(["--config", str(config), "config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "very-secret-value" not in shown and "AKIAEXAMPLE" not in shown
    assert f"path: s3://{bucket.name}/docs" in shown and bucket.endpoint in shown


def test_the_cli_ingests_an_s3_url_with_credentials_from_the_environment(bucket, tmp_path, capsys, monkeypatch):
    fill(bucket)
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "RAGLINE_DATA_DIR": str(tmp_path / "index"), "AWS_ENDPOINT_URL": bucket.endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    assert run(["ingest", f"s3://{bucket.name}/docs/", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert names(report["new"]) == ["install.md", "notes.txt", "tuning.md"]
    assert run(["search", "what is the office cat called?", "-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["hits"][0]
    assert top["source"] == "notes.txt" and top["url"] == f"s3://{bucket.name}/docs/notes.txt"
    bucket.delete("docs/notes.txt")
    (tmp_path / "ragline.yaml").write_text(  # configured: a URL inside it is that source, synced only there
        f"ingest:\n  sources:\n    - path: s3://{bucket.name}/docs\n      tenant: acme\n"
    )
    assert run(["ingest", f"s3://{bucket.name}/docs/guide", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["unchanged"], report["deleted"], report["new"], report["access_changed"]) == (
        2, [], [], [f"s3://{bucket.name}/docs/guide/install.md", f"s3://{bucket.name}/docs/guide/tuning.md"]
    )
    assert run(["ingest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [f"s3://{bucket.name}/docs/notes.txt"]


@pytest.mark.slow
def test_engine_ray_reads_the_objects_on_the_driver(bucket, tmp_path, embedder):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ragline.cluster.ray_ingest import keep_ray_sockets_short

    keep_ray_sockets_short()
    ray = pytest.importorskip("ray")
    fill(bucket)
    bucket.put("docs/broken.pdf", b"%PDF-1.4 this is no PDF")
    app = Ragline(Settings(data_dir=tmp_path / "ray", engine="ray", ray={"parse_batch_files": 2}))
    app.__dict__["embedder"] = embedder
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # both runs use it
    try:
        report = app.indexer().run([bucket.source()])
        assert names(report.new) == ["install.md", "notes.txt", "tuning.md"]
        assert [path for path, _ in report.failed] == [f"s3://{bucket.name}/docs/broken.pdf"]
        assert {r.doc_id for r in app.store.documents() if r.status == "indexed"} == {
            document_id("docs", relative) for relative in FILES
        }
        hit = app.retriever.search("what is the office cat called?", k=1, scope=EVERYTHING).hits[0]
        assert hit.chunk.metadata["source"] == "notes.txt"
        bucket.delete("docs/notes.txt")
        report = app.indexer().run([bucket.source()])
        assert report.deleted == [f"s3://{bucket.name}/docs/notes.txt"] and report.unchanged == 2
    finally:
        app.close()
        if ray.is_initialized():
            ray.shutdown()
