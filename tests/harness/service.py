"""Run the service for tests: real uvicorn in a thread, a private redis-server, payloads.

Tests use Redis DB 13 of the shared server under a prefix of their own and
delete only that prefix's keys; a test that needs Redis to go away starts its
own ``redis-server`` on a free port and stops that one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from starlette.applications import Starlette

from service.app import UVICORN_OPTIONS, listening_sockets
from service.protocol import RequestLimits, bounded_protocol
from tests.harness import redisdb
from tests.harness.registry import free_port
from worker.engine.policy import EventTemplates, Policy, RepositoryPattern, Sources
from worker.settings.model import HookSettings

#: A policy every GitHub and GitLab project feeds, asking for both events: without one,
#: the hooks answer a CI event "ignored" (no policy's sources match its project).
CI_POLICY = Policy(
    name="ci",
    repositories=(RepositoryPattern.compile("**"),),
    on=EventTemplates(pull_request_closed=("pr-{number}",), branch_deleted=("{branch}",)),
    sources=Sources(
        github=(RepositoryPattern.compile("**"),), gitlab=(RepositoryPattern.compile("**"),)
    ),
)
REDIS_TEST_URL = redisdb.url(13)
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_OPTIONS = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning")
V1 = "application/vnd.docker.distribution.events.v1+json"
V2 = "application/vnd.docker.distribution.events.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def unique_prefix() -> str:
    return f"regsweep-test-{uuid.uuid4().hex[:12]}:"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (never FLUSHDB: the database is shared)."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)


@contextmanager
def running(
    app: Starlette, hooks: HookSettings | None = None, port: int | None = None
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port in a thread; yields its base URL.

    On the HTTP parser, request bounds and event loop ``regsweep serve`` uses
    (``hooks``' limits, and /metrics' own socket when ``hooks.metrics_listen``
    is set), so bad input meets what operators run (its own logging stays the
    test process's).
    """
    hooks = hooks or HookSettings()
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        http=bounded_protocol(RequestLimits.of(hooks)),
        loop=UVICORN_OPTIONS["loop"],
    )
    server = uvicorn.Server(config)
    sockets = listening_sockets(config, hooks)
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for sock in sockets:
            sock.close()


@dataclass
class RedisServer:
    """A private ``redis-server`` that a test may stop (or kill) and start again.

    Without ``data_dir`` nothing persists. With it, every write is in the append-only
    file, fsynced before Redis answers (``appendfsync always``), so what Redis
    acknowledged survives :meth:`kill` and comes back at the next :meth:`start`.
    """

    port: int
    proc: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _options(self) -> list[str]:
        if self.data_dir is None:
            return list(REDIS_OPTIONS)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Later options win: the append-only file on, fsynced on every write.
        aof = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        return [*REDIS_OPTIONS, *aof]

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), *self._options()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save; only what was fsynced survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


# --- payloads -----------------------------------------------------------------------


def digest_of(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def registry_event(
    action: str = "push",
    repository: str = "team/web",
    *,
    tag: str | None = "v1",
    digest: str | None = None,
    media_type: str | None = OCI_MANIFEST,
    event_id: str | None = None,
) -> dict[str, Any]:
    """One event shaped like distribution's notifications (2.8 field names)."""
    target: dict[str, Any] = {"repository": repository}
    if digest is not None or media_type is not None:
        target["digest"] = digest or digest_of(repository + str(tag))
    if media_type is not None:
        target |= {"mediaType": media_type, "size": 528, "length": 528}
        kind = "manifests" if media_type == OCI_MANIFEST else "blobs"
        target["url"] = f"http://127.0.0.1:5000/v2/{repository}/{kind}/{target['digest']}"
    if tag is not None:
        target["tag"] = tag
    return {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": "2025-03-01T10:00:00.123456789Z",
        "action": action,
        "target": target,
        "request": {"id": str(uuid.uuid4()), "method": "PUT", "useragent": "test"},
        "actor": {},
        "source": {"addr": "registry:5000", "instanceID": str(uuid.uuid4())},
    }


def outcome(response: httpx.Response) -> dict[str, int]:
    """The counts of a registry delivery's ``Regsweep-Outcome`` header (its body is empty)."""
    assert response.content == b"", response.content
    pairs = (item.split("=") for item in response.headers["regsweep-outcome"].split(", "))
    return {key: int(count) for key, count in pairs}


def envelope(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def github_headers(
    secret: str, body: bytes, event: str, delivery: str | None = None
) -> dict[str, str]:
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
        "User-Agent": "GitHub-Hookshot/test",
    }


def standard_webhook_headers(
    key: str, body: bytes, msg_id: str, at: float | None = None
) -> dict[str, str]:
    """``webhook-*`` headers as the Standard Webhooks spec signs them."""
    timestamp = str(int(time.time() if at is None else at))
    raw_key = base64.b64decode(key.removeprefix("whsec_"))
    mac = hmac.new(raw_key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


# CI payloads in the shapes GitHub's and GitLab's webhook docs publish (trimmed
# to the fields regsweep and a realistic reader would touch).

ZERO_SHA = "0" * 40
REPOSITORY = {"id": 1296269, "name": "web", "full_name": "acme/web", "private": False}
SENDER = {"login": "octocat", "id": 1, "type": "User"}


def github_pull_request(action: str = "closed", merged: bool = True, number: int = 42) -> bytes:
    pull = {
        "id": 1,
        "number": number,
        "state": "closed" if action == "closed" else "open",
        "merged": merged,
        "merged_at": "2025-03-01T10:00:00Z" if merged else None,
        "head": {"label": "acme:feature/login", "ref": "feature/login", "sha": "a" * 40},
        "base": {"label": "acme:main", "ref": "main", "sha": "b" * 40},
    }
    document = {
        "action": action,
        "number": number,
        "pull_request": pull,
        "repository": REPOSITORY,
        "sender": SENDER,
    }
    return json.dumps(document).encode()


def github_delete(ref: str = "feature/login", ref_type: str = "branch") -> bytes:
    document = {
        "ref": ref,
        "ref_type": ref_type,
        "pusher_type": "user",
        "repository": REPOSITORY,
        "sender": SENDER,
    }
    return json.dumps(document).encode()


def github_push(ref: str = "refs/heads/feature/login", deleted: bool = True) -> bytes:
    document = {
        "ref": ref,
        "before": "c" * 40,
        "after": ZERO_SHA if deleted else "d" * 40,
        "created": False,
        "deleted": deleted,
        "forced": False,
        "commits": [],
        "head_commit": None,
        "repository": REPOSITORY,
        "sender": SENDER,
    }
    return json.dumps(document).encode()


def github_ping() -> bytes:
    hook = {"type": "Repository", "id": 7, "events": ["pull_request", "delete", "push"]}
    return json.dumps({"zen": "Keep it logically awesome.", "hook_id": 7, "hook": hook}).encode()


GITLAB_PROJECT = {"id": 15, "name": "web", "path_with_namespace": "acme/web"}


def gitlab_merge_request(action: str = "merge", iid: int = 7) -> bytes:
    attributes = {
        "id": 99,
        "iid": iid,
        "source_branch": "feature/login",
        "target_branch": "main",
        "state": {"merge": "merged", "close": "closed"}.get(action, "opened"),
        "action": action,
    }
    document: dict[str, Any] = {
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 1, "username": "root"},
        "project": GITLAB_PROJECT,
        "object_attributes": attributes,
    }
    return json.dumps(document).encode()


def gitlab_push(after: str = ZERO_SHA, ref: str = "refs/heads/feature/login") -> bytes:
    document: dict[str, Any] = {
        "object_kind": "push",
        "event_name": "push",
        "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
        "after": after,
        "ref": ref,
        "checkout_sha": None,
        "project": GITLAB_PROJECT,
        "commits": [],
        "total_commits_count": 0,
    }
    return json.dumps(document).encode()
