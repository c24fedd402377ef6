"""Request body limit that answers in the service's JSON error shape.

Starlette 1.x ships ``RequestBodyLimitMiddleware`` (``max_body_size=``), but
when ``Content-Length`` is over the limit it replaces whatever the app sends
with a plain-text 413, and the contract wants ``{"error": ...}`` on every 4xx.
This one rejects a declared-too-large body before the app runs and, for a
chunked body, raises :class:`BodyTooLarge` (an ``HTTPException``) from
``receive`` as soon as the running total passes the limit, so the app's
exception handler renders it.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body is larger than {limit} bytes")


def _declared_length(scope: Scope) -> int | None:
    """The body length a request declares; None when it is chunked or says nothing usable."""
    length = None
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return None  # chunked: framed by the chunks, whatever Content-Length says
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


class BodyLimit:
    """ASGI middleware: at most ``limit`` bytes of request body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            error = BodyTooLarge(self.limit)
            response = JSONResponse({"error": error.detail}, status_code=413)
            await response(scope, receive, send)
            return
        if declared is not None:
            # The server reads exactly the declared length (h11 and httptools both
            # frame the body by it): there is nothing more to count.
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return limited
