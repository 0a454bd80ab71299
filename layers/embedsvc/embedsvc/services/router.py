"""The router: try a model's endpoints in order (local first, API fallback), through the rate-limit ledger.

A model is only ever answered by an endpoint serving *that* model: falling back never changes the
vector space. Rate limits are reserved before each call; a 429 is written to the ledger (every worker
backs off) and the same endpoint is tried again after the wait; timeouts and server faults move on to
the next endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from embedsvc.adapters.providers.base import EmbeddingProvider, ProviderResult
from embedsvc.config import ModelSpec, ProviderSpec
from embedsvc.errors import (
    AllProvidersFailed,
    EmbedServiceError,
    ProviderError,
    ProviderRateLimited,
    ServiceOverloaded,
)
from embedsvc.services.ratelimit import Lane, LimitSpec, NoopLedger

logger = Logger(child=True)

DEFAULT_RETRY_AFTER_SECONDS = 1.0


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
    ):
        self.providers = providers
        self.ledger = ledger
        # An in-process model has no provider quota to protect: no DynamoDB round trip for it.
        self.unmetered = NoopLedger()
        self.provider_specs = provider_specs
        self.max_rate_limited_tries = max_rate_limited_tries

    def limit_for(self, provider_key: str, model_name: str) -> LimitSpec:
        spec = self.provider_specs[provider_key]
        return LimitSpec(key=f"{provider_key}:{model_name}", tpm=spec.tpm, rpm=spec.rpm)

    def embed(
        self,
        model: ModelSpec,
        texts: list[str],
        tokens: int,
        *,
        lane: Lane,
        max_wait_seconds: float,
        dimensions: int | None = None,
    ) -> RoutedResult:
        """Embed one provider-sized request with the first endpoint of `model` that answers."""
        failures: list[str] = []
        only_rate_limited = True  # every failure was a spent budget or a 429: the caller should back off
        retry_after: float | None = None
        deadline = time.monotonic() + max_wait_seconds
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
                except EmbedServiceError as exc:  # e.g. an unreadable API key secret: try the next endpoint
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    continue
            for _ in range(self.max_rate_limited_tries):
                try:
                    reservation = ledger.acquire(
                        limit, tokens, lane, max_wait_seconds=max(deadline - time.monotonic(), 0.0)
                    )
                except ServiceOverloaded as exc:
                    retry_after = exc.retry_after
                    failures.append(f"{endpoint.provider}: budget exhausted")
                    break  # this endpoint's budget is spent for longer than we may wait: try the next
                try:
                    result = provider.embed(texts, endpoint.model_name, dimensions=dimensions)
                except ProviderRateLimited as exc:
                    wait = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER_SECONDS
                    ledger.report_throttle(limit, wait)
                    retry_after = wait
                    failures.append(f"{endpoint.provider}: 429 (retry after {wait:.2f}s)")
                    continue  # the next acquire waits out the cooldown, for every worker
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
        raise AllProvidersFailed(f"no endpoint of model {model.name} answered: " + "; ".join(failures))
