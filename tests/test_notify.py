"""Notifications end to end: a real ``regsweep worker`` prunes and collects garbage on the real
2.8.2 registry and tells real receivers (Starlette on uvicorn) that are slow, failing, down
at first, or fine; plus the policy file's ``notify:`` section and the alert paths."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import yaml

from regsweep import cli
from tests.harness import service as h
from tests.harness import stack
from tests.harness.images import ImageBuilder, random_layer
from tests.harness.maintenance import (
    ProcessRegistry,
    RedisSpace,
    days_ago,
    make_maintenance,
    upload_status,
)
from tests.harness.receiver import Receiver
from tests.harness.registry import free_port, set_pushed
from tests.harness.workers import REGSWEEP, WorkerProcess, start_worker
from worker.errors import ConfigError
from worker.maintenance.job import GcRequest, SessionTrackedController, run_gc
from worker.maintenance.recovery import recover_crashed_window
from worker.notify.message import dead_letters
from worker.notify.sender import Notifier
from worker.queue.celery_app import make_celery
from worker.queue.names import EVENTS_QUEUE, TASK_TICK
from worker.settings.load import load_config, parse_config
from worker.settings.model import NOTIFY_EVENTS, NotifyTarget, Secret
from worker.store.state import State

T = TypeVar("T")

REPOSITORY = "notify/app"
#: Each target's URL carries a secret of its own, which must never leave the worker.
SECRETS = {
    name: f"T0{uuid.uuid4().hex}"
    for name in ("ok", "slack", "flaky", "fail", "slow", "reject", "late", "gc")
}


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    return stack.wait_for(condition, timeout, what=what)


@dataclass
class Rig:
    root: Path
    config: Path
    registry: ProcessRegistry
    redis: redis.Redis
    redis_url: str
    receiver: Receiver
    late: Receiver
    late_port: int
    worker: WorkerProcess
    env: dict[str, str]

    @property
    def log(self) -> str:
        return (self.root / "worker.log").read_text(errors="replace")

    def job(self, job_id: str) -> dict[str, Any]:
        raw: dict[bytes, bytes] = self.redis.hgetall(f"regsweep:job:{job_id}")  # type: ignore[assignment]
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def finished(self, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job.get("state") in ("succeeded", "failed") else None

        return wait_for(done, f"job {job_id} finished\n{self.log[-3000:]}", timeout)

    def regsweep(self, *args: str) -> str:
        done = subprocess.run(
            [REGSWEEP, "-c", str(self.config), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def outcomes(self) -> dict[tuple[str, str, str], int]:
        raw: dict[bytes, bytes] = self.redis.hgetall("regsweep:metrics:notifications")  # type: ignore[assignment]
        out: dict[tuple[str, str, str], int] = {}
        for field, value in raw.items():
            target, event, outcome = json.loads(field)
            out[(target, event, outcome)] = int(value)
        return out


def targets(port: int, late_port: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The notify section and the environment holding each target's URL."""
    base = f"http://127.0.0.1:{port}"
    spec: list[tuple[str, str, str, dict[str, Any]]] = [
        ("ok", "webhook", f"{base}/ok/{SECRETS['ok']}", {}),
        (
            "slack",
            "slack",
            f"{base}/slack/services/{SECRETS['slack']}",
            {"events": ["prune.deleted", "gc.finished"]},
        ),
        (
            "flaky",
            "webhook",
            f"{base}/flaky/{SECRETS['flaky']}",
            {"events": ["prune.deleted"], "retries": 3, "timeout": "2s"},
        ),
        (
            "fail",
            "webhook",
            f"{base}/fail/{SECRETS['fail']}",
            {"events": ["prune.deleted"], "retries": 2},
        ),
        (
            "slow",
            "webhook",
            f"{base}/slow/{SECRETS['slow']}",
            {"events": ["prune.deleted"], "retries": 1, "timeout": "1s", "give_up_after": "30s"},
        ),
        (
            "reject",
            "webhook",
            f"{base}/reject/{SECRETS['reject']}",
            {"events": ["prune.deleted"], "retries": 5},
        ),
        (
            "late",
            "webhook",
            f"http://127.0.0.1:{late_port}/ok/{SECRETS['late']}",
            {"events": ["prune.deleted"], "retries": 6, "give_up_after": "90s"},
        ),
        ("gc", "webhook", f"{base}/ok-gc/{SECRETS['gc']}", {"events": ["gc.finished"]}),
    ]
    section: list[dict[str, Any]] = []
    environ: dict[str, str] = {}
    for name, kind, url, extra in spec:
        variable = f"NOTIFY_URL_{name.upper()}"
        section.append({"name": name, "kind": kind, "url_env": variable, **extra})
        environ[variable] = url
    return section, environ


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("notify")
    server = h.RedisServer(free_port())
    server.start()
    registry = ProcessRegistry.create(root / "registry")
    # The registry makes its root at its first push; the workers refuse a storage_path that
    # is not a directory, so each test here also runs alone.
    registry.storage.mkdir(parents=True, exist_ok=True)
    registry.start()
    receiver, late = Receiver(), Receiver()
    late_port = free_port()
    with h.running(receiver.app()) as receiver_url:
        section, urls = targets(int(receiver_url.rsplit(":", 1)[1]), late_port)
        s = registry.settings
        document = {
            "registry": {"url": registry.url, "storage_path": str(registry.storage)},
            "redis": {"url": server.url},
            "policies": [
                {
                    "name": "notify",
                    "repositories": ["notify/**"],
                    "mode": "enforce",
                    "keep": [{"tags": ["*"], "newest": 1}],
                }
            ],
            "maintenance": {
                "window": {"cron": "0 3 * * sun", "duration": "2h"},
                "controller": {
                    "kind": "process",
                    "readonly_command": s.readonly_command,
                    "readwrite_command": s.readwrite_command,
                    "gc_command": s.gc_command,
                    "storage_path": s.storage_path,
                },
            },
            "notify": section,
        }
        config = root / "regsweep.yaml"
        config.write_text(yaml.safe_dump(document))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")} | urls
        debug = ("--loglevel", "DEBUG", "--without-mingle", "--without-gossip")
        worker = start_worker(
            config,
            ("events", "prune", "jobs", "gc"),
            log=root / "worker.log",
            concurrency=2,
            extra=debug,
            env=environ,
        )
        client = redis.Redis.from_url(server.url)
        made = Rig(
            root, config, registry, client, server.url, receiver, late, late_port, worker, environ
        )
        try:
            worker.wait_ready(60)
            yield made
        finally:
            worker.stop(timeout=30)
            client.close()
            registry.stop()
            server.stop()


def push_builds(rig: Rig, tags: list[str]) -> None:
    """Images pushed in this order, each a day after the last (as the storage tells it)."""
    with ImageBuilder.connect(rig.registry.url) as builder:
        for age, tag in zip(range(len(tags), 0, -1), tags, strict=True):
            builder.image(REPOSITORY, tag, layers=[random_layer(64 * 1024)])
            set_pushed(rig.registry.storage, REPOSITORY, days_ago(age), tag)


def test_a_prune_tells_every_target_as_it_can_take_it(rig: Rig) -> None:
    """One prune that deletes two builds: its job is recorded succeeded before any receiver
    has everything; the webhook gets the deletions as JSON, Slack gets text and blocks, a
    receiver failing twice gets the same delivery a third time, one always failing and one
    too slow are given up after their retries, a 404 is not retried, a receiver down at first
    gets it once it is up, and a target filtering the event gets nothing. Every outcome is
    counted; no URL's secret is in the worker's log (at debug level), a job or the metrics."""
    push_builds(rig, ["b1", "b2", "b3"])
    job_id = rig.regsweep("prune", REPOSITORY, "--enqueue").split()[0]
    job = rig.finished(job_id)
    assert job["state"] == "succeeded" and job["counts"]["deleted"] == 2, job
    # Recorded first, told after: the slow receiver's attempts are still under way.
    assert ("slow", "prune.deleted", "failed") not in rig.outcomes()

    ok = wait_for(lambda: rig.receiver.of("ok", "prune.deleted"), "the webhook delivery")
    body = ok[0].body
    assert body["event"] == "prune.deleted" and body["details"]["job_id"] == job_id
    assert sorted(t for d in body["details"]["deleted"] for t in d["tags"]) == ["b1", "b2"]
    assert {d["rule"] for d in body["details"]["deleted"]} == {"retention"}
    assert ok[0].headers["content-type"] == "application/json"
    assert ok[0].delivery_id == body["id"]

    slack = wait_for(lambda: rig.receiver.of("slack", "prune.deleted"), "the Slack delivery")
    message = slack[0].body
    assert set(message) == {"text", "blocks", "link_names", "unfurl_links", "unfurl_media"}
    assert message["text"].startswith(f"regsweep deleted 2 from {REPOSITORY}")
    assert [b["type"] for b in message["blocks"]] == ["header", "section", "context"]
    assert message["blocks"][1]["text"]["type"] == "mrkdwn" and "b1" in message["text"]

    wait_for(lambda: rig.outcomes().get(("flaky", "prune.deleted", "sent")), "flaky: sent")
    flaky = rig.receiver.of("flaky")
    assert len(flaky) == 3 and len({d.delivery_id for d in flaky}) == 1

    wait_for(lambda: rig.outcomes().get(("fail", "prune.deleted", "failed")), "fail: failed")
    assert len(rig.receiver.of("fail")) == 3  # the first attempt and two retries
    wait_for(lambda: rig.outcomes().get(("slow", "prune.deleted", "failed")), "slow: failed")
    assert len(rig.receiver.of("slow")) == 2
    wait_for(lambda: rig.outcomes().get(("reject", "prune.deleted", "failed")), "reject: failed")
    assert len(rig.receiver.of("reject")) == 1

    wait_for(lambda: "to late: attempt 1 failed (ConnectError" in rig.log, "late: first attempt")
    with h.running(rig.late.app(), port=rig.late_port):
        wait_for(lambda: rig.late.of("ok", "prune.deleted"), "late: delivered once up")
        wait_for(lambda: rig.outcomes().get(("late", "prune.deleted", "sent")), "late: sent")

    assert rig.receiver.of("ok-gc") == []
    assert rig.outcomes()[("ok", "prune.deleted", "sent")] == 1
    log = rig.log
    assert "no complete answer within 1s" in log and "HTTP 500: internal error at <url>" in log
    everything = log + json.dumps(rig.job(job_id)) + json.dumps(list(rig.outcomes()))
    for secret in SECRETS.values():
        assert secret not in everything


def test_a_gc_window_reports_what_it_reclaimed(rig: Rig) -> None:
    """A GC job on the worker tells its report (bytes reclaimed, durations) to the targets that
    want ``gc.finished``: the one that filters everything else out included."""
    before = len(rig.receiver.of("ok", "gc.finished"))
    job_id = rig.regsweep("gc", "--enqueue").split()[0]
    job = rig.finished(job_id, timeout=120)
    assert job["state"] == "succeeded", job
    report = wait_for(lambda: rig.receiver.of("ok", "gc.finished")[before:], "gc.finished")
    details = report[0].body["details"]
    assert details["job_id"] == job_id and details["report"]["bytes_reclaimed"] > 0
    assert details["report"]["bytes_reclaimed"] == job["bytes"]
    assert wait_for(lambda: rig.receiver.of("ok-gc", "gc.finished"), "the filtered target")
    slack = wait_for(lambda: rig.receiver.of("slack", "gc.finished"), "Slack: gc.finished")
    assert slack[0].body["text"].startswith("regsweep GC reclaimed")


def test_dead_letters_are_told_once_per_tick(rig: Rig) -> None:
    """Three dead letters kept between two ticks make one notification saying three, a prune
    that failed for good with the command that runs it again; the next tick, with none new,
    tells nothing."""

    async def dead_letter(n: int) -> str:
        state = State.from_url(rig.redis_url)
        for i in range(n - 1):
            await state.dead_letter("registry", f"bad event {i}", "{}")
        work = {"kind": "prune", "params": {"repository": REPOSITORY}}
        letter = await state.dead_letter("prune", "bad event 2", "{}", replay=work)
        await state.aclose()
        return letter

    letter = asyncio.run(dead_letter(3))
    app = make_celery(load_config(rig.config, rig.env))
    ticks = rig.log.count("regsweep.tick[")
    app.send_task(TASK_TICK, queue=EVENTS_QUEUE)
    told = wait_for(lambda: rig.receiver.of("ok", "dead_letter"), "the dead-letter notification")
    assert told[0].body["details"]["new"] == 3 and told[0].body["details"]["total"] == 3
    assert f"prune: bad event 2 (regsweep replay {letter})" in told[0].body["text"]
    assert "bad event 1 (" not in told[0].body["text"]  # an unusable delivery: nothing to run
    app.send_task(TASK_TICK, queue=EVENTS_QUEUE)
    wait_for(lambda: rig.log.count("regsweep.tick[") >= ticks + 4, "both ticks ran")
    assert len(rig.receiver.of("ok", "dead_letter")) == 1


# --------------------------------------------------------------------------- alerts


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    made = RedisSpace()
    yield made
    made.cleanup()


def test_left_read_only_is_alerted_once_and_the_recovery_told(
    tmp_path: Path, space: RedisSpace
) -> None:
    """A window whose every switch back fails sends ``gc.failed`` and one
    ``registry.left_read_only`` alert; a recovery check that fails again does not repeat it;
    the recovery that works sends ``gc.recovered``."""
    reg = ProcessRegistry.create(tmp_path / "registry")
    reg.start()
    receiver = Receiver()
    try:
        with h.running(receiver.app()) as url:
            target = NotifyTarget("ops", "webhook", Secret(f"{url}/ok/x"), retries=0)
            notifier = Notifier([target])
            broken = replace(reg.settings, readwrite_command="echo 'unit busy' >&2; exit 1")
            m = make_maintenance(space, SessionTrackedController(broken), reg.url)
            m.notify = notifier.publish
            outcome = run_gc(m, GcRequest(space.state.create_job("gc", {})))
            assert outcome.status == "failed" and upload_status(reg.url) == 405
            assert recover_crashed_window(m) is not None  # fails again: no second alert
            m = make_maintenance(space, SessionTrackedController(reg.settings), reg.url)
            m.notify = notifier.publish
            recovered = recover_crashed_window(m)
            assert recovered is not None and recovered.registry_writable
            notifier.close(wait=10)
        events = [d.event for d in receiver.deliveries]
        assert events == ["registry.left_read_only", "gc.failed", "gc.recovered"], events
        alert = receiver.deliveries[0].body
        assert alert["details"]["job_id"] == outcome.job_id
        assert "readwrite_command exited with 1" in alert["text"]
    finally:
        reg.stop()


# --------------------------------------------------------------------------- the policy file

BASE = "registry: {url: http://127.0.0.1:5000}\n"


def test_notify_section_is_checked_and_names_unset_variables_but_never_a_url() -> None:
    """Every problem of ``notify:`` is listed at once with its key; an unset URL variable turns
    its target off and is named; a variable holding something that is not a URL is refused
    without its value shown."""
    text = BASE + yaml.safe_dump(
        {
            "notify": [
                {"name": "a", "kind": "teams", "url_env": "A_URL", "events": ["prune.delted"]},
                {"name": "b", "kind": "webhook", "url_env": "B_URL", "timeout": "5m"},
                {"name": "c", "kind": "slack", "url_env": "C_URL", "give_up_after": "1s"},
                {"name": "c", "kind": "webhook", "url_env": "UNSET_URL"},
                {"kind": "webhook", "url_env": "https://hooks.example/T0/B0/xyz"},
            ]
        }
    )
    environ = {"A_URL": "http://r/a", "B_URL": "not a url but a secret-9", "C_URL": "http://r/c"}
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "p.yaml", environ)
    problems = "\n".join(raised.value.problems)
    assert "notify[0] (a).kind: must be webhook" in problems
    assert (
        "notify[0] (a).events[0]: unknown event 'prune.delted' (did you mean prune.deleted?)"
        in problems
    )
    assert "notify[1] (b).url_env: B_URL does not hold an http:// or https:// URL" in problems
    assert "notify[1] (b).timeout: must be at most 1m" in problems
    assert "notify[2] (c).give_up_after: must be at least the timeout" in problems
    assert "notify[3].name: another target is named 'c'" in problems
    assert "notify[4].name: required" in problems
    assert "notify[4].url_env: must be the name of an environment variable" in problems
    assert "secret-9" not in problems and "hooks.example" not in problems

    good = BASE + yaml.safe_dump(
        {
            "notify": [
                {"name": "ops", "kind": "slack", "url_env": "SLACK_URL"},
                {"name": "off", "kind": "webhook", "url_env": "UNSET_URL", "events": ["gc.failed"]},
            ]
        }
    )
    config = parse_config(good, "p.yaml", {"SLACK_URL": "https://hooks.example/T/B/s3cr3t"})
    (ops,) = config.notify.targets
    assert ops.events == frozenset(NOTIFY_EVENTS) and ops.retries == 3
    assert "s3cr3t" not in repr(config)
    assert config.notify.unset == (
        "notify[1] (off).url_env: UNSET_URL is not set, so this target is off",
    )


def test_check_config_fails_on_a_target_whose_variable_is_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`regsweep check-config` exits 2 naming the unset variable of a notification target."""
    monkeypatch.delenv("REGSWEEP_REDIS_URL", raising=False)
    monkeypatch.delenv("OPS_HOOK_URL", raising=False)
    path = tmp_path / "regsweep.yaml"
    path.write_text(BASE + "notify:\n  - {name: ops, kind: webhook, url_env: OPS_HOOK_URL}\n")
    assert cli.main(["-c", str(path), "check-config"]) == 2
    assert "notify[0] (ops).url_env: OPS_HOOK_URL is not set" in capsys.readouterr().err
    monkeypatch.setenv("OPS_HOOK_URL", "https://hooks.example/secret-path")
    assert cli.main(["-c", str(path), "check-config"]) == 0
    assert "secret-path" not in capsys.readouterr().out


def test_a_full_queue_drops_and_close_is_bounded() -> None:
    """A target whose receiver hangs: publishing never blocks, what exceeds the queue is
    dropped and counted, and closing gives up after its bound with the rest dropped."""
    counted: list[tuple[str, str, str]] = []
    receiver = Receiver(delay=4.0)
    with h.running(receiver.app()) as url:
        target = NotifyTarget(
            "hang", "webhook", Secret(f"{url}/slow/x"), retries=0, timeout=timedelta(seconds=3)
        )
        notifier = Notifier([target], lambda *o: counted.append(o), queue_limit=3)
        started = time.monotonic()
        for n in range(10):
            notifier.publish(dead_letters(n + 1, n + 1, []))
        assert time.monotonic() - started < 0.5
        wait_for(lambda: receiver.of("slow"), "the first attempt under way")
        started = time.monotonic()
        notifier.close(wait=1.0)
        assert time.monotonic() - started < 10.0
    outcomes = [o[2] for o in counted]
    # One was being sent when the queue filled (three waited behind it): six dropped at once,
    # the three waiting when the close gave up; the one under way ends as it ends.
    assert outcomes.count("dropped") == 9, outcomes


def _uncommented_notify(path: Path) -> str:
    """The commented-out ``notify:`` block of a shipped policy file, uncommented."""
    lines = path.read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("# notify:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    return "\n".join(block) + "\n"


def _documented_notify() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    return text.split("```yaml\nnotify:", 1)[1].split("```", 1)[0].join(("notify:", ""))


@pytest.mark.parametrize("source", ["docs", "examples/regsweep.yaml", "deploy/regsweep.yaml"])
def test_shipped_notify_examples_load_as_written(source: str) -> None:
    """The notify: examples of the docs and of both shipped policy files (commented out there)
    load once uncommented, with their URL variables set."""
    root = Path(__file__).resolve().parent.parent
    block = _documented_notify() if source == "docs" else _uncommented_notify(root / source)
    environ = {
        "REGSWEEP_SLACK_WEBHOOK_URL": "https://hooks.slack.example/services/T/B/x",
        "REGSWEEP_NOTIFY_WEBHOOK_URL": "https://receiver.example/regsweep",
    }
    config = parse_config(BASE + block, source, environ)
    kinds = {t.kind for t in config.notify.targets}
    assert kinds == {"slack", "webhook"} and config.notify.unset == ()
    slack = next(t for t in config.notify.targets if t.kind == "slack")
    assert "registry.left_read_only" in slack.events
