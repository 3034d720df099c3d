"""Configuration of answer generation, to be nested in the main `Settings`.

Suggested wiring: `Settings.generate: GenerateSettings`, so that e.g.
`RAGLINE_GENERATE__LLM__BASE_URL=http://localhost:8000/v1` picks a vLLM server.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Strict(BaseModel):
    """A config section that rejects misspelt keys instead of silently ignoring them."""

    model_config = ConfigDict(extra="forbid")


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
    # Local llama.cpp
    n_ctx: int = Field(default=4096, ge=256)
    n_threads: int | None = Field(default=None, ge=1, description="default: all CPU cores")


class RouterSettings(_Strict):
    """Send simple questions to a cheap model and the rest to the strong one."""

    enabled: bool = False
    model_path: Path | None = Field(default=None, description="default: <data_dir>/models/router.joblib")
    examples: Path | None = Field(default=None, description="labelled JSONL; default: the bundled examples")


class GenerateSettings(_Strict):
    llm: LLMSettings = Field(default_factory=LLMSettings)
    cheap_llm: LLMSettings | None = Field(default=None, description="used for questions the router calls cheap")
    router: RouterSettings = Field(default_factory=RouterSettings)
    input_fraction: float = Field(
        default=0.5, gt=0, lt=1, description="share of the context window for the prompt; the rest is for the answer"
    )
    max_answer_tokens: int | None = Field(default=1024, ge=1, description="cap on answer length")
    temperature: float = Field(default=0.1, ge=0, le=2)

    @model_validator(mode="after")
    def _router_needs_cheap_llm(self) -> GenerateSettings:
        if self.router.enabled and self.cheap_llm is None:
            raise ValueError("router.enabled needs cheap_llm: the model for questions routed as cheap")
        return self
