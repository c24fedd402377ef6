"""Every route of the service over real uvicorn and real Redis (DB 13), good and bad input.

Each bad-input test asserts the status, the JSON body and that nothing reached
the sink (the Redis lists behind RedisListSink).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from service.app import create_app
from tests.harness import service as h
from tests.harness.sinks import RedisListSink
from worker.engine.events import CiEvent
from worker.engine.policy import RepositoryPattern, Sources
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import State

TOKEN = "registry-token-Zq8"
GITHUB_SECRET = "It's a Secret to Everybody"
GITLAB_TOKEN = "gitlab-token-Xy1"
SIGNING_KEY = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
API_TOKEN = "api-token-Pk3"
SECRETS = (TOKEN, GITHUB_SECRET, GITLAB_TOKEN, SIGNING_KEY, API_TOKEN)
REGISTRY_HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": h.V1}
API_HEADERS = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
LIMIT = 64 * 1024


@dataclass
class Service:
    """One running app, its HTTP client, and a view of its Redis keys."""

    http: httpx.Client
    redis: redis.Redis
    prefix: str

    def queue(self, name: str = "events") -> list[dict[str, Any]]:
        raw: list[bytes] = self.redis.lrange(f"{self.prefix}queue:{name}", 0, -1)  # type: ignore[assignment]
        return [json.loads(item) for item in reversed(raw)]

    def redis_keys(self) -> list[str]:
        return sorted(k.decode() for k in self.redis.scan_iter(match=f"{self.prefix}*"))

    def dead_letters(self) -> list[dict[str, Any]]:
        raw: list[bytes] = self.redis.lrange(f"{self.prefix}deadletter", 0, -1)  # type: ignore[assignment]
        return [json.loads(item) for item in raw]

    def assert_nothing_enqueued(self) -> None:
        assert self.queue("events") == [] and self.queue("jobs") == []


def _start(hooks: HookSettings) -> Iterator[Service]:
    prefix = h.unique_prefix()
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"), hooks=hooks, policies=(h.CI_POLICY,)
    )
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    with (
        h.running(create_app(config, sink=sink, state=state)) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        yield Service(http, client, prefix)
    h.delete_prefix(client, prefix)
    client.close()


@pytest.fixture(scope="module")
def full_service() -> Iterator[Service]:
    hooks = HookSettings(
        registry_token=Secret(TOKEN),
        github_secret=Secret(GITHUB_SECRET),
        gitlab_token=Secret(GITLAB_TOKEN),
        gitlab_signing_key=Secret(SIGNING_KEY),
        api_token=Secret(API_TOKEN),
        body_limit=LIMIT,
    )
    yield from _start(hooks)


@pytest.fixture
def svc(full_service: Service) -> Iterator[Service]:
    """The fully configured service, with its Redis keys removed after each test."""
    yield full_service
    h.delete_prefix(full_service.redis, full_service.prefix)


@pytest.fixture(scope="module")
def gitlab_only_service() -> Iterator[Service]:
    yield from _start(HookSettings(gitlab_token=Secret(GITLAB_TOKEN)))


@pytest.fixture
def gitlab_only(gitlab_only_service: Service) -> Iterator[Service]:
    """A service with only the GitLab token set: every other hook is disabled."""
    yield gitlab_only_service
    h.delete_prefix(gitlab_only_service.redis, gitlab_only_service.prefix)


def assert_no_secret(response: httpx.Response) -> None:
    for secret in SECRETS:
        assert secret not in response.text


# --- /hooks/registry ------------------------------------------------------------------


def test_registry_push_reaches_sink_once(svc: Service) -> None:
    """A manifest push is enqueued once; the replay of its id is acknowledged as a duplicate."""
    body = h.envelope(h.registry_event(event_id="push-1", tag="v1"))
    first = svc.http.post("/hooks/registry", content=body, headers=REGISTRY_HEADERS)
    replay = svc.http.post("/hooks/registry", content=body, headers=REGISTRY_HEADERS)
    assert first.status_code == 202
    assert h.outcome(first) == {"accepted": 1, "duplicates": 0, "ignored": 0, "dead_lettered": 0}
    assert replay.status_code == 202 and h.outcome(replay)["duplicates"] == 1
    (message,) = svc.queue()
    assert message["type"] == "registry"
    assert message["event"]["id"] == "push-1" and message["event"]["tag"] == "v1"
    assert f"{svc.prefix}dedup:registry:push-1" in svc.redis_keys()


def test_registry_v2_envelope_and_tag_delete(svc: Service) -> None:
    """A 3.x (v2+json) tag delete without digest is accepted and enqueued."""
    body = h.envelope(h.registry_event("delete", tag="pr-3", media_type=None))
    headers = {**REGISTRY_HEADERS, "Content-Type": h.V2}
    response = svc.http.post("/hooks/registry", content=body, headers=headers)
    assert response.status_code == 202 and h.outcome(response)["accepted"] == 1
    (message,) = svc.queue()
    assert message["event"]["digest"] is None and message["event"]["tag"] == "pr-3"


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"],
    ids=["missing", "wrong", "basic", "longer"],
)
def test_registry_bad_token_is_401(svc: Service, authorization: str | None) -> None:
    """Without the right bearer token: 401 JSON, no secret echoed, nothing enqueued or stored."""
    headers = {"Content-Type": h.V1} | ({"Authorization": authorization} if authorization else {})
    body = h.envelope(h.registry_event())
    response = svc.http.post("/hooks/registry", content=body, headers=headers)
    assert response.status_code == 401
    assert set(response.json()) == {"error"}
    assert_no_secret(response)
    assert svc.redis_keys() == []


@pytest.mark.parametrize(
    ("content", "content_type", "reason"),
    [
        (b"{not json", h.V1, "not JSON"),
        (h.envelope(h.registry_event()), "text/plain", "unsupported content type"),
        (h.envelope(h.registry_event(repository="team/../etc")), h.V1, "target.repository"),
        (h.envelope(h.registry_event(repository="team%2fweb")), h.V1, "target.repository"),
        (h.envelope(h.registry_event(tag="t" * 129)), h.V1, "target.tag"),
    ],
    ids=["malformed-json", "content-type", "dotdot", "pct2f", "long-tag"],
)
def test_registry_unusable_input_is_dead_lettered(
    svc: Service, content: bytes, content_type: str, reason: str
) -> None:
    """With the right token, unusable input is answered 202 and dead-lettered, never 4xx."""
    headers = {**REGISTRY_HEADERS, "Content-Type": content_type}
    response = svc.http.post("/hooks/registry", content=content, headers=headers)
    assert response.status_code == 202
    assert h.outcome(response) == {"accepted": 0, "duplicates": 0, "ignored": 0, "dead_lettered": 1}
    (dead,) = svc.dead_letters()
    assert dead["source"] == "registry" and reason in dead["reason"]
    svc.assert_nothing_enqueued()


def test_registry_pulls_and_blob_pushes_touch_nothing(svc: Service) -> None:
    """Pulls (HEADs), blob pushes and mounts are acknowledged without writing to Redis."""
    body = h.envelope(
        h.registry_event("pull"),
        h.registry_event("push", media_type="application/octet-stream", tag=None),
        h.registry_event("mount", media_type="application/octet-stream", tag=None),
    )
    response = svc.http.post("/hooks/registry", content=body, headers=REGISTRY_HEADERS)
    assert response.status_code == 202 and h.outcome(response)["ignored"] == 3
    assert svc.redis_keys() == []


def test_registry_body_over_limit_with_content_length(svc: Service) -> None:
    """A declared Content-Length over the limit is refused with 413 JSON before reading."""
    body = h.envelope(h.registry_event(event_id="big")) + b" " * LIMIT
    response = svc.http.post("/hooks/registry", content=body, headers=REGISTRY_HEADERS)
    assert response.status_code == 413
    assert response.json() == {"error": f"request body is larger than {LIMIT} bytes"}
    assert svc.redis_keys() == []


@pytest.mark.parametrize("route", ["/hooks/github", "/hooks/gitlab", "/api/v1/jobs"])
def test_every_route_with_a_body_refuses_one_over_the_limit(svc: Service, route: str) -> None:
    """The other routes that take a body answer 413 JSON too, declared or chunked, and
    nothing is enqueued."""
    body = b'{"kind": "gc", "pad": "' + b" " * LIMIT + b'"}'
    headers = {
        "/hooks/github": h.github_headers(GITHUB_SECRET, body, "ping"),
        "/hooks/gitlab": {"X-Gitlab-Token": GITLAB_TOKEN, "X-Gitlab-Event": "Push Hook"},
        "/api/v1/jobs": API_HEADERS,
    }[route] | {"Content-Type": "application/json"}
    declared = svc.http.post(route, content=body, headers=headers)
    chunked = svc.http.post(route, content=iter([body[:100], body[100:]]), headers=headers)
    assert "content-length" not in chunked.request.headers
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json() == {"error": f"request body is larger than {LIMIT} bytes"}
    assert svc.redis_keys() == []


def test_registry_body_over_limit_chunked(svc: Service) -> None:
    """A chunked body (no Content-Length) is cut off with 413 JSON once it passes the limit."""

    def chunks() -> Iterator[bytes]:
        yield h.envelope(h.registry_event(event_id="big-chunked"))[:-2]
        for _ in range(4):
            yield b" " * (LIMIT // 2)
        yield b"]}"

    response = svc.http.post("/hooks/registry", content=chunks(), headers=REGISTRY_HEADERS)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert response.json() == {"error": f"request body is larger than {LIMIT} bytes"}
    assert svc.redis_keys() == []


def test_body_just_under_limit_is_read(svc: Service) -> None:
    """A body at the limit is still read and processed, so the limit is not off by one."""
    event = h.envelope(h.registry_event(event_id="at-limit"))
    body = event + b" " * (LIMIT - len(event))
    assert len(body) == LIMIT
    response = svc.http.post("/hooks/registry", content=body, headers=REGISTRY_HEADERS)
    assert response.status_code == 202 and h.outcome(response)["accepted"] == 1


# --- /hooks/github ----------------------------------------------------------------------


def _github(svc: Service, event: str, body: bytes, **overrides: str) -> httpx.Response:
    headers = h.github_headers(GITHUB_SECRET, body, event) | overrides
    return svc.http.post("/hooks/github", content=body, headers=headers)


def test_github_ping(svc: Service) -> None:
    """A signed ping answers 200 with ok and the zen line, and enqueues nothing."""
    response = _github(svc, "ping", h.github_ping())
    assert response.status_code == 200
    assert response.json() == {"ok": True, "zen": "Keep it logically awesome."}
    svc.assert_nothing_enqueued()


def test_github_pull_request_closed_once(svc: Service) -> None:
    """A closed PR is enqueued as a CI event; redelivery of the same id is a 200 duplicate."""
    body = h.github_pull_request(merged=True, number=42)
    delivery = str(uuid.uuid4())
    first = _github(svc, "pull_request", body, **{"X-GitHub-Delivery": delivery})
    again = _github(svc, "pull_request", body, **{"X-GitHub-Delivery": delivery})
    assert first.status_code == 202 and first.json() == {"status": "accepted", "delivery": delivery}
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    (message,) = svc.queue()
    assert message == {
        "type": "ci",
        "event": {
            "source": "github",
            "delivery_id": delivery,
            "project": "acme/web",
            "kind": "pull_request_closed",
            "number": 42,
            "branch": "feature/login",
            "merged": True,
        },
    }


def test_github_body_replayed_under_a_new_delivery_id_is_a_duplicate(svc: Service) -> None:
    """GitHub signs the body only: a captured delivery sent again with a fresh
    X-GitHub-Delivery (signature still valid) is a duplicate by its body's hash, while a
    different body under the first delivery's id is a duplicate by its id."""
    body = h.github_pull_request(merged=False, number=43)
    first = _github(svc, "pull_request", body, **{"X-GitHub-Delivery": "original"})
    replay = _github(svc, "pull_request", body, **{"X-GitHub-Delivery": "forged-new-id"})
    other = h.github_pull_request(merged=False, number=44)
    reused = _github(svc, "pull_request", other, **{"X-GitHub-Delivery": "original"})
    assert first.status_code == 202
    assert replay.status_code == 200 and replay.json()["status"] == "duplicate"
    assert reused.status_code == 200 and reused.json()["status"] == "duplicate"
    assert [m["event"]["number"] for m in svc.queue()] == [43]


def test_github_branch_delete_and_push_delete(svc: Service) -> None:
    """`delete` of a branch and `push` with deleted: true each enqueue a branch_deleted event."""
    assert _github(svc, "delete", h.github_delete()).status_code == 202
    assert _github(svc, "push", h.github_push()).status_code == 202
    kinds = [(m["event"]["kind"], m["event"]["branch"]) for m in svc.queue()]
    assert kinds == [("branch_deleted", "feature/login")] * 2


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "sha256=" + "0" * 64,
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
    ],
    ids=["missing", "zeros", "vector-for-other-body"],
)
def test_github_bad_signature_is_401(svc: Service, signature: str | None) -> None:
    """A missing or wrong X-Hub-Signature-256 gives 401 JSON and nothing is enqueued."""
    body = h.github_pull_request()
    headers = h.github_headers(GITHUB_SECRET, body, "pull_request")
    headers.pop("X-Hub-Signature-256")
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    response = svc.http.post("/hooks/github", content=body, headers=headers)
    assert response.status_code == 401 and "X-Hub-Signature-256" in response.json()["error"]
    assert_no_secret(response)
    assert svc.redis_keys() == []


def test_github_other_content_type_is_415(svc: Service) -> None:
    """A (correctly signed) delivery that is neither JSON nor GitHub's form gets 415 with the
    reason, nothing enqueued."""
    body = h.github_pull_request()
    headers = h.github_headers(GITHUB_SECRET, body, "pull_request")
    headers["Content-Type"] = "text/plain"
    response = svc.http.post("/hooks/github", content=body, headers=headers)
    assert response.status_code == 415
    error = response.json()["error"]
    assert "application/json" in error and "application/x-www-form-urlencoded" in error
    svc.assert_nothing_enqueued()


def test_github_malformed_json_is_400(svc: Service) -> None:
    """A signed but non-JSON body gives 400 with a reason and nothing is enqueued."""
    response = _github(svc, "pull_request", b"{not json")
    assert response.status_code == 400 and "not JSON" in response.json()["error"]
    svc.assert_nothing_enqueued()


def test_github_missing_fields_or_headers_are_400(svc: Service) -> None:
    """A closed PR without its number, or a delivery without X-GitHub-Delivery, is a 400."""
    document = json.loads(h.github_pull_request())
    del document["pull_request"]["number"]
    response = _github(svc, "pull_request", json.dumps(document).encode())
    assert response.status_code == 400 and "pull_request.number" in response.json()["error"]
    body = h.github_pull_request()
    headers = h.github_headers(GITHUB_SECRET, body, "pull_request")
    del headers["X-GitHub-Delivery"]
    response = svc.http.post("/hooks/github", content=body, headers=headers)
    assert response.status_code == 400 and "X-GitHub-Delivery" in response.json()["error"]
    svc.assert_nothing_enqueued()


def test_github_unknown_event_is_202_ignored(svc: Service) -> None:
    """Event types and actions regsweep does not use are acknowledged as ignored."""
    response = _github(svc, "issues", b'{"action": "opened"}')
    assert response.status_code == 202
    assert response.json()["status"] == "ignored" and "issues" in response.json()["reason"]
    opened = _github(svc, "pull_request", h.github_pull_request(action="opened"))
    assert opened.status_code == 202 and opened.json()["status"] == "ignored"
    assert svc.redis_keys() == []


# --- /hooks/gitlab ----------------------------------------------------------------------


def _gitlab_headers(body: bytes, event: str, delivery: str | None = None) -> dict[str, str]:
    delivery = delivery or str(uuid.uuid4())
    return {
        "Content-Type": "application/json",
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": GITLAB_TOKEN,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "Idempotency-Key": delivery,
    } | h.standard_webhook_headers(SIGNING_KEY, body, f"msg_{delivery}")


def test_gitlab_merge_request_merged_once(svc: Service) -> None:
    """A signed MR merge is enqueued under its signed webhook-id; the same signed delivery
    replayed with a new Idempotency-Key and X-Gitlab-Event-UUID (unsigned headers) is a
    duplicate."""
    body = h.gitlab_merge_request("merge", iid=7)
    headers = _gitlab_headers(body, "Merge Request Hook", delivery="idem-1")
    first = svc.http.post("/hooks/gitlab", content=body, headers=headers)
    replay = headers | {"X-Gitlab-Event-UUID": str(uuid.uuid4()), "Idempotency-Key": "other"}
    again = svc.http.post("/hooks/gitlab", content=body, headers=replay)
    assert first.status_code == 202 and first.json()["delivery"] == "msg_idem-1"
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    (message,) = svc.queue()
    assert message["event"] == {
        "source": "gitlab",
        "delivery_id": "msg_idem-1",
        "project": "acme/web",
        "kind": "pull_request_closed",
        "number": 7,
        "branch": "feature/login",
        "merged": True,
    }


def test_gitlab_push_hook_branch_delete_and_other_hooks(svc: Service) -> None:
    """A Push Hook with after = 40 zeros is enqueued; a Note Hook is 202 ignored."""
    body = h.gitlab_push()
    ok = svc.http.post("/hooks/gitlab", content=body, headers=_gitlab_headers(body, "Push Hook"))
    note = b'{"object_kind": "note"}'
    ignored = svc.http.post(
        "/hooks/gitlab", content=note, headers=_gitlab_headers(note, "Note Hook")
    )
    assert ok.status_code == 202 and ignored.status_code == 202
    assert ignored.json()["status"] == "ignored"
    assert [m["event"]["kind"] for m in svc.queue()] == ["branch_deleted"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"X-Gitlab-Token": "wrong"}, "X-Gitlab-Token"),
        ({"X-Gitlab-Token": None}, "X-Gitlab-Token"),
        ({"webhook-signature": "v1,AAAA"}, "webhook-signature"),
        ({"webhook-signature": None}, "webhook-signature"),
        ({"webhook-timestamp": str(int(time.time()) - 600)}, "5 minutes"),
    ],
    ids=["wrong-token", "no-token", "bad-signature", "no-signature", "stale"],
)
def test_gitlab_verification_failures_are_401(
    svc: Service, change: dict[str, str | None], message: str
) -> None:
    """Wrong/missing token, bad/missing signature or a stale timestamp give 401, nothing stored."""
    body = h.gitlab_merge_request("close")
    headers: dict[str, str | None] = {**_gitlab_headers(body, "Merge Request Hook"), **change}
    sent = {k: v for k, v in headers.items() if v is not None}
    response = svc.http.post("/hooks/gitlab", content=body, headers=sent)
    assert response.status_code == 401 and message in response.json()["error"]
    assert_no_secret(response)
    assert svc.redis_keys() == []


def test_gitlab_token_only_service(gitlab_only: Service) -> None:
    """Without a signing key the token alone is enough; X-Gitlab-Event-UUID is the dedup id."""
    body = h.gitlab_merge_request("close", iid=3)
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": "Merge Request Hook",
        "X-Gitlab-Token": GITLAB_TOKEN,
        "X-Gitlab-Event-UUID": "uuid-3",
    }
    first = gitlab_only.http.post("/hooks/gitlab", content=body, headers=headers)
    again = gitlab_only.http.post("/hooks/gitlab", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    (message,) = gitlab_only.queue()
    assert message["event"]["number"] == 3 and message["event"]["merged"] is False


# --- disabled hooks, unknown routes -------------------------------------------------


def test_disabled_hooks_answer_404(gitlab_only: Service) -> None:
    """A hook whose secret is not configured answers 404 {"error": "hook disabled"}."""
    body = h.envelope(h.registry_event())
    for path, headers in (
        ("/hooks/registry", REGISTRY_HEADERS),
        ("/hooks/github", h.github_headers(GITHUB_SECRET, body, "push")),
    ):
        response = gitlab_only.http.post(path, content=body, headers=headers)
        assert response.status_code == 404 and response.json() == {"error": "hook disabled"}
    jobs = gitlab_only.http.post("/api/v1/jobs", json={"kind": "gc"}, headers=API_HEADERS)
    assert jobs.status_code == 404 and jobs.json() == {"error": "job API disabled"}
    gitlab_only.assert_nothing_enqueued()


def test_unknown_route_and_method_are_json(svc: Service) -> None:
    """404 and 405 from routing are JSON errors too."""
    missing = svc.http.get("/nope")
    wrong_method = svc.http.get("/hooks/registry")
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# --- /api/v1/jobs -----------------------------------------------------------------------


def test_job_created_enqueued_and_followed(svc: Service) -> None:
    """A prune job is recorded, enqueued, and its status URL returns the queued record."""
    response = svc.http.post(
        "/api/v1/jobs",
        json={"kind": "prune", "repository": "team/web", "dry_run": True},
        headers=API_HEADERS,
    )
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert response.json()["status_url"] == f"/api/v1/jobs/{job_id}"
    (message,) = svc.queue("jobs")
    assert message == {
        "job_id": job_id,
        "kind": "prune",
        "params": {"repository": "team/web", "dry_run": True},
    }
    status = svc.http.get(response.json()["status_url"], headers=API_HEADERS)
    assert status.status_code == 200
    assert status.json()["state"] == "queued" and status.json()["kind"] == "prune"


def test_job_api_refusals(svc: Service) -> None:
    """Bad token 401, bad body 400, wrong content type 415, unknown job 404; nothing enqueued."""
    no_token = svc.http.post("/api/v1/jobs", json={"kind": "gc"})
    bad_kind = svc.http.post("/api/v1/jobs", json={"kind": "nuke"}, headers=API_HEADERS)
    form = svc.http.post(
        "/api/v1/jobs",
        content=b"kind=gc",
        headers=API_HEADERS | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    unknown = svc.http.get(f"/api/v1/jobs/{'0' * 32}", headers=API_HEADERS)
    odd_id = svc.http.get("/api/v1/jobs/..%2f..", headers=API_HEADERS)
    unauth_get = svc.http.get(f"/api/v1/jobs/{'0' * 32}")
    assert no_token.status_code == 401 and "error" in no_token.json()
    assert bad_kind.status_code == 400 and "kind must be" in bad_kind.json()["error"]
    assert form.status_code == 415
    assert unknown.status_code == 404 and unknown.json() == {"error": "unknown job"}
    assert odd_id.status_code == 404
    assert unauth_get.status_code == 401
    svc.assert_nothing_enqueued()
    assert svc.redis_keys() == []


@pytest.mark.parametrize(
    ("kind", "repository", "reason"),
    [
        (
            "prune",
            "127.0.0.1:5000/team/web",
            "repository 127.0.0.1:5000/team/web: not a repository name (leave out the "
            "registry's address 127.0.0.1:5000); did you mean team/web?",
        ),
        (
            "prune",
            "Team/Web",
            "repository Team/Web: not a repository name (repository names are lowercase); "
            "did you mean team/web?",
        ),
        (
            "sweep",
            "team/web:pr-7",
            "repository team/web:pr-7: not a repository name (give the tag apart); "
            "did you mean team/web?",
        ),
        (
            "restore",
            "team/web@sha256:0123abcd",
            "repository team/web@sha256:0123abcd: not a repository name (give the digest "
            "apart); did you mean team/web?",
        ),
        (
            "prune",
            "team/web$",
            "repository team/web$: not a repository name (lowercase letters and digits, "
            "separated by . _ __ or -, joined by /)",
        ),
    ],
)
def test_job_api_checks_repository_names_as_plan_does(
    svc: Service, kind: str, repository: str, reason: str
) -> None:
    """A job for a repository typed the `docker pull` way (host:port/ prefix, capitals, a tag
    or digest on it) is refused with 400 saying what to change, as `regsweep plan` says it;
    nothing is recorded or enqueued."""
    body: dict[str, object] = {"kind": kind, "repository": repository}
    if kind == "restore":
        body["digest"] = "0123abcd"
    response = svc.http.post("/api/v1/jobs", json=body, headers=API_HEADERS)
    assert response.status_code == 400
    assert response.json() == {"error": reason}
    svc.assert_nothing_enqueued()
    assert svc.redis_keys() == []


# --- health and metrics ----------------------------------------------------------


def test_health_ready_and_metrics(svc: Service) -> None:
    """healthz and readyz answer 200; /metrics counts events by source and outcome."""
    body = h.envelope(h.registry_event(event_id="m-1"))
    svc.http.post("/hooks/registry", content=body, headers=REGISTRY_HEADERS)
    svc.http.post("/hooks/registry", content=body, headers={"Content-Type": h.V1})
    assert svc.http.get("/healthz").json()["ok"] is True
    assert svc.http.get("/readyz").status_code == 200
    metrics = svc.http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'regsweep_events_total{outcome="accepted",source="registry"}' in text
    assert 'regsweep_events_total{outcome="unauthorized",source="registry"}' in text
    assert (
        'regsweep_http_request_duration_seconds_count{method="POST",route="/hooks/registry"' in text
    )


class BrokenSink(RedisListSink):
    """A sink with a bug: it raises something other than StateError."""

    async def ci_event(self, event: CiEvent) -> None:
        raise RuntimeError(f"bug with {GITHUB_SECRET}")


def test_unexpected_error_is_500_json_without_traceback() -> None:
    """A bug behind a hook answers 500 {"error": "internal error"}: no traceback, no secret."""
    prefix = h.unique_prefix()
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        hooks=HookSettings(github_secret=Secret(GITHUB_SECRET)),
        policies=(h.CI_POLICY,),
    )
    sink = BrokenSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    body = h.github_delete()
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    try:
        with h.running(create_app(config, sink=sink, state=state)) as url:
            headers = h.github_headers(GITHUB_SECRET, body, "delete")
            response = httpx.post(f"{url}/hooks/github", content=body, headers=headers)
        assert response.status_code == 500
        assert response.json() == {"error": "internal error"}
        assert "Traceback" not in response.text
        assert_no_secret(response)
        # Nothing was recorded, so GitHub's redelivery will be processed.
        assert list(client.scan_iter(match=f"{prefix}dedup:*")) == []
    finally:
        h.delete_prefix(client, prefix)
        client.close()


# --- GitHub's form-encoded deliveries, and events no policy wants -----------------------


def _github_form(svc: Service, event: str, form: bytes, **overrides: str) -> httpx.Response:
    """Signed as GitHub signs a form delivery: the HMAC of the raw form body."""
    headers = h.github_headers(GITHUB_SECRET, form, event) | {
        "Content-Type": "application/x-www-form-urlencoded"
    }
    return svc.http.post("/hooks/github", content=form, headers=headers | overrides)


def _form(payload: bytes) -> bytes:
    return urllib.parse.urlencode({"payload": payload.decode()}).encode()


def test_github_form_encoded_delivery_is_accepted_once(svc: Service) -> None:
    """GitHub's default content type (the JSON URL-encoded in a payload field, the signature
    over the raw form) is queued as the JSON delivery would be; a redelivery is a duplicate."""
    delivery = str(uuid.uuid4())
    form = _form(h.github_pull_request(number=7))
    assert b"%22" in form and b"{" not in form  # really encoded, as GitHub sends it
    first = _github_form(svc, "pull_request", form, **{"X-GitHub-Delivery": delivery})
    again = _github_form(svc, "pull_request", form, **{"X-GitHub-Delivery": delivery})
    assert first.status_code == 202, first.text
    assert first.json() == {"status": "accepted", "delivery": delivery}
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    (message,) = svc.queue()
    assert message["event"]["number"] == 7 and message["event"]["project"] == "acme/web"
    ping = _github_form(svc, "ping", _form(h.github_ping()))
    assert ping.status_code == 200 and ping.json()["zen"] == "Keep it logically awesome."


@pytest.mark.parametrize(
    ("form", "reason"),
    [
        (b"", "no payload fields"),
        (b"zen=x", "no payload fields"),
        (b"payload=%7B%7D&payload=%7B%7D", "has 2 payload fields"),
        (b"payload=not+json", "not JSON"),
        (b"payload=%5B1%5D", "not a JSON object"),
        (b"payload", "cannot be read"),
        (b"payload=%ff%fe", "not URL-encoded text"),
        ("payload=caf\u00e9".encode(), "not URL-encoded text"),
        (b"&".join(b"f%d=1" % i for i in range(40)), "cannot be read"),
    ],
    ids=[
        "empty",
        "no-payload",
        "two-payloads",
        "not-json",
        "not-object",
        "no-equals",
        "bad-utf8",
        "raw-non-ascii",
        "too-many-fields",
    ],
)
def test_github_bad_form_is_400_with_its_reason(svc: Service, form: bytes, reason: str) -> None:
    """A signed form that cannot be read, lacks its payload, has two, or whose payload is not
    a JSON object gets 400 naming what is wrong; nothing is queued or recorded."""
    response = _github_form(svc, "pull_request", form)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]
    svc.assert_nothing_enqueued()
    assert svc.redis_keys() == []


def test_github_form_signature_covers_the_raw_form(svc: Service) -> None:
    """The signature is checked over the form as sent, before it is parsed: one computed over
    the JSON inside, or a form changed after signing, is 401 and nothing is queued."""
    payload = h.github_pull_request(number=8)
    form = _form(payload)
    over_json = h.github_headers(GITHUB_SECRET, payload, "pull_request")["X-Hub-Signature-256"]
    wrong = _github_form(svc, "pull_request", form, **{"X-Hub-Signature-256": over_json})
    assert wrong.status_code == 401
    signed = h.github_headers(GITHUB_SECRET, form, "pull_request")
    tampered = form.replace(b"8", b"9")
    headers = signed | {"Content-Type": "application/x-www-form-urlencoded"}
    changed = svc.http.post("/hooks/github", content=tampered, headers=headers)
    assert changed.status_code == 401
    svc.assert_nothing_enqueued()


def test_github_form_over_the_body_limit_is_413(svc: Service) -> None:
    """A form delivery over the body limit is refused before anything is parsed or queued."""
    form = _form(h.github_pull_request()) + b"&pad=" + b"x" * LIMIT
    response = _github_form(svc, "pull_request", form)
    assert response.status_code == 413
    svc.assert_nothing_enqueued()


@pytest.fixture(scope="module")
def other_projects_service() -> Iterator[Service]:
    """The service with one policy, fed only by acme/other on GitHub (pull requests only)."""
    prefix = h.unique_prefix()
    policy = h.CI_POLICY
    only_other = replace(
        policy,
        on=replace(policy.on, branch_deleted=()),
        sources=Sources(github=(RepositoryPattern.compile("acme/other"),)),
    )
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        hooks=HookSettings(github_secret=Secret(GITHUB_SECRET), gitlab_token=Secret(GITLAB_TOKEN)),
        policies=(only_other,),
    )
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    with (
        h.running(create_app(config, sink=sink, state=state)) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        yield Service(http, client, prefix)
    h.delete_prefix(client, prefix)
    client.close()


def test_ci_event_no_policy_wants_is_ignored_with_its_reason(
    other_projects_service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """An event from a project no policy's sources match, or one the matching policies have
    no on: templates for, is answered 202 ignored with the reason, logged, and not queued."""
    svc = other_projects_service
    caplog.set_level(logging.INFO, logger="regsweep.service")
    unmatched = _github(svc, "pull_request", h.github_pull_request())
    assert unmatched.status_code == 202
    assert unmatched.json() == {
        "status": "ignored",
        "reason": "no policy's sources.github matches acme/web",
    }
    other = json.loads(h.github_delete())
    other["repository"] = {**other["repository"], "full_name": "acme/other"}
    no_template = _github(svc, "delete", json.dumps(other).encode())
    assert no_template.status_code == 202
    assert no_template.json()["reason"] == (
        "the policies acme/other feeds (ci) have no on.branch_deleted"
    )
    body = h.gitlab_merge_request()
    gitlab = svc.http.post(
        "/hooks/gitlab", content=body, headers=_gitlab_headers(body, "Merge Request Hook")
    )
    assert gitlab.status_code == 202 and "sources.gitlab" in gitlab.json()["reason"]
    svc.assert_nothing_enqueued()
    logged = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert any("no policy's sources.github matches acme/web" in line for line in logged)
    h.delete_prefix(svc.redis, svc.prefix)
