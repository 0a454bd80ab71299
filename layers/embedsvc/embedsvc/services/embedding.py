"""The embedding service: validate, count, consult the cache, split, route, record cost, assemble."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from embedsvc.config import ModelSpec, Registry
from embedsvc.errors import EmbedServiceError, InvalidRequest, ProviderRejected
from embedsvc.models.api import MAX_INPUTS, EncodingFormat
from embedsvc.observability import CallContext, CostRecorder
from embedsvc.services.batching import RequestLimits, split_requests
from embedsvc.services.ratelimit import Lane
from embedsvc.services.tokens import count_tokens, truncate_to_limit

# How long a caller may wait for rate-limit budget before the service sheds the request.
DEFAULT_MAX_WAIT_SECONDS = {Lane.REALTIME: 5.0, Lane.BULK: 60.0}


@dataclass
class EmbedResult:
    model: ModelSpec
    vectors: np.ndarray  # (n, dims) float32, in input order
    prompt_tokens: int  # tokens of every input, as the provider would count them
    cache_hits: int
    errors: dict[int, EmbedServiceError] = field(default_factory=dict)  # input index -> why it failed


class EmbeddingService:
    def __init__(
        self,
        registry: Registry,
        router,
        cache,
        costs: CostRecorder,
        *,
        max_wait_seconds: dict[Lane, float] | None = None,
        bulk_ceiling: float = 1.0,
        ledger_share: float = 1.0,
        tenant_share: Callable[[str | None], float | None] | None = None,
        shared_cache_max_inputs: int = 16,
    ):
        self.bulk_ceiling = bulk_ceiling
        # The share of each provider limit the ledger grants from DynamoDB (less any fallback reserve).
        self.ledger_share = ledger_share
        # A tenant's share of every provider limit, or None when that tenant is not capped.
        self.tenant_share = tenant_share or (lambda tenant: None)
        # Requests with more inputs are embedding jobs: they use the process's memory tier only. A
        # text-embedding-3-small vector is a 6 KB item: 7 DynamoDB write units (~$8.8e-6 on demand) to store
        # and 1 read unit (~$2.5e-7) to look up, while embedding a 15-token text again costs $3e-7. The
        # shared tier pays off for repeated queries (a hit saves a provider round trip), not for batches.
        self.shared_cache_max_inputs = shared_cache_max_inputs
        self.max_wait_seconds = max_wait_seconds or DEFAULT_MAX_WAIT_SECONDS
        self.registry = registry
        self.router = router
        self.cache = cache
        self.costs = costs

    def request_limits(
        self, model: ModelSpec, lane: Lane, tenant_share: float | None = None
    ) -> RequestLimits:
        """Per-request limits: the model's, and never more tokens than its tightest endpoint's budget allows."""
        # A request whose reservation exceeds what the ledger may grant of a provider's TPM (for bulk, its
        # ceiling; for a capped tenant, its share) could never be granted: the same arithmetic as the ledger's.
        tpm = min(self.registry.providers[e.provider].tpm for e in model.endpoints)
        granted_by_dynamodb = math.floor(self.ledger_share * tpm)
        cap = (
            granted_by_dynamodb
            if lane is Lane.REALTIME
            else math.floor(self.bulk_ceiling * granted_by_dynamodb)
        )
        if tenant_share is not None:
            cap = min(cap, math.floor(tenant_share * granted_by_dynamodb))
        # An estimate reserves its margin too: floor(cap / margin) x margin never exceeds the cap.
        grantable = math.floor(cap / model.token_estimate_margin) if model.tokenizer == "estimate" else cap
        max_tokens = max(1, min(model.max_tokens_per_request, grantable))
        return RequestLimits(model.max_inputs_per_request, max_tokens, model.max_input_tokens)

    def resolve_dimensions(self, model: ModelSpec, dimensions: int | None) -> int:
        """The output size: the model's own, or a smaller one where the model supports shortening."""
        if dimensions is None or dimensions == model.dimensions:
            return model.dimensions
        if not model.supports_dimensions:
            raise InvalidRequest(
                f"The model '{model.name}' does not support the 'dimensions' parameter.", param="dimensions"
            )
        if not 1 <= dimensions <= model.dimensions:
            raise InvalidRequest(
                f"'dimensions' must be between 1 and {model.dimensions} for '{model.name}'.",
                param="dimensions",
            )
        return dimensions

    def validate_inputs(self, texts: list[str]) -> None:
        """A 400 for what no provider can embed: no inputs, too many, non-strings, blank or invalid text."""
        if not texts:
            raise InvalidRequest("'input' must not be an empty list.", param="input")
        if len(texts) > MAX_INPUTS:
            raise InvalidRequest(
                f"'input' has {len(texts)} items; at most {MAX_INPUTS} are allowed.", param="input"
            )
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"'input[{index}]' must be a string.", param="input")
            if not text.strip():
                raise InvalidRequest(
                    f"'input[{index}]' is empty; empty strings cannot be embedded.", param="input"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                # JSON may carry a lone surrogate (\ud800); no tokenizer or provider can take it.
                raise InvalidRequest(
                    f"'input[{index}]' is not valid Unicode (it holds a lone surrogate).", param="input"
                ) from None

    def embed(
        self,
        inputs: list[str] | list[list[int]],
        model: str,
        *,
        context: CallContext,
        lane: Lane = Lane.REALTIME,
        dimensions: int | None = None,
        truncate: bool = False,
        encoding_format: EncodingFormat | None = None,
        max_total_tokens: int | None = None,
        deadline: float | None = None,
    ) -> EmbedResult:
        """Vectors for every input, or the first failure raised (the API's all-or-nothing contract).

        `inputs` are texts or arrays of cl100k_base token ids (decoded to text for every model). The API
        passes `encoding_format`, so the answer must fit one Lambda response, and `max_total_tokens`,
        OpenAI's per-request cap; like every other limit they are checked before the cache or a provider.
        `deadline` (time.monotonic) bounds every wait and provider call, as in `embed_partial`.
        """
        from embedsvc.services import api_limits
        from embedsvc.services.token_inputs import decode_token_inputs, is_token_inputs

        spec = self.registry.model(model)
        dims = self.resolve_dimensions(spec, dimensions)
        id_counts: list[int] | None = None
        if is_token_inputs(inputs):
            texts = decode_token_inputs(inputs)
            # OpenAI counts the ids it is sent; other models count the decoded text their own way.
            id_counts = [len(ids) for ids in inputs] if spec.tokenizer == "cl100k_base" else None
        else:
            texts = list(inputs)
        self.validate_inputs(texts)
        if encoding_format is not None:
            api_limits.check_answer_fits(spec, dims, encoding_format, len(texts))
        if id_counts is not None and not truncate:
            api_limits.check_tokens_per_input(spec, id_counts)
        if max_total_tokens is not None:
            api_limits.check_total_tokens(spec, texts, max_total_tokens, id_counts)
        result = self.embed_partial(  # all or nothing: stop at the first failed provider request
            texts,
            model,
            contexts=[context] * len(texts),
            lane=lane,
            dimensions=dimensions,
            truncate=truncate,
            stop_on_error=True,
            isolate_rejections=False,
            deadline=deadline,
        )
        if result.errors:
            raise next(iter(result.errors.values()))
        if id_counts is not None:
            result.prompt_tokens = sum(id_counts)
        return result

    def embed_partial(
        self,
        texts: list[str],
        model: str,
        *,
        contexts: list[CallContext],
        lane: Lane = Lane.REALTIME,
        dimensions: int | None = None,
        truncate: bool = False,
        use_cache: bool = True,
        stop_on_error: bool = False,
        isolate_rejections: bool = True,
        deadline: float | None = None,
    ) -> EmbedResult:
        """Vectors for as many texts as possible: a failed provider request fails only its own inputs.

        `contexts` gives each input its cost owner, so one provider request packed from many queue
        messages still attributes tokens to each message's source, user and task. `truncate` embeds
        over-long inputs by their head (indexing) instead of rejecting them (the API). `use_cache`
        off skips the shared cache entirely (bulk indexing, where the collection's hash is the cache).
        `stop_on_error` raises at the first failed request; `isolate_rejections` bisects a request the
        provider refused, so only the inputs it refuses fail. `deadline` (time.monotonic) bounds every wait
        and provider call (the worker's Lambda end). With tenant shares configured, each provider request
        carries one tenant's inputs only, so the ledger can hold each tenant to its share.
        """
        from embedsvc.adapters.cache import cache_key

        spec = self.registry.model(model)
        dims = self.resolve_dimensions(spec, dimensions)
        self.validate_inputs(texts)
        tokens = count_tokens(spec, texts)
        if truncate:
            pairs = [truncate_to_limit(spec, text, count) for text, count in zip(texts, tokens, strict=True)]
            texts, tokens = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            for index, count in enumerate(tokens):
                if count > spec.max_input_tokens:
                    raise InvalidRequest(
                        f"'input[{index}]' has {count} tokens; '{spec.name}' accepts at most {spec.max_input_tokens}.",
                        param="input",
                    )
        keys = [cache_key(spec.key, dims, text, c.tenant_id) for text, c in zip(texts, contexts, strict=True)]
        shared = len(texts) <= self.shared_cache_max_inputs
        found = self.cache.get_many(keys, shared=shared) if use_cache else {}
        # Each distinct missing text is embedded once, even if it repeats in the request.
        missing: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key not in found and key not in missing:
                missing[key] = index
        # One provider request never mixes budget owners: a spent budget fails only its own inputs.
        owners = self._budget_owners(spec, [contexts[index] for index in missing.values()])
        by_tenant: dict[tuple[str | None, tuple], list[int]] = {}
        for index, budgets in zip(missing.values(), owners, strict=True):
            tenant = contexts[index].tenant_id
            capped = tenant if self.tenant_share(tenant) is not None else None
            by_tenant.setdefault((capped, budgets), []).append(index)
        fresh: dict[str, np.ndarray] = {}
        failed: dict[str, EmbedServiceError] = {}

        def embed_positions(
            positions: list[int], tenant: str | None, share: float | None, budgets: tuple = ()
        ) -> None:
            try:
                routed = self.router.embed(
                    spec,
                    [texts[p] for p in positions],
                    sum(tokens[p] for p in positions),
                    lane=lane,
                    max_wait_seconds=self.max_wait_seconds[lane],
                    dimensions=dims if dims != spec.dimensions else None,
                    deadline=deadline,
                    tenant=tenant if share is not None else None,
                    tenant_share=share,
                    **({"budgets": budgets} if budgets else {}),
                )
            except ProviderRejected as exc:
                if isolate_rejections and len(positions) > 1:
                    # One bad input must not sink the others: halve until the rejected ones stand alone.
                    half = len(positions) // 2
                    embed_positions(positions[:half], tenant, share, budgets)
                    embed_positions(positions[half:], tenant, share, budgets)
                    return
                failed.update({keys[p]: exc for p in positions})
                return
            except EmbedServiceError as exc:
                failed.update({keys[p]: exc for p in positions})
                return
            used = routed.result.prompt_tokens
            used = used if used is not None else sum(tokens[p] for p in positions)
            self._record_cost(spec, routed.provider, used, [(contexts[p], tokens[p]) for p in positions])
            chunk_vectors = {keys[p]: routed.result.vectors[i] for i, p in enumerate(positions)}
            fresh.update(chunk_vectors)
            # Cache each chunk as it lands, so a failure in a later chunk does not waste this one.
            if use_cache:
                self.cache.put_many(chunk_vectors, shared=shared)

        for (tenant, budgets), positions in by_tenant.items():
            share = self.tenant_share(tenant)
            limits = self.request_limits(spec, lane, share)
            for chunk in split_requests([tokens[i] for i in positions], limits):
                embed_positions([positions[i] for i in chunk.indices], tenant, share, budgets)
                if failed and stop_on_error:
                    raise next(iter(failed.values()))  # all-or-nothing callers: no more provider calls
        vectors = np.zeros((len(texts), dims), dtype=np.float32)
        errors: dict[int, EmbedServiceError] = {}
        for index, key in enumerate(keys):
            if key in found:
                vectors[index] = found[key]
            elif key in fresh:
                vectors[index] = fresh[key]
            else:
                errors[index] = failed[key]
        # What the cache answered was not paid for: saved tokens and dollars, by the inputs' owners.
        self._record_saved(spec, [(contexts[i], tokens[i]) for i, key in enumerate(keys) if key in found])
        return EmbedResult(
            model=spec,
            vectors=vectors,
            prompt_tokens=sum(tokens),
            cache_hits=sum(1 for key in keys if key in found),
            errors=errors,
        )

    def _budget_owners(self, spec: ModelSpec, contexts: list[CallContext]) -> list[tuple]:
        """The budgets (task, tenant) each input's provider requests are charged to; () where none applies."""
        lookup = getattr(self.router, "budget_scopes", None)
        if lookup is None or not contexts:
            return [() for _ in contexts]
        return list(lookup(spec, contexts))

    def _record_cost(
        self, spec: ModelSpec, provider: str, used: int, owners: list[tuple[CallContext, int]]
    ) -> None:
        """Split one provider call's reported tokens among the inputs' owners, in proportion to their tokens."""
        by_owner: dict[CallContext, int] = {}
        for owner, count in owners:
            by_owner[owner] = by_owner.get(owner, 0) + count
        counted = sum(by_owner.values()) or 1
        remaining = used
        for position, (owner, count) in enumerate(by_owner.items()):
            share = remaining if position == len(by_owner) - 1 else round(used * count / counted)
            remaining -= share
            self.costs.record(
                model=spec.key,
                provider=provider,
                tokens=share,
                price_per_million=spec.price_per_million_tokens,
                context=owner,
                requests=1 if position == 0 else 0,
            )

    def _record_saved(self, spec: ModelSpec, owners: list[tuple[CallContext, int]]) -> None:
        """Record tokens no provider was paid for, summed per owner (one EMF record each)."""
        by_owner: dict[CallContext, int] = {}
        for owner, count in owners:
            by_owner[owner] = by_owner.get(owner, 0) + count
        for owner, count in by_owner.items():
            self.costs.record_saved(
                model=spec.key, tokens=count, price_per_million=spec.price_per_million_tokens, context=owner
            )

    def record_skipped(self, texts: list[str], model: str, contexts: list[CallContext]) -> None:
        """Record texts left unembedded because the collection already holds them (content-hash skips) as
        saved: the tokens (as the model counts them) a reindex would otherwise have paid for."""
        if not texts:
            return
        spec = self.registry.model(model)
        # Indexing truncates to the model's window: a skip saves at most that much per text.
        tokens = [min(count, spec.max_input_tokens) for count in count_tokens(spec, texts)]
        self._record_saved(spec, list(zip(contexts, tokens, strict=True)))
