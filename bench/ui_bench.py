"""The dashboard's two big pages against the registry API's list-and-resolve of the same data.

    PYTHONPATH=. .venv/bin/python -m bench.ui_bench [--rounds 20] [--cache DIR]

Data: one registry holding ``bench/big`` (2,000 tags, bench/seed.py) and 5,000
repositories of one tag each. regsweep's side is what a worker keeps: each
repository planned by the real pruner from the live registry
(:meth:`~worker.engine.prune.Pruner.plan_many`) and its view saved as
:mod:`worker.queue.pruning` saves it. Then ``regsweep serve`` runs (uvicorn, as
operators run it) and, warm (three requests first, not timed), each page is
fetched ``--rounds`` times one at a time; the time is the client's from request
to last byte on the same machine (an upper bound of the server's time).

Reference, in the same run and process: what a registry UI must do to show the
same data, at the floor's concurrency (8): the repository page is ``GET
/tags/list`` and a ``HEAD`` of every tag (the digest); the repositories page is
``GET /_catalog`` (paged) and a ``GET /tags/list`` per repository (Joxit's
count of tags). Prints a Markdown table (medians, p95, ratios) for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from bench.seed import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    SHARED_LAYER,
    digest,
    fresh_registry,
    seeded_storage,
)
from tests.harness.registry import free_port
from tests.harness.service import RedisServer
from tests.harness.stack import wait_for
from worker.engine.prune import Pruner, RepositoryPlan
from worker.engine.view import plan_view
from worker.registry.client import RegistryClient
from worker.settings.load import load_config
from worker.store.audit import RedisAuditLog
from worker.store.keys import Keys
from worker.store.tagindex import TagIndex
from worker.store.views import save_view

BIG = "bench/big"
MANY = 5000
CONCURRENCY = 8
VIEWER = "bench-viewer-token"
POLICY = """\
registry:
  url: {url}
  concurrency: 8
redis:
  url: {redis}
hooks:
  viewer_token_env: REGSWEEP_VIEWER_TOKEN
policies:
  - name: bench
    repositories: ["bench/**"]
    mode: dry-run
    keep:
      - tags: ["*"]
        newest: 10
"""


def many_name(i: int) -> str:
    return f"bench/many/r{i:04d}"


async def seed_many(url: str, count: int) -> None:
    """``count`` repositories of one image each (the shared layer mounted from bench/big)."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        layer = digest(SHARED_LAYER)
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            repo = many_name(i)
            async with gate:
                for blob, data in ((layer, None), (digest(config), config)):
                    mount = await client.post(
                        f"/v2/{repo}/blobs/uploads/", params={"mount": blob, "from": BIG}
                    )
                    if mount.status_code != 201:
                        location = httpx.URL(mount.headers["Location"])
                        put = location.copy_merge_params({"digest": blob})
                        (await client.put(put, content=data or SHARED_LAYER)).raise_for_status()
                manifest = json.dumps(
                    {
                        "schemaVersion": 2,
                        "mediaType": OCI_MANIFEST,
                        "config": {
                            "mediaType": OCI_CONFIG,
                            "digest": digest(config),
                            "size": len(config),
                        },
                        "layers": [
                            {"mediaType": OCI_LAYER, "digest": layer, "size": len(SHARED_LAYER)}
                        ],
                    }
                )
                pushed = await client.put(
                    f"/v2/{repo}/manifests/latest",
                    content=manifest.encode(),
                    headers={"Content-Type": OCI_MANIFEST},
                )
                pushed.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(count)))


def seeded(cache: Path) -> Path:
    root = seeded_storage(cache, "ui-bench", {BIG: 2000})
    marker = root / "done-with-many"
    if not marker.exists():
        from tests.harness.registry import RegistryProcess

        registry = RegistryProcess.create(root)
        registry.start()
        try:
            asyncio.run(seed_many(registry.url, MANY))
        finally:
            registry.stop()
        marker.write_text("ok")
    return root


async def plan_everything(config_path: Path) -> None:
    """Plan every repository as a worker does and keep each view (a dry-run policy)."""
    config = load_config(config_path, {})
    assert config.redis_url is not None
    client = aioredis.Redis.from_url(config.redis_url)
    keys = Keys()
    async with RegistryClient.from_settings(config.registry) as registry:
        index = TagIndex(client)
        pruner = Pruner(config, registry, history=index, audit=RedisAuditLog(client, keys=keys))
        names = [BIG, *(many_name(i) for i in range(MANY))]
        for planned in await pruner.plan_many(names):
            assert isinstance(planned, RepositoryPlan), planned
            view = plan_view(
                planned.inventory, planned.plan, planned.policy, job_id="0" * 32, executed=False
            )
            await save_view(client, keys, view)
    await client.aclose()


# --- timing ----------------------------------------------------------------------------


def timed(fetch: Callable[[], object], rounds: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        fetch()
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        fetch()
        out.append(time.perf_counter() - started)
    return out


async def list_and_resolve(url: str) -> int:
    """The registry UI's repository page: the tag list, then every tag's digest."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        tags = (await client.get(f"/v2/{BIG}/tags/list")).json()["tags"]
        gate = asyncio.Semaphore(CONCURRENCY)
        accept = {"Accept": OCI_MANIFEST}

        async def head(tag: str) -> str:
            async with gate:
                answer = await client.head(f"/v2/{BIG}/manifests/{tag}", headers=accept)
                return answer.headers["Docker-Content-Digest"]

        return len(await asyncio.gather(*(head(t) for t in tags)))


async def catalog_and_count(url: str) -> int:
    """The registry UI's repositories page: the catalog, then each repository's tag list."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        names: list[str] = []
        path: str | None = "/v2/_catalog?n=1000"
        while path:
            answer = await client.get(path)
            names += answer.json()["repositories"]
            link = answer.headers.get("Link")
            path = link.split(";")[0].strip("<>") if link else None
        gate = asyncio.Semaphore(CONCURRENCY)

        async def count(name: str) -> int:
            async with gate:
                return len((await client.get(f"/v2/{name}/tags/list")).json()["tags"])

        return sum(await asyncio.gather(*(count(n) for n in names)))


def run_async(make: Callable[[], Awaitable[object]]) -> Callable[[], object]:
    return lambda: asyncio.run(make())  # type: ignore[arg-type]


def _ms(values: list[float]) -> str:
    """``median ms | p95 ms``."""
    return f"{statistics.median(values) * 1000:.0f} ms | {p95(values) * 1000:.0f} ms"


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(len(values) * 0.95) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=Path("bench/out/cache"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    root = seeded(args.cache)
    work = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    registry = fresh_registry(root, work / "registry")
    redis_server = RedisServer(free_port())
    redis_server.start()
    port = free_port()
    config = work / "regsweep.yaml"
    config.write_text(POLICY.format(url=registry.url, redis=redis_server.url))
    serve = None
    try:
        started = time.perf_counter()
        asyncio.run(plan_everything(config))
        print(
            f"planned {MANY + 1} repositories in {time.perf_counter() - started:.1f}s",
            file=sys.stderr,
        )
        env = {**os.environ, "REGSWEEP_VIEWER_TOKEN": VIEWER}
        regsweep = str(Path(sys.executable).with_name("regsweep"))
        serve = subprocess.Popen(
            [regsweep, "-c", str(config), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(base), timeout=30, what="regsweep serve")
        report(base, registry.url, args.rounds)
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait()
        registry.stop()
        redis_server.stop()


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def report(base: str, registry_url: str, rounds: int) -> None:
    with httpx.Client(base_url=base, timeout=60) as http:
        csrf = http.get("/ui/signin").text.split('name="csrf" value="')[1].split('"')[0]
        http.post("/ui/signin", data={"csrf": csrf, "token": VIEWER})
        pages = {
            "repository page, 2,000 tags (first 100 rows)": f"/ui/r/{BIG}",
            "repository page, 2,000 tags (all 2,000 rows)": f"/ui/r/{BIG}?per_page=all",
            "read API plan, 2,000 tags (JSON)": f"/api/v1/repositories/{BIG}/plan",
            "repositories page, 5,001 repositories (page 1)": "/ui/repositories",
            "repositories page, searched and sorted by size": "/ui/repositories?q=r49&sort=-bytes",
            "read API repositories (page 1, JSON)": "/api/v1/repositories",
        }
        auth = {"Authorization": f"Bearer {VIEWER}"}
        results: dict[str, list[float]] = {}
        for name, path in pages.items():
            headers = auth if path.startswith("/api/") else None

            def fetch(path: str = path, headers: dict[str, str] | None = headers) -> None:
                answer = http.get(path, headers=headers)
                assert answer.status_code == 200, (path, answer.status_code)

            results[name] = timed(fetch, rounds)
    reference = {
        "registry: tag list + HEAD of each of 2,000 tags": timed(
            run_async(lambda: list_and_resolve(registry_url)), max(3, rounds // 4), warm=1
        ),
        "registry: catalog + a tag list per repository (5,001)": timed(
            run_async(lambda: catalog_and_count(registry_url)), max(3, rounds // 4), warm=1
        ),
    }
    print("| page | median | p95 | vs the registry's list-and-resolve |")
    print("|---|---|---|---|")
    big_ref = statistics.median(reference["registry: tag list + HEAD of each of 2,000 tags"])
    many_ref = statistics.median(reference["registry: catalog + a tag list per repository (5,001)"])
    for name, values in results.items():
        ratio = statistics.median(values) / (big_ref if "2,000 tags" in name else many_ref)
        print(f"| {name} | {_ms(values)} | {ratio:.3f}\u00d7 |")
    for name, values in reference.items():
        print(f"| {name} | {_ms(values)} | 1\u00d7 |")
    print(f"\nload average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
