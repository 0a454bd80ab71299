"""The router: try a model's endpoints in order (local first, API fallback), through the rate-limit ledger.

A model is only ever answered by an endpoint serving *that* model: falling back never changes the
vector space. Rate limits are reserved before each call; a 429 is written to the ledger (every worker
backs off) and the same endpoint is tried again after the wait; timeouts and server faults move on to
the next endpoint.

With a `deadline` (time.monotonic, e.g. a Lambda's end less a safety margin) every wait for budget and
every provider call fits in the time left: a call is not started with less than `min_call_seconds`
left, and its timeout is cut to what remains, so the caller never outlives its invocation.

Budgets. A request may be charged to its task's and tenant's budgets (`budgets`, from `budget_scopes`):
each metered endpoint's reservation carries the charges, at the model's price, so the ledger refuses it
(BudgetExceeded, raised at once: another endpoint would spend the same budget) before the provider is
called. A request that fails after its grant gives its charges back; the in-process model is free and
charges nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger

from embedsvc.adapters.providers.base import EmbeddingProvider, ProviderResult
from embedsvc.config import ModelSpec, ProviderSpec
from embedsvc.errors import (
    AllProvidersFailed,
    DeadlineExceeded,
    EmbedServiceError,
    LedgerUnavailable,
    ProviderError,
    ProviderNotConfigured,
    ProviderRateLimited,
    ServiceOverloaded,
)
from embedsvc.services.budgets import BudgetCharge, Scope
from embedsvc.services.ratelimit import Lane, LimitSpec, NoopLedger

BudgetScopes = tuple[tuple[Scope, str], ...]  # the (scope, key) budgets one request is charged to

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

    def budget_scopes(self, model: ModelSpec, contexts: Sequence[Any]) -> list[BudgetScopes]:
        """For each call context (task_id, tenant_id), the budgets its calls to `model` are charged to.

        Empty without a budget store, or when every endpoint of the model is the free in-process one.
        One cached lookup for all the contexts (BudgetStore.active).
        """
        store = getattr(self.ledger, "budgets", None)
        metered = any(self.provider_specs[e.provider].kind != "local" for e in model.endpoints)
        if store is None or not metered:
            return [() for _ in contexts]
        owners: list[BudgetScopes] = []
        for context in contexts:
            task, tenant = getattr(context, "task_id", None), getattr(context, "tenant_id", None)
            pairs: list[tuple[Scope, str]] = []
            if task:
                pairs.append(("task", task))
            if tenant:
                pairs.append(("tenant", tenant))
            owners.append(tuple(pairs))
        wanted = {pair for pairs in owners for pair in pairs}
        try:
            found = store.active(wanted) if wanted else set()
        except LedgerUnavailable:
            if not getattr(self.ledger, "fallback_processes", 0):
                raise  # fail closed: a budget that cannot be looked up is not skipped
            # An API process that may serve from the in-memory fallback while DynamoDB is down: its
            # operator chose availability, and the fallback's grants are not DynamoDB's to charge anyway.
            logger.warning("budgets could not be looked up; serving without them (fallback mode)")
            return [() for _ in contexts]
        return [tuple(pair for pair in pairs if pair in found) for pairs in owners]

    @staticmethod
    def _refund(ledger, reservation) -> None:
        if getattr(reservation, "charges", ()):
            ledger.refund_charges(reservation)

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
        budgets: BudgetScopes = (),
    ) -> RoutedResult:
        """Embed one provider-sized request with the first endpoint of `model` that answers.

        `tokens` is the request's token count (exact, or estimated); the ledger reserves it, with the
        model's margin when estimated, and reconciles with the provider's reported usage after. Each of
        `budgets` is charged the reservation at the model's price (BudgetExceeded when one is spent).
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
            charges = [
                BudgetCharge.of(scope, key, reserve, model.price_per_million_tokens) for scope, key in budgets
            ]
            # Only with budgets: a ledger stand-in that knows nothing of them keeps working.
            charging = {"charges": charges} if charges and ledger is self.ledger else {}
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
                        **charging,
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
                    self._refund(ledger, reservation)  # a refused request is not billed
                    wait = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER_SECONDS
                    ledger.report_throttle(limit, wait)
                    retry_after = wait
                    failures.append(f"{endpoint.provider}: 429 (retry after {wait:.2f}s)")
                    continue  # the next acquire waits out the cooldown, for every worker
                except ProviderNotConfigured as exc:
                    self._refund(ledger, reservation)
                    not_configured.append(exc)
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    break
                except ProviderError as exc:
                    self._refund(ledger, reservation)
                    logger.warning(
                        "provider failed; trying the next endpoint",
                        extra={"provider": endpoint.provider, "error": exc.message},
                    )
                    failures.append(f"{endpoint.provider}: {exc.message}")
                    only_rate_limited = False
                    break
                except BaseException:  # refused as a request (ProviderRejected) or cut short: nothing billed
                    self._refund(ledger, reservation)
                    raise
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
