"""The ``regsweep`` command. Each subcommand parses, calls one core function, maps errors.

Exit codes: 0 ok, 1 run error, 2 usage or config error.

The service, Celery and the maintenance controllers (Docker SDK) are imported
by the commands that use them: ``plan`` and ``prune`` start in half the time
without them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from regsweep import render
from worker import env, logs
from worker.audit import AuditLog, JsonlAuditLog
from worker.config import load_config
from worker.errors import ConfigError, RegsweepError
from worker.events import JobKind, JobRequest
from worker.inventory import CreatedCache
from worker.policy import Config
from worker.pruner import Pruner, RepositoryPlan
from worker.registry.client import RegistryClient
from worker.restore import restore

EXIT_OK: Final = 0
EXIT_RUN_ERROR: Final = 1
EXIT_USAGE: Final = 2
DEFAULT_AUDIT_FILE: Final = "regsweep-audit.jsonl"

Command = Callable[[argparse.Namespace, Config], Coroutine[Any, Any, int]]
#: Long-running commands that own the process (and its signals): no event loop around them.
Process = Callable[[argparse.Namespace, Config], int]
#: Commands whose own options go to Celery untouched (``regsweep worker -Q gc -c 1``).
CELERY_COMMANDS: Final = ("worker", "beat")
#: No start-up banner: Celery prints it to stdout as plain text, amid the JSON log lines.
QUIET: Final = ("--quiet",)
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regsweep", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="policy file (default: $REGSWEEP_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("check-config", help="validate the policy file and list every problem")
    plan = sub.add_parser("plan", help="show what the policies would delete, and why")
    plan.add_argument("repositories", nargs="*", metavar="REPO")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    prune = sub.add_parser("prune", help="delete what the policies no longer keep")
    prune.add_argument("repositories", nargs="*", metavar="REPO")
    prune.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    prune.add_argument(
        "--enqueue", action="store_true", help="queue prune jobs for the workers; print job ids"
    )
    rest = sub.add_parser("restore", help="put a deleted manifest and its tags back (until GC)")
    rest.add_argument("repository", metavar="REPO")
    rest.add_argument("digest", metavar="DIGEST")
    audit = sub.add_parser("audit", help="list audited deletions")
    audit.add_argument("--since", type=_since, help="e.g. 24h, 7d or an ISO timestamp")
    audit.add_argument("--json", action="store_true")
    gc = sub.add_parser("gc", help="garbage-collect now: pruning paused, registry read-only")
    gc.add_argument("--dry-run", action="store_true", help="report what GC would remove only")
    gc.add_argument("--enqueue", action="store_true", help="queue it for the gc worker; print id")
    _add_process_commands(sub)
    _accept_config_after_command(sub)
    return parser


def _accept_config_after_command(sub: Any) -> None:
    """``regsweep check-config -c FILE`` as well as ``regsweep -c FILE check-config``.

    Not for ``worker`` and ``beat``: after them, ``-c`` is Celery's (concurrency).
    SUPPRESS keeps a ``-c`` given before the command when none follows it.
    """
    for name, command in sub.choices.items():
        if name not in CELERY_COMMANDS:
            command.add_argument(
                "-c", "--config", default=argparse.SUPPRESS, help="policy file (as before COMMAND)"
            )


def _add_process_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service (hooks, job API, metrics)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    sub.add_parser(
        "worker",
        help="run a Celery worker (every queue unless -Q); Celery worker options pass through",
        add_help=False,
    )
    sub.add_parser(
        "beat",
        help="run Celery beat (sweeps, ticks, GC windows); options pass through",
        add_help=False,
    )


def split_celery_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """regsweep's own arguments, and what follows ``worker``/``beat`` (Celery's options)."""
    args = list(argv)
    i = 0
    while i < len(args):
        if args[i] in ("-c", "--config"):
            i += 2
        elif args[i].startswith("-"):
            i += 1
        elif args[i] in CELERY_COMMANDS:
            return args[: i + 1], args[i + 1 :]
        else:
            break
    return args, []


async def enqueue(config: Config, requests: Sequence[JobRequest]) -> list[str]:
    """Record each job in Redis and queue its task for the workers; the job ids.

    What ``--enqueue`` does for every command that has it.
    """
    from service.celery_sink import CelerySink
    from service.ingest import submit_job
    from worker.state import State

    if config.redis_url is None:
        raise ConfigError("--enqueue needs redis.url (or REGSWEEP_REDIS_URL)")
    state = State.from_url(config.redis_url)
    sink = CelerySink.from_config(config)
    try:
        return [await submit_job(request, state, sink) for request in requests]
    finally:
        sink.close()
        await state.aclose()


async def _prune_enqueue(args: argparse.Namespace, config: Config) -> int:
    dry_run = True if args.dry_run else None
    repositories = args.repositories or [None]
    requests = [JobRequest(JobKind.PRUNE, repository=r, dry_run=dry_run) for r in repositories]
    for job_id in await enqueue(config, requests):
        print(job_id)
    return EXIT_OK


def _serve(args: argparse.Namespace, config: Config) -> int:
    from service.app import serve

    serve(config, host=args.host, port=args.port)
    return EXIT_OK


def _worker(args: argparse.Namespace, config: Config) -> int:
    from worker.celery_app import QUEUES, make_celery

    logs.configure_worker()
    options = list(args.celery_args)
    if not _given(options, "-Q", "--queues"):
        options += ["-Q", ",".join(QUEUES)]
    make_celery(config).worker_main([*QUIET, "worker", *_with_loglevel(options)])
    return EXIT_OK


def _given(options: Sequence[str], short: str, long: str) -> bool:
    return any(o in (short, long) or o.startswith((f"{long}=", f"{short}=")) for o in options)


def _with_loglevel(options: Sequence[str]) -> list[str]:
    """Celery's default level (WARNING) would hide its own "ready" and task lines."""
    return list(options) if _given(options, "-l", "--loglevel") else [*options, "-l", "INFO"]


def _beat(args: argparse.Namespace, config: Config) -> int:
    from worker.celery_app import make_celery

    logs.configure()
    make_celery(config).start([*QUIET, "beat", *_with_loglevel(args.celery_args)])
    return EXIT_OK


PROCESSES: Final[dict[str, Process]] = {"serve": _serve, "worker": _worker, "beat": _beat}


def _since(text: str) -> datetime:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text and text[-1] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration or timestamp: {text!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _audit_log(config: Config) -> AuditLog:
    if config.audit_path:
        return JsonlAuditLog(config.audit_path)
    base = Path(config.source).parent if config.source.startswith("/") else Path.cwd()
    return JsonlAuditLog(base / DEFAULT_AUDIT_FILE)


def _created_cache_path() -> Path:
    return Path(env.cache_dir(env.current())) / "created.json"


def _pruner(config: Config, client: RegistryClient, created: CreatedCache) -> Pruner:
    """The in-process pruner: JSONL audit, and a persistent cache of image build times."""
    return Pruner(config, client, audit=_audit_log(config), created_cache=created)


async def _check_config(args: argparse.Namespace, config: Config) -> int:
    print(f"{config.source}: ok, {len(config.policies)} policies")
    for policy in config.policies:
        repos = ", ".join(p.source for p in policy.repositories)
        print(f"  {policy.name} ({policy.mode.value}): {repos}")
    return EXIT_OK


async def _plan(args: argparse.Namespace, config: Config) -> int:
    created = CreatedCache.load(_created_cache_path())
    async with RegistryClient.from_settings(config.registry) as client:
        pruner = _pruner(config, client, created)
        planned = await pruner.plan_many(await pruner.repositories(args.repositories))
    await asyncio.to_thread(created.save, _created_cache_path())
    if args.json:
        json.dump(render.plan_json(planned), sys.stdout, indent=2)
        print()
    else:
        _print_plans(planned)
    return EXIT_OK


def _print_plans(planned: Sequence[RepositoryPlan]) -> None:
    if not planned:
        print("no repository matches a policy")
    for rp in planned:
        print(render.plan_table(rp))
        print()


async def _prune(args: argparse.Namespace, config: Config) -> int:
    if args.enqueue:
        return await _prune_enqueue(args, config)
    job_id = f"cli-{uuid.uuid4().hex[:12]}"
    created = CreatedCache.load(_created_cache_path())
    async with RegistryClient.from_settings(config.registry) as client:
        pruner = _pruner(config, client, created)
        repos = await pruner.repositories(args.repositories)
        progress: dict[str, render.Progress] = {}

        def planned(rp: RepositoryPlan) -> None:
            print(render.plan_table(rp))
            if rp.enforced and not args.dry_run:
                progress[rp.plan.repository] = render.Progress(len(rp.plan.deletions))

        results = await pruner.prune_many(
            repos,
            dry_run=args.dry_run,
            job_id=job_id,
            on_planned=planned,
            on_progress=lambda repo, d, s: progress[repo].step(
                f"{repo}: {s.value} {render.short(d.digest)}"
            ),
        )
    await asyncio.to_thread(created.save, _created_cache_path())
    failed = False
    for rp, report in results:
        if report is None:
            why = "--dry-run" if args.dry_run else f"policy {rp.policy.name} is dry-run"
            print(f"{rp.plan.repository}: nothing deleted ({why})")
            continue
        print(render.report_line(report))
        failed |= report.outcome.value == "failed"
    return EXIT_RUN_ERROR if failed else EXIT_OK


async def _restore(args: argparse.Namespace, config: Config) -> int:
    async with RegistryClient.from_settings(config.registry) as client:
        restored = await restore(client, _audit_log(config), args.repository, args.digest)
    for item in restored:
        tags = ", ".join(item.tags) or "no tags"
        print(f"restored {item.action} {item.digest} ({tags})")
    return EXIT_OK


async def _audit(args: argparse.Namespace, config: Config) -> int:
    entries = await _audit_log(config).entries(since=args.since)
    for entry in entries:
        if args.json:
            record = json.loads(entry.to_json())
            record.pop("manifest")
            print(json.dumps(record))
        else:
            print(render.audit_line(entry))
    return EXIT_OK


async def _gc(args: argparse.Namespace, config: Config) -> int:
    from worker.maintenance.command import gc_command

    return gc_command(config, dry_run=args.dry_run, enqueue=args.enqueue)


COMMANDS: Final[dict[str, Command]] = {
    "gc": _gc,
    "check-config": _check_config,
    "plan": _plan,
    "prune": _prune,
    "restore": _restore,
    "audit": _audit,
}


def main(argv: Sequence[str] | None = None) -> int:
    own, celery_args = split_celery_args(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(own)
    args.celery_args = celery_args
    logging.basicConfig(level=logging.WARNING, format="regsweep: %(levelname)s: %(message)s")
    environ = env.current()
    path = args.config or env.config_path(environ)
    if not path:
        print("regsweep: no policy file: pass -c FILE or set REGSWEEP_CONFIG", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command in PROCESSES:
            return PROCESSES[args.command](args, config)
        return asyncio.run(COMMANDS[args.command](args, config))
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_USAGE
    except RegsweepError as exc:
        print(f"regsweep: {exc}", file=sys.stderr)
        return EXIT_RUN_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
