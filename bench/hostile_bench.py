"""The service under hostile clients and a frozen Redis, beside the code it replaced.

    PYTHONPATH=. .venv/bin/python -m bench.hostile_bench --before /path/to/main/checkout

Three ``regsweep serve`` processes, same config, same Redis (DB 11 of
``$REGSWEEP_TEST_REDIS``), one CPU core's worth of load each in turn:

- ``before``: the code of ``--before`` (a checkout of the main branch), run
  with that checkout first on ``PYTHONPATH``;
- ``after``: this checkout, as ``regsweep serve`` runs it (httptools and
  uvloop, with the bounded protocol of service/protocol.py);
- ``plain``: this checkout's app on uvicorn's own httptools protocol, so the
  bounded protocol's cost is measured by itself.

1. Throughput and p99 at saturation: ``wrk`` (closed loop, unique event ids),
   the three servers alternating, ``--rounds`` rounds.
2. p99 at a fixed rate (``--rate``, open loop, as ingest_bench) with nothing
   else, with 50 slowloris connections open (each sends one header line a
   second and reconnects when closed), and while one client streams a
   128 MiB request head.
3. Time to 503 with Redis frozen: each server gets its own private
   ``redis-server``, SIGSTOPped; 20 concurrent deliveries; the time each
   waited for its answer.
4. Hook throughput alone and while 8 connections flood ``/metrics``.

``--parts`` picks among them (default: all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn

from bench.ingest_bench import BODY_TEMPLATE, CONTENT_TYPE, TOKEN, fixed_rate, write_script, wrk
from tests.harness import service as h
from tests.harness import stack as s
from tests.harness.registry import free_port

HEAD = (
    f"POST /hooks/registry HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n"
    f"Content-Type: {CONTENT_TYPE}\r\n"
).encode()
BIG_HEAD = 128 * 1024 * 1024
LORISES = 50
PARTS = ("throughput", "rate", "frozen", "metrics")
TICKS = os.sysconf("SC_CLK_TCK")
#: Server process by base URL, for its CPU time.
PIDS: dict[str, int] = {}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_pid() -> int:
    client = redis.Redis.from_url(s.REDIS_URL)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def serve_plain(port: int) -> None:
    """What ``regsweep serve`` does, on uvicorn's own httptools protocol (no bounds)."""
    from service.app import GIL_SWITCH_INTERVAL, UVICORN_OPTIONS, create_app
    from service.publish import CelerySink
    from worker import logs
    from worker.settings.load import load_config

    config = load_config(os.environ["REGSWEEP_CONFIG"])
    logs.configure()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    sink = CelerySink.from_config(config)
    app = create_app(config, sink=sink)
    gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=port, **UVICORN_OPTIONS)


def _env(config: Path, pythonpath: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    env |= s.ENVIRONMENT | {"REGSWEEP_CONFIG": str(config)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


@contextmanager
def servers(root: Path, before: Path, redis_urls: dict[str, str]) -> Iterator[dict[str, str]]:
    """The three servers; name -> base URL. ``redis_urls`` per name."""
    here = str(Path(__file__).resolve().parents[1])
    procs = []
    urls = {}
    for name in ("before", "after", "plain"):
        config = s.policy_file(root / f"{name}.yaml", "http://127.0.0.1:1", [], redis_urls[name])
        port = free_port()
        if name == "plain":
            argv = [sys.executable, "-m", "bench.hostile_bench", "--serve-plain", str(port)]
            env = _env(config, here)
        else:
            argv = [s.REGSWEEP, "serve", "--port", str(port)]
            env = _env(config, str(before) if name == "before" else here)
        log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log))
        urls[name] = f"http://127.0.0.1:{port}"
        PIDS[urls[name]] = procs[-1].pid
    try:
        for url in urls.values():
            s.wait_for(partial(_up, url), timeout=30, step=0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# --- hostile clients ------------------------------------------------------------------


class Slowloris:
    """``count`` connections sending one header line a second; reconnecting when closed."""

    def __init__(self, url: str, count: int) -> None:
        parsed = httpx.URL(url)
        self.address = (parsed.host, parsed.port or 80)
        self.count = count
        self.stop = threading.Event()
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Slowloris:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=5)
        sock.sendall(b"POST /hooks/registry HTTP/1.1\r\n")
        return sock

    def _run(self) -> None:
        socks = [self._connect() for _ in range(self.count)]
        while not self.stop.wait(1.0):
            for i, sock in enumerate(socks):
                try:
                    sock.sendall(b"X-Slow: y\r\n")
                except OSError:
                    sock.close()
                    self.reconnects += 1
                    socks[i] = self._connect()
        for sock in socks:
            sock.close()


class BigHead:
    """One client streaming a 128 MiB header as fast as the server takes it."""

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.address = (parsed.host, parsed.port or 80)
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BigHead:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        chunk = b"a" * (1024 * 1024)
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(HEAD + b"X-Big: ")
            with contextlib.suppress(OSError):
                while self.sent < BIG_HEAD and not self.stop.is_set():
                    sock.sendall(chunk)
                    self.sent += len(chunk)


def under_load(url: str, rate: float, seconds: float, load: str) -> dict[str, Any]:
    if load == "slowloris":
        with Slowloris(url, LORISES) as loris:
            time.sleep(2)  # all connected and dribbling
            result = asyncio.run(fixed_rate(url, rate, seconds))
        return result | {"slowloris_reconnects": loris.reconnects}
    if load == "128MiB-head":
        with BigHead(url) as big:
            result = asyncio.run(fixed_rate(url, rate, seconds))
        return result | {"big_head_sent_mib": round(big.sent / 2**20)}
    return asyncio.run(fixed_rate(url, rate, seconds))


# --- frozen Redis -----------------------------------------------------------------------


async def _time_to_answer(url: str, deliveries: int) -> list[tuple[int, float]]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": CONTENT_TYPE}
    limits = httpx.Limits(max_connections=deliveries)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> tuple[int, float]:
            body = BODY_TEMPLATE.replace("%s", f"frozen-{i}-{time.time_ns()}")
            started = time.perf_counter()
            response = await client.post("/hooks/registry", content=body, headers=headers)
            return response.status_code, time.perf_counter() - started

        return list(await asyncio.gather(*(one(i) for i in range(deliveries))))


def frozen(urls: dict[str, str], servers_: dict[str, h.RedisServer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, url in urls.items():
        server = servers_[name]
        assert server.proc is not None
        asyncio.run(_time_to_answer(url, 2))  # connections and scripts warm
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            answers = asyncio.run(_time_to_answer(url, 20))
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        times = [t for _, t in answers]
        out[name] = {
            "statuses": sorted({c for c, _ in answers}),
            "median_s": round(statistics.median(times), 2),
            "max_s": round(max(times), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-plain", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--rate-seconds", type=float, default=15.0)
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure"
    )
    args = parser.parse_args()
    if args.serve_plain:
        serve_plain(args.serve_plain)
        return
    assert args.before is not None, "--before is required"
    results: dict[str, Any] = {}
    s.flush()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shared = {name: s.REDIS_URL for name in ("before", "after", "plain")}
        with servers(root, args.before, shared) as urls:
            if "throughput" in args.parts:
                results["throughput"] = throughput(urls, root, args)
            if "rate" in args.parts:
                for load in ("none", "slowloris", "128MiB-head"):
                    for name in ("before", "after"):
                        key = f"rate_{load}_{name}"
                        results[key] = under_load(urls[name], args.rate, args.rate_seconds, load)
                        print(key, json.dumps(results[key]), flush=True)
            if "metrics" in args.parts:
                for name in ("before", "after"):
                    results[f"metrics_flood_{name}"] = metrics_flood(urls[name], root, args)
                    print(name, json.dumps(results[f"metrics_flood_{name}"]), flush=True)
        s.flush()
        if "frozen" in args.parts:
            results["frozen"] = frozen_redis(root, args.before)
    if "throughput" in results:
        results["summary"] = summary(results["throughput"])
    print(json.dumps(results, indent=2))


def throughput(urls: dict[str, str], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """wrk rounds, the servers alternating within each round."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for url in urls.values():
        wrk(url, write_script(root), 2, args.connections)
    store = redis_pid()
    for _ in range(args.rounds):
        for name, url in urls.items():
            before = cpu_seconds(PIDS[url]), cpu_seconds(store)
            result = wrk(url, write_script(root), args.seconds, args.connections)
            requests = result["rps"] * args.seconds
            # CPU per request is less moved by a shared machine's load than requests/s.
            result["service_cpu_us"] = round((cpu_seconds(PIDS[url]) - before[0]) / requests * 1e6)
            result["redis_cpu_us"] = round((cpu_seconds(store) - before[1]) / requests * 1e6, 1)
            rounds[name].append(result)
    return rounds


def metrics_flood(url: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Hook throughput alone, then while 8 connections scrape /metrics as fast as they can,
    then (for comparison: any flood takes its share) while they fetch /healthz."""
    alone = wrk(url, write_script(root), args.seconds, args.connections)
    return {"hook_rps_alone": alone["rps"]} | {
        f"{path}_{k}": v
        for path in ("metrics", "healthz")
        for k, v in _flooded(url, root, args, f"/{path}").items()
    }


def _flooded(url: str, root: Path, args: argparse.Namespace, path: str) -> dict[str, float]:
    argv = ["wrk", "-t1", "-c8", f"-d{args.seconds + 2}s", f"{url}{path}"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as flood:
        time.sleep(1)
        flooded = wrk(url, write_script(root), args.seconds, args.connections)
        out, _ = flood.communicate()
    flood_rps = float(out.split("Requests/sec:")[1].split()[0])
    return {"hook_rps_under_flood": flooded["rps"], "flood_rps": flood_rps}


def frozen_redis(root: Path, before: Path) -> dict[str, Any]:
    """Each server on a private redis-server, frozen in turn."""
    privates = {name: h.RedisServer(free_port()) for name in ("before", "after")}
    for server in privates.values():
        server.start()
    try:
        own = {name: server.url for name, server in privates.items()} | {"plain": s.REDIS_URL}
        with servers(root, before, own) as urls:
            return frozen({n: urls[n] for n in privates}, privates)
    finally:
        for server in privates.values():
            server.stop()


def summary(throughput: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rps = {name: [r["rps"] for r in rounds] for name, rounds in throughput.items()}
    pairs = list(zip(rps["after"], rps["before"], rps["plain"], strict=True))
    cpu = {name: [r["service_cpu_us"] for r in rounds] for name, rounds in throughput.items()}
    store = {name: [r["redis_cpu_us"] for r in rounds] for name, rounds in throughput.items()}
    return {
        "service_cpu_us_per_request_median": {n: statistics.median(v) for n, v in cpu.items()},
        "redis_cpu_us_per_request_median": {n: statistics.median(v) for n, v in store.items()},
        "rps_median": {name: round(statistics.median(v)) for name, v in rps.items()},
        "after_over_before": [round(a / b, 3) for a, b, _ in pairs],
        "bounded_over_plain": [round(a / p, 3) for a, _, p in pairs],
        "p99_at_saturation": {n: [r["p99"] for r in rs] for n, rs in throughput.items()},
    }


if __name__ == "__main__":
    main()
