"""Any OpenAI-compatible embeddings endpoint (OpenAI, TEI, Infinity, vLLM, Ollama) through the official SDK."""

from __future__ import annotations

import base64
import email.utils
import os
import threading
import time
from typing import Any

import numpy as np

from embedsvc.adapters.providers.base import ProviderResult
from embedsvc.config import ProviderSpec
from embedsvc.errors import (
    ProviderError,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
)

# Secrets Manager answers that mean "there is no key for us", as opposed to "not right now".
_SECRET_ABSENT = ("ResourceNotFoundException", "AccessDeniedException", "DecryptionFailure")


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` (seconds or an HTTP date), as the SDK reads them."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None


def _as_vector(embedding: Any) -> np.ndarray:
    """A float32 vector from base64 (float32 little-endian) or, from servers that ignore the ask, floats."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


class OpenAIHttpProvider:
    def __init__(self, spec: ProviderSpec, *, api_key: str | None = None):
        self.key = spec.key
        self.spec = spec
        self._api_key = api_key
        self._client: Any = None
        self._lock = threading.Lock()

    def _resolve_api_key(self) -> str:
        if self._api_key:
            return self._api_key
        if self.spec.api_key_env and os.environ.get(self.spec.api_key_env):
            return os.environ[self.spec.api_key_env]
        if self.spec.api_key_secret:
            from embedsvc.adapters.aws import get_secret

            try:
                return get_secret(self.spec.api_key_secret)
            except Exception as exc:
                cause = exc.__cause__ or exc.__context__ or exc  # Powertools wraps the ClientError
                code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
                if code in _SECRET_ABSENT:
                    raise ProviderNotConfigured(self._how_to_configure(code)) from None
                raise ProviderError(
                    f"provider {self.key}: cannot read its API key secret right now ({code or type(cause).__name__})"
                ) from exc
        # Self-hosted servers often need no key; the SDK insists on a non-empty one.
        return "none"

    def _how_to_configure(self, code: str) -> str:
        ways = []
        if self.spec.api_key_env:
            ways.append(
                f"set {self.spec.api_key_env} in the environment (e.g. `{self.spec.api_key_env}=sk-... make serve`)"
            )
        ways.append(f"store the key in the Secrets Manager secret '{self.spec.api_key_secret}'")
        ways.append(
            "or point the model at a self-hosted OpenAI-compatible server in the registry "
            "(EMBEDSVC_REGISTRY_FILE; see the README's Configuration)"
        )
        return f"provider '{self.key}' has no API key (secret: {code}): " + ", ".join(ways)

    def client(self):
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                # SDK retries are off: every try must pass through the shared rate-limit ledger first,
                # otherwise retries would spend provider budget that no other worker can see.
                self._client = OpenAI(
                    base_url=self.spec.base_url,
                    api_key=self._resolve_api_key(),
                    max_retries=0,
                    timeout=self.spec.timeout_seconds,
                )
            return self._client

    def warm(self) -> None:
        """Create the SDK client (imports, key lookup) ahead of the first call."""
        self.client()

    def embed(
        self,
        texts: list[str],
        model_name: str,
        *,
        dimensions: int | None = None,
        timeout: float | None = None,
    ) -> ProviderResult:
        import openai

        kwargs: dict[str, Any] = {"dimensions": dimensions} if dimensions else {}
        if timeout is not None:
            kwargs["timeout"] = min(timeout, self.spec.timeout_seconds)  # never past the caller's deadline
        try:
            # base64, as the SDK asks by default (a third of the bytes), but said explicitly so that the SDK
            # hands the strings over instead of turning each vector into a list of Python floats. The raw
            # response is read as JSON: building the SDK's typed objects for 2,048 embeddings costs more
            # CPU than decoding their vectors (28 ms of a 256-text request on this machine, bench-api).
            # Errors are raised by the SDK as with `create`.
            raw = self.client().embeddings.with_raw_response.create(
                input=texts, model=model_name, encoding_format="base64", **kwargs
            )
        except openai.RateLimitError as exc:
            if exc.code == "insufficient_quota":
                # Out of credit is not a throttle: waiting will not help, another endpoint might.
                raise ProviderError(f"{self.key} has no quota left: {exc.message}") from exc
            raise ProviderRateLimited(
                f"{self.key} answered 429: {exc.message}", retry_after=parse_retry_after(exc.response.headers)
            ) from exc
        except openai.APITimeoutError as exc:
            seconds = kwargs.get("timeout", self.spec.timeout_seconds)
            raise ProviderTimeout(f"{self.key} timed out after {seconds:.1f}s") from exc
        except openai.APIConnectionError as exc:
            raise ProviderError(f"{self.key} is unreachable: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code in (401, 403, 404, 408, 409):
                # Server faults, and a key or model this endpoint lacks: another endpoint may still serve.
                raise ProviderError(f"{self.key} answered {exc.status_code}: {exc.message}") from exc
            raise ProviderRejected(
                f"{self.key} rejected the request ({exc.status_code}): {exc.message}"
            ) from exc
        data, prompt_tokens = self._parse(raw.http_response)
        if len(data) != len(texts):
            raise ProviderError(f"{self.key} returned {len(data)} embeddings for {len(texts)} inputs")
        vectors = (
            np.stack([_as_vector(item["embedding"]) for item in data]) if data else np.zeros((0, 0), "<f4")
        )
        return ProviderResult(vectors, prompt_tokens)

    def _parse(self, http_response: Any) -> tuple[list[dict[str, Any]], int | None]:
        """The answer's embeddings in input order and its prompt tokens; a clear error if it is not one."""
        try:
            body = http_response.json()
            data = sorted(body["data"], key=lambda item: int(item["index"]))
            if not all("embedding" in item for item in data):
                raise KeyError("embedding")
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                f"{self.key} answered {http_response.status_code} with a body that is not an embeddings "
                f"list ({type(exc).__name__}: {exc})"
            ) from exc
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens = usage.get("prompt_tokens")
        return data, tokens if isinstance(tokens, int) else None
