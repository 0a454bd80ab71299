"""Which models index each content type, changeable without a deploy (SSM Parameter Store).

Per content type one parameter `{prefix}/{content_type}` holds JSON `{"active": "minilm", "shadow":
"minilm-int8", "migration": "..."}`: the active model (its collection is what the alias `{content_type}`
points at after a cutover) and, during a migration, a shadow model whose collection every mutation
also reaches (dual-write). Writers (write-through, worker, repair, audit) ask `models_for`; readers
search the alias, so a cutover is one alias switch, not a config change they must see.

Reads go through Powertools `parameters` with a short `max_age` (CONTENT_MODELS_MAX_AGE_SECONDS,
default 5 s): a Lambda container sees a change within that long. The migration workflow waits out that
age after every change before relying on it (see statemachines/migration.asl.json, `ConfigSettles`),
so no write can miss the shadow collection unnoticed: a write committed before the wait ends is
either dual-written or read by the backfill, which pages the content store only afterwards.

Without a parameter (or with CONTENT_MODELS_PARAMETER unset, as in most tests) the static setting
CONTENT_MODELS applies, else the registry's default model. When SSM cannot be read, the last value
this process read is used (a warning is logged); with none, the error is raised, never guessed.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embedsvc.errors import ConfigError, TransientError

if TYPE_CHECKING:
    from embedsvc.config import Settings

logger = Logger(child=True)


class ModelConfigUnavailable(TransientError):
    """SSM cannot be read and this process has never read the content type's models."""

    code = "model_config_unavailable"


class ContentModels(BaseModel):
    """One content type's models: the active one, and the shadow one while a migration dual-writes."""

    model_config = ConfigDict(extra="forbid")

    active: str = Field(min_length=1)
    shadow: str | None = None
    migration: str | None = None  # the migration that set the shadow (for operators reading the parameter)
    updated_at: float | None = None

    def writes(self) -> list[str]:
        """Every model whose collection each mutation reaches, active first."""
        return [self.active] + ([self.shadow] if self.shadow and self.shadow != self.active else [])


class ModelConfig:
    """`models_for(content_type)` from SSM (cached `max_age` seconds) or the static settings."""

    def __init__(self, settings: Settings, ssm: Any = None, *, prefix: str | None = None, max_age: int = 5):
        self.settings = settings
        self.prefix = prefix.rstrip("/") if prefix else None
        self.max_age = max_age
        self._ssm = ssm
        self._provider: Any = None
        self._last_good: dict[str, ContentModels] = {}
        self._lock = threading.Lock()

    @property
    def dynamic(self) -> bool:
        """Whether the models come from SSM (and so can change while processes run)."""
        return self.prefix is not None

    def parameter_name(self, content_type: str) -> str:
        if self.prefix is None:
            raise ConfigError("CONTENT_MODELS_PARAMETER is not set: the content types' models are static")
        return f"{self.prefix}/{content_type}"

    def static(self, content_type: str) -> ContentModels:
        """What the settings say (CONTENT_MODELS, else the default model): the value before any migration."""
        keys = self.settings.models_for(content_type)
        return ContentModels(active=keys[0], shadow=keys[1] if len(keys) > 1 else None)

    def _ssm_provider(self) -> Any:
        with self._lock:
            if self._provider is None:
                from aws_lambda_powertools.utilities.parameters import SSMProvider

                if self._ssm is None:
                    from embedsvc.adapters.aws import client

                    self._ssm = client("ssm")
                self._provider = SSMProvider(boto3_client=self._ssm)
            return self._provider

    def get(self, content_type: str, *, fresh: bool = False) -> ContentModels:
        """The content type's models; `fresh` skips the cache (the migration's own steps)."""
        if self.prefix is None:
            return self.static(content_type)
        from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError

        name = self.parameter_name(content_type)
        try:
            raw = self._ssm_provider().get(name, max_age=self.max_age, force_fetch=fresh)
        except GetParameterError as exc:
            if "ParameterNotFound" in str(exc):
                return self.static(content_type)
            with self._lock:
                known = self._last_good.get(content_type)
            if known is None:
                raise ModelConfigUnavailable(f"cannot read SSM parameter {name}: {exc}") from None
            logger.warning("SSM unreadable; using the models last read", extra={"parameter": name})
            return known
        models = self._parse(name, raw)
        with self._lock:
            self._last_good[content_type] = models
        return models

    def models_for(self, content_type: str) -> list[str]:
        """The model keys that index a content type: active first, then the shadow while one is set."""
        return self.get(content_type).writes()

    def set(self, content_type: str, models: ContentModels) -> ContentModels:
        """Write the content type's models (other processes see them within `max_age` seconds)."""
        for key in models.writes():
            if key not in self.settings.registry.models:
                raise ConfigError(f"model {key!r} is not registered")
        stamped = models.model_copy(update={"updated_at": time.time()})
        name = self.parameter_name(content_type)
        self._ssm_provider()
        self._ssm.put_parameter(
            Name=name, Value=stamped.model_dump_json(exclude_none=True), Type="String", Overwrite=True
        )
        self._provider.clear_cache()
        with self._lock:
            self._last_good[content_type] = stamped
        return stamped

    def _parse(self, name: str, raw: Any) -> ContentModels:
        try:
            data = json.loads(raw) if isinstance(raw, str | bytes) else raw
            models = ContentModels.model_validate(data)
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"SSM parameter {name} is not a content type's models: {exc}") from None
        for key in models.writes():
            if key not in self.settings.registry.models:
                raise ConfigError(f"SSM parameter {name} names unknown model {key!r}")
        return models
