"""A small HTTP server that plays API Gateway (REST) in front of the real handlers, authorizer included.

It enforces what AWS enforces and a plain local call would not: API Gateway's 10 MB request body,
Lambda's 6 MB request (the whole event) and response (the whole serialized proxy answer), and the
29 s integration timeout, and answers each as API Gateway does, with this project's gateway
responses (template.yaml `GatewayResponses`): OpenAI's error shape, `code` null.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.services.response_limits import LAMBDA_RESPONSE_LIMIT_BYTES

STAGE = "local"
API_GATEWAY_MAX_BODY_BYTES = 10 * 1024 * 1024  # REST API payload quota
# Lambda's synchronous request limit, on the whole event. Measured as 6 MiB ("Request must be smaller
# than 6291456 bytes"), 100 bytes below the response limit although the quotas page says "6 MB" for both.
LAMBDA_REQUEST_LIMIT_BYTES = 6 * 1024 * 1024
INTEGRATION_TIMEOUT_SECONDS = 29.0  # API Gateway REST's default (and, without a quota raise, maximum)

UNAUTHORIZED = {
    "error": {
        "message": "Invalid or missing API key. Send it as the header Authorization: Bearer sk-...",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
ACCESS_DENIED = {
    "error": {
        "message": "This API key is not allowed to call this endpoint.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def gateway_error(status: int, message: str) -> dict:
    """The body of a DEFAULT_4XX / DEFAULT_5XX gateway response, as template.yaml defines them."""
    etype = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


def lambda_payload_bytes(payload: dict, *, ensure_ascii: bool) -> int:
    """The size of a Lambda payload as JSON with the runtime's separators (simplejson's defaults)."""
    return len(json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8"))


def rest_event(
    method: str, path: str, headers: dict[str, str], body: str | None, authorizer: dict | None
) -> dict:
    """The API Gateway REST proxy event (payload 1.0) for one HTTP request."""
    split = urlsplit(path)
    query = dict(parse_qsl(split.query)) or None
    return {
        "resource": split.path,
        "path": split.path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": None,
        "stageVariables": None,
        "body": body,
        "isBase64Encoded": False,
        "requestContext": {
            "resourcePath": split.path,
            "httpMethod": method,
            "path": f"/{STAGE}{split.path}",
            "stage": STAGE,
            "requestId": str(uuid.uuid4()),
            "requestTimeEpoch": int(time.time() * 1000),
            "identity": {"sourceIp": "127.0.0.1"},
            "authorizer": authorizer,
            "accountId": "123456789012",
            "apiId": "local",
        },
    }


class LocalGateway:
    def __init__(
        self,
        api_handler,
        authorizer_handler,
        *,
        port: int = 3000,
        host: str = "127.0.0.1",
        integration_timeout_seconds: float = INTEGRATION_TIMEOUT_SECONDS,
    ):
        self.api_handler = api_handler
        self.authorizer_handler = authorizer_handler
        self.integration_timeout_seconds = integration_timeout_seconds
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalGateway:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="local-gateway",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def authorize(self, method: str, path: str, authorization: str | None) -> dict | int:
        """Run the TOKEN authorizer as API Gateway does: its context, or 401 / 403."""
        event = {
            "type": "TOKEN",
            "authorizationToken": authorization or "",
            "methodArn": f"arn:aws:execute-api:us-east-1:123456789012:local/{STAGE}/{method}{urlsplit(path).path}",
        }
        if not authorization:
            return 401  # API Gateway answers 401 itself when the identity source is absent
        try:
            policy = self.authorizer_handler(event, LocalLambdaContext("authorizer"))
        except Exception:
            return 401
        statements = policy.get("policyDocument", {}).get("Statement", [])
        if not any(s.get("Effect") == "Allow" for s in statements):
            return 403  # a Deny policy is ACCESS_DENIED, not UNAUTHORIZED
        return {"principalId": policy.get("principalId"), **(policy.get("context") or {})}

    def invoke(self, event: dict) -> tuple[int, str, dict[str, str]]:
        """Invoke the API function as API Gateway's Lambda proxy integration does: (status, body, headers)."""
        json_type = {"Content-Type": "application/json"}
        if lambda_payload_bytes(event, ensure_ascii=False) > LAMBDA_REQUEST_LIMIT_BYTES:
            # Lambda refuses the invocation; API Gateway answers 500 for any invocation it could not make.
            return 500, json.dumps(gateway_error(500, "Internal server error")), json_type
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["answer"] = self.api_handler(event, LocalLambdaContext("api"))
            except Exception as exc:
                outcome["error"] = exc

        # A daemon thread, so an invocation API Gateway gave up on runs on (as the Lambda would, until its
        # own timeout) without holding the process open.
        invocation = threading.Thread(target=run, name="local-lambda", daemon=True)
        invocation.start()
        invocation.join(self.integration_timeout_seconds)
        if invocation.is_alive():
            return 504, json.dumps(gateway_error(504, "Endpoint request timed out")), json_type
        answer = outcome.get("answer")
        if "error" in outcome or not isinstance(answer, dict) or "statusCode" not in answer:
            # An unhandled error in the function, or an answer that is no proxy response: API Gateway's 502.
            return 502, json.dumps(gateway_error(502, "Internal server error")), json_type
        # ensure_ascii: the runtime escapes non-ASCII except on python3.12; escaped is never smaller.
        if lambda_payload_bytes(answer, ensure_ascii=True) > LAMBDA_RESPONSE_LIMIT_BYTES:
            # "Response payload size exceeded maximum allowed payload size (6291556 bytes)": a 502.
            return 502, json.dumps(gateway_error(502, "Internal server error")), json_type
        headers = dict(answer.get("headers") or {})
        for name, values in (answer.get("multiValueHeaders") or {}).items():
            headers[name] = ", ".join(values)
        return int(answer["statusCode"]), answer.get("body") or "", headers

    def _handler_class(self):
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: str, headers: dict[str, str]) -> None:
                data = body.encode()
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                json_type = {"Content-Type": "application/json"}
                length = int(self.headers.get("Content-Length") or 0)
                if length > API_GATEWAY_MAX_BODY_BYTES:
                    self.rfile.read(length)
                    self._reply(413, json.dumps(gateway_error(413, "Request Too Long")), json_type)
                    return
                body = self.rfile.read(length).decode("utf-8", errors="replace") if length else None
                headers = {k: v for k, v in self.headers.items()}
                context = gateway.authorize(self.command, self.path, self.headers.get("Authorization"))
                if context == 401:
                    self._reply(401, json.dumps(UNAUTHORIZED), {**json_type, "WWW-Authenticate": "Bearer"})
                    return
                if context == 403:
                    self._reply(403, json.dumps(ACCESS_DENIED), json_type)
                    return
                assert isinstance(context, dict)
                status, answer, out_headers = gateway.invoke(
                    rest_event(self.command, self.path, headers, body, context)
                )
                self._reply(status, answer, out_headers)

            do_POST = do_GET = do_PUT = do_DELETE = _handle  # noqa: N815

        return Handler
