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
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from regsweep import checkconfig, console, jobs, render, replay, status
from worker import logs
from worker.durations import DurationTooLong, parse_duration
from worker.engine.executor import RunOutcome, deletions_log
from worker.engine.inventory import CreatedCache
from worker.engine.names import (
    Named,
    Second,
    digest_problems,
    name_problems,
    on_command_line,
    repository_problem,
)
from worker.engine.prune import Pruned, Pruner, RepositoryFailure, RepositoryPlan
from worker.engine.restore import restore
from worker.errors import ConfigError, RegsweepError
from worker.queue.messages import JobKind, JobRequest, follow_hint
from worker.records import Hold
from worker.registry.client import RegistryClient
from worker.settings import env
from worker.settings.load import load_config
from worker.settings.local import audit_unwritable
from worker.settings.model import Config
from worker.store.audit import AuditQuery
from worker.store.locks import PruneTurns
from worker.store.open import Stores, audit_file

EXIT_OK: Final = 0
EXIT_RUN_ERROR: Final = 1
EXIT_USAGE: Final = 2
#: ``regsweep hold`` without ``--for``.
DEFAULT_HOLD: Final = timedelta(days=7)
#: How long ``regsweep prune`` waits for another prune of a repository (a worker's) to end.
PRUNE_TURN_PATIENCE: Final = timedelta(minutes=10)

Command = Callable[[argparse.Namespace, Config], Coroutine[Any, Any, int]]
#: Long-running commands that own the process (and its signals): no event loop around them.
Process = Callable[[argparse.Namespace, Config], int]
#: Commands whose own options go to Celery untouched (``regsweep worker -Q gc -c 1``).
CELERY_COMMANDS: Final = ("worker", "beat")
#: No start-up banner: Celery prints it to stdout as plain text, amid the JSON log lines.
QUIET: Final = ("--quiet",)
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
#: Shells ``regsweep completion`` writes a script for.
SHELLS: Final = ("bash", "zsh", "tcsh")
#: shtab's ``FILE``: complete file names. Spelled out so that every command does not
#: import shtab (50 ms) to build its parser; only ``regsweep completion`` does.
COMPLETE_FILES: Final = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}

DESCRIPTION: Final = """\
Prune a self-hosted Docker registry (CNCF distribution) by retention policy, safely,
and garbage-collect it in a maintenance window."""
EPILOG: Final = """\
The policy file comes from -c FILE (before or after the command) or $REGSWEEP_CONFIG.
Exit codes: 0 ok, 1 run error, 2 usage or config error.
Each command's own options: regsweep COMMAND --help."""


def _version() -> str:
    try:
        return f"regsweep {metadata.version('regsweep')}"
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "regsweep (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regsweep",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="policy file (default: $REGSWEEP_CONFIG)"
    ).complete = COMPLETE_FILES  # type: ignore[attr-defined]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkconfig.add_arguments(
        sub.add_parser("check-config", help="validate the policy file and list every problem")
    )
    plan = sub.add_parser("plan", help="show what the policies would delete, and why")
    plan.add_argument("repositories", nargs="*", metavar="REPO")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    prune = sub.add_parser("prune", help="delete what the policies no longer keep")
    prune.add_argument("repositories", nargs="*", metavar="REPO")
    prune.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    prune.add_argument(
        "--enqueue", action="store_true", help="queue prune jobs for the workers; print job ids"
    )
    prune.add_argument("--json", action="store_true", help="machine-readable output")
    rest = sub.add_parser("restore", help="put a deleted manifest and its tags back (until GC)")
    rest.add_argument("repository", metavar="REPO")
    # Optional here so that `restore team/web@sha256:...` is answered with what it meant.
    rest.add_argument(
        "digest", metavar="DIGEST", nargs="?", help="a digest or a unique prefix of one (required)"
    )
    rest.add_argument(
        "--force", action="store_true", help="move tags that now point elsewhere back too"
    )
    rest.add_argument("--json", action="store_true", help="machine-readable output")
    hold = sub.add_parser("hold", help="keep a tag whatever the policy says, for a while")
    hold.add_argument("repository", metavar="REPO")
    hold.add_argument(
        "tag", metavar="TAG", nargs="?", help="the tag (required; apart from REPO, not REPO:TAG)"
    )
    hold.add_argument(
        "--for", dest="duration", type=_duration, default=DEFAULT_HOLD, help="default 7d"
    )
    hold.add_argument("--json", action="store_true", help="machine-readable output")
    unhold = sub.add_parser("unhold", help="end a hold")
    unhold.add_argument("repository", metavar="REPO")
    unhold.add_argument(
        "tag", metavar="TAG", nargs="?", help="the tag (required; apart from REPO, not REPO:TAG)"
    )
    unhold.add_argument("--json", action="store_true", help="machine-readable output")
    audit = sub.add_parser("audit", help="list audited deletions")
    audit.add_argument("--since", type=_since, help="e.g. 24h, 1h30m, 7d or an ISO timestamp")
    audit.add_argument("--repository", metavar="REPO")
    audit.add_argument("--digest", metavar="DIGEST", help="a digest or a prefix of one")
    audit.add_argument("--job", metavar="JOB_ID")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    gc = sub.add_parser("gc", help="garbage-collect now: pruning paused, registry read-only")
    gc.add_argument("--dry-run", action="store_true", help="report what GC would remove only")
    gc.add_argument("--enqueue", action="store_true", help="queue it for the gc worker; print id")
    gc.add_argument(
        "--storage-prune",
        action="store_true",
        help="prune the enforced policies on storage first (maintenance.storage_prune)",
    )
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.add_parser(sub)
    status.add_parser(sub)
    replay.add_parser(sub)
    _add_process_commands(sub)
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for SHELL, e.g.: "
        "regsweep completion bash > /etc/bash_completion.d/regsweep",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=", ".join(SHELLS))
    _accept_config_after_command(sub)
    return parser


def _accept_config_after_command(sub: Any) -> None:
    """``regsweep check-config -c FILE`` as well as ``regsweep -c FILE check-config``.

    Not for ``worker`` and ``beat``: after them, ``-c`` is Celery's (concurrency).
    SUPPRESS keeps a ``-c`` given before the command when none follows it.
    """
    for name, command in sub.choices.items():
        if name not in (*CELERY_COMMANDS, "completion"):
            command.add_argument(
                "-c",
                "--config",
                metavar="FILE",
                default=argparse.SUPPRESS,
                help="policy file (as before COMMAND)",
            ).complete = COMPLETE_FILES


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
    from service.ingest import submit_job
    from worker.queue.enqueue import Enqueuer
    from worker.store.state import State

    if config.redis_url is None:
        raise ConfigError("--enqueue needs redis.url (or REGSWEEP_REDIS_URL)")
    state = State.from_url(config.redis_url)
    sink = Enqueuer.from_config(config)
    try:
        return [await submit_job(request, state, sink) for request in requests]
    finally:
        sink.close()
        await state.aclose()


async def _prune_enqueue(args: argparse.Namespace, config: Config) -> int:
    problems = [p for r in args.repositories if (p := repository_problem(r)) is not None]
    # Refused here as a prune in place refuses it, not queued to end "skipped".
    problems += [
        f"{r}: no policy's repositories match it; nothing to plan"
        for r in args.repositories
        if repository_problem(r) is None and config.policy_for(r) is None
    ]
    if problems:
        raise ConfigError([f"regsweep: {problem}" for problem in problems])
    dry_run = True if args.dry_run else None
    repositories = args.repositories or [None]
    requests = [JobRequest(JobKind.PRUNE, repository=r, dry_run=dry_run) for r in repositories]
    job_ids = await enqueue(config, requests)
    print(json.dumps({"job_ids": job_ids}) if args.json else "\n".join(job_ids))
    for job_id in job_ids:
        print(follow_hint(job_id), file=sys.stderr)
    return EXIT_OK


def _serve(args: argparse.Namespace, config: Config) -> int:
    from service.app import serve

    serve(config, host=args.host, port=args.port)
    return EXIT_OK


def _worker(args: argparse.Namespace, config: Config) -> int:
    from worker.queue.celery_app import make_celery
    from worker.queue.names import QUEUES

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
    from worker.queue.celery_app import make_celery

    logs.configure()
    make_celery(config).start([*QUIET, "beat", *_with_loglevel(args.celery_args)])
    return EXIT_OK


PROCESSES: Final[dict[str, Process]] = {"serve": _serve, "worker": _worker, "beat": _beat}


def _duration(text: str) -> timedelta:
    """The config's duration syntax: ``30s``, ``15m``, ``1h30m``, ``7d``, ``2w``; longer than 0s
    and no longer than the config's durations may be."""
    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from exc
    if not duration:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than 0s")
    return duration


def _since(text: str) -> datetime:
    """A duration back from now, or an ISO timestamp (UTC unless it says otherwise)."""
    try:
        return datetime.now(UTC) - parse_duration(text)
    except DurationTooLong as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from exc
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration or timestamp: {text!r}") from exc
    except OverflowError as exc:  # 0001-01-01T00:00+01:00 is before the first UTC moment
        raise argparse.ArgumentTypeError(f"not a time regsweep can hold: {text!r}") from exc


def _check_names(named: Named) -> None:
    """Exit 2 naming each name that is none (as ``plan`` does), with what it likely meant."""
    problems = name_problems(named, on_command_line)
    if problems:
        raise ConfigError([f"regsweep: {problem}" for problem in problems])


def _created_cache_path() -> Path:
    return Path(env.cache_dir(env.current())) / "created.json"


def _pruner(
    config: Config, client: RegistryClient, stores: Stores, created: CreatedCache
) -> Pruner:
    """The in-process pruner: the installation's history and audit, and a persistent cache
    of image build times."""
    return Pruner(config, client, history=stores.history, audit=stores.audit, created_cache=created)


def _audit_unwritable(config: Config) -> str | None:
    """Why the audit file (used without Redis) cannot be written; None when it can."""
    return audit_unwritable(str(audit_file(config)), config.redis_url)


async def _plan(args: argparse.Namespace, config: Config) -> int:
    created = CreatedCache.load(_created_cache_path())
    stores = Stores.open(config)
    try:
        await stores.check()
        async with RegistryClient.from_settings(config.registry) as client:
            pruner = _pruner(config, client, stores, created)
            repos = await _chosen(pruner, args.repositories)
            with console.progress() as bars:
                planning = bars.add("planning", len(repos))
                results = await pruner.plan_many(repos, on_done=lambda _: bars.advance(planning))
    finally:
        await stores.aclose()
    await asyncio.to_thread(created.save, _created_cache_path())
    planned = [r for r in results if isinstance(r, RepositoryPlan)]
    if args.json:
        print(json.dumps(render.plan_json(planned), indent=2))
    else:
        _print_plans(planned)
    return _report_failures(r for r in results if isinstance(r, RepositoryFailure))


async def _chosen(pruner: Pruner, named: Sequence[str]) -> list[str]:
    """The repositories named on the command line, each checked (exit 2 naming every one
    that cannot be planned), or every one some policy governs."""
    return await pruner.requested(named) if named else await pruner.repositories()


def _report_failures(failures: Iterable[RepositoryFailure]) -> int:
    """Say which repositories could not be planned; exit 1 if any."""
    code = EXIT_OK
    for failure in failures:
        print(f"regsweep: {failure.repository}: not planned: {failure.error}", file=sys.stderr)
        code = EXIT_RUN_ERROR
    return code


def _print_plans(planned: Sequence[RepositoryPlan]) -> None:
    if not planned:
        print("no repository matches a policy")
    for rp in planned:
        print(render.plan_table(rp))
        print()


async def _prune(args: argparse.Namespace, config: Config) -> int:
    if args.enqueue:
        return await _prune_enqueue(args, config)
    problem = None if args.dry_run else _audit_unwritable(config)
    if problem is not None:
        print(f"regsweep: nothing deleted: audit.path: {problem}", file=sys.stderr)
        return EXIT_RUN_ERROR
    job_id = f"cli-{uuid.uuid4().hex[:12]}"
    created = CreatedCache.load(_created_cache_path())
    stores = Stores.open(config)
    try:
        await stores.check()
        async with RegistryClient.from_settings(config.registry) as client:
            pruner = _pruner(config, client, stores, created)
            repos = await _chosen(pruner, args.repositories)
            turns = _turns(stores, args.dry_run)
            results = await _prune_with_progress(pruner, repos, args, job_id, turns)
    finally:
        await stores.aclose()
    await asyncio.to_thread(created.save, _created_cache_path())
    code = _report_failures(r for r in results if isinstance(r, RepositoryFailure))
    pruned = [r for r in results if not isinstance(r, RepositoryFailure)]
    if any(r.report and r.report.outcome is RunOutcome.FAILED for r in pruned):
        code = EXIT_RUN_ERROR
    if args.json:
        print(json.dumps(render.prune_json(job_id, args.dry_run, results), indent=2))
        return code
    for rp, report in pruned:
        if report is None:
            print(f"{rp.plan.repository}: nothing deleted ({_not_executed(rp, args.dry_run)})")
        else:
            print(render.report_line(report))
    return code


def _turns(stores: Stores, dry_run: bool) -> PruneTurns | None:
    """With Redis, what a worker's prune takes: each repository's lock (waited for) and,
    unless dry-run, no maintenance window. Without it, no worker can be pruning beside
    this (workers need Redis); another ``regsweep prune`` can, and nothing stops it."""
    if stores.redis is None:
        if not dry_run:
            _say("no redis.url: no per-repository lock taken, no maintenance window seen")
        return None
    return PruneTurns(
        stores.redis,
        stores.keys,
        patience=PRUNE_TURN_PATIENCE,
        on_wait=lambda repo, holder: _say(
            f"{repo}: waiting for the prune that holds it ({holder})"
        ),
        window=not dry_run,
    )


def _say(line: str) -> None:
    print(f"regsweep: {line}", file=sys.stderr, flush=True)


def _not_executed(rp: RepositoryPlan, dry_run: bool) -> str:
    """Why a repository's plan was not carried out."""
    if dry_run:
        return "--dry-run"
    if not rp.enforced:
        return f"policy {rp.policy.name} is dry-run"
    return "nothing to delete"


async def _prune_with_progress(
    pruner: Pruner,
    repos: Sequence[str],
    args: argparse.Namespace,
    job_id: str,
    turns: PruneTurns | None,
) -> list[Pruned | RepositoryFailure]:
    """Each plan's table as it is made (not with ``--json``); on a terminal, bars for the
    repositories planned and the deletions done. Each deletion's own line is logged."""
    with console.progress() as bars:
        planning = bars.add("planning", len(repos))
        deleting = bars.add("deleting", 0)

        def planned(rp: RepositoryPlan) -> None:
            bars.advance(planning)
            if not args.json:
                print(render.plan_table(rp))
            if rp.enforced and not args.dry_run:
                bars.grow(deleting, len(rp.plan.deletions))

        return await pruner.prune_many(
            repos,
            dry_run=args.dry_run,
            job_id=job_id,
            on_planned=planned,
            on_progress=lambda *_: bars.advance(deleting),
            turn=turns.take if turns else None,
        )


async def _restore(args: argparse.Namespace, config: Config) -> int:
    _check_names(Named(args.repository, args.digest, Second.DIGEST))
    job_id = f"cli-{uuid.uuid4().hex[:12]}"
    stores = Stores.open(config)
    try:
        async with RegistryClient.from_settings(config.registry) as client:
            restored = await restore(
                client,
                stores.audit,
                stores.history,
                args.repository,
                args.digest,
                hold_for=config.restore_hold,
                force=args.force,
                job_id=job_id,
            )
    finally:
        await stores.aclose()
    held_until = datetime.now(UTC) + config.restore_hold
    if args.json:
        print(json.dumps(render.restore_json(args.repository, restored, held_until, job_id)))
        return EXIT_OK
    until = held_until.strftime("%Y-%m-%d %H:%M UTC")
    for item in restored:
        print(render.restored_line(item))
    print(f"tags held until {until} (regsweep unhold REPO TAG ends a hold)")
    print(f"the audit marks what was put back as restored by {job_id}")
    return EXIT_OK


async def _hold(args: argparse.Namespace, config: Config) -> int:
    _check_names(Named(args.repository, args.tag, Second.TAG))
    if config.policy_for(args.repository) is None:
        raise ConfigError(
            f"regsweep: {args.repository}: no policy's repositories match it; "
            "nothing deletes its tags, so nothing was held"
        )
    until = datetime.now(UTC) + args.duration
    stores = Stores.open(config)
    try:
        await stores.history.hold(args.repository, Hold(args.tag, until, "regsweep hold"))
    finally:
        await stores.aclose()
    if args.json:
        held = {"repository": args.repository, "tag": args.tag, "held_until": until.isoformat()}
        print(json.dumps(held))
    else:
        print(f"{args.repository}:{args.tag} held until {until.strftime('%Y-%m-%d %H:%M UTC')}")
    return EXIT_OK


async def _unhold(args: argparse.Namespace, config: Config) -> int:
    _check_names(Named(args.repository, args.tag, Second.TAG))
    stores = Stores.open(config)
    try:
        ended = await stores.history.unhold(args.repository, args.tag)
    finally:
        await stores.aclose()
    if args.json:
        print(json.dumps({"repository": args.repository, "tag": args.tag, "ended": ended}))
    if not ended:
        print(f"regsweep: {args.repository}:{args.tag} is not held", file=sys.stderr)
        return EXIT_RUN_ERROR
    if not args.json:
        print(f"{args.repository}:{args.tag} no longer held")
    return EXIT_OK


async def _audit(args: argparse.Namespace, config: Config) -> int:
    wrong = [] if args.digest is None else digest_problems(args.digest)
    if args.repository is not None:
        wrong += name_problems(Named(args.repository), lambda r, _: f"--repository {r}")
    if wrong:
        raise ConfigError([f"regsweep: {problem}" for problem in wrong])
    query = AuditQuery(
        since=args.since, repository=args.repository, digest=args.digest, job_id=args.job
    )
    stores = Stores.open(config)
    try:
        entries = sorted(await stores.audit.entries(query), key=lambda e: e.time)
        problems = stores.audit.problems
    finally:
        await stores.aclose()
    for problem in problems:
        print(f"regsweep: {stores.audit.location}: skipped {problem}", file=sys.stderr)
    for entry in entries:
        print(json.dumps(entry.public()) if args.json else render.audit_line(entry))
    return EXIT_OK


async def _gc(args: argparse.Namespace, config: Config) -> int:
    from regsweep.gc import gc_command

    return gc_command(
        config,
        dry_run=args.dry_run,
        enqueue=args.enqueue,
        as_json=args.json,
        storage_prune=args.storage_prune,
    )


COMMANDS: Final[dict[str, Command]] = {
    "gc": _gc,
    "plan": _plan,
    "prune": _prune,
    "restore": _restore,
    "hold": _hold,
    "unhold": _unhold,
    "audit": _audit,
    "jobs": jobs.jobs_command,
    "status": status.status_command,
    "replay": replay.replay_command,
}


def _celery_help(command: str) -> int:
    """``regsweep worker --help``: what regsweep adds, then Celery's own options. No policy
    file needed."""
    from celery import Celery

    print(CELERY_HELP[command])
    sys.argv[0] = "regsweep"  # Celery's usage line names the program by it
    Celery("regsweep").start([command, "--help"])
    return EXIT_OK


CELERY_HELP: Final = {
    "worker": """usage: regsweep [-c FILE] worker [CELERY WORKER OPTIONS]

Run a Celery worker with regsweep's tasks. It consumes every queue (events, prune, jobs,
gc) unless -Q says otherwise, e.g. `regsweep worker -Q gc -c 1` for the one GC worker. Its
log is JSON lines on stderr. The options below are Celery's and pass through unchanged
(after `worker`, -c is Celery's concurrency; give the policy file before the command).
""",
    "beat": """usage: regsweep [-c FILE] beat [CELERY BEAT OPTIONS]

Run Celery beat: the periodic sweeps, the workers' ticks and the GC windows of the
policy file. Run exactly one. The options below are Celery's and pass through unchanged.
""",
}


def _wants_help(options: Sequence[str]) -> bool:
    return any(o in ("-h", "--help") for o in options)


def main(argv: Sequence[str] | None = None) -> int:
    console.quiet_on_closed_pipe()
    own, celery_args = split_celery_args(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(own)
    args.celery_args = celery_args
    if args.command in CELERY_COMMANDS and _wants_help(celery_args):
        return _celery_help(args.command)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, shell=args.shell))
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING, format="regsweep: %(levelname)s: %(message)s")
    # What prune deleted, one line each, and each job's summary: the CLI's log too.
    deletions_log.setLevel(logging.INFO)
    environ = env.current()
    path = args.config or env.config_path(environ)
    if not path:
        print("regsweep: no policy file: pass -c FILE or set REGSWEEP_CONFIG", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":  # loads the file itself, strictly
        return checkconfig.check_config(args, path, environ)
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
