"""A small HTTP server that plays API Gateway (REST) in front of the real handlers, authorizer included."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from embedsvc.local.lambda_context import LocalLambdaContext

STAGE = "local"
MAX_BODY_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
UNAUTHORIZED = {
    "error": {
        "message": "Unauthorized: send 'Authorization: Bearer <key>'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


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
    def __init__(self, api_handler, authorizer_handler, *, port: int = 3000, host: str = "127.0.0.1"):
        self.api_handler = api_handler
        self.authorizer_handler = authorizer_handler
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

    def authorize(self, method: str, path: str, authorization: str | None) -> dict | None:
        """Run the TOKEN authorizer as API Gateway does; None means 401."""
        event = {
            "type": "TOKEN",
            "authorizationToken": authorization or "",
            "methodArn": f"arn:aws:execute-api:us-east-1:123456789012:local/{STAGE}/{method}{urlsplit(path).path}",
        }
        if not authorization:
            return None  # API Gateway answers 401 itself when the identity source is absent
        try:
            policy = self.authorizer_handler(event, LocalLambdaContext("authorizer"))
        except Exception:
            return None
        statements = policy.get("policyDocument", {}).get("Statement", [])
        if not any(s.get("Effect") == "Allow" for s in statements):
            return None
        return {"principalId": policy.get("principalId"), **(policy.get("context") or {})}

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
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self.rfile.read(length)
                    error = {
                        "error": {
                            "message": "Request body too large (6 MB at most).",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "request_too_large",
                        }
                    }
                    self._reply(413, json.dumps(error), {"Content-Type": "application/json"})
                    return
                body = self.rfile.read(length).decode("utf-8", errors="replace") if length else None
                headers = {k: v for k, v in self.headers.items()}
                context = gateway.authorize(self.command, self.path, self.headers.get("Authorization"))
                if context is None:
                    self._reply(401, json.dumps(UNAUTHORIZED), {"Content-Type": "application/json"})
                    return
                event = rest_event(self.command, self.path, headers, body, context)
                answer = gateway.api_handler(event, LocalLambdaContext("api"))
                out_headers = dict(answer.get("headers") or {})
                for name, values in (answer.get("multiValueHeaders") or {}).items():
                    out_headers[name] = ", ".join(values)
                self._reply(int(answer["statusCode"]), answer.get("body") or "", out_headers)

            do_POST = do_GET = do_PUT = do_DELETE = _handle  # noqa: N815

        return Handler
