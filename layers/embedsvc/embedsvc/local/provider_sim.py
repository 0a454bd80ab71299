"""A local OpenAI-compatible embeddings server: the provider in tests, benchmarks and offline demos.

It answers `POST /v1/embeddings` exactly like OpenAI (float or base64, usage, error bodies), with
deterministic unit vectors derived from each text's hash, so the real `openai` SDK code path runs
without the internet. It can also play a rate-limited provider (TPM and RPM over a sliding window,
429 + Retry-After past it) and inject scripted faults (status codes, delays).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from embedsvc.local.json_http import send_json, send_raw

DEFAULT_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


def hash_vector(text: str, dimensions: int) -> np.ndarray:
    """A deterministic unit vector for a text (the simulator's 'model')."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vector / np.linalg.norm(vector)


def sim_tokens(model: str, text: str) -> int:
    """How the simulator counts tokens: cl100k for OpenAI model names, else 0.25/byte (as our estimator)."""
    if model.startswith("text-embedding"):
        from embedsvc.services.tokens import _cl100k

        return len(_cl100k().encode_ordinary(text))
    return max(1, math.ceil(len(text.encode("utf-8")) * 0.25))


@dataclass
class Fault:
    """A scripted answer for the next request: an HTTP error status with headers, and/or a delay."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    message: str = "injected fault"
    code: str = "injected"  # OpenAI's error code, e.g. "insufficient_quota"
    body: str | None = None  # a 200 with this body instead of embeddings (a proxy's HTML page, a truncation)


@dataclass
class RequestRecord:
    at: float
    model: str
    inputs: int
    tokens: int
    status: int
    user: str | None = None  # the request's `user` field: lets a benchmark tell its callers apart


class ProviderSimulator:
    """Run with `with ProviderSimulator() as sim:`; point the SDK at `sim.base_url`."""

    def __init__(
        self,
        *,
        tpm: int | None = None,
        rpm: int | None = None,
        window_seconds: float = 60.0,
        latency_seconds: float = 0.0,
        api_key: str | None = None,
        dimensions: dict[str, int] | None = None,
        vector_fn: Callable[[str, int], np.ndarray] = hash_vector,
        token_counter: Callable[[str, str], int] = sim_tokens,
        port: int = 0,
    ):
        self.tpm, self.rpm, self.window = tpm, rpm, window_seconds
        self.latency = latency_seconds
        self.api_key = api_key
        self.dimensions = {**DEFAULT_DIMENSIONS, **(dimensions or {})}
        self.vector_fn = vector_fn
        # (model, text) -> the tokens this provider counts and bills; a provider may count differently
        # from the service's estimate, which is what the ledger's reconcile is for.
        self.token_counter = token_counter
        self.faults: deque[Fault] = deque()
        self.records: list[RequestRecord] = []
        self._accepted: deque[tuple[float, int]] = deque()  # (time, tokens) inside the window
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> ProviderSimulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="provider-sim",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ProviderSimulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, *faults: Fault) -> None:
        """Queue faults answered, in order, to the next requests."""
        self.faults.extend(faults)

    @property
    def calls(self) -> int:
        return len(self.records)

    def accepted(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status == 200]

    def _admit(self, now: float, tokens: int) -> float:
        """0 if the request fits the sliding window, else seconds until it would."""
        with self._lock:
            while self._accepted and self._accepted[0][0] <= now - self.window:
                self._accepted.popleft()
            used_tokens = sum(t for _, t in self._accepted)
            over_tokens = self.tpm is not None and used_tokens + tokens > self.tpm
            over_requests = self.rpm is not None and len(self._accepted) + 1 > self.rpm
            if not (over_tokens or over_requests):
                self._accepted.append((now, tokens))
                return 0.0
            # Wait until enough of the oldest entries leave the window.
            freed, wait = used_tokens, self.window
            for index, (at, spent) in enumerate(self._accepted):
                freed -= spent
                fits_tokens = self.tpm is None or freed + tokens <= self.tpm
                fits_requests = self.rpm is None or len(self._accepted) - index - 1 + 1 <= self.rpm
                if fits_tokens and fits_requests:
                    wait = at + self.window - now
                    break
            return max(wait, 0.001)

    def _handler_class(self):
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                send_json(self, status, body, headers)

            def _error(
                self, status: int, message: str, code: str, headers: dict[str, str] | None = None
            ) -> None:
                etype = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
                self._send(
                    status,
                    {"error": {"message": message, "type": etype, "param": None, "code": code}},
                    headers,
                )

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") not in ("/v1/embeddings", "/embeddings"):
                    self._error(404, f"no route {self.path}", "not_found")
                    return
                if sim.api_key and self.headers.get("Authorization") != f"Bearer {sim.api_key}":
                    self._error(401, "Incorrect API key provided", "invalid_api_key")
                    return
                try:
                    body = json.loads(raw)
                    model = body["model"]
                    inputs = body["input"]
                except (ValueError, KeyError, TypeError):
                    self._error(400, "malformed request", "invalid_request")
                    return
                if isinstance(inputs, str):
                    inputs = [inputs]
                user = body.get("user") if isinstance(body.get("user"), str) else None
                tokens = sum(sim.token_counter(model, text) for text in inputs if isinstance(text, str))
                now = time.time()
                fault = sim.faults.popleft() if sim.faults else None
                if fault and fault.delay_seconds:
                    time.sleep(fault.delay_seconds)
                if fault and fault.status:
                    sim.records.append(RequestRecord(now, model, len(inputs), tokens, fault.status, user))
                    self._error(fault.status, fault.message, fault.code, fault.headers)
                    return
                if fault and fault.body is not None:
                    sim.records.append(RequestRecord(now, model, len(inputs), tokens, 200, user))
                    send_raw(self, 200, fault.body.encode())
                    return
                if any(not isinstance(t, str) or t == "" for t in inputs):
                    sim.records.append(RequestRecord(now, model, len(inputs), tokens, 400, user))
                    self._error(400, "'$.input' is invalid.", "invalid_request")
                    return
                wait = sim._admit(now, tokens) if (sim.tpm or sim.rpm) else 0.0
                if wait:
                    sim.records.append(RequestRecord(now, model, len(inputs), tokens, 429, user))
                    headers = {
                        "retry-after": str(math.ceil(wait)),
                        "retry-after-ms": str(math.ceil(wait * 1000)),
                    }
                    self._error(
                        429, f"Rate limit reached; try again in {wait:.3f}s", "rate_limit_exceeded", headers
                    )
                    return
                if sim.latency:
                    time.sleep(sim.latency)
                dims = int(body.get("dimensions") or sim.dimensions.get(model, 384))
                data = []
                for index, text in enumerate(inputs):
                    vector = sim.vector_fn(text, dims).astype(np.float32)
                    if body.get("encoding_format") == "base64":
                        embedding: object = base64.b64encode(vector.tobytes()).decode()
                    else:
                        embedding = vector.tolist()
                    data.append({"object": "embedding", "index": index, "embedding": embedding})
                sim.records.append(RequestRecord(now, model, len(inputs), tokens, 200, user))
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": data,
                        "model": model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                    },
                )

        return Handler
