"""The `ragline` command line: ingest, search, ask, status, serve, eval, tune, config show."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from ragline.app import Ragline
from ragline.cli.common import (
    FILTER_OPTION, MODE_OPTION, RERANK_OPTION, RETRIEVE_OPTION, TENANT_OPTION, BarProgress, State, err, out,
    parse_filters, retrieve_overrides,
)
from ragline.cli.cache import cache_cli
from ragline.cli.eval import eval_cli
from ragline.cli.keys import keys_cli
from ragline.cli.store import store_cli
from ragline.cli.tune import tune_command
from ragline.cli.watch import watch_command
from ragline.config import ConfigError, Settings
from ragline.embed.base import EmbedderError
from ragline.generate.base import LLMError
from ragline.ingest.sources import explicit_source
from ragline.pipeline import IngestError, IngestReport
from ragline.registry import UnknownComponentError
from ragline.retrieve.retriever import Retrieval, RetrievalError
from ragline.store.base import DEFAULT_TENANT, Scope, StoreError
from ragline.types import AnswerEvent, StatusEvent, TokenEvent

EXIT_RUN_FAILED = 1
EXIT_FILES_FAILED = 3
KNOWN_ERRORS = (
    ConfigError, IngestError, EmbedderError, StoreError, RetrievalError, UnknownComponentError, LLMError, ValueError,
)

cli = typer.Typer(
    help="Ragline: index documents, search them with citations, serve them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
config_cli = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
cli.add_typer(config_cli, name="config")
router_cli = typer.Typer(help="The cheap/strong model router.", no_args_is_help=True)
cli.add_typer(router_cli, name="router")
llm_cli = typer.Typer(help="The configured LLM.", no_args_is_help=True)
cli.add_typer(llm_cli, name="llm")
cli.add_typer(eval_cli, name="eval")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(cache_cli, name="cache")
cli.add_typer(store_cli, name="store")


@cli.callback()
def main_options(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", envvar="RAGLINE_CONFIG", help="YAML config file (default: ./ragline.yaml)"),
    ] = None,
) -> None:
    State.config_file = config


def _print_report(report: IngestReport) -> None:
    table = Table(title="ingest summary", show_header=False)
    for label, value in [
        ("new files", len(report.new)),
        ("changed files", len(report.changed)),
        ("unchanged files", report.unchanged),
        ("deleted files", len(report.deleted)),
        ("failed files", len(report.failed)),
        ("skipped files (secrets, links, twins)", len(report.skipped)),
        ("unsupported files (skipped)", report.unsupported),
        ("chunks written", report.chunks),
        ("seconds", f"{report.seconds:.1f}"),
    ]:
        table.add_row(label, str(value))
    out.print(table)
    for path, reason in report.failed:
        out.print(f"[red]failed[/red] {escape(path)}: {escape(reason)}")
    for path, reason in report.skipped:
        out.print(f"[yellow]skipped[/yellow] {escape(path)}: {escape(reason)}")
    for path, note in report.notes:
        out.print(f"[dim]note[/dim] {escape(path)}: {escape(note)}")


ENGINE_OPTION = typer.Option("--engine", help="local or ray (default: engine)")
ADDRESS_OPTION = typer.Option(
    "--address", help="with --engine ray: auto, ray://HOST:PORT, HOST:PORT or local (default: ray.address)"
)


def _with_engine(settings: Settings, engine: str | None, address: str | None) -> Settings:
    """The settings with this call's `--engine` and `--address`."""
    if engine not in (None, "local", "ray"):
        raise typer.BadParameter(f"{engine!r} is not an engine: give local or ray", param_hint="--engine")
    ray = settings.ray if address is None else settings.ray.model_copy(update={"address": address})
    return settings.model_copy(update={"engine": engine or settings.engine, "ray": ray})


@cli.command()
def ingest(
    paths: Annotated[
        Optional[list[str]],
        typer.Argument(help="folders, files or object-store URLs (s3://bucket/prefix) (default: ingest.sources)"),
    ] = None,
    url_template: Annotated[
        Optional[str], typer.Option(help="public URL of each file, e.g. https://docs.example.org/{path}.html")
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(help="with one PATH: the source's name, part of its documents' identity (default: its folder's)"),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="drop the index and rebuild it")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit non-zero when any file failed")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="queue behind an ingest already running on the index")] = False,
    wait_timeout: Annotated[
        float, typer.Option(min=0, help="with --wait: give up after this many seconds")
    ] = 3600.0,
    engine: Annotated[Optional[str], ENGINE_OPTION] = None,
    address: Annotated[Optional[str], ADDRESS_OPTION] = None,
) -> None:
    """Index folders incrementally: new and changed files are (re)indexed, deleted ones removed.

    Without PATHs, the folders of ingest.sources are synced and files of folders no longer
    listed there are removed; with PATHs, only those folders are synced (a PATH inside a configured
    source keeps its tenant and groups; any other goes to the default tenant, for everyone in it).
    With --engine ray, files are parsed and embedded on a Ray cluster (ray.* settings) and written from here.
    """
    settings = _with_engine(State.settings(), engine, address)
    explicit = [explicit_source(p, url_template, settings.ingest.sources) for p in paths or []]
    if name is not None:
        if len(explicit) != 1:
            raise typer.BadParameter("--name names one source: give exactly one PATH with it", param_hint="--name")
        if not name.strip():
            raise typer.BadParameter("a source's name may not be empty", param_hint="--name")
        explicit = [explicit[0].model_copy(update={"name": name})]
    sources = explicit or settings.ingest.sources
    if not sources:
        raise ConfigError("nothing to ingest: give PATH arguments or set ingest.sources in the config")
    app = Ragline(settings)
    progress = BarProgress()
    try:
        indexer = app.indexer(progress, wait_s=wait_timeout if wait else None)
        report = indexer.run(sources, full=full, prune_other_roots=not explicit)
    finally:
        progress.stop()
        app.close()
    if json_output:
        print(json.dumps(report.to_dict()))
    else:
        _print_report(report)
    if strict and report.failed:
        raise typer.Exit(EXIT_FILES_FAILED)


def _print_hits(result: Retrieval) -> None:
    if not result.hits:
        out.print("[yellow]no passages found[/yellow] (is the index empty? run `ragline ingest`)")
    for rank, hit in enumerate(result.hits, 1):
        meta = hit.chunk.metadata
        out.rule(f"[bold]{rank}. {escape(meta.get('title', ''))}[/bold]  score {hit.score:.3f}")
        out.print(f"[cyan]{escape(hit.chunk.citation_url)}[/cyan]")
        out.print(escape(hit.chunk.text))


def _as_json(result: Retrieval) -> str:
    return json.dumps({
        "query": result.query, "hits": [hit.to_dict() for hit in result.hits], "timings": result.timings,
        "notes": result.notes,
    })


@cli.command()
def search(
    query: Annotated[Optional[str], typer.Argument(help="the question")] = None,
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=1000, help="how many passages (default: retrieve.top_k)")] = None,
    queries: Annotated[
        Optional[Path], typer.Option(help="file with one query per line; prints one JSON line per query")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    filters: Annotated[Optional[list[str]], FILTER_OPTION] = None,
    mode: Annotated[Optional[str], MODE_OPTION] = None,
    rerank: Annotated[Optional[str], RERANK_OPTION] = None,
    retrieve: Annotated[Optional[list[str]], RETRIEVE_OPTION] = None,
    tenant: Annotated[str, TENANT_OPTION] = DEFAULT_TENANT,
) -> None:
    """Find the passages that answer a question, each cited by its section URL."""
    if (query is None) == (queries is None):
        raise typer.BadParameter("give either a QUERY or --queries FILE")
    if queries is not None and not queries.is_file():
        raise typer.BadParameter(f"{queries} is not a file", param_hint="--queries")
    texts = [query] if query is not None else [
        line.strip() for line in queries.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    settings = State.settings()
    options = retrieve_overrides(settings.retrieve, mode, rerank, retrieve)
    app = Ragline(settings)
    try:
        wanted = parse_filters(filters, app.store.filter_fields())  # before the model loads: bad input fails fast
        results = app.retriever.search_many(texts, k, wanted, options, scope=Scope.everything(tenant))
    finally:
        app.close()
    for result in results:
        if json_output or queries is not None:
            print(_as_json(result))
        else:
            _print_hits(result)


@cli.command()
def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=100, help="passages to answer from")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="print the answer when it is complete")] = False,
    filters: Annotated[Optional[list[str]], FILTER_OPTION] = None,
    mode: Annotated[Optional[str], MODE_OPTION] = None,
    rerank: Annotated[Optional[str], RERANK_OPTION] = None,
    retrieve: Annotated[Optional[list[str]], RETRIEVE_OPTION] = None,
    tenant: Annotated[str, TENANT_OPTION] = DEFAULT_TENANT,
) -> None:
    """Answer a question from the indexed documents, with [n] citations to their sections."""
    settings = State.settings()
    options = retrieve_overrides(settings.retrieve, mode, rerank, retrieve)
    app = Ragline(settings)
    live = not (json_output or no_stream)
    final: dict = {}
    streamed = False
    try:
        wanted = parse_filters(filters, app.store.filter_fields())
        for event in app.ask(question, k, wanted, options, scope=Scope.everything(tenant)):
            if isinstance(event, TokenEvent) and live:
                out.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
                streamed = True
            elif isinstance(event, StatusEvent):
                err.print(f"[dim]{event.stage}…[/dim]")
            elif isinstance(event, AnswerEvent):
                final = event.answer.to_dict()
    finally:
        app.close()
    if json_output:
        print(json.dumps(final))
        return
    _print_answer(final, already_shown=streamed)


def _print_answer(answer: dict, already_shown: bool) -> None:
    if answer["note"]:
        err.print(f"\n[yellow]note:[/yellow] {escape(answer['note'])}")
        already_shown = False  # the final answer replaces what was streamed
    if not already_shown:
        out.print(answer["answer"], markup=False, highlight=False, soft_wrap=True)
    out.print()
    quotes = _supporting_sentences(answer)
    for citation in answer["citations"]:
        out.print(f"[bold][{citation['n']}][/bold] {escape(citation['title'])} — [cyan]{escape(citation['url'])}[/cyan]")
        if citation["n"] in quotes:
            out.print(f"    [dim]“{escape(quotes[citation['n']])}”[/dim]")
    if answer.get("abstained"):
        err.print("[yellow]the closest passages, none of which supported the draft answer:[/yellow]")
        for hit in answer["hits"]:
            err.print(f"  {escape(hit['title'])} — [cyan]{escape(hit['url'])}[/cyan]")
    elif not answer["grounded"]:
        claims = answer.get("claims") or []
        unsupported = sum(not claim["supported"] for claim in claims)
        err.print(
            f"[yellow]{unsupported} of {len(claims)} claims are not supported by the passages: treat them with care[/yellow]"
            if claims else "[yellow]this answer cites no passage it was given: treat it with care[/yellow]"
        )
    usage, timings = answer["usage"], answer["timings"]
    err.print(
        f"[dim]{answer['model']} · {usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} tokens · "
        + " · ".join(f"{key} {value:.0f}" for key, value in timings.items())
        + "[/dim]"
    )


QUOTE_CHARS = 240


def _supporting_sentences(answer: dict) -> dict[int, str]:
    """For each cited passage, the first passage sentence found to support a claim (shortened to print)."""
    quotes: dict[int, str] = {}
    for claim in answer.get("claims") or []:
        for span in claim["citations"]:
            text = " ".join(span["text"].split())
            quotes.setdefault(span["n"], text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…")
    return quotes


@router_cli.command("train")
def router_train(
    examples: Annotated[Path, typer.Argument(help='JSONL of {"query": ..., "label": "cheap" | "strong"}')],
    model_path: Annotated[Optional[Path], typer.Option(help="where to save (default: generate.router.model_path)")] = None,
) -> None:
    """Train the router that sends simple questions to the cheap model."""
    from ragline.generate.router import Router, read_examples, router_path

    settings = State.settings()
    if not examples.is_file():
        raise typer.BadParameter(f"{examples} is not a file", param_hint="EXAMPLES")
    target = model_path or router_path(settings.generate.router, settings.data_dir)
    router = Router.train(examples)
    router.save(target)
    queries, labels = read_examples(examples)
    accuracy = sum(router.choose(q) == label for q, label in zip(queries, labels)) / len(queries)
    out.print(f"trained on {len(queries)} examples (training accuracy {accuracy:.0%}); saved to {target}")


@llm_cli.command("serve")
def llm_serve(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8001,
) -> None:
    """Serve the configured LLM as an OpenAI-compatible server (/v1/chat/completions)."""
    import uvicorn

    from ragline.serve.llm_server import create_llm_app

    settings = State.settings()
    uvicorn.run(create_llm_app(settings), host=host, port=port)


@cli.command()
def status(json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """What is indexed: documents, chunks, the last ingest, the store and models."""
    settings = State.settings()
    app = Ragline(settings)
    try:
        records = app.store.documents()
        last = app.store.get_meta("last_ingest")
        info = {
            "data_dir": str(settings.data_dir.resolve()),
            "store": settings.store.backend,
            "embedder": f"{settings.embedder.backend}:{settings.embedder.model}",
            "llm": f"{settings.generate.llm.backend}:{settings.generate.llm.model}",
            "index_built_with": app.store.get_meta("embedder"),
            "documents": sum(r.status == "indexed" for r in records),
            "failed_documents": sum(r.status == "failed" for r in records),
            "chunks": app.store.count(),
            "last_ingest": json.loads(last) if last else None,
        }
    finally:
        app.close()
    if json_output:
        print(json.dumps(info))
        return
    table = Table(show_header=False, title="ragline status")
    for key, value in info.items():
        if key == "last_ingest" and value:
            value = (
                f"{value['at']}: {len(value['new'])} new, {len(value['changed'])} changed, "
                f"{len(value['deleted'])} deleted, {len(value['failed'])} failed, {value['seconds']:.1f}s"
            )
        table.add_row(key, escape(str(value)))
    out.print(table)


@cli.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="bind address (default: serve.host)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default: serve.port)")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, max=64, help="server processes (default: serve.workers)")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="listen beyond loopback with authentication off (anyone may read all)")
    ] = False,
    engine: Annotated[
        Optional[str], typer.Option("--engine", help="local: this machine's processes; ray: Ray Serve deployments "
                                    "(ray.serve.*) (default: engine)")
    ] = None,
    address: Annotated[Optional[str], ADDRESS_OPTION] = None,
) -> None:
    """Serve the HTTP API under /v1 (search, query, chat, OpenAI-compatible chat completions, documents, jobs,
    feedback) with /healthz, /readyz and /metrics; OpenAPI docs at /docs.

    With --engine ray, the embedding model, the reranker, the LLM and the API run as Ray Serve deployments
    scaled by ray.serve.*, on a local Ray runtime or the cluster at --address, until Ctrl-C or SIGTERM."""
    try:
        import uvicorn

        from ragline.serve.api import create_app
    except ImportError as exc:
        raise ConfigError("the API needs the serve extra: pip install 'ragline[serve]'") from exc
    configured = State.settings()
    on_ray = _with_engine(configured, engine, address).engine == "ray"
    # --engine picks how the API is served; the ingest jobs it runs keep the configured engine
    settings = _with_engine(configured, configured.engine, address)
    bind = host or (settings.ray.serve.http_host if on_ray else None) or settings.serve.host
    if not settings.serve.auth.enabled and not is_loopback(bind) and not insecure:
        raise ConfigError(
            f"refusing to listen on {bind} with authentication off: anyone who reaches the port could read every "
            "document. Turn on serve.auth.enabled (and create keys with `ragline keys create`), bind 127.0.0.1, "
            "or pass --insecure"
        )
    count = workers or settings.serve.workers
    port = port or (settings.ray.serve.http_port if on_ray else None) or settings.serve.port
    if on_ray:
        _serve_on_ray(settings, bind, port)
        return
    if settings.embedder.threads is None:  # a server encodes many small requests at once: one thread each
        os.environ["RAGLINE_EMBEDDER__THREADS"] = "1"
        settings = settings.model_copy(update={"embedder": settings.embedder.model_copy(update={"threads": 1})})
    if count == 1:
        uvicorn.run(create_app(settings), host=bind, port=port, log_config=None, access_log=False)
        return
    # Several processes: each builds its app from the same config file, and their metrics meet in one folder.
    if State.config_file is not None:
        os.environ["RAGLINE_CONFIG"] = str(State.config_file.resolve())
    metrics_dir = settings.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    uvicorn.run(
        "ragline.serve.api:create_app_from_env", factory=True, host=bind, port=port, workers=count, log_config=None,
        access_log=False,
    )


def _serve_on_ray(settings: Settings, bind: str, port: int) -> None:
    """`serve --engine ray`: deploy on Ray Serve and block until Ctrl-C or SIGTERM."""
    try:
        from ragline.cluster.serve import ServeError, run_until_stopped
    except ImportError as exc:
        raise ConfigError("serve --engine ray needs Ray Serve: pip install 'ragline[ray]'") from exc

    def announce(deployed) -> None:
        err.print(f"serving on Ray Serve: the API at [cyan]{deployed.url}[/cyan] "
                  f"({', '.join(deployed.apps)}); Ctrl-C stops")

    try:
        run_until_stopped(settings, bind, port, announce)
    except ServeError as exc:
        raise ConfigError(str(exc)) from exc


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@config_cli.command("show")
def config_show(
    engine: Annotated[Optional[str], ENGINE_OPTION] = None,
    address: Annotated[Optional[str], ADDRESS_OPTION] = None,
) -> None:
    """Print the effective configuration (defaults, file, environment and these options merged) as YAML, secrets
    masked: what a job run with the same options uses."""
    settings = _with_engine(State.settings(), engine, address)
    shown = json.loads(settings.model_dump_json())  # secret fields dump as "**********"
    env_vars = shown["ray"]["runtime_env"].get("env_vars")
    if isinstance(env_vars, dict):  # the job's environment often carries tokens
        shown["ray"]["runtime_env"]["env_vars"] = dict.fromkeys(env_vars, "**********")
    print(yaml.safe_dump(shown, sort_keys=False), end="")
    if settings.engine == "ray":
        from ragline.cluster.ray_ingest import where_jobs_run

        print(f"# ingest runs on {where_jobs_run(settings.ray)}")


cli.command("tune")(tune_command)
cli.command("watch")(watch_command)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; known errors become one red line, not a traceback."""
    try:
        cli(args=argv)  # standalone mode: usage errors and typer.Exit end in SystemExit
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except KNOWN_ERRORS as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return EXIT_RUN_FAILED
    return 0


def main() -> None:
    sys.exit(run())
