"""The code's layout keeps its promises: the edge loads no engine, every import runs down the
table of layers (none in a circle), the keyspace is named in one module, every Redis command
is sent from the store, and every module says what it is for."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("regsweep", "service", "worker")
#: The layers, lowest first. A module imports only from a lower layer or from its own package
#: (the foundation's modules from each other too): the registry client and the store never
#: reach up into the engine or the settings; they are handed what they need where the objects
#: are made. Packages of one layer (the registry and the store) do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    # The foundation: the error tree, the OCI vocabulary and the records both sides keep.
    (
        "worker",
        "worker.errors",
        "worker.backoff",
        "worker.identity",
        "worker.logs",
        "worker.durations",
        "worker.oci",
        "worker.clock",
        "worker.records",
    ),
    # The two outside parts regsweep talks to: the registry, and what outlives a process.
    ("worker.registry", "worker.store"),
    ("worker.engine",),
    ("worker.settings",),
    ("worker.notify",),
    ("worker.queue",),
    ("worker.maintenance",),
    ("service",),
    ("regsweep",),
)
#: What the HTTP edge must not load: the engine's working parts, task code, Docker.
EDGE_MUST_NOT_IMPORT = (
    "worker.engine.executor",
    "worker.engine.inventory",
    "worker.engine.planner",
    "worker.engine.prune",
    "worker.queue.tasks",
    "worker.queue.leases",
    "worker.maintenance",
    "docker",
)
#: What only the read API and the dashboard load, on their first request (service/lazy.py):
#: a service that takes hooks only never pays for templates, sessions or the read side.
EDGE_LOADS_LAZILY = ("jinja2", "itsdangerous", "service.ui", "service.read_api", "service.reads")
#: What the read side (the read API, the dashboard) must not load either: it reads what the
#: workers recorded and never plans, deletes or switches anything itself. The maintenance
#: window's schedule (pure cron arithmetic) is the one maintenance module it reads.
READ_SIDE_MUST_NOT_IMPORT = (
    *(m for m in EDGE_MUST_NOT_IMPORT if m != "worker.maintenance"),
    "worker.maintenance.controllers",
    "worker.maintenance.job",
    "worker.maintenance.gc",
    "worker.maintenance.tasks",
    "worker.registry.client",
)

#: The modules outside worker/store that may import redis, each for its reason: the broker's
#: wiring, which speaks kombu's and Celery's transport, not regsweep's keyspace.
REDIS_ALLOWED: dict[str, str] = {
    "worker.queue.broker": "kombu's Redis transport, raising redis' error for a lost channel",
    "worker.queue.enqueue": "catches redis' errors kombu lets through when sending a task",
    "service.publish": "LPUSHes Celery's messages onto a plain redis:// broker",
}
#: redis-py's command methods (and the pipeline that batches them): called on a client-like
#: name outside the store, one is a Redis operation the store should hold.
REDIS_COMMANDS = frozenset(
    {
        *("get", "set", "getdel", "getex", "mget", "mset", "setnx", "setex", "psetex"),
        *("delete", "unlink", "exists", "expire", "pexpire", "expireat", "persist"),
        *("ttl", "pttl", "type", "rename", "incr", "incrby", "incrbyfloat", "decr", "decrby"),
        *("hset", "hsetnx", "hget", "hmget", "hgetall", "hdel", "hexists", "hkeys", "hvals"),
        *("hlen", "hincrby", "hincrbyfloat", "hscan", "hscan_iter"),
        *("sadd", "srem", "smembers", "sismember", "smismember", "scard", "sscan_iter"),
        *("zadd", "zrem", "zrange", "zrevrange", "zrangebyscore", "zrevrangebyscore", "zscore"),
        *("zcard", "zcount", "zincrby", "zremrangebyscore", "zremrangebyrank", "zscan_iter"),
        *("lpush", "rpush", "lpop", "rpop", "blpop", "brpop", "lrange", "ltrim", "llen", "lrem"),
        *("lmove", "blmove", "lindex", "xadd", "xrange", "xrevrange", "xlen", "xtrim", "xread"),
        *("eval", "evalsha", "register_script", "script_load", "pipeline", "transaction"),
        *("scan", "scan_iter", "keys", "info", "config_get", "config_set", "dbsize"),
        *("flushdb", "flushall", "publish", "watch", "multi", "execute", "lock"),
    }
)
#: The names a Redis client or pipeline goes by, bare or as an attribute (``self.redis``,
#: ``state.client``, ``m.redis``).
CLIENT_NAMES = frozenset({"redis", "_redis", "client", "_client", "pipe", "pipeline", "conn"})


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def module_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (not inside functions or TYPE_CHECKING)."""
    return _imported(ast.parse(path.read_text()).body)


def _imported(nodes: Iterable[ast.AST]) -> set[str]:
    """The modules (and ``module.name``s) ``nodes`` import, absolute imports only."""
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_edge_loads_no_engine_task_code_or_docker() -> None:
    """``import service.app`` imports neither the executor, inventory, planner or pruner,
    nor any Celery task module, nor the maintenance code and the Docker SDK."""
    code = "import sys, service.app; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert [m for m in loaded if m.startswith(EDGE_MUST_NOT_IMPORT)] == []


def test_the_read_side_loads_only_on_its_first_request() -> None:
    """``import service.app`` and building the app import neither the read API, the dashboard,
    Jinja2 nor itsdangerous (the hook path stays as lean as before); the read side itself
    loads no engine, task, registry-client or maintenance-switching code."""
    code = (
        "import sys, service.app\n"
        "from worker.settings.model import Config, RegistrySettings\n"
        "service.app.create_app(Config(RegistrySettings('http://x')), sink=None, state=object())\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = _loaded(code)
    assert [m for m in loaded if m.startswith(EDGE_LOADS_LAZILY)] == []
    read_side = _loaded(
        "import sys, service.read_api, service.ui.app; print('\\n'.join(sys.modules))"
    )
    assert [m for m in read_side if m.startswith(READ_SIDE_MUST_NOT_IMPORT)] == []
    assert "jinja2" in read_side  # the check above looked at a loaded dashboard


def _loaded(code: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()


def all_imports(path: Path) -> set[str]:
    """Modules ``path`` imports anywhere (inside functions too, not under TYPE_CHECKING alone)."""
    return _imported(ast.walk(ast.parse(path.read_text())))


def package_of(module: str) -> tuple[int, str]:
    """The layer and the package (the longest prefix in :data:`LAYERS`) ``module`` belongs to."""
    matches = [
        (len(prefix), level, prefix)
        for level, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    _, level, prefix = max(matches)
    return level, prefix


def test_every_package_has_a_layer() -> None:
    """Every module of the three packages falls in a package the table of layers names below
    its top (``worker`` alone is only its ``__init__``): a new package must be given a place."""
    unplaced = [
        name for name, _ in modules() if package_of(name)[1] == "worker" and name != "worker"
    ]
    assert unplaced == []


def test_no_import_runs_up_the_layers() -> None:
    """No module imports from a higher layer or from another package of its own layer
    (anywhere in the module, inside functions too)."""
    names = dict(modules())
    upward = []
    for name, path in names.items():
        level, package = package_of(name)
        for imported in sorted(m for m in all_imports(path) if m in names):
            to_level, to_package = package_of(imported)
            if to_package == package or (level == to_level == 0):
                continue
            if to_level >= level:
                upward.append(f"{name} -> {imported}")
    assert upward == []


def test_the_digest_grammar_is_written_once() -> None:
    """Only worker/oci.py spells out a digest's grammar (``sha256:`` and hex digits, or the
    ``algorithm:encoded`` form); every other module asks it."""
    grammar = re.compile(r"sha(?:256|384|512):\[|\[a-zA-Z0-9=_-\]")
    assert _spelling(grammar) == {"worker/oci.py"}


def test_no_module_level_import_cycle() -> None:
    """The import graph of regsweep's own modules (at module level) has no cycle."""
    names = dict(modules())
    graph = {
        name: sorted(m for m in module_level_imports(path) if m in names and m != name)
        for name, path in names.items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def _strings(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_the_key_prefix_is_named_in_one_module() -> None:
    """Only worker/store/keys.py writes a Redis key (``regsweep:…``) out: every other module
    asks it (log messages saying ``regsweep: …`` are no keys)."""
    assert _spelling(re.compile(r"^regsweep:(\S|$)")) == {"worker/store/keys.py"}


def _spelling(pattern: re.Pattern[str]) -> set[str]:
    """The modules with a string constant ``pattern`` finds something in."""
    return {
        str(path.relative_to(ROOT))
        for _, path in modules()
        if any(pattern.search(s) for s in _strings(path))
    }


def _opening(path: Path) -> str:
    """The first line of a module's docstring ("" without one)."""
    doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    return doc.splitlines()[0] if doc else ""


def test_every_module_says_what_it_is_for() -> None:
    """Each module's docstring opens with a sentence (not empty, not a placeholder), the test
    harness's included."""
    harness = [
        (f"tests.harness.{p.stem}", p) for p in sorted((ROOT / "tests/harness").glob("*.py"))
    ]
    silent = [
        name for name, path in [*modules(), *harness] if _opening(path) in ("", "TODO", "XXX")
    ]
    assert silent == []


def test_shipped_code_never_imports_the_tests() -> None:
    """The packages that are installed import nothing from ``tests`` (which is not installed),
    not even inside a function."""
    offenders = []
    for name, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            imported = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{name}: {m}" for m in imported if m.split(".")[0] == "tests"]
    assert offenders == []


def _outside_the_store() -> Iterator[tuple[str, Path]]:
    """Every module but the store's and the broker wiring of :data:`REDIS_ALLOWED`."""
    for name, path in modules():
        if not (name == "worker.store" or name.startswith("worker.store.")) and (
            name not in REDIS_ALLOWED
        ):
            yield name, path


def test_only_the_store_imports_redis() -> None:
    """Outside worker/store no module imports redis, at module level or inside a function,
    but the broker wiring :data:`REDIS_ALLOWED` names: the others hold a client the store made
    (annotated ``RedisClient``) and hand it to a store."""
    offenders = [
        f"{name}: {imported}"
        for name, path in _outside_the_store()
        for imported in sorted(all_imports(path))
        if imported.split(".")[0] == "redis"
    ]
    assert offenders == []


def _client_like(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in CLIENT_NAMES
    return isinstance(node, ast.Attribute) and node.attr in CLIENT_NAMES


def test_only_the_store_sends_redis_commands() -> None:
    """Outside worker/store (and the broker wiring) no code calls a redis-py command on a
    client-like name (``client.hset(...)``, ``self.redis.eval(...)``, ``pipe.expire(...)``):
    every Redis operation is a store's method or function."""
    calls = [
        f"{name}:{node.lineno}: {ast.unparse(node.func)}"
        for name, path in _outside_the_store()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in REDIS_COMMANDS
        and _client_like(node.func.value)
    ]
    assert calls == []


#: Celery's ways of publishing a task.
PUBLISH_CALLS: Final = frozenset({"send_task", "apply_async", "delay", "signature", "s", "si"})


def test_one_module_hands_tasks_to_celery() -> None:
    """Every job and event reaches the workers through worker/queue/enqueue.py: no other module
    calls ``send_task``, ``apply_async``, ``delay`` or makes a signature (the service's hook
    path writes kombu's message itself, service/publish.py, and a test holds it to the real
    ``send_task`` one)."""
    calls = [
        f"{name}:{node.lineno}: {ast.unparse(node.func)}"
        for name, path in modules()
        if path != ROOT / "worker/queue/enqueue.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in PUBLISH_CALLS
    ]
    assert calls == []
