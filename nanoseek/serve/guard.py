"""What stands between a client and the routes: the Host check, the API key, the body's size and
time limits, the security headers; and uvicorn's connection limits (slowloris).

`Guard` is ASGI middleware, so everything here happens before a route runs and before any body
is read into the app:
1. without an API key, only requests whose Host header names this machine (loopback names, the
   bound address, `allowed_hosts`) are answered, so a web page that rebinds its DNS name to
   127.0.0.1 cannot read or use the server (403);
2. with an API key, every path but the web page, its static files and /health needs
   `Authorization: Bearer <key>` or `x-api-key: <key>` (401), compared in constant time as bytes;
3. the body is read here, at most `max_body` bytes (413, whether or not Content-Length says so)
   within BODY_TIMEOUT seconds (408), then handed to the app;
4. every response carries SECURITY_HEADERS (a strict CSP: the web app has no inline script or style);
5. HEAD is answered as GET without the body, on every route (uptime checks, `curl -I`).
Every refusal is OpenAI's error shape. `uvicorn_config` adds what uvicorn alone does not do: a
deadline for a request's headers, and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable

import anyio
import h11
import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

MAX_BODY = 8 << 20  # bytes in one request body
BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive
HEADER_TIMEOUT = 10.0  # seconds from a connection (or its previous response) to the end of a request's headers
KEEP_ALIVE = 5  # seconds an idle kept-alive connection stays open
MAX_CONNECTIONS = 512  # open connections (or requests in flight); over this, a 503 (DeadlineH11Protocol)
SHUTDOWN_GRACE = 30  # seconds a stop (SIGTERM, Ctrl-C) waits for the replies under way before closing them
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PUBLIC = ("/", "/health", "/favicon.ico")  # with /static/..., the paths answered without the key (all others need it)
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host names a server bound to `host` answers without a key: loopback, the bound address
    (unless it is a wildcard), and `extra`."""
    bound = () if host in ("0.0.0.0", "::", "") else (host,)
    return tuple(dict.fromkeys(host_name(h) for h in (*LOOPBACK, *bound, *extra)))  # a name given with its port too


def host_name(header: str) -> str:
    """A Host header without its port: 'example.com:80' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: the checks of the module docstring, in that order."""

    def __init__(self, app, api_key: str | None = None, hosts: Iterable[str] = LOOPBACK, max_body: int = MAX_BODY):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None
        self.hosts = frozenset(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send, headers = _with_headers(send), dict(scope["headers"])
        try:
            self.check(scope["path"], headers)
            body = await self.read_body(headers, receive)
        except APIError as e:
            return await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
        if scope["method"] == "HEAD":
            scope, send = {**scope, "method": "GET"}, _headless(send)
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)

    def check(self, path: str, headers: dict[bytes, bytes]) -> None:
        """The Host check (without a key), then the key (on protected paths)."""
        if self.key is None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                raise APIError(403, f"Host {host!r} is not allowed: a server without an API key answers only to "
                                    f"{sorted(self.hosts)} (serve --allowed-host adds names)",
                               "permission_error", code="host_not_allowed")
            return
        if path in PUBLIC or path.startswith("/static/"):
            return
        auth = headers.get(b"authorization", b"")
        # or as Anthropic's clients send it (the anthropic SDK, Claude Code with ANTHROPIC_API_KEY)
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        if not given:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                           "authentication_error", code="invalid_api_key")
        if not secrets.compare_digest(given, self.key):
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def read_body(self, headers: dict[bytes, bytes], receive) -> bytes | None:
        """The whole body, refused past max_body bytes (a declared Content-Length over it at once)
        or BODY_TIMEOUT seconds; None if the client disconnects first."""
        declared = headers.get(b"content-length", b"")
        too_big = APIError(413, f"the request body is over the limit of {self.max_body} bytes",
                           code="request_too_large")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        chunks, size = [], 0
        try:
            with anyio.fail_after(BODY_TIMEOUT):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return None
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        raise too_big
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise APIError(408, f"the request body took over {BODY_TIMEOUT:g} s to arrive", code="timeout") from None


def _replay(body: bytes, receive):
    """A receive that gives the app the body already read, then the client's own messages (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_headers(send):
    """A send that adds SECURITY_HEADERS to the response's start (where the app has not set them)."""
    async def sending(message):
        if message["type"] == "http.response.start":
            have = {k.lower() for k, _ in message.get("headers", [])}
            message = {**message, "headers": [*message.get("headers", []),
                                              *((k, v) for k, v in SECURITY_HEADERS if k not in have)]}
        await send(message)

    return sending


def _headless(send):
    """A send that leaves out the response's body (HEAD: its headers, Content-Length included, are GET's)."""
    async def sending(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return sending


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers: a client that
    opens a connection and sends its headers slowly (slowloris), or nothing, is dropped after
    HEADER_TIMEOUT seconds instead of holding the connection forever; and past the connection cap
    (`limit_concurrency`) a 503 in OpenAI's error shape, where uvicorn's own is plain text."""

    _deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cap, self.limit_concurrency = self.limit_concurrency, None  # counted here instead of by uvicorn
        self.app = self._capped(self.app)

    def _capped(self, app):
        async def capped(scope, receive, send):
            # as uvicorn counts, but this request's own task is among the tasks already
            if self.cap is not None and (len(self.connections) >= self.cap or len(self.tasks) > self.cap):
                self.logger.warning("Exceeded concurrency limit.")
                busy = APIError(503, f"the server is at its limit of {self.cap} open connections; try again shortly",
                                "server_error", code="overloaded")
                return await JSONResponse(busy.body(), status_code=503,
                                          headers={"Retry-After": "1", "Connection": "close"})(scope, receive, send)
            return await app(scope, receive, send)

        return capped

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # a kept-alive connection: the next request's headers have the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._deadline = self.loop.call_later(HEADER_TIMEOUT, self._drop)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str, port: int, **overrides) -> uvicorn.Config:
    """How nanoseek runs uvicorn: HTTP/1.1 with header deadlines, a connection cap, short keep-alive, and a stop that
    waits for replies under way at most SHUTDOWN_GRACE seconds (a client that stopped reading its stream had held a
    SIGTERM off for good)."""
    settings = dict(host=host, port=port, http=DeadlineH11Protocol, limit_concurrency=MAX_CONNECTIONS,
                    timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=SHUTDOWN_GRACE, log_level="warning")
    return uvicorn.Config(app, **{**settings, **overrides})


def run(app, host: str, port: int) -> None:
    """Serve `app` on host:port until interrupted (`nanoseek serve`)."""
    uvicorn.Server(uvicorn_config(app, host, port)).run()
