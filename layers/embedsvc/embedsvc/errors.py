"""One error hierarchy for the whole service.

Each error carries what the edges need to map it: the HTTP status and OpenAI error `type`/`code`
(API), whether a retry can help (SQS per-record failures, Step Functions Retry/Catch match the class
name), and a retry hint in seconds where one is known. Errors are mapped only at the edges.
"""

from __future__ import annotations


class EmbedServiceError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def to_openai(self) -> dict:
        """The body OpenAI answers errors with."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ConfigError(EmbedServiceError):
    code = "configuration_error"


class InvalidRequest(EmbedServiceError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnknownModel(InvalidRequest):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str, known: list[str]):
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it. Known models: {', '.join(known)}.",
            param="model",
        )


class Unauthorized(EmbedServiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(EmbedServiceError):
    """The caller is known but may not do this (e.g. write shared content without being one of its writers)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class ServiceOverloaded(EmbedServiceError):
    """The service sheds load: the shared rate-limit budget is spent for longer than a caller may wait."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"
    retryable = True


class BudgetExceeded(EmbedServiceError):
    """A task's or tenant's budget would be passed by this request: refused before any provider call.

    429 with OpenAI's `insufficient_quota` type (what OpenAI answers when a quota is spent), code
    `budget_exceeded`. Not retryable: waiting does not refill a task's lifetime budget (no Retry-After);
    a tenant's monthly budget says when its next month starts (`retry_after`). The worker dead-letters
    such a message with reason `budget_exceeded` instead of retrying it.
    """

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"
    retryable = False

    def __init__(self, message: str, *, scope: str, key: str, retry_after: float | None = None):
        super().__init__(message, retry_after=retry_after)
        self.scope = scope
        self.key = key


class TransientError(EmbedServiceError):
    """Worth retrying later: the cause is outside the request."""

    status = 503
    type = "server_error"
    code = "service_unavailable"
    retryable = True


class ProviderError(TransientError):
    """A provider failed in a way another provider (or a later try) may not."""

    code = "provider_error"


class ProviderRateLimited(ProviderError):
    code = "provider_rate_limited"


class ProviderTimeout(ProviderError):
    code = "provider_timeout"


class ProviderRejected(EmbedServiceError):
    """The provider refused the request itself (4xx other than 429): retrying cannot help."""

    status = 400
    type = "invalid_request_error"
    code = "provider_rejected"


class AllProvidersFailed(TransientError):
    code = "all_providers_failed"


class DeadlineExceeded(TransientError):
    """Not enough of the invocation's time is left to wait for budget and call the provider: retry later."""

    code = "deadline_exceeded"


class ContentStoreUnavailable(TransientError):
    """Postgres did not answer or asked us to retry: nothing was committed."""

    code = "content_store_unavailable"


class LedgerUnavailable(TransientError):
    """DynamoDB throttled or did not answer: the provider is not called unmetered; retry shortly."""

    code = "rate_limit_ledger_unavailable"


class LedgerMisconfigured(TransientError):
    """The ledger table refuses us for good (missing table, no permission, bad request): fail closed.

    Retryable for the queue (a fixed deployment resumes the work), but never waited out in memory.
    """

    code = "rate_limit_ledger_misconfigured"


class ProviderNotConfigured(ProviderError):
    """An endpoint cannot be used as configured (e.g. no API key): the message says how to fix it."""

    code = "provider_not_configured"


class VectorStoreUnavailable(TransientError):
    code = "vector_store_unavailable"


class PermanentMessageError(EmbedServiceError):
    """A queue message that can never succeed (bad schema, unknown version): straight to the DLQ."""

    code = "invalid_message"
