"""The router: try a model's endpoints in order (local first, API fallback), through the rate-limit ledger.

A model is only ever answered by an endpoint serving *that* model: falling back never changes the
vector space. Rate limits are reserved before each call; a 429 is written to the ledger (every worker
backs off) and the same endpoint is tried again after the wait; timeouts and server faults move on to
the next endpoint.

With a `deadline` (time.monotonic, e.g. a Lambda's end less a safety margin) every wait for budget and
every provider call fits in the time left: a call is not started with less than `min_call_seconds`
left, and its timeout is cut to what remains, so the caller never outlives its invocation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from embedsvc.adapters.providers.base import EmbeddingProvider, ProviderResult
from embedsvc.config import ModelSpec, ProviderSpec
from embedsvc.errors import (
    AllProvidersFailed,
    DeadlineExceeded,
    EmbedServiceError,
    ProviderError,
    ProviderNotConfigured,
    ProviderRateLimited,
    ServiceOverloaded,
)
from embedsvc.services.ratelimit import Lane, LimitSpec, NoopLedger

logger = Logger(child=True)

DEFAULT_RETRY_AFTER_SECONDS = 1.0
# A provider call started with less time than this left would likely be cut off by its caller's deadline.
MIN_CALL_SECONDS = 5.0


@dataclass
class RoutedResult:
    result: ProviderResult
    provider: str


class EmbeddingRouter:
    def __init__(
        self,
        providers: dict[str, EmbeddingProvider],
        ledger,
        *,
        provider_specs: dict[str, ProviderSpec],
        max_rate_limited_tries: int = 3,
        min_call_seconds: float = MIN_CALL_SECONDS,
    ):
        self.providers = providers
        self.ledger = ledger
        # An in-process model has no provider quota to protect: no DynamoDB round trip for it.
        self.unmetered = NoopLedger()
        self.provider_specs = provider_specs
        self.max_rate_limited_tries = max_rate_limited_tries
        self.min_call_seconds = min_call_seconds

    def limit_for(self, provider_key: str, model_name: str) -> LimitSpec:
        spec = self.provider_specs[provider_key]
        return LimitSpec(
            key=f"{provider_key}:{model_name}",
            tpm=spec.tpm,
            rpm=spec.rpm,
            window_seconds=spec.window_seconds,
            guard_seconds=spec.ledger_guard_seconds(),
        )

    def _time_left(self, deadline: float | None) -> float:
        return math.inf if deadline is None else deadline - time.monotonic()

    def _check_time(self, deadline: float | None, what: str) -> float:
        """The seconds left before `deadline`; DeadlineExceeded when a provider call no longer fits."""
        left = self._time_left(deadline)
        if left < self.min_call_seconds:
            raise DeadlineExceeded(
                f"{left:.1f}s left in this invocation, less than the {self.min_call_seconds:g}s a provider "
                f"call needs ({what}); the work is returned for a later try"
            )
        return left

    def embed(
        self,
        model: ModelSpec,
        texts: list[str],
        tokens: int,
        *,
        lane: Lane,
        max_wait_seconds: float,
        dimensions: int | None = None,
        deadline: float | None = None,
        tenant: str | None = None,
        tenant_share: float | None = None,
    ) -> RoutedResult:
        """Embed one provider-sized request with the first endpoint of `model` that answers.

        `tokens` is the request's token count (exact, or estimated); the ledger reserves it, with the
        model's margin when estimated, and reconciles with the provider's reported usage after.
        """
        failures: list[str] = []
        not_configured: list[ProviderNotConfigured] = []
        only_rate_limited = True  # every failure was a spent budget or a 429: the caller should back off
        retry_after: float | None = None
        wait_until = time.monotonic() + max_wait_seconds
        reserve = model.reservation_tokens(tokens)
        for endpoint in model.endpoints:
            provider = self.providers[endpoint.provider]
            limit = self.limit_for(endpoint.provider, endpoint.model_name)
            ledger = self.unmetered if self.provider_specs[endpoint.provider].kind == "local" else self.ledger
            warm = getattr(provider, "warm", None)
            if callable(warm):
                # Build the HTTP client before reserving: a grant should reach the provider promptly,
                # inside the ledger's guard time, not after a cold import.
                try:
                    warm()
                except ProviderNotConfigured as exc:  # e.g. no API key: try the next endpoint, say how to fix
                    not_configured.append(exc)
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    continue
                except EmbedServiceError as exc:  # e.g. the key's secret cannot be read right now
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    continue
            for _ in range(self.max_rate_limited_tries):
                left = self._check_time(deadline, "before waiting for rate-limit budget")
                may_wait = max(min(wait_until - time.monotonic(), left - self.min_call_seconds), 0.0)
                try:
                    reservation = ledger.acquire(
                        limit,
                        reserve,
                        lane,
                        max_wait_seconds=may_wait,
                        tenant=tenant,
                        tenant_share=tenant_share,
                    )
                except ServiceOverloaded as exc:
                    retry_after = exc.retry_after
                    failures.append(f"{endpoint.provider}: budget exhausted")
                    break  # this endpoint's budget is spent for longer than we may wait: try the next
                try:
                    left = self._check_time(deadline, "after waiting for rate-limit budget")
                except DeadlineExceeded:
                    ledger.reconcile(reservation, 0)  # never sent: give the budget back
                    raise
                timeout = None if math.isinf(left) else left
                try:
                    result = provider.embed(
                        texts, endpoint.model_name, dimensions=dimensions, timeout=timeout
                    )
                except ProviderRateLimited as exc:
                    wait = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER_SECONDS
                    ledger.report_throttle(limit, wait)
                    retry_after = wait
                    failures.append(f"{endpoint.provider}: 429 (retry after {wait:.2f}s)")
                    continue  # the next acquire waits out the cooldown, for every worker
                except ProviderNotConfigured as exc:
                    not_configured.append(exc)
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    break
                except ProviderError as exc:
                    logger.warning(
                        "provider failed; trying the next endpoint",
                        extra={"provider": endpoint.provider, "error": exc.message},
                    )
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    break
                actual = result.prompt_tokens if result.prompt_tokens is not None else tokens
                ledger.reconcile(reservation, actual)
                if failures:
                    logger.info(
                        "answered after failures", extra={"provider": endpoint.provider, "failures": failures}
                    )
                return RoutedResult(result, endpoint.provider)
        if only_rate_limited:
            raise ServiceOverloaded(
                f"the rate limit for model {model.name} is exhausted; retry later", retry_after=retry_after
            )
        if len(not_configured) == len(model.endpoints):
            raise ProviderNotConfigured(
                f"model {model.name} cannot be served as configured: "
                + "; ".join(exc.message for exc in not_configured)
            )
        raise AllProvidersFailed(f"no endpoint of model {model.name} answered: " + "; ".join(failures))
