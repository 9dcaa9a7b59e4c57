"""Who may use the app: loopback only by default; on any other address, only a browser that presents the token.

The app lets its user start jobs and write files under ``--data-root``, so it must not be open to a network by
accident. Bound to 127.0.0.1 (or ::1, localhost) it trusts the machine's own users, as Jupyter does on loopback with
a token off; bound to anything else a token is required (generated and printed when not given). The token is checked
on every HTTP request, the websocket upgrade included: ``?token=...`` in the address once, then a cookie
(HttpOnly, SameSite=Strict), so the page's own requests carry it.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any, Optional, Tuple

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "tensorpeft_token"
REFUSED = ("TensorPEFT app: this server needs its access token. Open the address it printed when it started "
           "(http://HOST:PORT/?token=...).\n")


class AccessError(ValueError):
    pass


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def access_token(host: str, token: Optional[str], require: bool = False) -> Optional[str]:
    """The token the server will require: None on loopback (unless ``require`` or a token was given), else the
    given one or a fresh random one."""
    if token is not None and len(token) < 16:
        raise AccessError("--token: use at least 16 characters (or leave it out and one is generated)")
    if token:
        return token
    if require or not is_loopback(host):
        return secrets.token_urlsafe(24)
    return None


def token_accepted(expected: str, query: Optional[str], cookie: Optional[str]) -> Tuple[bool, bool]:
    """(accepted, set the cookie): the query's token or the cookie's, compared in constant time."""
    if query and hmac.compare_digest(query.encode(), expected.encode()):
        return True, True
    if cookie and hmac.compare_digest(cookie.encode(), expected.encode()):
        return True, False
    return False, False


def token_middleware(expected: str) -> Any:
    """An aiohttp middleware refusing (403) every request without the token."""
    from aiohttp import web

    @web.middleware
    async def check(request: Any, handler: Any) -> Any:
        accepted, set_cookie = token_accepted(expected, request.query.get("token"), request.cookies.get(COOKIE))
        if not accepted:
            return web.Response(status=403, text=REFUSED)
        response = await handler(request)
        if set_cookie and hasattr(response, "set_cookie") and not getattr(response, "prepared", False):
            response.set_cookie(COOKIE, expected, httponly=True, samesite="Strict", path="/")
        return response

    return check


def install(server: Any, expected: Optional[str]) -> None:
    """Put the check in front of the trame server's routes (before it starts listening)."""
    if not expected:
        return

    def bind(wslink_server: Any) -> None:
        wslink_server.app.middlewares.append(token_middleware(expected))

    server.controller.on_server_bind.add(bind)
