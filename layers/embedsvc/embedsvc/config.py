"""Settings and the model registry.

Everything is read from the environment on first use (never at import time, so tests and the
local stack can set the environment first) and cached; `reset_settings()` drops the cache.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from embedsvc.errors import ConfigError

ProviderKind = Literal["openai", "local"]
Tokenizer = Literal["cl100k_base", "local", "estimate"]


class ProviderSpec(BaseModel):
    """One place that can serve embeddings: an OpenAI-compatible endpoint or the in-process model."""

    key: str
    kind: ProviderKind
    base_url: str | None = None
    # Where the API key comes from: a Secrets Manager secret id (AWS) or an env var (local).
    api_key_secret: str | None = None
    api_key_env: str | None = None
    timeout_seconds: float = 30.0
    tpm: int = Field(default=1_000_000, gt=0, description="tokens per minute this provider grants us")
    rpm: int = Field(default=3_000, gt=0, description="requests per minute this provider grants us")

    @model_validator(mode="after")
    def _openai_needs_url(self) -> ProviderSpec:
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"provider {self.key!r}: kind 'openai' needs base_url")
        return self


class Endpoint(BaseModel):
    """A provider serving one model, under the name that provider knows it by."""

    provider: str
    model_name: str


class ModelSpec(BaseModel):
    """A registered model. Collections are named `{content_type}_{key}`."""

    key: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str  # the public model name clients send in `model`
    dimensions: int = Field(gt=0)
    supports_dimensions: bool = False  # text-embedding-3 accepts a smaller `dimensions`
    max_input_tokens: int = Field(gt=0)
    max_inputs_per_request: int = Field(gt=0)
    max_tokens_per_request: int = Field(gt=0)
    price_per_million_tokens: float = Field(ge=0)
    tokenizer: Tokenizer = "estimate"
    endpoints: list[Endpoint] = Field(min_length=1)  # tried in order: local first, API fallback

    @field_validator("endpoints")
    @classmethod
    def _distinct(cls, endpoints: list[Endpoint]) -> list[Endpoint]:
        seen = [e.provider for e in endpoints]
        if len(seen) != len(set(seen)):
            raise ValueError("a provider may appear once per model")
        return endpoints


class Registry(BaseModel):
    providers: dict[str, ProviderSpec]
    models: dict[str, ModelSpec]
    default_model: str

    @model_validator(mode="after")
    def _consistent(self) -> Registry:
        for key, provider in self.providers.items():
            if provider.key != key:
                raise ValueError(f"provider entry {key!r} has key {provider.key!r}")
        for key, model in self.models.items():
            if model.key != key:
                raise ValueError(f"model entry {key!r} has key {model.key!r}")
            for endpoint in model.endpoints:
                if endpoint.provider not in self.providers:
                    raise ValueError(f"model {key!r} names unknown provider {endpoint.provider!r}")
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not registered")
        return self

    def model(self, key_or_name: str) -> ModelSpec:
        """Find a model by its key (`minilm`) or public name (`text-embedding-3-small`)."""
        if key_or_name in self.models:
            return self.models[key_or_name]
        for model in self.models.values():
            if model.name == key_or_name:
                return model
        from embedsvc.errors import UnknownModel

        raise UnknownModel(key_or_name, sorted(m.name for m in self.models.values()))


OPENAI_BASE_URL = "https://api.openai.com/v1"

# OpenAI's documented limits: 8,192 tokens per input, 2,048 inputs and 300,000 tokens per request.
DEFAULT_REGISTRY: dict = {
    "default_model": "minilm",
    "providers": {
        "local": {"key": "local", "kind": "local", "tpm": 10_000_000, "rpm": 100_000},
        "openai": {
            "key": "openai",
            "kind": "openai",
            "base_url": OPENAI_BASE_URL,
            "api_key_secret": "embedsvc/openai-api-key",
            "api_key_env": "OPENAI_API_KEY",
            "tpm": 1_000_000,
            "rpm": 3_000,
        },
    },
    "models": {
        "minilm": {
            "key": "minilm",
            "name": "all-MiniLM-L6-v2",
            "dimensions": 384,
            "max_input_tokens": 256,
            "max_inputs_per_request": 2048,
            "max_tokens_per_request": 300_000,
            "price_per_million_tokens": 0.0,
            "tokenizer": "local",
            "endpoints": [{"provider": "local", "model_name": "all-MiniLM-L6-v2"}],
        },
        "te3s": {
            "key": "te3s",
            "name": "text-embedding-3-small",
            "dimensions": 1536,
            "supports_dimensions": True,
            "max_input_tokens": 8192,
            "max_inputs_per_request": 2048,
            "max_tokens_per_request": 300_000,
            "price_per_million_tokens": 0.02,
            "tokenizer": "cl100k_base",
            "endpoints": [{"provider": "openai", "model_name": "text-embedding-3-small"}],
        },
        "te3l": {
            "key": "te3l",
            "name": "text-embedding-3-large",
            "dimensions": 3072,
            "supports_dimensions": True,
            "max_input_tokens": 8192,
            "max_inputs_per_request": 2048,
            "max_tokens_per_request": 300_000,
            "price_per_million_tokens": 0.13,
            "tokenizer": "cl100k_base",
            "endpoints": [{"provider": "openai", "model_name": "text-embedding-3-large"}],
        },
    },
}


class Settings(BaseModel):
    """Runtime settings, one object per process (see `get_settings`)."""

    stage: str = "local"
    region: str = "us-east-1"
    cache_table: str = "embedsvc-cache"
    cache_ttl_seconds: int = 30 * 24 * 3600
    ledger_table: str = "embedsvc-ratelimit"
    api_keys_table: str = "embedsvc-api-keys"
    index_queue_url: str | None = None
    index_dlq_url: str | None = None  # the worker sends messages that can never succeed here, with a reason
    # Which models index each content type (active first, then shadow); absent types use default_model.
    content_models: dict[str, list[str]] = Field(default_factory=dict)
    metrics_namespace: str = "EmbeddingService"
    qdrant_url: str | None = None  # a Qdrant server; else local mode below
    qdrant_path: str | None = None  # Qdrant local mode on disk; None and no url -> in memory
    qdrant_api_key_secret: str | None = None  # Secrets Manager id of the Qdrant server's API key
    # The worker skips the shared embedding cache by default: a collection's content hash already skips
    # unchanged text, a backfill for a new model never hits, and caching 500k vectors costs real DynamoDB money.
    worker_use_cache: bool = False
    bulk_ceiling: float = Field(
        default=0.8, gt=0, le=1
    )  # share of a limit bulk work may use while users are active
    # How long a caller may wait for rate-limit budget before the service sheds it (API: 429; worker: retry).
    realtime_max_wait_seconds: float = Field(default=5.0, ge=0)
    bulk_max_wait_seconds: float = Field(default=60.0, ge=0)
    # Cost centers callers may name (X-Cost-Source, a message's `source`): a CloudWatch dimension, so the
    # set is closed, keeping metric cardinality and the dashboard under control.
    cost_sources: list[str] = Field(
        default_factory=lambda: [
            "user_query",
            "note_index",
            "verse_index",
            "reindex",
            "backfill",
            "evaluation",
        ]
    )
    registry: Registry

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        registry_data = DEFAULT_REGISTRY
        if path := env.get("EMBEDSVC_REGISTRY_FILE"):
            try:
                registry_data = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read EMBEDSVC_REGISTRY_FILE={path}: {exc}") from exc
        elif name := env.get("EMBEDSVC_REGISTRY_PARAMETER"):
            from embedsvc.adapters.aws import get_parameter

            try:
                registry_data = json.loads(get_parameter(name))
            except ValueError as exc:
                raise ConfigError(f"SSM parameter {name} is not JSON: {exc}") from exc
        elif raw := env.get("EMBEDSVC_REGISTRY"):
            try:
                registry_data = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"EMBEDSVC_REGISTRY is not JSON: {exc}") from exc
        fields: dict = {"registry": registry_data}
        mapping = {
            "STAGE": "stage",
            "AWS_REGION": "region",
            "CACHE_TABLE": "cache_table",
            "CACHE_TTL_SECONDS": "cache_ttl_seconds",
            "LEDGER_TABLE": "ledger_table",
            "API_KEYS_TABLE": "api_keys_table",
            "INDEX_QUEUE_URL": "index_queue_url",
            "INDEX_DLQ_URL": "index_dlq_url",
            "METRICS_NAMESPACE": "metrics_namespace",
            "QDRANT_URL": "qdrant_url",
            "QDRANT_PATH": "qdrant_path",
            "QDRANT_API_KEY_SECRET": "qdrant_api_key_secret",
            "BULK_CEILING": "bulk_ceiling",
            "REALTIME_MAX_WAIT_SECONDS": "realtime_max_wait_seconds",
            "BULK_MAX_WAIT_SECONDS": "bulk_max_wait_seconds",
            "WORKER_USE_CACHE": "worker_use_cache",
        }
        if raw_models := env.get("CONTENT_MODELS"):
            try:
                fields["content_models"] = json.loads(raw_models)
            except ValueError as exc:
                raise ConfigError(f"CONTENT_MODELS is not JSON: {exc}") from exc
        if raw_sources := env.get("COST_SOURCES"):
            fields["cost_sources"] = [s.strip() for s in raw_sources.split(",") if s.strip()]
        for var, field in mapping.items():
            if env.get(var):
                fields[field] = env[var]
        try:
            settings = cls.model_validate(fields)
        except ValueError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from exc
        for content_type, keys in settings.content_models.items():
            for key in keys:
                if key not in settings.registry.models:
                    raise ConfigError(f"CONTENT_MODELS: {content_type} names unknown model {key!r}")
        return settings

    def models_for(self, content_type: str) -> list[str]:
        """The model keys that index a content type (active first)."""
        return self.content_models.get(content_type) or [self.registry.default_model]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings.from_env()


def reset_settings() -> None:
    """Forget cached settings and every client built from them (tests, local stack)."""
    get_settings.cache_clear()
    from embedsvc import container

    container.reset()
