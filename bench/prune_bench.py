"""regsweep against the registry API floor, side by side, on identical registry copies.

    PYTHONPATH=. .venv/bin/python -m bench.prune_bench [--rounds 3] [--cache DIR]

Scenarios: one repository of 2,000 tags (each its own manifest over one shared
layer) and 20 repositories of 200 tags (the sweep). Every measured run starts a
fresh registry on a copy of the same seeded storage, and regsweep with no state
and no cache (cold: what a first run costs); floor and regsweep runs alternate,
so machine noise hits both. Prints a Markdown table of medians and ratios
(regsweep / floor) for docs/performance.md.

regsweep learns push times from ``registry.storage_path`` (the tag links'
mtimes, seeded in tag-name order). The last two rows are the opt-in
``age_from: build_time`` without storage, which must read every image config,
against the floor that reads them too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.seed import fresh_registry, seeded_storage

BIG = {"bench/big": 2000}
MANY = {f"bench/r{i:02d}": 200 for i in range(20)}
KEEP = 10
PY = sys.executable

POLICY = """\
registry:
  url: {url}
  concurrency: 8{storage}
policies:
  - name: bench
    repositories: ["bench/**"]
    mode: enforce
    age_from: {age_from}
    keep:
      - tags: ["*"]
        newest: {keep}
audit:
  path: {audit}
"""


@dataclass(frozen=True)
class Evidence:
    """Where the regsweep side of a row learns push times."""

    storage: bool
    age_from: str = "push"


@dataclass
class Sample:
    seconds: list[float] = field(default_factory=list)
    extra: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def timed(cmd: list[str], cache: Path | None = None) -> tuple[float, str]:
    env = dict(os.environ)
    if cache is not None:
        env["REGSWEEP_CACHE_DIR"] = str(cache)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {done.stderr[-2000:]}")
    return elapsed, done.stderr


def floor_cmd(url: str, repos: list[str], resolve_only: bool, configs: bool = False) -> list[str]:
    flags = (["--resolve-only"] if resolve_only else []) + (["--configs"] if configs else [])
    return [PY, "-m", "bench.floor", url, str(KEEP), *repos, *flags]


def regsweep_cmd(config: Path, command: str, repos: list[str]) -> list[str]:
    return [PY, "-m", "bench.maxrss", "-c", str(config), command, *repos]


def measure(
    seeded: Path,
    work: Path,
    build: Callable[[str, Path], list[str]],
    evidence: Evidence = Evidence(storage=True),
) -> tuple[float, str]:
    """One run on a fresh copy of ``seeded``; regsweep's state, audit and cache start empty."""
    registry = fresh_registry(seeded, work)
    try:
        config = work / "regsweep.yaml"
        storage = f"\n  storage_path: {registry.storage_path}" if evidence.storage else ""
        config.write_text(
            POLICY.format(
                url=registry.url,
                keep=KEEP,
                audit=work / "audit.jsonl",
                storage=storage,
                age_from=evidence.age_from,
            )
        )
        return timed(build(registry.url, config), work / "cache")
    finally:
        registry.stop()


def scenario(
    name: str, seeded: Path, work: Path, repos: list[str], rounds: int, *, only: str = ""
) -> list[tuple[str, Sample, Sample]]:
    resolve = lambda url, cfg: floor_cmd(url, repos, resolve_only=True)  # noqa: E731
    full = lambda url, cfg: floor_cmd(url, repos, resolve_only=False)  # noqa: E731
    # The floor of a pruner that must learn push times: GETs manifests and configs.
    resolve_c = lambda url, cfg: floor_cmd(url, repos, resolve_only=True, configs=True)  # noqa: E731
    full_c = lambda url, cfg: floor_cmd(url, repos, resolve_only=False, configs=True)  # noqa: E731
    plan = lambda url, cfg: regsweep_cmd(cfg, "plan", repos)  # noqa: E731
    prune = lambda url, cfg: regsweep_cmd(cfg, "prune", repos)  # noqa: E731
    storage, build_time = Evidence(storage=True), Evidence(storage=False, age_from="build_time")
    pairs = [
        ("list + resolve (floor) vs `regsweep plan`, storage_path, cold", resolve, plan, storage),
        (
            "full prune, keep newest 10 (floor) vs `regsweep prune`, storage_path, cold",
            full,
            prune,
            storage,
        ),
        (
            "list + resolve + configs (floor) vs `regsweep plan`, age_from: build_time, cold",
            resolve_c,
            plan,
            build_time,
        ),
        (
            "full prune + configs (floor) vs `regsweep prune`, age_from: build_time, cold",
            full_c,
            prune,
            build_time,
        ),
    ]
    rows = []
    for label, floor, ours, evidence in pairs:
        if only and only not in label:
            continue
        f, r = Sample(), Sample()
        for _ in range(rounds):
            f.seconds.append(measure(seeded, work, floor)[0])
            elapsed, err = measure(seeded, work, ours, evidence)
            r.seconds.append(elapsed)
            r.extra.append(_maxrss_mib(err))
        rows.append((f"{name}: {label}", f, r))
        print(f"{name}: {label}: floor {f.median:.2f}s regsweep {r.median:.2f}s", file=sys.stderr)
    return rows


def _maxrss_mib(stderr: str) -> float:
    for line in stderr.splitlines():
        if line.startswith("maxrss_kib="):
            return int(line.split("=", 1)[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "regsweep-bench"
    )
    parser.add_argument("--scenario", choices=["big", "many", "all"], default="all")
    parser.add_argument("--only", default="", help="run only rows whose label contains this")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / "work"
    rows = []
    if args.scenario in ("big", "all"):
        big = seeded_storage(args.cache, "big", BIG)
        rows += scenario("2,000 tags", big, work, list(BIG), args.rounds, only=args.only)
    if args.scenario in ("many", "all"):
        many = seeded_storage(args.cache, "many", MANY)
        rows += scenario("20 x 200 tags", many, work, list(MANY), args.rounds, only=args.only)
    print("| scenario | floor (median s) | regsweep (median s) | ratio | regsweep peak RSS |")
    print("|---|---|---|---|---|")
    for label, f, r in rows:
        rss = statistics.median(r.extra)
        ratio = r.median / f.median
        print(f"| {label} | {f.median:.2f} | {r.median:.2f} | {ratio:.2f}x | {rss:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
