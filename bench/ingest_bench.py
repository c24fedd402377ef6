"""Ingest benchmark: /hooks/registry (auth, dedup, enqueue to Celery) beside a bare endpoint.

Both run under uvicorn with the same settings (``regsweep serve``'s), one
process each, on 127.0.0.1. Redis DB 11 is the broker and state (flushed
before and after); no worker consumes, so what is measured is the service's
own path: Bearer check, envelope parse, ``SET NX`` per event, ``send_task``.

1. Throughput: ``wrk`` (Debian's) with a Lua script that POSTs a registry
   envelope with a unique event id per request, closed loop, N connections.
2. Latency at a fixed rate: an open-loop generator (asyncio streams, keep-alive
   connections) schedules one request every 1/rate s whatever the answers,
   and records each latency from its scheduled time.

    python -m bench.ingest_bench [--seconds 15] [--connections 16] [--rate 200]
        [--without direct-push|bounds]

``--without`` prices one of the service's two reaches into private internals, run as
``regsweep serve`` otherwise runs: ``direct-push`` publishes every message with Celery's
``send_task`` in a thread instead of LPUSHing the envelope kombu's Redis transport would
(``service/publish.py``: ``redis_envelope``, ``_protocol2``); ``bounds`` serves on uvicorn's
own httptools protocol instead of the bounded subclass (``service/protocol.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.app import UVICORN_OPTIONS
from tests.harness import stack as s
from tests.harness.registry import free_port

TOKEN = s.HOOK_TOKEN
CONTENT_TYPE = "application/vnd.docker.distribution.events.v1+json"
DIGEST = "sha256:" + "ab" * 32
#: One manifest push, in the shape (and about the size) distribution 2.8 sends.
EVENT = {
    "id": "%s",
    "timestamp": "2025-03-01T10:00:00.123456789Z",
    "action": "push",
    "target": {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "size": 528,
        "digest": DIGEST,
        "length": 528,
        "repository": "bench/app",
        "url": f"http://registry:5000/v2/bench/app/manifests/{DIGEST}",
        "tag": "v1",
    },
    "request": {
        "id": "5e5f0c6b-6d3a-4b8e-9c1c-0d8f1d2f9e0a",
        "addr": "10.0.0.7:51234",
        "host": "registry:5000",
        "method": "PUT",
        "useragent": "docker/27.3.1 go/go1.22.7 git-commit/41ca978 os/linux arch/amd64",
    },
    "actor": {"name": "ci"},
    "source": {"addr": "registry:5000", "instanceID": "2c8b3e5a-6f1d-4e3b-8a0c-1f2e3d4c5b6a"},
}
BODY_TEMPLATE = json.dumps({"events": [EVENT]})

LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local id = "%(run)s-" .. tid .. "-" .. counter
  local body = string.format(template, id)
  return wrk.format("POST", "/hooks/registry", headers, body)
end
template = %(template)s
headers = {["Authorization"] = "Bearer %(token)s", ["Content-Type"] = "%(content_type)s"}
"""


async def _ok(request: Request) -> Response:
    return Response(status_code=200)


bare_app = Starlette(routes=[Route("/hooks/registry", _ok, methods=["POST"])])


def serve_bare(port: int) -> None:
    """The reference: same uvicorn settings as `regsweep serve` (and its frozen start-up
    heap), an endpoint that only says 200."""
    gc.freeze()
    uvicorn.run(bare_app, host="127.0.0.1", port=port, **UVICORN_OPTIONS)


def serve_regsweep(port: int, without: str) -> None:
    """``regsweep serve`` (policy from REGSWEEP_CONFIG) with one private reach taken out."""
    import service.app
    import service.publish
    from worker.queue.celery_app import make_celery
    from worker.settings.load import load_config

    if without == "direct-push":
        service.publish.CelerySink.from_config = classmethod(  # type: ignore[method-assign,assignment]
            lambda cls, config: cls(make_celery(config), None)
        )
    elif without == "bounds":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        setattr(service.app, "bounded_protocol", lambda limits: HttpToolsProtocol)  # noqa: B010
    service.app.serve(load_config(os.environ["REGSWEEP_CONFIG"], os.environ), port=port)


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def _wait_up(url: str) -> None:
    def up() -> bool:
        try:
            httpx.post(f"{url}/hooks/registry", timeout=1)
            return True
        except httpx.TransportError:
            return False

    s.wait_for(up, timeout=20, step=0.1)


@contextmanager
def servers(root: Path, without: str | None = None) -> Iterator[dict[str, str]]:
    """`regsweep serve` and the bare endpoint, each on a free port; name -> base URL."""
    config = s.policy_file(root / "regsweep.yaml", "http://127.0.0.1:1", [], s.REDIS_URL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    env |= s.ENVIRONMENT | {"REGSWEEP_CONFIG": str(config)}
    full_port, bare_port = free_port(), free_port()
    regsweep = [s.REGSWEEP, "serve", "--port", str(full_port)]
    if without is not None:
        regsweep = [sys.executable, "-m", "bench.ingest_bench", "--serve-regsweep", str(full_port)]
        regsweep += ["--without", without]
    bare = [sys.executable, "-m", "bench.ingest_bench", "--serve-bare", str(bare_port)]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        for argv, log in ((regsweep, open(root / "serve.log", "wb")), (bare, subprocess.DEVNULL))  # noqa: SIM115
    ]
    urls = {"bare": f"http://127.0.0.1:{bare_port}", "regsweep": f"http://127.0.0.1:{full_port}"}
    try:
        for url in urls.values():
            _wait_up(url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    return {
        "rps": rps,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "p99": p99 and p99.group(1),
    }


def write_script(root: Path) -> Path:
    script = root / f"envelope-{uuid.uuid4().hex[:6]}.lua"
    values = {
        "run": uuid.uuid4().hex[:10],
        "template": _lua_string(BODY_TEMPLATE),
        "token": TOKEN,
        "content_type": CONTENT_TYPE,
    }
    script.write_text(LUA % values)
    return script


def _request(host: str, body: str) -> bytes:
    head = (
        f"POST /hooks/registry HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body.encode()


async def _read_status(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length framed); its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def fixed_rate(
    url: str, rate: float, seconds: float, connections: int = 32
) -> dict[str, Any]:
    """Open loop: one POST every 1/rate s over keep-alive connections; latency is measured
    from each request's scheduled time, so waiting for a free connection counts too."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    run = uuid.uuid4().hex[:10]
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while (item := await queue.get()) is not None:
            scheduled, request = item
            writer.write(request)
            await writer.drain()
            code = await _read_status(reader)
            latencies.append(time.perf_counter() - scheduled)
            statuses[code] = statuses.get(code, 0) + 1
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    total = int(rate * seconds)
    start = time.perf_counter() + 0.2
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = BODY_TEMPLATE.replace("%s", f"{run}-{i}")
        queue.put_nowait((scheduled, _request(f"{host}:{port}", body)))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {
        "requests": total,
        "statuses": statuses,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def run(
    seconds: int,
    connections: int,
    rate: float,
    rate_seconds: float,
    rounds: int,
    *,
    without: str | None = None,
) -> None:
    s.flush()
    results: dict[str, Any] = {"throughput": {"bare": [], "regsweep": []}}
    with tempfile.TemporaryDirectory() as tmp, servers(Path(tmp), without) as urls:
        for url in urls.values():  # warm both up (imports, first connections)
            wrk(url, write_script(Path(tmp)), 2, connections)
        for _ in range(rounds):
            for name, url in urls.items():
                results["throughput"][name].append(
                    wrk(url, write_script(Path(tmp)), seconds, connections)
                )
        for name, url in urls.items():
            results[f"latency_{name}"] = asyncio.run(fixed_rate(url, rate, rate_seconds))
    s.flush()
    results["summary"] = summary(results["throughput"], rate, results["latency_regsweep"])
    print(json.dumps(results, indent=2))


def summary(
    throughput: dict[str, list[dict[str, Any]]], rate: float, latency: dict[str, Any]
) -> dict[str, Any]:
    """Medians, and the ratio of each round's pair: the two ran back to back, so a
    pair's ratio is less moved by the shared machine's load than either figure."""
    bare = [r["rps"] for r in throughput["bare"]]
    full = [r["rps"] for r in throughput["regsweep"]]
    ratios = [round(f / b, 3) for f, b in zip(full, bare, strict=True)]
    return {
        "bare_rps_median": round(statistics.median(bare)),
        "regsweep_rps_median": round(statistics.median(full)),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratios": ratios,
        "bare_rps_range": [round(min(bare)), round(max(bare))],
        "regsweep_rps_range": [round(min(full)), round(max(full))],
        "p99_ms_at_rate": latency["p99_ms"],
        # wrk's own, closed loop at full load: the tail a burst of deliveries sees.
        "regsweep_p99_at_saturation": [r["p99"] for r in throughput["regsweep"]],
        "rate": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--rate-seconds", type=float, default=20.0)
    parser.add_argument("--serve-regsweep", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--without", choices=["direct-push", "bounds"])
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.serve_regsweep:
        serve_regsweep(args.serve_regsweep, args.without)
        return
    run(
        args.seconds,
        args.connections,
        args.rate,
        args.rate_seconds,
        args.rounds,
        without=args.without,
    )


if __name__ == "__main__":
    main()
