"""``regsweep jobs [ID] [--follow]`` and ``regsweep status`` as an operator runs them: real
processes reading the real Redis (DB 7 of the test server, flushed before and after the
module) that job records, the audit and the tag index are written to by the real store
code; a prune job carried out by the worker's own task against the session's registry.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import yaml

from tests.harness import cli, redisdb
from tests.harness.cli import REGSWEEP
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.workers import tasks_in_process
from worker.queue import news, parking, tasks
from worker.queue.context import WorkerContext
from worker.records import Hold
from worker.settings.load import load_config
from worker.store.audit import AuditEntry, Outcome, RedisAuditLog, Settlement
from worker.store.keys import Keys
from worker.store.state import JOB_TTL, RECENT_JOBS_CAP, State
from worker.store.tagindex import TagIndex

#: The CLI's caches (build times, manifests) are each test's own.
pytestmark = pytest.mark.usefixtures("private_cache")

T = TypeVar("T")
REDIS_URL = redisdb.url(7)
KEYS = Keys()
POLICY = {
    "name": "jobs",
    "repositories": ["j/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep-*"]}],
}
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: A guard against a test hanging on a command that never prints: not an assertion on time.
READ_GUARD = 60.0


def _flush() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


@pytest.fixture(scope="module", autouse=True)
def clean_db() -> Iterator[None]:
    _flush()
    yield
    _flush()


def write_config(path: Path, registry_url: str, *, redis_url: str | None = REDIS_URL) -> Path:
    """The policy file: the registry, Redis (when given), the policy, a Sunday 03:00 window."""
    document: dict[str, Any] = {"registry": {"url": registry_url}}
    if redis_url is not None:
        document["redis"] = {"url": redis_url}
    document["policies"] = [POLICY]
    document["maintenance"] = {"window": {"cron": "0 3 * * sun", "duration": "2h"}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def config(tmp_path: Path, registry: RegistryProcess) -> Path:
    return write_config(tmp_path / "regsweep.yaml", registry.url)


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _with_state(action: Any) -> Any:
    state = State.from_url(REDIS_URL)
    try:
        return await action(state)
    finally:
        await state.aclose()


def create_jobs(kind: str, count: int, **params: Any) -> list[str]:
    """``count`` job records made by the store, oldest first."""

    async def make(state: State) -> list[str]:
        return [await state.create_job(kind, params) for _ in range(count)]

    ids: list[str] = arun(_with_state(make))
    return ids


def update_job(job_id: str, **fields: Any) -> None:
    arun(_with_state(lambda state: state.update_job(job_id, **fields)))


def audit_deletion(job_id: str, repository: str, tag: str, outcome: Outcome) -> AuditEntry:
    """A deletion recorded and settled in the audit stream by the executor's own store."""
    entry = AuditEntry(
        time=datetime.now(UTC),
        repository=repository,
        digest="sha256:" + job_id[:8] * 8,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=1234,
        tags=(tag,),
        action="manifest",
        policy="jobs",
        rule="keep[0]",
        reason=f"{tag}: matched by no keep rule",
        job_id=job_id,
        manifest=b"{}",
    )

    async def record(state: State) -> None:
        log = RedisAuditLog(state.client)
        await log.intend([entry])
        await log.settle([Settlement.of(entry, outcome)])

    arun(_with_state(record))
    return entry


def jobs_json(config: Path, *args: str) -> Any:
    done = cli.run("jobs", *args, "--json", config=config)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- the index


def test_jobs_lists_the_newest_first_up_to_the_limit(config: Path) -> None:
    """``jobs`` lists the newest jobs first; ``--limit`` caps them; text and JSON agree."""
    made = create_jobs("prune", 4, repository="j/order")
    listed = jobs_json(config, "--limit", "3")
    assert [j["id"] for j in listed] == made[::-1][:3]
    assert {j["kind"] for j in listed} == {"prune"} and {j["state"] for j in listed} == {"queued"}
    assert all(j["deletions"] == [] and j["params"]["repository"] == "j/order" for j in listed)
    text = cli.run("jobs", "--limit", "3", config=config)
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "STATE", "CREATED", "REPOSITORY", "SUMMARY"]
    assert [row.split()[0] for row in rows] == made[::-1][:3]
    assert all("j/order" in row for row in rows)


def test_the_index_keeps_its_cap_and_drops_ids_older_than_a_job_lives() -> None:
    """Creating a job trims the index to RECENT_JOBS_CAP newest ids and drops ids created
    more than JOB_TTL ago (put there with an old score: no test waits a week)."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    client.delete(KEYS.recent_jobs)
    old = (datetime.now(UTC) - JOB_TTL - timedelta(minutes=1)).timestamp()
    client.zadd(KEYS.recent_jobs, {"from-last-week": old})
    made = create_jobs("prune", RECENT_JOBS_CAP + 3)
    indexed = [str(m) for m in client.zrange(KEYS.recent_jobs, 0, -1)]
    client.close()
    assert len(indexed) == RECENT_JOBS_CAP
    assert "from-last-week" not in indexed
    assert indexed == made[3:]


def test_expired_job_ids_are_skipped_and_pruned_on_read() -> None:
    """An id whose record expired is not listed, the listing still fills its limit from the
    older ones, and the id leaves the index."""
    older, expired, newest = create_jobs("gc", 3)
    client = redis.Redis.from_url(REDIS_URL)
    client.pexpire(KEYS.job(expired), 1)
    while client.exists(KEYS.job(expired)):  # Redis expires it within milliseconds
        threading.Event().wait(0.01)

    async def read(state: State) -> list[dict[str, Any]]:
        return await state.recent_jobs(2)

    listed = arun(_with_state(read))
    assert [j["id"] for j in listed] == [newest, older]
    assert client.zscore(KEYS.recent_jobs, expired) is None
    assert client.zscore(KEYS.recent_jobs, older) is not None
    client.close()


# --------------------------------------------------------------------------- a real prune


@pytest.fixture
def in_process(config: Path) -> Iterator[None]:
    """The worker's tasks run in this process against ``config``."""
    with tasks_in_process(load_config(config, {})):
        yield


def test_a_prune_job_shows_what_it_deleted(
    config: Path, in_process: None, images: ImageBuilder, repo_name: str
) -> None:
    """A prune carried out by the worker's task: ``jobs ID`` shows each deletion with its
    repository, tags, digest and reason, from the audit; the listing shows them too."""
    repository = f"j/{repo_name}"
    dropped = [images.image(repository, f"drop-{i}") for i in (1, 2)]
    images.image(repository, "keep-1")
    job_id = tasks.run(lambda ctx: ctx.state.create_job("prune", {"repository": repository}))
    tasks.prune.apply(kwargs={"repository": repository, "job_id": job_id})
    doc = jobs_json(config, job_id)
    assert doc["id"] == job_id and doc["state"] == "succeeded" and doc["counts"]["deleted"] == 2
    by_digest = {d["digest"]: d for d in doc["deletions"]}
    assert set(by_digest) == {image.digest for image in dropped}
    for i, image in enumerate(dropped, start=1):
        deletion = by_digest[image.digest]
        assert deletion["repository"] == repository and deletion["tags"] == [f"drop-{i}"]
        assert deletion["outcome"] == "deleted" and deletion["reason"] and deletion["rule"]
    text = cli.run("jobs", job_id[:10], config=config)
    assert text.returncode == 0, text.stderr
    assert f"job {job_id}" in text.stdout and "deletions (2):" in text.stdout
    for i, image in enumerate(dropped, start=1):
        digest = image.digest[:19]  # sha256: and 12 hex digits
        (line,) = [x for x in text.stdout.splitlines() if digest in x]
        assert line.split()[:2] == ["deleted", repository]
        assert f"tags=drop-{i}" in line and by_digest[image.digest]["reason"] in line
    listing = cli.run("jobs", config=config).stdout.splitlines()
    row = next(i for i, line in enumerate(listing) if line.startswith(job_id))
    assert "2 deleted" in listing[row]
    assert {line.split()[0] for line in listing[row + 1 : row + 3]} == {"deleted"}


# --------------------------------------------------------------------------- --follow


class Follower:
    """``regsweep jobs ID --follow`` running, its stdout read line by line."""

    def __init__(self, config: Path, job_id: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*REGSWEEP, "-c", str(config), "jobs", job_id, "--follow", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli.environment(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self) -> str:
        line = self.lines.get(timeout=READ_GUARD)
        assert line is not None, f"ended early: {self.proc.wait()} {self.stderr()}"
        return line

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def finish(self) -> tuple[int, list[str]]:
        rest: list[str] = []
        while (line := self.lines.get(timeout=READ_GUARD)) is not None:
            rest.append(line)
        return self.proc.wait(timeout=READ_GUARD), rest


def test_follow_prints_each_change_and_deletion_until_the_job_succeeds(config: Path) -> None:
    """``--follow`` prints the state it finds, each later state, each deletion once it is
    settled, and ends with the job's summary when it succeeds: exit 0."""
    (job_id,) = create_jobs("prune", 1, repository="j/followed")
    follower = Follower(config, job_id)
    assert follower.next_line().endswith(f"job {job_id} (prune j/followed): queued")
    update_job(job_id, state="running")
    assert follower.next_line().endswith(": running")
    entry = audit_deletion(job_id, "j/followed", "pr-1", Outcome.DELETED)
    deletion = follower.next_line()
    assert deletion.split()[:2] == ["deleted", "j/followed"] and "tags=pr-1" in deletion
    assert entry.reason in deletion
    update_job(job_id, state="succeeded", counts={"deleted": 1})
    code, rest = follower.finish()
    assert code == 0
    (end,) = rest
    assert end.endswith(f"job {job_id} (prune j/followed): succeeded: 1 deleted")


def test_follow_json_of_a_failed_job_exits_1(config: Path) -> None:
    """``--follow --json`` prints one JSON object per line (state, deletions, then the
    whole job as ``end``); a job that failed makes it exit 1, an interrupted one too."""
    failed, interrupted = create_jobs("prune", 2, repository="j/failing")
    audit_deletion(failed, "j/failing", "old", Outcome.ALREADY_GONE)
    update_job(failed, state="failed", errors=["registry said no"])
    done = cli.run("jobs", failed, "--follow", "--json", config=config)
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["deletion", "state", "end"]
    assert events[0]["outcome"] == "already-gone" and events[0]["tags"] == ["old"]
    assert events[1] == events[1] | {"id": failed, "kind": "prune", "state": "failed"}
    assert events[2]["job"]["errors"] == ["registry said no"]
    assert [d["id"] for d in events[2]["job"]["deletions"]] == [events[0]["id"]]
    update_job(interrupted, state="interrupted")
    assert cli.run("jobs", interrupted, "--follow", config=config).returncode == 1


# --------------------------------------------------------------------------- errors


def test_an_unknown_id_is_a_run_error(config: Path) -> None:
    """An id no job has (nor starts with): exit 1 and a sentence saying so, for ``jobs ID``
    and ``--follow`` alike; ``--follow`` without an ID is a usage error."""
    for args in (["0" * 32], ["0" * 32, "--follow"]):
        done = cli.run("jobs", *args, config=config)
        assert done.returncode == 1
        assert done.stderr.startswith(f"regsweep: no job {'0' * 32} in Redis at redis://")
        assert "Traceback" not in done.stderr
    usage = cli.run("jobs", "--follow", config=config)
    assert usage.returncode == 2 and "needs a job ID" in usage.stderr


def test_without_redis_url_jobs_and_status_are_usage_errors(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """Without ``redis.url`` there is nothing to read: exit 2 naming the setting."""
    config = write_config(tmp_path / "regsweep.yaml", registry.url, redis_url=None)
    for command in ("jobs", "status"):
        done = cli.run(command, config=config)
        assert done.returncode == 2
        assert f"regsweep {command} needs redis.url (or REGSWEEP_REDIS_URL)" in done.stderr


def test_redis_down_is_a_run_error_naming_it_without_its_password(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A Redis that does not answer: exit 1, one line naming its URL with the password left
    out, no traceback."""
    port = free_port()
    url = f"redis://:pa55-w0rd@127.0.0.1:{port}/3"
    config = write_config(tmp_path / "regsweep.yaml", registry.url, redis_url=url)
    for args in (["jobs"], ["jobs", "abcd", "--follow"], ["status", "--json"]):
        done = cli.run(*args, config=config)
        assert done.returncode == 1
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"regsweep: cannot reach Redis at redis://127.0.0.1:{port}/3 ")
        assert "pa55-w0rd" not in line


# --------------------------------------------------------------------------- status


@pytest.fixture
async def ctx(config: Path) -> Any:
    context = await WorkerContext.open(load_config(config, {}))
    yield context
    await context.aclose()


@pytest.mark.anyio
async def test_status_shows_window_holds_deferred_dead_letters_and_jobs(
    config: Path, ctx: WorkerContext
) -> None:
    """``status --json`` and its text: the next Sunday-03:00 window, the GC running, parked
    prunes, holds in force (not ended ones), dead letters, the last prune and sweep, jobs
    by state; each written by the code that writes it in production."""
    now = datetime.now(UTC)
    index = TagIndex(ctx.redis)
    await index.hold("j/held", Hold("pr-7", now + timedelta(days=3), "regsweep hold"))
    await index.hold("j/held", Hold("ended", now - timedelta(minutes=1), "regsweep hold"))
    await parking.defer(ctx, "j/parked", {"job_id": "p1", "trigger": "push"})
    for n in range(4):
        await ctx.state.dead_letter("registry", f"unusable {n}", "{}")
    sweep = await ctx.state.create_job("sweep", {"trigger": "beat"})
    await ctx.state.update_job(sweep, state="succeeded")
    await news.prune_succeeded(ctx, "job-1", "j/pruned")
    await ctx.redis.set(KEYS.maintenance_flag, "gc-job-9")
    try:
        done = await asyncio.to_thread(cli.run, "status", "--json", config=config)
        text = await asyncio.to_thread(cli.run, "status", config=config)
    finally:
        await ctx.redis.delete(KEYS.maintenance_flag, KEYS.deferred)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    window = doc["maintenance"]["window"]
    start, end = (datetime.fromisoformat(window["next"][k]) for k in ("start", "end"))
    assert start > now and start.weekday() == 6 and (start.hour, start.minute) == (3, 0)
    assert end - start == timedelta(hours=2) and start - now <= timedelta(days=7)
    assert doc["maintenance"]["active_job"] == "gc-job-9"
    assert doc["deferred"] == [
        {"repository": "j/parked", "job_id": "p1", "trigger": "push", "dry_run": False}
    ]
    assert [(h["repository"], h["tag"]) for h in doc["holds"]] == [("j/held", "pr-7")]
    letters = doc["dead_letters"]
    assert letters["kept"] == 4 and letters["total"] >= 4
    assert [e["reason"] for e in letters["newest"]] == ["unusable 3", "unusable 2", "unusable 1"]
    assert all("body" not in e for e in letters["newest"])
    assert doc["last_successful_prune"]["job_id"] == "job-1"
    assert doc["last_sweep"]["id"] == sweep and doc["last_sweep"]["state"] == "succeeded"
    assert doc["jobs"]["by_state"]["succeeded"] >= 1
    assert text.returncode == 0, text.stderr
    for expected in (
        "maintenance window: '0 3 * * sun' (UTC), 2h long",
        "maintenance: GC job gc-job-9 running",
        "  j/parked  job p1  (push)",
        "  j/held:pr-7 until ",
        "dead letters: 4 kept",
        ", j/pruned, job job-1",
        f"last sweep: {doc['last_sweep']['created'][:10]}",
    ):
        assert expected in text.stdout, (expected, text.stdout)
    assert "ended" not in text.stdout


def test_status_without_a_window(tmp_path: Path, registry: RegistryProcess) -> None:
    """A policy file with no ``maintenance.window``: status says none is configured."""
    path = tmp_path / "regsweep.yaml"
    path.write_text(
        yaml.safe_dump({"registry": {"url": registry.url}, "redis": {"url": REDIS_URL}})
    )
    text = cli.run("status", config=path)
    assert text.returncode == 0, text.stderr
    assert "maintenance window: none configured" in text.stdout
    assert json.loads(cli.run("status", "--json", config=path).stdout)["maintenance"] == {
        "window": None,
        "active_job": None,
    }


# --------------------------------------------------------------------------- --enqueue


def test_enqueue_prints_ids_alone_and_says_how_to_follow(config: Path) -> None:
    """``prune --enqueue`` and ``gc --enqueue`` print only the job ids on stdout; stderr says
    ``regsweep jobs ID --follow``, and ``jobs ID`` shows the queued job."""
    for args in (["prune", "j/enqueued", "--enqueue"], ["gc", "--enqueue"]):
        done = cli.run(*args, config=config)
        assert done.returncode == 0, done.stderr
        (job_id,) = done.stdout.splitlines()
        assert JOB_ID.match(job_id)
        assert f"follow with: regsweep jobs {job_id} --follow" in done.stderr
        assert jobs_json(config, job_id)["state"] == "queued"
    client = redis.Redis.from_url(REDIS_URL)
    client.delete("prune", "gc")  # the task messages no worker here consumes
    client.close()


# --------------------------------------------------------------------------- adversarial


def test_last_sweep_and_gc_outlive_a_thousand_newer_prunes(config: Path) -> None:
    """A weekly GC and a sweep followed by more prunes than the recent-jobs index keeps
    still show as the last GC and sweep, and the counts say they are capped."""
    (gc,) = create_jobs("gc", 1, trigger="window")
    (sweep,) = create_jobs("sweep", 1, trigger="beat")
    create_jobs("prune", RECENT_JOBS_CAP + 5, repository="j/busy")
    done = cli.run("status", "--json", config=config)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["last_gc"]["id"] == gc and doc["last_sweep"]["id"] == sweep
    assert doc["jobs"]["capped_at"] == RECENT_JOBS_CAP
    text = cli.run("status", config=config)
    assert f"among the newest {RECENT_JOBS_CAP:,} jobs" in text.stdout
    assert f"last GC: {doc['last_gc']['created'][:10]}" in text.stdout


def test_a_prefix_shared_with_an_expired_job_names_the_live_one(config: Path) -> None:
    """Of two jobs whose ids start alike, the one whose record expired (still in the index
    until the next listing) does not make the prefix ambiguous."""

    # A prefix none of the module's other jobs (over a thousand random ids) is likely to
    # share: with a 4-digit one, one of them now and then did.
    shared = "feedfacecafe"
    live, expired = (shared + "1" * 20), (shared + "2" * 20)

    async def make(state: State) -> None:
        await state.create_job("prune", {"repository": "j/a"}, job_id=live)
        await state.create_job("prune", {"repository": "j/b"}, job_id=expired)
        await state.client.delete(KEYS.job(expired))

    arun(_with_state(make))
    doc = jobs_json(config, shared)
    assert doc["id"] == live


def test_follow_ends_when_its_reader_goes_away(config: Path) -> None:
    """``jobs ID --follow | head -1`` on a job that stays queued: once the reader is gone
    the follower stops (quietly, exit 0) instead of polling for ever."""
    (job_id,) = create_jobs("prune", 1, repository="j/watched")
    process = subprocess.Popen(
        [*REGSWEEP, "-c", str(config), "jobs", job_id, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli.environment(),
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().rstrip().endswith(": queued")
    process.stdout.close()  # like `head -1` after its line
    assert process.wait(timeout=READ_GUARD) == 0
    assert "Traceback" not in process.stderr.read()
