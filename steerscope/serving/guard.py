"""The server's gate, as a pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide a
client's disconnect from the handlers).

- With an API key: every /v1/ request must send `Authorization: Bearer KEY`.
- Without one (loopback only): the `Host` header must name a loopback address, and an `Origin`
  header, when sent, must be a loopback origin. A web page the user visits can otherwise make the
  browser POST to 127.0.0.1 (a "simple" cross-origin request needs no preflight) or reach the
  server through DNS rebinding, and replace vector sets or start generations.
- A POST body must be declared `application/json` (browsers send `text/plain` cross-origin
  without asking), and no larger than the limit.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from .config import LOOPBACK


def _host_only(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1', 'localhost' -> 'localhost'; anything
    else after a bracketed address or the port ('[::1]evil.com', 'localhost:80x') -> ''."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else "?"
        return value[1:end] if rest == "" or (rest[0] == ":" and rest[1:].isdigit()) else ""
    if value.count(":") == 1:
        host, port = value.split(":")
        return host if port.isdigit() else ""
    return value


def is_loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:  # a malformed origin is refused, not a 500
        return False
    return parts.scheme in ("http", "https") and host in LOOPBACK


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body: int, max_body_kb: int, error):
        self.app, self.api_key, self.max_body, self.max_body_kb, self.error = app, api_key, max_body, max_body_kb, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.check(scope)
        if problem is not None:
            message, status = problem
            return await self.error(message, status)(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, scope) -> tuple[str, int] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if self.api_key is not None:
            if path.startswith("/v1/"):
                got = headers.get("authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):  # constant time
                    return "missing or wrong API key: send `Authorization: Bearer KEY`.", 401
        else:
            host = _host_only(headers.get("host", ""))
            if host not in LOOPBACK:
                return (
                    f"Host {headers.get('host', '')!r} is not a loopback address; this server has no API key, so it "
                    "answers only requests addressed to 127.0.0.1, localhost or [::1] (--api-key-env to serve others).",
                    403,
                )
            origin = headers.get("origin")
            if origin is not None and not is_loopback_origin(origin):
                return (
                    f"cross-origin request from {origin!r} refused: without an API key only pages served from "
                    "loopback may call this server (--api-key-env to allow others).",
                    403,
                )
        if method in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return (f"the body must be sent as `Content-Type: application/json`, got {ctype or 'none'!r}.", 415)
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return f"the request body is larger than {self.max_body_kb} KiB (--max-body-kb).", 413
        return None
