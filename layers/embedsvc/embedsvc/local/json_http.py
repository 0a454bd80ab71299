"""One JSON answer from a local stand-in server (the provider simulator, the Extensions API)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


def send_json(
    handler: BaseHTTPRequestHandler, status: int, body: object, headers: dict[str, str] | None = None
) -> None:
    """Answer `status` with `body` as JSON, its length, and any extra headers (HTTP/1.1 keep-alive safe)."""
    send_raw(handler, status, json.dumps(body).encode(), headers)


def send_raw(
    handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None
) -> None:
    """Answer `status` with `data` declared as JSON (whatever it holds: a fault may send a broken body)."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
