"""Request body limit that answers in the service's JSON error shape.

Starlette 1.x ships ``RequestBodyLimitMiddleware`` (``max_body_size=``), but
when ``Content-Length`` is over the limit it replaces whatever the app sends
with a plain-text 413, and the contract wants ``{"error": ...}`` on every 4xx.
Every route that takes a body reads it with :func:`read_body`, which refuses a
declared-too-large body before reading a byte and stops a chunked one as soon
as the running total passes the limit, raising :class:`BodyTooLarge` (an
``HTTPException``) for the app's exception handler to render. Only the routes
that read a body pay for the check; a middleware would add a layer to every request.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Scope


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


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes.

    Reads as ``Request.body`` does but without its async generator (``aclosing``
    and a generator step per chunk), which cost the registry hook more than its
    Bearer check.
    """
    declared = _declared_length(request.scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
