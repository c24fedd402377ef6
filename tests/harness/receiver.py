"""A webhook receiver for notification tests: a real Starlette app that records every POST.

The first segment of the path says how it answers, so one receiver plays every
kind of target at once:

``ok``, ``slack``, anything else
    200 (Slack's incoming webhooks answer ``ok``).
``flaky``
    500 for the first :attr:`Receiver.flaky_failures` attempts of each delivery id, then 200.
``fail``
    500 every time, the body echoing the request's path (a secret URL a careless
    server repeats must still never reach a log).
``reject``
    404 with the path echoed (a deleted Slack hook): not worth a retry.
``slow``
    200 after :attr:`Receiver.delay` seconds, longer than the sender's timeout.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


@dataclass(frozen=True)
class Delivery:
    behaviour: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def event(self) -> str:
        return self.headers.get("x-regsweep-event", "")

    @property
    def delivery_id(self) -> str:
        return self.headers.get("x-regsweep-delivery", "")


@dataclass
class Receiver:
    flaky_failures: int = 2
    delay: float = 3.0
    deliveries: list[Delivery] = field(default_factory=list)
    _attempts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{behaviour}/{rest:path}", self._receive, methods=["POST"])]
        )

    async def _receive(self, request: Request) -> Response:
        behaviour = request.path_params["behaviour"]
        body = json.loads(await request.body())
        delivery = Delivery(
            behaviour, request.url.path, dict(request.headers), body, time.monotonic()
        )
        with self._lock:
            self.deliveries.append(delivery)
            self._attempts[f"{behaviour}:{delivery.delivery_id}"] += 1
            attempt = self._attempts[f"{behaviour}:{delivery.delivery_id}"]
        if behaviour == "flaky" and attempt <= self.flaky_failures:
            return PlainTextResponse("try again", status_code=500)
        if behaviour == "fail":
            return PlainTextResponse(f"internal error at {request.url.path}", status_code=500)
        if behaviour == "reject":
            return PlainTextResponse(f"no_service {request.url.path}", status_code=404)
        if behaviour == "slow":
            await asyncio.sleep(self.delay)
        return PlainTextResponse("ok")

    def of(self, behaviour: str, event: str | None = None) -> list[Delivery]:
        with self._lock:
            return [
                d
                for d in self.deliveries
                if d.behaviour == behaviour and (event is None or d.event == event)
            ]
