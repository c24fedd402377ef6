"""The job API's bounds and refusals, and a policy file edited under a running service: real
uvicorn, real Redis (DB 13, a prefix per test), the policy read from a real file."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from service.app import create_app
from tests.harness import service as h
from tests.harness import stack
from tests.harness.sinks import RedisListSink
from worker.settings.load import load_config
from worker.store.state import State

API_TOKEN = "api-token-Bq7"
HEADERS = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}


@dataclass
class Service:
    http: httpx.Client
    redis: redis.Redis
    prefix: str
    policy: Path

    def jobs_queued(self) -> list[dict[str, Any]]:
        raw: list[bytes] = self.redis.lrange(f"{self.prefix}queue:jobs", 0, -1)  # type: ignore[assignment]
        return [json.loads(item) for item in reversed(raw)]

    def post(self, **job: Any) -> httpx.Response:
        return self.http.post("/api/v1/jobs", json=job, headers=HEADERS)

    def start(self, job_id: str) -> None:
        """What a worker does when it takes the job: the record says running."""

        async def mark() -> None:
            state = State.from_url(h.REDIS_TEST_URL, prefix=self.prefix)
            await state.start_job(job_id)
            await state.aclose()

        anyio.run(mark)


def policy_document(repositories: list[str], hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "registry": {"url": "http://127.0.0.1:1"},
        "redis": {"url": h.REDIS_TEST_URL},
        "hooks": {"api_token_env": "REGSWEEP_API_TOKEN", **(hooks or {})},
        "policies": [{"name": "team", "repositories": repositories, "keep": [{"tags": ["*"]}]}],
    }


def edit(path: Path, document: dict[str, Any] | str) -> None:
    """Rewrite the file in place, as an editor that keeps the inode does."""
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    with path.open("r+") as fh:
        fh.truncate(0)
        fh.write(text)


@pytest.fixture
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Service]]:
    """Starts the service on a policy file governing ``team/**``, with ``hooks`` added."""
    monkeypatch.setenv("REGSWEEP_API_TOKEN", API_TOKEN)
    monkeypatch.delenv("REGSWEEP_REDIS_URL", raising=False)
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    prefix = h.unique_prefix()
    with contextlib.ExitStack() as running:

        def started(**hooks: Any) -> Service:
            path = tmp_path / "regsweep.yaml"
            path.write_text(yaml.safe_dump(policy_document(["team/**"], hooks)))
            os.utime(path, (0, 0))  # long written: a change is taken at once
            sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
            state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
            url = running.enter_context(
                h.running(create_app(load_config(path), sink=sink, state=state))
            )
            http = running.enter_context(httpx.Client(base_url=url, timeout=10))
            return Service(http, client, prefix, path)

        yield started
    h.delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def service(start: Callable[..., Service]) -> Service:
    return start()


def test_a_flood_of_jobs_meets_the_per_token_bound_and_a_started_job_frees_a_place(
    start: Callable[..., Service],
) -> None:
    """Past hooks.max_queued_jobs_per_token jobs waiting for a worker, the API answers 429
    with Retry-After and records nothing; once a worker starts one, a place is free."""
    service = start(max_queued_jobs_per_token=3, max_queued_jobs=100)
    accepted = [service.post(kind="prune", repository=f"team/app{n}") for n in range(3)]
    assert [r.status_code for r in accepted] == [202, 202, 202]
    refused = service.post(kind="prune", repository="team/app3")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "30"
    assert "3 jobs of this API token are queued (at most 3)" in refused.json()["error"]
    assert len(service.jobs_queued()) == 3
    service.start(accepted[0].json()["job_id"])
    again = stack.wait_for(
        lambda: _accepted(service.post(kind="prune", repository="team/app3"), 202),
        10,
        what="a place freed by the started job",
    )
    assert again.json()["job_id"] == service.jobs_queued()[-1]["job_id"]
    assert service.post(kind="sweep").status_code == 429


def test_the_global_bound_holds_whatever_the_token_may_queue(
    start: Callable[..., Service],
) -> None:
    """hooks.max_queued_jobs caps every job waiting, of every API client."""
    service = start(max_queued_jobs_per_token=50, max_queued_jobs=2)
    assert service.post(kind="gc").status_code == 202
    assert service.post(kind="sweep").status_code == 202
    refused = service.post(kind="prune", repository="team/web")
    assert refused.status_code == 429 and "2 jobs are queued (at most 2)" in refused.json()["error"]
    assert [j["kind"] for j in service.jobs_queued()] == ["gc", "sweep"]


def test_a_job_for_a_repository_no_policy_governs_is_refused(service: Service) -> None:
    """A prune or sweep of a repository no policy matches gets 422 naming it, as the CLI
    refuses it, and nothing is recorded; a restore (of what the audit holds) is accepted."""
    for kind in ("prune", "sweep"):
        refused = service.post(kind=kind, repository="other/app")
        assert refused.status_code == 422
        assert refused.json()["error"].startswith("no policy governs other/app")
    assert service.jobs_queued() == []
    digest = "sha256:" + "1" * 64
    assert service.post(kind="restore", repository="other/app", digest=digest).status_code == 202


def test_an_edited_policy_file_takes_effect_between_requests(service: Service) -> None:
    """Edited in place to govern another repository, the file is taken by the running
    service: the job it refused is accepted; while an edit does not load, a job only the
    policy could vouch for gets 503; the service's report in Redis names what it runs."""
    assert service.post(kind="prune", repository="new/app").status_code == 422
    edit(service.policy, policy_document(["team/**", "new/**"]))
    stack.wait_for(
        lambda: service.post(kind="prune", repository="new/app").status_code == 202,
        10,
        what="the edited policy taken",
    )
    digest = load_config(service.policy).digest
    stack.wait_for(lambda: _reported(service) == digest, 20, what="the new digest reported")

    edit(service.policy, "policies: [\n")
    unknown = stack.wait_for(
        lambda: _accepted(service.post(kind="prune", repository="new/app"), 503),
        10,
        what="the broken policy refused",
    )
    assert "does not load" in unknown.json()["error"]
    assert service.post(kind="gc").status_code == 202  # no policy needed to accept it
    edit(service.policy, policy_document(["team/**"]))
    stack.wait_for(
        lambda: service.post(kind="prune", repository="new/app").status_code == 422,
        10,
        what="the fixed policy taken",
    )


def _accepted(response: httpx.Response, status: int) -> httpx.Response | None:
    return response if response.status_code == status else None


def _reported(service: Service) -> str | None:
    ids: set[bytes] = service.redis.smembers(f"{service.prefix}processes")  # type: ignore[assignment]
    for process_id in ids:
        raw: bytes | None = service.redis.get(f"{service.prefix}process:{process_id.decode()}")  # type: ignore[assignment]
        if raw is not None and json.loads(raw)["role"] == "service":
            return str(json.loads(raw)["policy"])
    return None
