"""The storage-level prune against the registry API floor, side by side, on identical copies.

    REGSWEEP_TEST_REDIS=redis://127.0.0.1:6379 PYTHONPATH=. \\
        .venv/bin/python -m bench.storage_prune_bench [--rounds 3] [--growth 2000,100000]

Scenarios (the images of :mod:`bench.seed`, written by :mod:`bench.storage_seed`): one
repository of 2,000 tags and 20 of 200, ``keep newest 10``. Per round, on fresh copies of
the same seeded storage (Debian's distribution 2.8.2):

- **API floor** (``bench/floor.py``): list, HEAD each tag, DELETE the 1,990 by digest at
  concurrency 8, no checks, no audit: no API pruner is faster;
- **storage prune**: regsweep's whole window (process controller, Redis audit): pruning
  paused, read-only restart, write refused, GC, then the storage prune — the write probed
  again, the registry's config read, the storage cross-checked against the API (catalog,
  tag lists, a HEAD per tag), the inventory read from storage, the plan, each deletion's
  audit intent made durable, the files removed, settled — then the read-write restart,
  the removed manifests asked for and the trash emptied. Reported: the storage prune
  proper, its cross-check, the registry's read-only span, and the whole job.

``--growth`` adds one repository of N tags per size: the storage prune's time, and the API
path's, measured as 200 DELETEs at concurrency 8 on a fresh registry with N tags and
projected to the whole prune (:func:`projected`: each of distribution's DELETEs reads
every tag link left in the repository, so the whole prune is quadratic and cannot be run
at 100,000).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.seed import fresh_registry, tag_name
from bench.storage_seed import seeded_storage
from tests.harness.maintenance import FAST, ProcessRegistry, RedisSpace, keep_newest
from tests.harness.storage_prune import storage_window, window_config
from worker.maintenance.job import GcRequest, run_gc

BIG = {"bench/big": 2000}
MANY = {f"bench/r{i:02d}": 200 for i in range(20)}
KEEP = 10
#: DELETEs timed per size for the API path's growth.
SAMPLE = 200


@dataclass
class Row:
    label: str
    floor: list[float] = field(default_factory=list)
    prune: list[float] = field(default_factory=list)
    check: list[float] = field(default_factory=list)
    readonly: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)


def floor_round(seeded: Path, work: Path, repos: list[str]) -> float:
    registry = fresh_registry(seeded, work)
    try:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bench.floor", registry.url, str(KEEP), *repos],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started
    finally:
        registry.stop()


def storage_round(
    seeded: Path, work: Path, repos: dict[str, int]
) -> tuple[float, float, float, float]:
    """Seconds of the storage prune proper (inventory, plan, audit, removal), of its
    cross-check against the API, of the registry's read-only span (from the switch until
    writes are accepted again: GC, the prune, both restarts) and of the whole job (the
    check after the restart and the trash's emptying too)."""
    shutil.rmtree(work, ignore_errors=True)
    registry = ProcessRegistry.create(work, log_level="warn")
    shutil.copytree(seeded / "data", registry.storage, symlinks=True)
    registry.start()
    space = RedisSpace()
    try:
        config = window_config(registry, work, keep_newest(KEEP, "bench/**"))
        m = storage_window(space, config, timing=FAST)
        started = time.perf_counter()
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {}), trigger="bench"))
        window = time.perf_counter() - started
        report = outcome.report
        if outcome.status != "done" or report is None or report.storage_prune is None:
            raise SystemExit(f"window failed: {report.errors if report else outcome.reason}")
        summary = report.storage_prune
        readonly = report.readonly_seconds or 0.0
        print(f"  GC {report.gc_seconds}s, trash {summary['trash_seconds']}s", file=sys.stderr)
        with httpx.Client(base_url=registry.url, timeout=60) as client:
            for repo in repos:
                left = client.get(f"/v2/{repo}/tags/list").json()["tags"]
                assert len(left) == KEEP, (repo, len(left))
    finally:
        registry.stop()
        space.cleanup()
    return float(summary["prune_seconds"]), float(summary["check_seconds"]), readonly, window


def scenario(label: str, seeded: Path, work: Path, repos: dict[str, int], rounds: int) -> Row:
    row = Row(label)
    for n in range(rounds):
        row.floor.append(floor_round(seeded, work / "floor", list(repos)))
        prune, check, readonly, window = storage_round(seeded, work / "ours", repos)
        row.prune.append(prune)
        row.check.append(check)
        row.readonly.append(readonly)
        row.window.append(window)
        print(
            f"{label} round {n}: floor {row.floor[-1]:.2f}s, storage prune {prune:.2f}s, "
            f"cross-check {check:.2f}s, read-only {readonly:.2f}s, job {window:.2f}s",
            file=sys.stderr,
        )
    return row


async def _delete_sample(url: str, repo: str, count: int) -> float:
    """Seconds per DELETE by digest, ``SAMPLE`` of them at concurrency 8 (the floor's way)."""
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=3600) as client:
        gate = asyncio.Semaphore(8)
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

        async def head(tag: str) -> str:
            async with gate:
                done = await client.head(f"/v2/{repo}/manifests/{tag}", headers=accept)
            return done.headers["Docker-Content-Digest"]

        digests = await asyncio.gather(*(head(tag_name(i)) for i in range(SAMPLE)))

        async def delete(d: str) -> None:
            async with gate:
                (await client.delete(f"/v2/{repo}/manifests/{d}")).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(delete(d) for d in digests))
        return (time.perf_counter() - started) / SAMPLE


def projected(per_delete: float, size: int) -> float:
    """The API path's whole prune of ``size`` tags down to :data:`KEEP`, from the time per
    DELETE measured at ``size`` tags: each DELETE reads every tag link left, so its cost is
    proportional to them, and the prune's to their sum (about a half of size squared)."""
    per_link = per_delete / (size - SAMPLE / 2)
    return per_link * (size * (size + 1) - KEEP * (KEEP + 1)) / 2


def growth(
    cache: Path, work: Path, sizes: list[int]
) -> list[tuple[int, float, float, float, float]]:
    """Per size: the storage prune's seconds, its cross-check's, the registry's read-only
    span, and the API path's projected seconds."""
    found = []
    for size in sizes:
        repos = {"bench/grow": size}
        seeded = seeded_storage(cache, f"grow-{size}", repos)
        registry = fresh_registry(seeded, work / "floor")
        try:
            per_delete = asyncio.run(_delete_sample(registry.url, "bench/grow", size))
        finally:
            registry.stop()
        prune, check, readonly, window = storage_round(seeded, work / "ours", repos)
        api = projected(per_delete, size)
        print(
            f"{size} tags: storage prune {prune:.2f}s, cross-check {check:.2f}s, read-only "
            f"{readonly:.2f}s, job {window:.2f}s; API {per_delete * 1000:.1f} ms per "
            f"DELETE, {api:.0f}s projected",
            file=sys.stderr,
        )
        found.append((size, prune, check, readonly, api))
    return found


def print_rows(rows: list[Row]) -> None:
    if not rows:
        return
    print(
        "| scenario | API floor (s) | storage prune (s) | floor / prune | cross-check (s) "
        "| floor / (prune + check) | read-only (s) | whole job (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        floor, prune = statistics.median(row.floor), statistics.median(row.prune)
        check, readonly = statistics.median(row.check), statistics.median(row.readonly)
        print(
            f"| {row.label} | {floor:.2f} | {prune:.2f} | {floor / prune:.1f}x | {check:.2f} "
            f"| {floor / (prune + check):.1f}x | {readonly:.2f} "
            f"| {statistics.median(row.window):.2f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "regsweep-storage-bench"
    )
    parser.add_argument("--scenario", choices=["big", "many", "all", "none"], default="all")
    parser.add_argument("--growth", default="", help="comma-separated tag counts, e.g. 2000,100000")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / "work"
    rows = []
    if args.scenario in ("big", "all"):
        big = seeded_storage(args.cache, "big", BIG)
        rows.append(scenario("2,000 tags, 1,990 deleted", big, work, BIG, args.rounds))
    if args.scenario in ("many", "all"):
        many = seeded_storage(args.cache, "many", MANY)
        rows.append(scenario("20 x 200 tags, 3,800 deleted", many, work, MANY, args.rounds))
    print_rows(rows)
    sizes = [int(s) for s in args.growth.split(",") if s.strip()]
    if sizes:
        print()
        print(
            "| tags | storage prune (s) | cross-check (s) | read-only (s) "
            "| API path, projected (s) |"
        )
        print("|---:|---:|---:|---:|---:|")
        for size, prune, check, readonly, api in growth(args.cache, work, sizes):
            print(f"| {size:,} | {prune:.2f} | {check:.2f} | {readonly:.2f} | {api:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
