"""Lambda's Extensions API, played locally: what `embedsvc.post_response` talks to, for tests and benchmarks.

It follows the documented contract (docs.aws.amazon.com/lambda/latest/dg/runtimes-extensions-api.html) as
far as an internal extension sees it:
- `POST /2020-01-01/extension/register` answers 200 with a `Lambda-Extension-Identifier` header;
- `GET /2020-01-01/extension/event/next` blocks until the next invocation and answers
  `{"eventType": "INVOKE", "requestId", "deadlineMs", "invokedFunctionArn", "tracing"}`; asking again is
  how an extension says it is done with the last invocation;
- `invoke` plays the Lambda service: it does not start an invocation until every registered extension is
  done with the previous one (the environment takes one invocation at a time), hands each extension the
  event, runs the handler, and returns its answer at once, as Lambda returns the response the runtime posts
  while extensions still run. `wait_idle` waits for the extensions' post-response work.

`fail_register=True` answers the registration with a 500, as a runtime that refuses it would.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from embedsvc.local.json_http import send_json
from embedsvc.local.lambda_context import LocalLambdaContext

PREFIX = "/2020-01-01/extension"


@dataclass
class _Extension:
    name: str
    events: queue.Queue = field(default_factory=queue.Queue)
    idle: threading.Event = field(default_factory=threading.Event)  # waiting in /next: done with the last one


class LocalExtensionsApi:
    """Run with `with LocalExtensionsApi() as api:`; set AWS_LAMBDA_RUNTIME_API to `api.address`."""

    def __init__(self, *, fail_register: bool = False, timeout_seconds: float = 30.0):
        self.fail_register = fail_register
        self.timeout_seconds = timeout_seconds
        self.extensions: dict[str, _Extension] = {}
        self.registrations: list[dict[str, Any]] = []  # what each register call sent (name, body)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def __enter__(self) -> LocalExtensionsApi:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once every extension is done with the last invocation (asked for its next event)."""
        deadline = time.monotonic() + (self.timeout_seconds if timeout is None else timeout)
        with self._lock:
            extensions = list(self.extensions.values())
        return all(ext.idle.wait(max(deadline - time.monotonic(), 0)) for ext in extensions)

    def invoke(
        self,
        handler: Callable[[Any, Any], Any],
        event: Any,
        *,
        function_name: str = "api",
        timeout_seconds: float = 30.0,
    ) -> Any:
        """One invocation as Lambda runs it; returns the handler's answer without waiting for extensions."""
        if not self.wait_idle():
            raise TimeoutError("an extension never finished the previous invocation: Lambda would time out")
        request_id = str(uuid.uuid4())
        deadline_ms = int((time.time() + timeout_seconds) * 1000)
        with self._lock:
            extensions = list(self.extensions.values())
        for ext in extensions:
            ext.idle.clear()
            ext.events.put(
                {
                    "eventType": "INVOKE",
                    "requestId": request_id,
                    "deadlineMs": deadline_ms,
                    "invokedFunctionArn": f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}",
                    "tracing": {"type": "X-Amzn-Trace-Id", "value": ""},
                }
            )
        return handler(event, LocalLambdaContext(function_name, aws_request_id=request_id))

    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                send_json(self, status, body, headers)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                name = self.headers.get("Lambda-Extension-Name", "")
                api.registrations.append({"name": name, "body": body})
                if self.path != f"{PREFIX}/register" or api.fail_register or not name:
                    self._send(
                        500, {"errorMessage": "registration refused", "errorType": "Extension.Unknown"}
                    )
                    return
                identifier = f"ext-{next(api._ids)}"
                with api._lock:
                    api.extensions[identifier] = _Extension(name)
                self._send(200, {"functionName": "api"}, {"Lambda-Extension-Identifier": identifier})

            def do_GET(self) -> None:  # noqa: N802
                ext = api.extensions.get(self.headers.get("Lambda-Extension-Identifier", ""))
                if self.path != f"{PREFIX}/event/next" or ext is None:
                    self._send(403, {"errorMessage": "unknown extension", "errorType": "Extension.Forbidden"})
                    return
                ext.idle.set()
                event = ext.events.get()
                self._send(200, event)

        return Handler
