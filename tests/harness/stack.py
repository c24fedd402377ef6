"""The whole event-driven stack as real processes, for end-to-end tests and benchmarks.

``regsweep serve`` (uvicorn) and ``regsweep worker`` (Celery, prefork) run as
subprocesses against Redis DB 11 of the shared server (broker and state: the
workers use the default ``regsweep:`` prefix, so the database is flushed at
start and end, and nothing else may use DB 11), with a registry (2.8.2 unless told)
whose ``notifications:`` point at the service.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
import yaml

from tests.harness import redisdb
from tests.harness.registry import DISTRIBUTION_2, RegistryBinary, RegistryProcess, free_port
from tests.harness.workers import WorkerProcess, start_worker

T = TypeVar("T")

REDIS_URL = redisdb.url(11)
REGSWEEP = str(Path(sys.executable).with_name("regsweep"))
HOOK_TOKEN = "stack-hook-token-7Hq"
GITHUB_SECRET = "stack-github-secret-2Lp"
GITLAB_TOKEN = "stack-gitlab-token-9Vr"
API_TOKEN = "stack-api-token-4Mz"
SECRETS = (HOOK_TOKEN, GITHUB_SECRET, GITLAB_TOKEN, API_TOKEN)
API_HEADERS = {"Authorization": f"Bearer {API_TOKEN}"}
ENVIRONMENT = {
    "REGSWEEP_HOOK_TOKEN": HOOK_TOKEN,
    "REGSWEEP_GITHUB_SECRET": GITHUB_SECRET,
    "REGSWEEP_GITLAB_TOKEN": GITLAB_TOKEN,
    "REGSWEEP_API_TOKEN": API_TOKEN,
}


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 20.0,
    step: float = 0.05,
    *,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; that value. The one waiting
    loop of the tests: a deadline, never a fixed sleep standing in for an event."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout}s")
        time.sleep(step)


def flush() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


def policy_file(
    path: Path, registry_url: str, policies: Sequence[Mapping[str, Any]], redis_url: str
) -> Path:
    document = {
        "registry": {"url": registry_url, "concurrency": 8},
        "redis": {"url": redis_url},
        "sweep": {"every": "6h"},
        "hooks": {
            "registry_token_env": "REGSWEEP_HOOK_TOKEN",
            "github_secret_env": "REGSWEEP_GITHUB_SECRET",
            "gitlab_token_env": "REGSWEEP_GITLAB_TOKEN",
            "api_token_env": "REGSWEEP_API_TOKEN",
        },
        "policies": list(policies),
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def notifying_registry(
    root: Path, hook_url: str, binary: RegistryBinary = DISTRIBUTION_2
) -> RegistryProcess:
    """A registry notifying ``hook_url``; pulls and blob pushes ignored (docs/webhooks.md)."""
    endpoint = {
        "name": "regsweep",
        "url": hook_url,
        "headers": {"Authorization": [f"Bearer {HOOK_TOKEN}"]},
        "timeout": "2s",
        "threshold": 3,
        "backoff": "200ms",
        "ignore": {"actions": ["pull"], "mediatypes": ["application/octet-stream"]},
    }
    return RegistryProcess.create(root, {"notifications": {"endpoints": [endpoint]}}, binary=binary)


@dataclass
class Process:
    """A regsweep subprocess with its output in a log file."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """Registry, service and worker, started in that order (the registry needs the URL)."""

    root: Path
    policies: Sequence[Mapping[str, Any]]
    #: The worker's queues (empty: every queue), its pool and its other arguments.
    worker_queues: Sequence[str] = ()
    worker_concurrency: int = 2
    worker_args: Sequence[str] = ("--without-mingle", "--without-gossip")
    #: DB 11 of the shared server (flushed), or a private server's URL (left alone).
    redis_url: str = REDIS_URL
    port: int = field(default_factory=free_port)
    binary: RegistryBinary = DISTRIBUTION_2
    registry: RegistryProcess | None = None
    service: Process | None = None
    worker: WorkerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.root / "regsweep.yaml"

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
        return base | ENVIRONMENT | {"REGSWEEP_CONFIG": str(self.config)}

    def _flush(self) -> None:
        if self.redis_url == REDIS_URL:
            flush()

    def start(self) -> None:
        self._flush()
        self.registry = notifying_registry(
            self.root / "registry", f"{self.url}/hooks/registry", self.binary
        )
        policy_file(self.config, self.registry.url, self.policies, self.redis_url)
        self.registry.start()
        self.service = self._process("serve", ["serve", "--port", str(self.port)])
        self.service.start()
        wait_for(self._healthy, timeout=20)
        self.worker = start_worker(
            self.config,
            self.worker_queues,
            log=self.root / "worker.log",
            concurrency=self.worker_concurrency,
            extra=self.worker_args,
            env=self.env(),
        )
        self.worker.wait_ready(timeout=30)

    def _process(self, name: str, args: list[str]) -> Process:
        return Process(name, [REGSWEEP, *args], self.root / f"{name}.log", self.env())

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=15)
        if self.service is not None:
            self.service.stop()
        if self.registry is not None:
            self.registry.stop()
        self._flush()

    def logs(self) -> str:
        parts = [f"--- serve\n{self.service.tail()}"] if self.service else []
        if self.worker is not None:
            parts.append(f"--- worker\n{self.worker.tail()}")
        if self.registry is not None:
            parts.append(f"--- registry\n{self.registry.log_tail()}")
        return "\n".join(parts)
