"""Settings and the model registry.

Everything is read from the environment on first use (never at import time, so tests and the
local stack can set the environment first) and cached; `container.reset_settings()` drops the cache.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from embedsvc.errors import ConfigError

ProviderKind = Literal["openai", "local"]
DEFAULT_HTTP_GUARD_SECONDS = 2.0
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
    tpm: int = Field(default=1_000_000, gt=0, description="tokens per window this provider grants us")
    rpm: int = Field(default=3_000, gt=0, description="requests per window this provider grants us")
    window_seconds: float = Field(default=60.0, gt=0, description="the window tpm and rpm count over")
    # How long the ledger keeps counting a grant after the provider's window has passed it: at least the
    # clock skew between callers plus the spread of grant-to-provider delivery times (a cold TLS handshake
    # to an internet API alone takes 100-300 ms). None: 2 s for HTTP providers, 0 for the in-process model.
    guard_seconds: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> ProviderSpec:
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"provider {self.key!r}: kind 'openai' needs base_url")
        return self

    def ledger_guard_seconds(self) -> float:
        """The rate-limit ledger's guard for this provider (see `guard_seconds`)."""
        if self.guard_seconds is not None:
            return self.guard_seconds
        return DEFAULT_HTTP_GUARD_SECONDS if self.kind == "openai" else 0.0


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
    # With the `estimate` tokenizer, reservations are this much larger than the estimate, so that a provider
    # counting up to that much more still stays within its limit; reconcile refunds the difference.
    token_estimate_margin: float = Field(default=1.2, ge=1.0)
    created: int = Field(default=0, ge=0, description="Unix time, as OpenAI's `created` in GET /v1/models")
    endpoints: list[Endpoint] = Field(min_length=1)  # tried in order: local first, API fallback

    def reservation_tokens(self, tokens: int) -> int:
        """Tokens to reserve for a request estimated at `tokens` (exact tokenizers reserve the count itself)."""
        if self.tokenizer != "estimate":
            return tokens
        return math.ceil(tokens * self.token_estimate_margin)

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
            "created": 1629158400,
            "dimensions": 384,
            "max_input_tokens": 256,
            "max_inputs_per_request": 2048,
            "max_tokens_per_request": 300_000,
            "price_per_million_tokens": 0.0,
            "tokenizer": "local",
            "endpoints": [{"provider": "local", "model_name": "all-MiniLM-L6-v2"}],
        },
        # all-MiniLM-L6-v2 as int8 ONNX on onnxruntime (no torch: fits a zip Lambda); cosine >= 0.999 with minilm.
        "minilm-int8": {
            "key": "minilm-int8",
            "name": "all-MiniLM-L6-v2-int8",
            "dimensions": 384,
            "max_input_tokens": 256,
            "max_inputs_per_request": 2048,
            "max_tokens_per_request": 300_000,
            "price_per_million_tokens": 0.0,
            "tokenizer": "local",
            "endpoints": [{"provider": "local", "model_name": "all-MiniLM-L6-v2-int8"}],
        },
        # A static model2vec model distilled from MiniLM (`embedsvc models build`): clearly weaker, the model
        # a migration gate must refuse. Same WordPiece vocabulary, so MiniLM's tokenizer counts its tokens.
        "minilm-m2v": {
            "key": "minilm-m2v",
            "name": "minilm-m2v-256",
            "dimensions": 256,
            "max_input_tokens": 512,
            "max_inputs_per_request": 2048,
            "max_tokens_per_request": 300_000,
            "price_per_million_tokens": 0.0,
            "tokenizer": "local",
            "endpoints": [{"provider": "local", "model_name": "minilm-m2v-256"}],
        },
        "te3s": {
            "key": "te3s",
            "name": "text-embedding-3-small",
            "created": 1705948997,
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
            "created": 1705953180,
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


def load_registry_data(env: Mapping[str, str]) -> dict:
    """The registry's JSON: from EMBEDSVC_REGISTRY_FILE, EMBEDSVC_REGISTRY_PARAMETER (SSM) or EMBEDSVC_REGISTRY."""
    if path := env.get("EMBEDSVC_REGISTRY_FILE"):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read EMBEDSVC_REGISTRY_FILE={path}: {exc}") from exc
    if name := env.get("EMBEDSVC_REGISTRY_PARAMETER"):
        from embedsvc.adapters.aws import get_parameter

        try:
            return json.loads(get_parameter(name))
        except ValueError as exc:
            raise ConfigError(f"SSM parameter {name} is not JSON: {exc}") from exc
    if raw := env.get("EMBEDSVC_REGISTRY"):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"EMBEDSVC_REGISTRY is not JSON: {exc}") from exc
    return DEFAULT_REGISTRY


class _RegistrySource(PydanticBaseSettingsSource):
    """Settings source for the one field that is not a plain variable: the model registry."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {"registry": load_registry_data(os.environ)}


class ContentTypeSpec(BaseModel):
    """A kind of content in the store: public (every caller searches it) or private to its owner."""

    model_config = ConfigDict(extra="forbid")

    private: bool = False
    # Public content is shared by every tenant, so only these tenants may write it (None: any tenant, as
    # in the local stack; the template allows only "admin"). Private content is always its owner's to write.
    writers: list[str] | None = None


def _default_content_types() -> dict[str, ContentTypeSpec]:
    return {"verse": ContentTypeSpec(private=False), "note": ContentTypeSpec(private=True)}


class Settings(BaseSettings):
    """Runtime settings, one object per process (see `get_settings`); each field is the env var of its name."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", populate_by_name=True)

    stage: str = "local"
    region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    cache_table: str = "embedsvc-cache"
    cache_ttl_seconds: int = 30 * 24 * 3600
    # Requests of at most this many inputs use the shared (DynamoDB) cache tier; larger ones (embedding jobs)
    # use the process's memory tier only: storing a vector costs more than embedding it again (EmbeddingService).
    shared_cache_max_inputs: int = Field(default=16, ge=0)
    ledger_table: str = "embedsvc-ratelimit"
    api_keys_table: str = "embedsvc-api-keys"
    # Small operational records: which messages were dead-lettered (so a redelivered batch does not do it again).
    state_table: str = "embedsvc-state"
    # The daily cost roll-up (adapters/cost_store.py): what `embedsvc costs` and task budgets read.
    costs_table: str = "embedsvc-costs"
    index_queue_url: str | None = None
    index_dlq_url: str | None = None  # the worker sends messages that can never succeed here, with a reason
    # Which models index each content type (active first, then shadow); absent types use default_model.
    content_models: dict[str, list[str]] = Field(default_factory=dict)
    # Where the models of each content type live while they can change without a deploy (a model
    # migration): SSM parameters `{prefix}/{content_type}`, read at most every max-age seconds per
    # process (services/model_config.py). Unset: CONTENT_MODELS alone.
    content_models_parameter: str | None = None
    content_models_max_age_seconds: int = Field(default=5, ge=0, le=300)
    # The migration workflow's state machines (template outputs), for `embedsvc migrate`.
    migration_state_machine_arn: str | None = None
    rollback_state_machine_arn: str | None = None
    metrics_namespace: str = "EmbeddingService"
    qdrant_url: str | None = None  # a Qdrant server; else local mode below
    qdrant_path: str | None = None  # Qdrant local mode on disk; None and no url -> in memory
    qdrant_api_key_secret: str | None = None  # Secrets Manager id of the Qdrant server's API key
    # The worker skips the shared embedding cache by default: a collection's content hash already skips
    # unchanged text, a backfill for a new model never hits, and caching 500k vectors costs real DynamoDB money.
    worker_use_cache: bool = False
    # Share of a limit bulk work may use while users are active.
    bulk_ceiling: float = Field(default=0.8, gt=0, le=1)
    # Share of a limit bulk work may use while users are idle; the rest is room the first arriving users get
    # at once, before bulk workers have backed off to the ceiling. At least `bulk_ceiling`.
    bulk_idle_ceiling: float = Field(default=0.98, gt=0, le=1)
    # How long a caller may wait for rate-limit budget before the service sheds it (API: 429; worker: retry).
    realtime_max_wait_seconds: float = Field(default=5.0, ge=0)
    bulk_max_wait_seconds: float = Field(default=60.0, ge=0)
    # When DynamoDB throttles or fails, callers are shed with 503 + Retry-After: the provider is never called
    # unmetered. A share f > 0 keeps f x limit out of DynamoDB's grants in every process, and lets each of at
    # most `ledger_fallback_processes` API processes (ApiFunction's reserved concurrency) grant
    # f x limit / processes from memory instead of shedding (see services/ratelimit.py). Set the share on
    # every function and the process count only on the API.
    ledger_fallback_share: float = Field(default=0.0, ge=0, le=0.5)
    ledger_fallback_processes: int = Field(default=0, ge=0)
    # A busy API process reserves budget for the requests it expects in this many seconds at once (fewer
    # writes to the ledger's one hot item); at most a quarter of the provider's guard, which covers it.
    ledger_lease_seconds: float = Field(default=0.25, ge=0)
    # Bulk goes at most this much faster than a limit's average rate (over an eighth of a window), so its
    # backlog never fills a window in one burst that then frees a window later: users arriving after a
    # bulk-only period wait at most about (1 - 1/pace) x the window for room. None: no pacing.
    bulk_pace: float | None = Field(default=1.2, ge=1.0)
    # Per-tenant share of every provider limit ({"tenant-a": 0.5, "default": 0.25}); empty: no tenant caps.
    tenant_shares: dict[str, float] = Field(default_factory=dict)
    # Cost centers callers may name (X-Cost-Source, a message's `source`): a CloudWatch dimension, so the
    # set is closed, keeping metric cardinality and the dashboard under control. Comma-separated in the env.
    cost_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "user_query",
            "note_index",
            "verse_index",
            "reindex",
            "backfill",
            "repair",
            "evaluation",
        ]
    )
    # The content store (Postgres): a URL locally, an RDS-format Secrets Manager secret on AWS.
    database_url: str | None = None
    database_secret_arn: str | None = None
    database_ssl_mode: Literal["disable", "require", "verify-full"] = "require"  # for the secret's host
    # Content types the store accepts, as JSON: {"verse": {"private": false}, "note": {"private": true}}.
    content_types: dict[str, ContentTypeSpec] = Field(default_factory=_default_content_types)
    # The weekly audit: where its reports go, and the share of a collection's points that may be orphans
    # before it refuses to delete any (an audit pointed at an empty or wrong database must not wipe an index).
    audit_reports_bucket: str | None = None
    audit_orphan_max_share: float = Field(default=0.05, ge=0, le=1)
    registry: Registry

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _RegistrySource(settings_cls)

    @field_validator("cost_sources", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("tenant_shares")
    @classmethod
    def _shares_are_fractions(cls, shares: dict[str, float]) -> dict[str, float]:
        for tenant, share in shares.items():
            if not 0 < share <= 1:
                raise ValueError(f"TENANT_SHARES: {tenant} has share {share}; a share lies in (0, 1]")
        return shares

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.bulk_idle_ceiling < self.bulk_ceiling:
            raise ValueError(
                f"BULK_IDLE_CEILING ({self.bulk_idle_ceiling}) must be at least BULK_CEILING ({self.bulk_ceiling})"
            )
        for content_type, keys in self.content_models.items():
            for key in keys:
                if key not in self.registry.models:
                    raise ValueError(f"CONTENT_MODELS: {content_type} names unknown model {key!r}")
        return self

    @classmethod
    def load(cls) -> Settings:
        """Settings from the environment, or ConfigError saying what is wrong."""
        try:
            return cls()  # type: ignore[call-arg]  # the registry comes from _RegistrySource
        except ValidationError as exc:
            # Values are left out: the message reaches logs, and an env var may hold more than it should.
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                for e in exc.errors(include_input=False)
            )
            raise ConfigError(f"invalid configuration: {problems}") from None
        except SettingsError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from None

    def models_for(self, content_type: str) -> list[str]:
        """The model keys that index a content type (active first)."""
        return self.content_models.get(content_type) or [self.registry.default_model]

    def tenant_share(self, tenant_id: str | None) -> float | None:
        """The share of each provider limit this tenant may use, or None when it is not capped."""
        if tenant_id is None or not self.tenant_shares:
            return None
        return self.tenant_shares.get(tenant_id, self.tenant_shares.get("default"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (`container.reset_settings()` forgets them)."""
    return Settings.load()
