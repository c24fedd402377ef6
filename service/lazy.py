"""An ASGI app made on its first request: the read API and the dashboard, off the hook path.

``import service.app`` loads neither (``tests/test_layout.py``): a service that
only takes hooks never imports Jinja2, the templates or the read side, and the
registry hook's import set and cost stay what they were. The first request under
``/ui`` or the read API's paths imports the module (in a worker thread, so the
event loop keeps answering hooks meanwhile) and builds the app once.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send


class LazyApp:
    """``module.factory(*args)`` → the ASGI app every request is handed to, made once."""

    def __init__(self, module: str, factory: str, *args: Any) -> None:
        self.module = module
        self.factory = factory
        self.args = args
        self._app: ASGIApp | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def loaded(self) -> bool:
        return self._app is not None

    async def _load(self) -> ASGIApp:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._app is None:
                module = await anyio.to_thread.run_sync(importlib.import_module, self.module)
                make: Callable[..., ASGIApp] = getattr(module, self.factory)
                self._app = make(*self.args)
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app or await self._load()
        await app(scope, receive, send)
