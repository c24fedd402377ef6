"""Where the CPU of a list-and-resolve goes: the registry's own, and the client's.

    PYTHONPATH=. .venv/bin/python -m bench.cpu_split [--rounds 2]

On the 2,000-tag repository of ``bench.prune_bench``, each on a fresh copy of
the seeded storage: the floor's list-and-resolve, ``regsweep plan`` with an
empty build-time cache (it must read every image config), and with a warm one.
For each: wall time, CPU seconds of the registry process (from /proc), CPU
seconds of the client process and its children. On a machine where the two
processes share the cores, the sum of the two CPU figures bounds the wall
time from below, so it shows what no client-side change can win back.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.prune_bench import BIG, KEEP, POLICY, floor_cmd, regsweep_cmd
from bench.seed import fresh_registry, seeded_storage

TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(seeded: Path, work: Path, kind: str, cache: Path) -> tuple[float, float, float]:
    """(wall, registry CPU, client CPU) seconds of one run."""
    registry = fresh_registry(seeded, work)
    try:
        assert registry.proc is not None
        config = work / "regsweep.yaml"
        config.write_text(POLICY.format(url=registry.url, keep=KEEP, audit=work / "audit.jsonl"))
        repos = list(BIG)
        cmd = (
            floor_cmd(registry.url, repos, resolve_only=True)
            if kind == "floor"
            else regsweep_cmd(config, "plan", repos)
        )
        if kind == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, REGSWEEP_CACHE_DIR=str(cache))
        registry_before, client_before = _process_cpu(registry.proc.pid), _children_cpu()
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        wall = time.perf_counter() - started
        return (
            wall,
            _process_cpu(registry.proc.pid) - registry_before,
            _children_cpu() - client_before,
        )
    finally:
        registry.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "regsweep-bench"
    )
    args = parser.parse_args()
    seeded = seeded_storage(args.cache, "big", BIG)
    work, cache = args.cache / "work", args.cache / "cache-split"
    shutil.rmtree(cache, ignore_errors=True)
    measure(seeded, work, "cold", cache)  # fills the cache for the warm rows
    samples: dict[str, list[tuple[float, float, float]]] = {"floor": [], "cold": [], "warm": []}
    for _ in range(args.rounds):
        for kind in ("floor", "warm", "cold"):  # warm before cold: cold empties the cache
            samples[kind].append(measure(seeded, work, kind, cache))
    labels = {
        "floor": "floor: list + HEAD per tag",
        "cold": "`regsweep plan`, cold cache",
        "warm": "`regsweep plan`, warm cache",
    }
    print("| run | wall (s) | registry CPU (s) | client CPU (s) | CPU sum / 2 cores (s) |")
    print("|---|---|---|---|---|")
    for kind, runs in samples.items():
        wall, reg, client = (statistics.median(column) for column in zip(*runs, strict=True))
        bound = (reg + client) / 2
        print(f"| {labels[kind]} | {wall:.2f} | {reg:.2f} | {client:.2f} | {bound:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
