"""Push to deletion: how soon after a tag moves is its superseded digest deleted?

The whole stack as real processes (tests/harness/stack.py): registry 2.8.2
notifying `regsweep serve`, Redis DB 11 (flushed), `regsweep worker`. Policy:
enforce, keep every tag, ``untagged: delete_after: 0s``. A paced generator
pushes ``--rate`` images per second for ``--seconds`` seconds, each moving the
``latest`` tag of one of ``--repositories`` repositories (round robin) to a
new digest. For every push it records when the registry answered the
manifest PUT and which digest the tag left; the audit stream says when that
digest's DELETE returned. Reported: latency percentiles PUT → DELETE, and
how many superseded digests are still there at the end (HEAD by digest).

    python -m bench.push_to_delete [--rate 20] [--seconds 60] [--repositories 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from tests.harness import stack as s
from tests.harness.workers import WorkerProcess, start_worker
from worker import oci

POLICY = {
    "name": "bench",
    "repositories": ["bench/**"],
    "mode": "enforce",
    "keep": [{"tags": ["*"]}],
    "untagged": {"delete_after": "0s"},
}
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Push:
    repository: str
    digest: str
    put_done: float
    superseded: str | None


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _blob(client: httpx.AsyncClient, repository: str, data: bytes) -> dict[str, Any]:
    digest = _digest(data)
    started = await client.post(f"/v2/{repository}/blobs/uploads/")
    started.raise_for_status()
    location = httpx.URL(started.headers["Location"]).copy_add_param("digest", digest)
    (await client.put(location, content=data)).raise_for_status()
    return {"digest": digest, "size": len(data)}


async def _push(
    client: httpx.AsyncClient, repository: str, layer: dict[str, Any], n: int
) -> tuple[str, float]:
    """A new image (unique config, shared layer) PUT straight to ``latest``."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode()
    config_desc = await _blob(client, repository, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, **config_desc},
        "layers": [{"mediaType": LAYER_TYPE, **layer}],
    }
    raw = json.dumps(manifest).encode()
    response = await client.put(
        f"/v2/{repository}/manifests/latest",
        content=raw,
        headers={"Content-Type": oci.OCI_MANIFEST},
    )
    response.raise_for_status()
    return _digest(raw), time.time()


async def generate(registry: str, rate: float, seconds: float, repositories: int) -> list[Push]:
    names = [f"bench/app-{i}" for i in range(repositories)]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=registry, limits=limits, timeout=30) as client:
        layers = {n: await _blob(client, n, os.urandom(256)) for n in names}
        current: dict[str, str | None] = dict.fromkeys(names)
        locks = {n: asyncio.Lock() for n in names}
        pushes: list[Push] = []

        async def one(i: int) -> None:
            name = names[i % len(names)]
            async with locks[name]:  # one tag, one writer: "superseded" is then exact
                digest, done = await _push(client, name, layers[name], i)
                pushes.append(Push(name, digest, done, current[name]))
                current[name] = digest

        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return pushes


def deleted_at() -> dict[str, float]:
    """digest -> when its DELETE returned: the time of the ``deleted`` settlement of the
    intent the audit stream recorded for it."""
    client = redis.Redis.from_url(s.REDIS_URL, decode_responses=True)
    digests: dict[str, str] = {}  # record id -> digest
    out: dict[str, float] = {}
    rows = cast(list[tuple[str, dict[str, str]]], client.xrange("regsweep:audit"))
    for _, fields in rows:
        if "entry" in fields:
            entry = json.loads(fields["entry"])
            digests[entry["id"]] = entry["digest"]
        elif "settled" in fields:
            settled = json.loads(fields["settled"])
            if settled["outcome"] == "deleted" and settled["id"] in digests:
                when = datetime.fromisoformat(settled["time"]).timestamp()
                out[digests[settled["id"]]] = when
    client.close()
    return out


def still_there(registry: str, pushes: list[Push]) -> list[str]:
    headers = {"Accept": oci.MANIFEST_ACCEPT}
    left = []
    with httpx.Client(base_url=registry, timeout=10) as client:
        for push in pushes:
            if push.superseded is None:
                continue
            url = f"/v2/{push.repository}/manifests/{push.superseded}"
            if client.head(url, headers=headers).status_code != 404:
                left.append(push.superseded)
    return left


def report(pushes: list[Push], gone: dict[str, float], left: list[str]) -> dict[str, Any]:
    waits = sorted(gone[p.superseded] - p.put_done for p in pushes if p.superseded in gone)
    superseded = sum(1 for p in pushes if p.superseded)

    def pct(q: float) -> float:
        return round(waits[min(len(waits) - 1, int(q * len(waits)))], 3)

    return {
        "pushes": len(pushes),
        "superseded": superseded,
        "deleted": len(waits),
        "left_behind": len(left),
        "p50_s": pct(0.50),
        "p95_s": pct(0.95),
        "p99_s": pct(0.99),
        "max_s": round(waits[-1], 3),
        "mean_s": round(statistics.fmean(waits), 3),
    }


def run(rate: float, seconds: float, repositories: int, concurrency: int, settle: float) -> None:
    with tempfile.TemporaryDirectory(prefix="push-to-delete-") as tmp:
        quiet = ("--without-mingle", "--without-gossip")
        # Events get a worker of their own, as docs/operations.md recommends: pushes
        # are applied to the index at once, so prunes of one repository coalesce.
        stack = s.Stack(
            Path(tmp),
            [POLICY],
            worker_queues=("prune", "gc"),
            worker_concurrency=concurrency,
            worker_args=quiet,
        )
        events: WorkerProcess | None = None
        try:
            stack.start()
            log = Path(tmp) / "worker-events.log"
            events = start_worker(stack.config, ("events",), log=log, extra=quiet, env=stack.env())
            assert stack.registry is not None
            started = time.perf_counter()
            pushes = asyncio.run(generate(stack.registry.url, rate, seconds, repositories))
            pushing = time.perf_counter() - started
            wanted = {p.superseded for p in pushes if p.superseded}
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline and not wanted <= set(deleted_at()):
                time.sleep(0.5)
            result = report(pushes, deleted_at(), still_there(stack.registry.url, pushes))
            result |= {"rate": rate, "seconds": seconds, "achieved_rate": len(pushes) / pushing}
            result |= {"repositories": repositories, "worker_concurrency": concurrency}
            print(json.dumps(result, indent=2))
        finally:
            if events is not None:
                events.stop(timeout=15)
            stack.stop()
            if os.environ.get("PUSH_TO_DELETE_LOGS"):  # keep the processes' logs to look at
                shutil.copytree(tmp, os.environ["PUSH_TO_DELETE_LOGS"], dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repositories", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=3, help="prune worker processes")
    parser.add_argument("--settle", type=float, default=60.0, help="wait for stragglers (s)")
    args = parser.parse_args()
    run(args.rate, args.seconds, args.repositories, args.concurrency, args.settle)


if __name__ == "__main__":
    main()
