"""Maintenance-window test parts: a registry run by shell scripts, Redis DB 10, seeded images.

``ProcessRegistry`` is a registry (Debian's 2.8.2 unless told: any
``RegistryBinary``) restarted by a script with a read-write or a read-only
config, the way an operator's systemd units would run it, and driven by
regsweep's process controller. ``RedisSpace`` is a key
prefix of its own on Redis DB 10, deleted at the end. ``in_process_prune``,
``in_process_defer`` and ``in_process_release`` run the prune task's and the tick's
code in this process (no Celery); a real worker is ``tests.harness.workers.start_worker``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shlex
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from tests.harness import redisdb
from tests.harness.images import ImageBuilder, PushedImage, PushedIndex, random_layer
from tests.harness.registry import DISTRIBUTION_2, RegistryBinary, RegistryProcess, set_pushed
from worker.engine.policy import KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.prune import Pruner
from worker.maintenance.controllers import LineCallback, RegistryController
from worker.maintenance.gc import GcResult
from worker.maintenance.job import Maintenance, Timing
from worker.maintenance.probe import RegistryProbe
from worker.queue import parking, pruning
from worker.queue.context import WorkerContext
from worker.registry.client import RegistryClient
from worker.settings.model import (
    Config,
    MaintenanceSettings,
    ProcessControllerSettings,
    RegistrySettings,
)
from worker.store.audit import JsonlAuditLog
from worker.store.history import LocalHistory
from worker.store.keys import Keys
from worker.store.state import SyncState

REDIS_URL = redisdb.url(10)
LAYER_SIZE = 128 * 1024
NOW = dt.datetime.now(dt.UTC)
#: Short waits for tests; production keeps minutes.
FAST = Timing(
    prune_drain=2.0,
    switch_timeout=20.0,
    switch_back_attempts=3,
    switch_back_backoff=0.1,
    progress_every=0.2,
    poll=0.05,
)

# Restarts the registry with the config given as $1, as `systemctl restart` would.
# The old process is an orphan nobody reaps here, so a zombie counts as gone.
RESTART_SCRIPT = """#!/bin/sh
set -eu
pidfile={pidfile}
if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    i=0
    while [ -r "/proc/$pid/stat" ] && ! grep -q ') Z' "/proc/$pid/stat" && [ $i -lt 200 ]; do
        sleep 0.05; i=$((i + 1))
    done
fi
OTEL_TRACES_EXPORTER=none nohup {binary} serve "$1" >>{log} 2>&1 </dev/null &
echo $! >"$pidfile"
"""


def days_ago(n: float) -> dt.datetime:
    return NOW - dt.timedelta(days=n)


# --------------------------------------------------------------------------- registry


@dataclass
class ProcessRegistry:
    """A registry restarted by shell scripts: one config read-write, one read-only."""

    root: Path
    url: str
    storage: Path
    config_rw: Path
    pidfile: Path
    settings: ProcessControllerSettings

    binary: RegistryBinary = DISTRIBUTION_2

    @classmethod
    def create(
        cls,
        root: Path,
        gc_command: str | None = None,
        *,
        log_level: str = "info",
        binary: RegistryBinary = DISTRIBUTION_2,
    ) -> ProcessRegistry:
        """Info level by default, so the GC's "Deleting blob" lines are there to stream."""
        root.mkdir(parents=True, exist_ok=True)
        proc = RegistryProcess.create(root, binary=binary)
        proc.config["log"]["level"] = log_level
        config_rw, config_ro = root / "config-rw.yml", root / "config-ro.yml"
        config_rw.write_text(yaml.safe_dump(proc.config))
        proc.set_readonly(True)
        config_ro.write_text(yaml.safe_dump(proc.config))
        pidfile = root / "registry.pid"
        script = root / "restart-registry.sh"
        script.write_text(
            RESTART_SCRIPT.format(
                pidfile=shlex.quote(str(pidfile)),
                binary=shlex.quote(binary.path),
                log=shlex.quote(str(root / "registry.log")),
            )
        )
        settings = ProcessControllerSettings(
            readonly_command=f"sh {script} {config_ro}",
            readwrite_command=f"sh {script} {config_rw}",
            gc_command=gc_command or f"{binary.path} garbage-collect {config_rw}",
            storage_path=str(proc.storage_path),
        )
        return cls(root, proc.url, proc.storage_path, config_rw, pidfile, settings, binary)

    def start(self) -> None:
        os.system(self.settings.readwrite_command)
        wait_answers(self.url)

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
            if ") Z" in stat:
                return
            time.sleep(0.05)


#: The points of a maintenance window at which a test or bench kills the GC worker.
KILL_POINTS = ("before-readonly", "switching-readonly", "during-gc", "switching-back")


def marked_registry(
    root: Path,
    *,
    switch_seconds: float = 1.0,
    gc_seconds: float = 2.0,
    binary: RegistryBinary = DISTRIBUTION_2,
) -> ProcessRegistry:
    """A :class:`ProcessRegistry` whose switch and GC commands first touch a marker file
    named after their point of the window (``root/<point>``, see :data:`KILL_POINTS`) and
    take a moment, so a worker can be killed while each one runs."""
    registry = ProcessRegistry.create(root / "registry", binary=binary)
    s = registry.settings
    registry.settings = replace(
        s,
        readonly_command=f"touch {root}/switching-readonly; sleep {switch_seconds}; "
        f"{s.readonly_command}",
        readwrite_command=f"touch {root}/switching-back; sleep {switch_seconds}; "
        f"{s.readwrite_command}",
        gc_command=f"touch {root}/during-gc; sleep {gc_seconds}; "
        f"{binary.path} garbage-collect {registry.config_rw}",
    )
    return registry


def write_config(
    path: Path, registry: ProcessRegistry, *, redis_url: str | None = REDIS_URL
) -> Path:
    """A policy file for `regsweep` subprocesses: no policies, the process controller."""
    settings = registry.settings
    config = {
        "registry": {"url": registry.url},
        "policies": [],
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
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
    path.write_text(yaml.safe_dump(config))
    return path


def wait_answers(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/v2/", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def upload_status(url: str, repository: str = "gc/probe") -> int:
    """What a push's first step (starting a blob upload) answers now."""
    response = httpx.post(f"{url}/v2/{repository}/blobs/uploads/", timeout=5.0)
    if response.status_code == 202:
        httpx.delete(httpx.URL(url).join(response.headers["Location"]), timeout=5.0)
    return response.status_code


# --------------------------------------------------------------------------- redis


@dataclass
class RedisSpace:
    """A key prefix of this test's own on Redis DB 10; :meth:`cleanup` deletes it."""

    client: redis.Redis = field(default_factory=lambda: redis.Redis.from_url(REDIS_URL))
    prefix: str = field(default_factory=lambda: f"rstest-gc:{uuid.uuid4().hex[:8]}:")

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def state(self) -> SyncState:
        return SyncState(self.client, prefix=self.prefix)

    def cleanup(self) -> None:
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            self.client.delete(key)
        self.client.close()


def make_maintenance(
    space: RedisSpace,
    controller: RegistryController,
    url: str,
    *,
    settings: MaintenanceSettings | None = None,
    release: Callable[[], int] | None = None,
    timing: Timing = FAST,
    clock: Callable[[], dt.datetime] | None = None,
) -> Maintenance:
    m = Maintenance(
        redis=space.client,
        state=space.state,
        controller=controller,
        probe=RegistryProbe.from_settings(RegistrySettings(url=url)),
        settings=settings or MaintenanceSettings(),
        keys=space.keys,
        release_deferred=release,
        timing=timing,
    )
    if clock is not None:
        m.clock = clock
    return m


def job_record(state: SyncState, job_id: str) -> dict[str, Any]:
    """The job's record, which the test expects to exist."""
    record = state.get_job(job_id)
    assert record is not None, f"no job {job_id}"
    return record


class DuringGc:
    """A controller that runs ``hook`` while the registry is read-only, just before GC."""

    def __init__(self, inner: RegistryController, hook: Callable[[], object]) -> None:
        self.inner = inner
        self.hook = hook

    def set_readonly(self, enabled: bool) -> None:
        self.inner.set_readonly(enabled)

    def is_readonly(self) -> bool:
        return self.inner.is_readonly()

    def run_gc(
        self,
        *,
        dry_run: bool,
        on_line: LineCallback | None = None,
        stop: threading.Event | None = None,
    ) -> GcResult:
        self.hook()
        return self.inner.run_gc(dry_run=dry_run, on_line=on_line, stop=stop)

    def storage_bytes(self) -> int | None:
        return self.inner.storage_bytes()

    def registry_version(self) -> str | None:
        return self.inner.registry_version()


# --------------------------------------------------------------------------- images and prunes


def keep_newest(n: int, pattern: str = "gc/**") -> Policy:
    return Policy(
        name="gc-test",
        repositories=(RepositoryPattern.compile(pattern),),
        mode=Mode.ENFORCE,
        protect=(),
        keep=(KeepRule(0, (TagPattern.compile("*"),), newest=n),),
    )


def engine_config(url: str, tmp_path: Path, policy: Policy, storage: Path) -> Config:
    """Push times come from ``storage`` (the registry's rootdirectory), as seeded below."""
    return Config(
        registry=RegistrySettings(url=url, concurrency=4, storage_path=str(storage)),
        policies=(policy,),
        redis_url=REDIS_URL,
        audit_path=str(tmp_path / "audit.jsonl"),
    )


def image(
    builder: ImageBuilder,
    repo: str,
    tag: str | tuple[str, ...],
    age: float,
    storage: Path | None = None,
) -> PushedImage:
    """An image whose tags look pushed ``age`` days ago in ``storage`` (when given)."""
    pushed = builder.image(repo, tag, created=days_ago(age), layers=[random_layer(LAYER_SIZE)])
    if storage is not None:
        set_pushed(storage, repo, days_ago(age), *((tag,) if isinstance(tag, str) else tag))
    return pushed


def multi_arch(
    builder: ImageBuilder, repo: str, tag: str, age: float, storage: Path | None = None
) -> Seeded:
    amd64 = builder.image(
        repo, (), created=days_ago(age), layers=[random_layer(LAYER_SIZE)], architecture="amd64"
    )
    arm64 = builder.image(
        repo, (), created=days_ago(age), layers=[random_layer(LAYER_SIZE)], architecture="arm64"
    )
    index = builder.index(repo, [amd64, arm64], tag)
    if storage is not None:
        set_pushed(storage, repo, days_ago(age), tag)
    return Seeded(repo, index, (amd64, arm64))


@dataclass(frozen=True)
class Seeded:
    """An image as pushed, with the child images of an index."""

    repository: str
    top: PushedImage | PushedIndex
    children: tuple[PushedImage, ...] = ()


def seed(builder: ImageBuilder, storage: Path) -> tuple[list[Seeded], list[Seeded]]:
    """Single-arch, multi-arch and signed images, three ages each (as ``storage`` tells push
    times); (kept, to delete) by a keep-newest-2 policy."""
    kept: list[Seeded] = []
    doomed: list[Seeded] = []
    for age, bucket in ((30, doomed), (20, kept), (10, kept)):
        bucket.append(Seeded("gc/single", image(builder, "gc/single", f"s{age}", age, storage)))
        bucket.append(multi_arch(builder, "gc/multi", f"m{age}", age, storage))
        signed = image(builder, "gc/signed", f"v{age}", age, storage)
        bucket.append(Seeded("gc/signed", signed))
        bucket.append(Seeded("gc/signed", builder.cosign("gc/signed", signed, "sig")))
    return kept, doomed


def missing_parts(builder: ImageBuilder, seeded: Seeded) -> list[str]:
    """Every manifest and blob of ``seeded`` that does not answer 200 (empty: pullable)."""
    repo = seeded.repository
    images: list[PushedImage | PushedIndex] = [seeded.top]
    if isinstance(seeded.top, PushedIndex):
        images += seeded.children
    missing = []
    for part in images:
        if not builder.manifest_exists(repo, part.digest):
            missing.append(f"manifest {part.digest}")
        if isinstance(part, PushedImage):
            for blob in (part.config_digest, *part.layer_digests):
                if not builder.blob_exists(repo, blob):
                    missing.append(f"blob {blob}")
    return missing


def prune(config: Config, repositories: list[str]) -> None:
    """Plan and execute the policy in-process, as ``regsweep prune`` does."""

    async def go() -> None:
        async with RegistryClient.from_settings(config.registry) as client:
            audit_path = Path(config.audit_path or "a.jsonl")
            pruner = Pruner(
                config,
                client,
                history=LocalHistory(audit_path.with_name("state")),
                audit=JsonlAuditLog(audit_path),
            )
            for repo in repositories:
                planned = await pruner.plan_one(repo)
                assert planned is not None
                report = await pruner.execute(planned, job_id="test-prune")
                assert report.outcome.value == "done", report

    asyncio.run(go())


def in_process_prune(config: Config, prefix: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a worker's prune task does with these task kwargs, run in this process;
    ``Deferred`` propagates."""

    async def go() -> dict[str, Any]:
        ctx = await WorkerContext.open(config, prefix=prefix)
        try:
            job = pruning.PruneJob(
                kwargs["repository"],
                kwargs["job_id"],
                dry_run=kwargs.get("dry_run", False),
                incremental=kwargs.get("incremental", False),
            )
            return await pruning.prune_repository(ctx, job)
        finally:
            await ctx.aclose()

    return asyncio.run(go())


def in_process_defer(config: Config, prefix: str, kwargs: dict[str, Any]) -> None:
    """What the prune task does with ``Deferred``: park the prune."""

    async def go() -> None:
        ctx = await WorkerContext.open(config, prefix=prefix)
        try:
            await parking.defer(ctx, kwargs["repository"], kwargs)
        finally:
            await ctx.aclose()

    asyncio.run(go())


def in_process_release(
    config: Config, prefix: str, into: list[dict[str, Any]]
) -> Callable[[], int]:
    """A release callback doing what ``tick`` does, collecting the prunes instead of queueing."""

    def release() -> int:
        async def go() -> list[dict[str, Any]]:
            ctx = await WorkerContext.open(config, prefix=prefix)
            try:
                parked = await parking.parked_prunes(ctx)
                await parking.unpark(ctx, parked.entries)
                return parked.prunes
            finally:
                await ctx.aclose()

        released = asyncio.run(go())
        into.extend(released)
        return len(released)

    return release
