"""Who may reach the server: the address it binds, and the middleware in front of every request
(Host and Origin checks, the token, the body-size cap, safety headers)."""

from __future__ import annotations

import hmac
import ipaddress
import socket

from fastapi import Request
from fastapi.responses import Response

from cnclip.app.serve.schemas import error_response
from cnclip.errors import CNClipError

TOKEN_ENV = "CNCLIP_TOKEN"
TOKEN_COOKIE = "cnclip_token"  # where the page keeps a correct ?token= (then thumbnails load as plain <img>)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


# -- start-up checks ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: the API shows every indexed photo."""
    if not is_loopback(host) and not token:
        raise CNClipError(
            f"refusing to serve on {host} without a token: anyone who can reach it would see every indexed "
            f"photo; pass --token SECRET (or set ${TOKEN_ENV}), or use --host 127.0.0.1"
        )


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for `host`:`port` (0 picks a free port), or a CNClipError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so, and
    # with Nagle on, every keep-alive response waited ~40 ms for a delayed ACK (measured here).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        # Listening at once: a client that connects before the server loop starts (the printed URL
        # opened right away) waits in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CNClipError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from e
    return sock


def token_matches(given: str | None, token: str | None) -> bool:
    """Whether `given` is the server's `token` (compared in constant time; no token matches nothing)."""
    return given is not None and token is not None and hmac.compare_digest(given.encode(), token.encode())


# -- the middleware -------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _cross_site(request: Request) -> bool:
    """A request a page of another origin made the browser send (browsers say so; programs send neither header)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True  # "none": typed or bookmarked by the user
    origin = request.headers.get("origin")
    if origin is None:
        return False
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    return origin.lower() != own


class Guard:
    """ASGI middleware in front of everything: checks the Host header (no token: loopback names only,
    which stops DNS-rebinding pages), the token on /api/, and the request body size (413 from
    Content-Length before reading, or as soon as a streamed body passes the cap); adds safety headers."""

    def __init__(self, app, token: str | None, hosts: frozenset[str], max_body: int):
        self.app, self.token, self.hosts, self.max_body = app, token, hosts, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._with_headers(scope, send)
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._too_large()(scope, receive, send)
        await self._limited(scope, receive, send)

    def _too_large(self) -> Response:
        return error_response(413, f"request body over {self.max_body // 2**20} MB")

    def _refusal(self, request: Request) -> Response | None:
        if request.url.path.startswith("/api/") and _cross_site(request):
            # another web page the user has open must not read thumbnails or post forms here
            return error_response(403, "cross-site request refused; use the page this server serves, or a program")
        if self.token is None:
            host = (request.url.hostname or "").lower()
            if host not in self.hosts:
                return error_response(403, f"host {host!r} not allowed; open the page at http://127.0.0.1:PORT/")
            return None
        if not request.url.path.startswith("/api/") or self._has_token(request):
            return None
        return error_response(
            401,
            "this server needs its token: send 'Authorization: Bearer TOKEN', or open the page as /?token=TOKEN",
            {"WWW-Authenticate": "Bearer"},
        )

    def _has_token(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        given = [auth[7:].strip() if auth[:7].lower() == "bearer " else None]
        given += [request.query_params.get("token"), request.cookies.get(TOKEN_COOKIE)]
        return any(token_matches(g, self.token) for g in given)

    async def _limited(self, scope, receive, send) -> None:
        received, exceeded, started = 0, False, False

        async def capped_receive():
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                exceeded = True
                raise _BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            if exceeded:  # the app's own answer to the broken-off body is replaced by the 413 below
                return
            started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except _BodyTooLarge:
            exceeded = True
        if exceeded and not started:
            await self._too_large()(scope, receive, send)

    @staticmethod
    def _with_headers(scope, send):
        page = not scope["path"].startswith("/api/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not page:  # other origins may not embed API answers (thumbnails in an <img>) either
                    headers.append((b"cross-origin-resource-policy", b"same-origin"))
                if page:
                    headers += [(b"content-security-policy", _PAGE_POLICY.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        return send_with_headers
