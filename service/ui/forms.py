"""The dashboard's forms: ``application/x-www-form-urlencoded`` bodies, small, parsed once.

The pages post only plain fields (no file uploads), so the standard library's
``parse_qsl`` is the whole parser; the body is bounded as the hooks' are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl

from starlette.requests import Request

from service.limits import read_body
from worker.errors import BadEvent

#: A form's body, at most (a sign-in or an action is a few hundred bytes).
FORM_LIMIT: Final = 16 * 1024
#: Fields a form may have, at most.
FORM_FIELDS: Final = 32
FORM_TYPE: Final = "application/x-www-form-urlencoded"

Form = Mapping[str, str]


async def read_form(request: Request) -> Form:
    """The posted fields (the first value of each); BadEvent for another body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_TYPE:
        raise BadEvent(f"a form must be posted as {FORM_TYPE}")
    body = await read_body(request, FORM_LIMIT)
    try:
        pairs = parse_qsl(
            body.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadEvent("the form cannot be read") from exc
    fields: dict[str, str] = {}
    for key, value in pairs:
        fields.setdefault(key, value)
    return fields
