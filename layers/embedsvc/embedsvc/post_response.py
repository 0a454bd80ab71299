"""Work that runs after a Lambda's answer has left: a Lambda internal extension that flushes the cost roll-up.

Why: the roll-up is one DynamoDB UpdateItem per dimension (source, tenant, user, task, model) for each
request. Written inside the handler, those writes sit between the provider's answer and the caller, on every
request, cache hits included. Lambda returns a function's response as soon as the runtime posts it, and
keeps the execution environment running (not frozen) until every registered extension has asked for its
next event (the `PostRuntimeExtensionsDuration` metric): an extension's post-response work delays no
caller, is billed, and finishes before this environment takes its next invocation. So the API's roll-up
is written there, by a thread of this process registered with the Extensions API: an internal extension.

The protocol (docs.aws.amazon.com/lambda/latest/dg/runtimes-extensions-api.html):
- `POST /2020-01-01/extension/register` with `{"events": ["INVOKE"]}` and a `Lambda-Extension-Name` header,
  during init, before the runtime first asks for an invocation (so: when the handler module is imported).
  The answer's `Lambda-Extension-Identifier` header goes on every later call. Internal extensions cannot
  register for SHUTDOWN.
- `GET /2020-01-01/extension/event/next` blocks until the next invocation starts, and answers its
  `requestId` and `deadlineMs`. Asking again says "done with the last one".
The extension thread waits until the handler says this request is done (`request_done`), flushes, and
asks for the next event. If the handler never says so, it flushes at the invocation's deadline anyway.

Outside Lambda (tests, the local gateway, the CLI: no `AWS_LAMBDA_RUNTIME_API`), when registration fails,
or with `COST_FLUSH_AFTER_RESPONSE=false`, nothing registers and `flush_costs` flushes inside the handler,
as before: the roll-up is written exactly once either way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

EXTENSION_NAME = "embedsvc-cost-flush"
API_VERSION = "2020-01-01"
REGISTER_TIMEOUT_SECONDS = 2.0
# A request the handler never reported done (it cannot happen short of a crash inside the runtime) is
# flushed this long before its deadline, so the extension still asks for its next event in time.
DEADLINE_MARGIN_SECONDS = 0.5


class PostResponseFlusher:
    """The internal extension: one per process, registered once, flushing after each invocation."""

    def __init__(self, runtime_api: str, flush: Callable[[], Any], *, clock: Callable[[], float] = time.time):
        self.base = f"http://{runtime_api}/{API_VERSION}/extension"
        self.flush = flush
        self.clock = clock
        self.identifier: str | None = None
        self._done: set[str] = set()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self.flushes = 0  # invocations flushed after their answer (for tests and logs)

    @property
    def active(self) -> bool:
        return self.identifier is not None and self._thread is not None and self._thread.is_alive()

    def register(self) -> bool:
        """Register with the Extensions API and start the thread; False (and a warning) if Lambda refuses."""
        request = urllib.request.Request(
            f"{self.base}/register",
            data=json.dumps({"events": ["INVOKE"]}).encode(),
            headers={"Lambda-Extension-Name": EXTENSION_NAME, "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=REGISTER_TIMEOUT_SECONDS) as answer:
                identifier = answer.headers.get("Lambda-Extension-Identifier")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            logger.warning(
                "post-response flush not registered: costs are written before each answer",
                extra={"error": type(exc).__name__},
            )
            return False
        if not identifier:
            logger.warning("post-response flush not registered: no Lambda-Extension-Identifier in the answer")
            return False
        self.identifier = identifier
        self._thread = threading.Thread(target=self._run, name="post-response-flush", daemon=True)
        self._thread.start()
        return True

    def request_done(self, request_id: str) -> None:
        """The handler has its answer for `request_id`: the extension may flush once the runtime posts it."""
        with self._condition:
            self._done.add(request_id)
            self._condition.notify_all()

    def _next_event(self) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base}/event/next", headers={"Lambda-Extension-Identifier": self.identifier or ""}
        )
        # No timeout: Lambda answers when the next invocation starts, which may be minutes away (frozen).
        with urllib.request.urlopen(request) as answer:  # noqa: S310 (the runtime API's own http URL)
            return json.loads(answer.read() or b"{}")

    def _run(self) -> None:
        while True:
            try:
                event = self._next_event()
            except Exception as exc:  # the runtime API went away: the environment is shutting down
                logger.warning("post-response flush stopped", extra={"error": type(exc).__name__})
                self.identifier = None
                return
            if event.get("eventType") != "INVOKE":
                continue
            self._wait_for(str(event.get("requestId", "")), float(event.get("deadlineMs") or 0) / 1000)
            try:
                self.flush()
                self.flushes += 1
            except Exception as exc:  # the flush logs its own losses; this thread must ask for the next event
                logger.warning("post-response flush failed", extra={"error": type(exc).__name__})

    def _wait_for(self, request_id: str, deadline: float) -> None:
        with self._condition:
            while request_id not in self._done:
                left = deadline - DEADLINE_MARGIN_SECONDS - self.clock() if deadline else 1.0
                if left <= 0:
                    logger.warning("handler never reported done: flushing at the deadline")
                    break
                self._condition.wait(timeout=left)
            self._done.discard(request_id)


_flusher: PostResponseFlusher | None = None
_lock = threading.Lock()


def start(flush: Callable[[], Any]) -> PostResponseFlusher | None:
    """Register the extension if this process is a Lambda runtime and it is enabled; call at import time."""
    global _flusher
    runtime_api = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    enabled = os.environ.get("COST_FLUSH_AFTER_RESPONSE", "true").strip().lower() not in ("0", "false", "no")
    if not runtime_api or not enabled:
        return None
    with _lock:
        if _flusher is None:
            candidate = PostResponseFlusher(runtime_api, flush)
            if candidate.register():
                _flusher = candidate
        return _flusher


def current() -> PostResponseFlusher | None:
    """The registered extension when it is running; None means: flush inside the handler."""
    flusher = _flusher
    return flusher if flusher is not None and flusher.active else None


def reset() -> None:
    """Forget the extension (tests)."""
    global _flusher
    with _lock:
        _flusher = None
