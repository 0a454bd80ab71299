"""The migration workflow's input, validated before anything changes (console, CLI, tests alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embedsvc.errors import InvalidRequest
from embedsvc.models.names import CONTENT_TYPE_PATTERN, MAX_TAG_LENGTH

if TYPE_CHECKING:
    from embedsvc.config import Settings

DEFAULT_ROLLBACK_WINDOW_SECONDS = 48 * 3600


class InvalidMigrationInput(InvalidRequest):
    """The execution's input cannot start a migration; the message says every problem."""

    code = "invalid_migration_input"


class MigrationRequest(BaseModel):
    """`{"content_type", "target_model", "rollback_window_seconds", "max_metric_drop", "ground_truth"}`.

    `ground_truth`: the project's JSON lines, or BEIR queries with `qrels`; an `s3://bucket/key` URI on
    AWS, a local path in the local stack. Gate: the candidate must meet or beat the active model on
    every gated metric, within `max_metric_drop` points, unless the paired test calls the drop noise.
    """

    model_config = ConfigDict(extra="forbid")

    content_type: str = Field(pattern=CONTENT_TYPE_PATTERN)
    target_model: str = Field(min_length=1)
    ground_truth: str = Field(min_length=1)
    qrels: str | None = Field(default=None, min_length=1)
    ground_truth_name: str | None = Field(default=None, min_length=1, max_length=200)
    rollback_window_seconds: int = Field(default=DEFAULT_ROLLBACK_WINDOW_SECONDS, ge=0, le=30 * 24 * 3600)
    max_metric_drop: float = Field(default=3.0, ge=0, le=100)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    requested_by: str = Field(default="console", min_length=1, max_length=MAX_TAG_LENGTH)
    # A budget for the backfill (the ledger refuses what would pass it; the migration then pauses).
    budget_usd: float | None = Field(default=None, gt=0)
    budget_tokens: int | None = Field(default=None, gt=0)
    # How often the workflow looks at the new collection while it fills, and at the rollback window.
    check_interval_seconds: int = Field(default=60, ge=1, le=3600)
    window_poll_seconds: int = Field(default=3600, ge=1, le=24 * 3600)
    max_checks: int = Field(default=1440, ge=1, le=100_000)  # then the backfill counts as stalled

    @classmethod
    def parse(cls, payload: Any, settings: Settings) -> MigrationRequest:
        """Validate an execution input against the schema and the deployment, or InvalidMigrationInput."""
        if not isinstance(payload, Mapping):
            raise InvalidMigrationInput(
                f"the input must be a JSON object, not {type(payload).__name__}", param="input"
            )
        try:
            request = cls.model_validate(dict(payload))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors()[:6]
            )
            raise InvalidMigrationInput(f"invalid migration input: {problems}", param="input") from None
        if request.content_type not in settings.content_types:
            known = ", ".join(sorted(settings.content_types))
            raise InvalidMigrationInput(
                f"unknown content type {request.content_type!r}; configured: {known}", param="content_type"
            )
        models = settings.registry.models
        if request.target_model not in models:
            by_name = [m.key for m in models.values() if m.name == request.target_model]
            if not by_name:
                raise InvalidMigrationInput(
                    f"unknown target_model {request.target_model!r}; registered: {', '.join(sorted(models))}",
                    param="target_model",
                )
            request = request.model_copy(update={"target_model": by_name[0]})
        return request
