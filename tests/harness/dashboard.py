"""Dashboard test parts: repositories planned for real on a made-up snapshot, kept in Redis.

:func:`seed_repository` builds an :class:`~worker.engine.model.Inventory` of
made-up manifests (images with shared base layers, a signature on some),
plans it with the real planner and keeps the view exactly as a worker does
(:func:`worker.store.views.save_view`); with ``index`` the tag index learns the
same tags. The read API tests, the page tests and ``bench/ui_bench.py`` use it to
fill a repository of thousands of tags, or thousands of repositories, in seconds
without a registry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import yaml

from tests.harness.faultproxy import FaultProxy
from tests.harness.maintenance import ProcessRegistry
from tests.harness.registry import free_port
from tests.harness.service import RedisServer
from tests.harness.stack import Process, wait_for
from tests.harness.workers import REGSWEEP, WorkerProcess, start_worker
from worker import oci
from worker.engine.model import Inventory, PushSource, PushTime
from worker.engine.planner import plan
from worker.engine.policy import KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.view import plan_view
from worker.oci import Digest, Manifest, parse_manifest
from worker.store.keys import Keys
from worker.store.views import save_view

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: Every image shares this base layer; each has one layer of its own.
BASE_LAYER = ("sha256:" + "b" * 64, 30_000_000)

POLICY = Policy(
    name="seeded",
    repositories=(RepositoryPattern.compile("**"),),
    mode=Mode.DRY_RUN,
    protect=(TagPattern.compile("latest"),),
    keep=(KeepRule(0, (TagPattern.compile("*"),), newest=10),),
)


def fake_digest(seed: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(seed.encode()).hexdigest())


def image_manifest(seed: str, subject: Digest | None = None) -> Manifest:
    """A made-up OCI image: its config, the shared base layer and a layer of its own."""
    own = (fake_digest(f"layer {seed}"), 1_000_000 + len(seed) * 1000)
    layers = [BASE_LAYER, own]
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {
            "mediaType": oci.OCI_CONFIG,
            "digest": fake_digest(f"config {seed}"),
            "size": 900,
        },
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
    }
    if subject is not None:
        document["subject"] = {"mediaType": oci.OCI_MANIFEST, "digest": subject, "size": 500}
    raw = json.dumps(document).encode()
    return parse_manifest(f"sha256:{hashlib.sha256(raw).hexdigest()}", oci.OCI_MANIFEST, raw)


@dataclass(frozen=True)
class Seeded:
    """A repository kept as a worker would keep it."""

    name: str
    inventory: Inventory
    view: dict[str, Any]


def snapshot(name: str, tags: int, *, shared_every: int = 10, signed_every: int = 25) -> Inventory:
    """``tags`` tags (``build-0000`` …, one pushed an hour), every ``shared_every``-th sharing
    the previous tag's digest, every ``signed_every``-th image signed (a cosign tag), and
    ``latest`` on the newest."""
    tag_map: dict[str, Digest] = {}
    manifests: dict[Digest, Manifest] = {}
    pushed: dict[str, PushTime] = {}
    last: Manifest | None = None
    for i in range(tags):
        tag = f"build-{i:04d}"
        image = (
            last if last is not None and i % shared_every == 1 else image_manifest(f"{name} {i}")
        )
        manifests[image.digest] = image
        tag_map[tag] = image.digest
        pushed[tag] = PushTime.exact(PushSource.NOTIFICATION, NOW - timedelta(hours=tags - i))
        if i % signed_every == 0:
            signature = image_manifest(f"{name} sig {i}")
            manifests[signature.digest] = signature
            tag_map["sha256-" + image.digest.removeprefix("sha256:") + ".sig"] = signature.digest
        last = image
    if last is not None:
        tag_map["latest"] = last.digest
        pushed["latest"] = PushTime.exact(PushSource.STORAGE, NOW)
    return Inventory(name, NOW, tag_map, manifests, push_times=pushed)


async def seed_repository(
    client: aioredis.Redis, keys: Keys, name: str, tags: int, *, index: bool = False
) -> Seeded:
    """Plan ``name`` (``tags`` tags) with :data:`POLICY` and keep it as a worker does."""
    inventory = snapshot(name, tags)
    planned = plan(inventory, POLICY, NOW)
    view = plan_view(inventory, planned, POLICY, job_id="0" * 32, executed=False)
    await save_view(client, keys, view)
    if index:
        pipe = client.pipeline(transaction=False)
        pipe.hset(keys.index(name, "tags"), mapping={t: str(d) for t, d in inventory.tags.items()})
        pipe.sadd(keys.indexed_repositories, name)
        await pipe.execute()
    return Seeded(name, inventory, view)


# --- the whole stack for the browser tests ------------------------------------------------

HOOK_TOKEN = "ui-hook-token-5Tr"
ADMIN_TOKEN = "ui-admin-token-8Kw"
VIEWER_TOKEN = "ui-viewer-token-3Lm"
ENVIRONMENT = {
    "REGSWEEP_HOOK_TOKEN": HOOK_TOKEN,
    "REGSWEEP_API_TOKEN": ADMIN_TOKEN,
    "REGSWEEP_VIEWER_TOKEN": VIEWER_TOKEN,
}


@dataclass
class UiStack:
    """A process-controlled registry (notifying the service, GC by the process controller),
    a slow proxy in front of it for one repository, a private Redis, ``regsweep serve`` and
    ``regsweep worker`` (every queue) as processes."""

    root: Path
    registry: ProcessRegistry
    proxy: FaultProxy
    redis_server: RedisServer
    port: int
    serve: Process
    worker: WorkerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def registry_url(self) -> str:
        return self.registry.url

    def logs(self) -> str:
        worker = self.worker.tail(60) if self.worker else ""
        return f"--- serve\n{self.serve.tail(60)}\n--- worker\n{worker}"


def _notifying(config_path: Path, hook_url: str) -> None:
    """Add the service as a notification endpoint to a registry config file."""
    config = yaml.safe_load(config_path.read_text())
    endpoint = {
        "name": "regsweep",
        "url": hook_url,
        "headers": {"Authorization": [f"Bearer {HOOK_TOKEN}"]},
        "timeout": "2s",
        "threshold": 3,
        "backoff": "200ms",
        "ignore": {"actions": ["pull"], "mediatypes": ["application/octet-stream"]},
    }
    config["notifications"] = {"endpoints": [endpoint]}
    config_path.write_text(yaml.safe_dump(config))


def ui_policy_file(
    stack_root: Path,
    registry: ProcessRegistry,
    proxy: FaultProxy,
    redis_url: str,
    policies: list[dict[str, Any]],
) -> Path:
    settings = registry.settings
    document = {
        "registry": {"url": f"http://127.0.0.1:{proxy.port}", "concurrency": 1},
        "redis": {"url": redis_url},
        "hooks": {
            "registry_token_env": "REGSWEEP_HOOK_TOKEN",
            "api_token_env": "REGSWEEP_API_TOKEN",
            "viewer_token_env": "REGSWEEP_VIEWER_TOKEN",
        },
        "policies": policies,
        "maintenance": {
            "window": {"cron": "0 3 * * sun", "duration": "2h"},
            "controller": {
                "kind": "process",
                "readonly_command": settings.readonly_command,
                "readwrite_command": settings.readwrite_command,
                "gc_command": settings.gc_command,
                "storage_path": settings.storage_path,
            },
        },
    }
    path = stack_root / "regsweep.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@contextmanager
def ui_stack(root: Path, policies: list[dict[str, Any]], slow: bytes) -> Iterator[UiStack]:
    """Start everything; every process and server it started is stopped at the end."""
    redis_server = RedisServer(free_port())
    redis_server.start()
    port = free_port()
    registry = ProcessRegistry.create(root / "registry")
    for config in (registry.config_rw, registry.root / "config-ro.yml"):
        _notifying(config, f"http://127.0.0.1:{port}/hooks/registry")
    registry.start()
    proxy = FaultProxy(int(registry.url.rsplit(":", 1)[1]), delay=0.15, slow=slow).start()
    config = ui_policy_file(root, registry, proxy, redis_server.url, policies)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    env |= ENVIRONMENT | {"REGSWEEP_CONFIG": str(config)}
    serve = Process("serve", [REGSWEEP, "serve", "--port", str(port)], root / "serve.log", env)
    made = UiStack(root, registry, proxy, redis_server, port, serve)
    try:
        serve.start()
        wait_for(lambda: _answers(made.url), timeout=20, what="regsweep serve answering")
        made.worker = start_worker(config, log=root / "worker.log", concurrency=2, env=env)
        made.worker.wait_ready(timeout=30)
        yield made
    finally:
        serve.stop()
        if made.worker is not None:
            made.worker.stop(timeout=15)
        proxy.stop()
        registry.stop()
        redis_server.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
