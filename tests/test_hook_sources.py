"""CI sources are rows of a table (issue 20): a third source, written here as docs/webhooks.md's
"Adding a CI source" steps say (a ``HookSource`` listed in ``SOURCES``, its project form in
``CI_SOURCES``), gets its route, its policy key and its own projects' events from the real
service, with no code that asks which source an event came from.

The source below is this test's own (a Gitea-like shared-token hook, the secret held by the
module as a real one holds it in ``hooks:``); everything it runs through is the shipped
service, policy parser and Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from starlette.requests import Request

from service.app import create_app
from service.hooks import sources
from service.hooks.source import Parsed, header
from service.hooks.verify import checked_delivery_id, same
from tests.harness import service as h
from tests.harness.sinks import RedisListSink
from worker.engine import events
from worker.engine.events import CiEvent, ProjectForm
from worker.errors import ConfigError, Unverified
from worker.settings.load import load_config, parse_config
from worker.settings.model import HookSettings
from worker.store.keys import Keys
from worker.store.state import State

TOKEN: Final = "gitea-token-Zq8"
POLICY_FILE: Final = """
registry: {url: "http://127.0.0.1:1"}
policies:
  - name: previews
    repositories: ["previews/**"]
    sources: {gitea: ["acme/site"], github: ["acme/other"]}
    on:
      pull_request_closed: ["pr-{number}"]
    keep: [{tags: ["*"], newest: 5}]
"""


class Gitea:
    """A shared-token hook: ``X-Gitea-Token``, ``X-Gitea-Delivery``, a closed pull request."""

    name: Final = "gitea"
    setting: Final = "hooks.gitea_token_env"

    def enabled(self, hooks: HookSettings) -> bool:
        return True

    def verify(self, hooks: HookSettings, request: Request, body: bytes) -> None:
        if not same(TOKEN, request.headers.get("x-gitea-token", "")):
            raise Unverified("X-Gitea-Token does not match")

    def delivery_id(self, hooks: HookSettings, request: Request) -> str:
        return checked_delivery_id("X-Gitea-Delivery", header(request, "X-Gitea-Delivery"))

    def parse(self, request: Request, body: bytes, delivery_id: str) -> Parsed:
        payload: dict[str, Any] = json.loads(body)
        if payload.get("action") != "closed":
            return Parsed(None, f"Gitea action {payload.get('action')!r}")
        project = payload["repository"]["full_name"]
        number = int(payload["number"])
        event = CiEvent(self.name, delivery_id, project, "pull_request_closed", number=number)
        return Parsed(event, "Gitea pull request")

    def dedup_keys(self, keys: Keys, delivery_id: str, body: bytes) -> list[str]:
        return [keys.delivery(self.name, delivery_id)]


def test_a_policy_names_only_the_sources_the_table_has() -> None:
    """Without its row in ``CI_SOURCES`` the policy file's ``sources.gitea`` is refused."""
    with pytest.raises(ConfigError) as refused:
        parse_config(POLICY_FILE, "regsweep.yaml", {})
    assert "sources.gitea: unknown key" in str(refused.value)


@pytest.fixture
def with_gitea(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(events.CI_SOURCES, "gitea", ProjectForm("owner/name", 2, 2))
    monkeypatch.setattr(sources, "SOURCES", (*sources.SOURCES, Gitea()))
    yield


def _deliver(http: httpx.Client, project: str, token: str = TOKEN) -> httpx.Response:
    body = {"action": "closed", "number": 7, "repository": {"full_name": project}}
    headers = {"X-Gitea-Token": token, "X-Gitea-Delivery": str(uuid.uuid4())}
    return http.post("/hooks/gitea", json=body, headers=headers)


@pytest.mark.usefixtures("with_gitea")
def test_a_source_added_as_a_row_gets_its_route_its_policy_key_and_only_its_projects(
    tmp_path: Path,
) -> None:
    """With its two rows, the real service serves ``/hooks/gitea``: a wrong token is 401; a
    closed pull request of a project the policy lists under ``sources.gitea`` is queued as
    a ``gitea`` event; a project listed only under ``sources.github`` is ignored, saying
    so."""
    policy_file = tmp_path / "regsweep.yaml"
    policy_file.write_text(POLICY_FILE)
    config = load_config(policy_file, {})
    prefix = h.unique_prefix()
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    try:
        with (
            h.running(create_app(config, sink=sink, state=state)) as url,
            httpx.Client(base_url=url, timeout=10) as http,
        ):
            assert _deliver(http, "acme/site", token="wrong").status_code == 401
            accepted = _deliver(http, "acme/site")
            assert accepted.status_code == 202 and accepted.json()["status"] == "accepted"
            other = _deliver(http, "acme/other")
            assert other.status_code == 202 and other.json()["status"] == "ignored", other.json()
            assert "sources.gitea" in other.json()["reason"]
        queued = [json.loads(m) for m in client.lrange(f"{prefix}queue:events", 0, -1)]
        assert [(m["event"]["source"], m["event"]["project"]) for m in queued] == [
            ("gitea", "acme/site")
        ]
    finally:
        h.delete_prefix(client, prefix)
        client.close()
