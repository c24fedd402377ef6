"""``maintenance.storage_prune``, ``gc_grace``, ``remove_empty_repositories`` and ``regsweep gc
--storage-prune``: what the file and the command line accept, refuse, and what a run prints."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from regsweep import cli
from tests.harness.images import ImageBuilder
from tests.harness.maintenance import REDIS_URL, ProcessRegistry, image, write_config
from tests.harness.stack import wait_for
from tests.harness.workers import HEARTBEAT_OFF, start_worker
from worker.errors import ConfigError
from worker.settings.load import parse_config
from worker.settings.model import GcGrace, MaintenanceSettings
from worker.store.state import SyncState

BASE = """\
registry: {url: http://127.0.0.1:5000, storage_path: /var/lib/registry}
maintenance:
  window: {cron: "0 3 * * sun", duration: 2h}
"""


def _maintenance(extra: str, base: str = BASE) -> MaintenanceSettings:
    text = base + textwrap.indent(textwrap.dedent(extra), "  ")
    return parse_config(text, "p.yaml", {}).maintenance


def test_the_keys_and_their_defaults() -> None:
    """Off by default, GC of its deletions in the next window by default; each key as written."""
    default = _maintenance("")
    assert (default.storage_prune, default.gc_grace, default.remove_empty_repositories) == (
        False,
        GcGrace.NEXT_WINDOW,
        False,
    )
    on = _maintenance("storage_prune: true\ngc_grace: 0\nremove_empty_repositories: true\n")
    assert (on.storage_prune, on.gc_grace, on.remove_empty_repositories) == (
        True,
        GcGrace.NONE,
        True,
    )
    assert _maintenance("gc_grace: next-window\n").gc_grace is GcGrace.NEXT_WINDOW


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("storage_prune: yes\n", "maintenance.storage_prune: must be true or false"),
        ("gc_grace: 7d\n", "maintenance.gc_grace: must be next-window (the default) or 0"),
        ("gc_grace: true\n", "maintenance.gc_grace: must be next-window"),
        ("remove_empty_repositories: 1\n", "remove_empty_repositories: must be true or false"),
    ],
)
def test_bad_values_are_refused_naming_the_key(extra: str, message: str) -> None:
    """A value the key does not take is refused with the key's name, never a traceback."""
    with pytest.raises(ConfigError) as refused:
        _maintenance(extra)
    assert message in str(refused.value)


def test_a_storage_prune_without_a_storage_path_is_refused_at_load() -> None:
    """``storage_prune: true`` needs ``registry.storage_path``: the file is refused, with line."""
    base = 'registry: {url: http://127.0.0.1:5000}\nmaintenance:\n  window: {cron: "0 3 * * sun"}\n'
    with pytest.raises(ConfigError) as refused:
        _maintenance("storage_prune: true\n", base)
    assert "p.yaml:4: maintenance.storage_prune: needs registry.storage_path" in str(refused.value)


def _config(path: Path, registry: ProcessRegistry, *, storage: bool = True) -> Path:
    write_config(path, registry)
    body = yaml.safe_load(path.read_text())
    if storage:
        body["registry"]["storage_path"] = str(registry.storage)
    body["policies"] = [
        {
            "name": "gc",
            "repositories": ["gc/**"],
            "mode": "enforce",
            "keep": [{"tags": ["*"], "newest": 1}],
        }
    ]
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def process_registry(tmp_path: Path) -> Iterator[ProcessRegistry]:
    made = ProcessRegistry.create(tmp_path / "registry")
    made.start()
    yield made
    made.stop()


@pytest.fixture
def db10_new_keys() -> Iterator[redis.Redis]:
    """Redis DB 10, which the CLI uses with the production prefix; keys it adds are deleted."""
    client = redis.Redis.from_url(REDIS_URL)
    before = set(client.keys("*"))
    yield client
    for key in set(client.keys("*")) - before:
        client.delete(key)
    client.close()


def test_cli_gc_storage_prune_refuses_a_dry_run_and_a_missing_storage_path(
    process_registry: ProcessRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--storage-prune --dry-run`` and ``--storage-prune`` without ``registry.storage_path``
    exit 2 saying why, and no window runs (nothing is switched)."""
    config = _config(tmp_path / "regsweep.yaml", process_registry)
    assert cli.main(["-c", str(config), "gc", "--storage-prune", "--dry-run"]) == 2
    assert "--storage-prune cannot be a dry run" in capsys.readouterr().err
    bare = _config(tmp_path / "bare.yaml", process_registry, storage=False)
    assert cli.main(["-c", str(bare), "gc", "--storage-prune"]) == 2
    assert "--storage-prune needs registry.storage_path" in capsys.readouterr().err


@pytest.mark.usefixtures("db10_new_keys")
def test_cli_gc_storage_prune_runs_the_window_and_says_what_it_removed(
    process_registry: ProcessRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``regsweep gc --storage-prune`` prunes on storage inside the window it runs and prints
    what went; ``--json`` carries the same in ``report.storage_prune``."""
    registry = process_registry
    with ImageBuilder.connect(registry.url) as builder:
        for age in (30, 20, 10):
            image(builder, "gc/cli", f"v{age}", age, registry.storage)
        image(builder, "gc/json", ("a",), 20, registry.storage)
        image(builder, "gc/json", ("b",), 10, registry.storage)
        config = _config(tmp_path / "regsweep.yaml", registry)
        assert cli.main(["-c", str(config), "gc", "--storage-prune"]) == 0
        out = capsys.readouterr().out
        assert "storage prune: 3 tags and 3 manifests removed from 2 of 2 repositories" in out
        assert builder.tags("gc/cli") == ["v10"] and builder.tags("gc/json") == ["b"]

        image(builder, "gc/json", ("c",), 1, registry.storage)
        assert cli.main(["-c", str(config), "gc", "--storage-prune", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["status"] == "done", doc
        assert doc["report"]["storage_prune"]["pruned"] == ["gc/json"]
        assert builder.tags("gc/json") == ["c"]


def _finished(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    record = SyncState(client).get_job(job_id)
    if record is None or record.get("state") in ("queued", "running"):
        return None
    return record


def test_gc_enqueue_storage_prune_is_carried_out_by_the_gc_worker(
    process_registry: ProcessRegistry,
    tmp_path: Path,
    db10_new_keys: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``gc --enqueue --storage-prune`` asks the ``gc`` worker for one window with the storage
    prune (the policy file does not turn it on): a real worker runs it, and the job's report
    says what it removed."""
    registry = process_registry
    with ImageBuilder.connect(registry.url) as builder:
        for age in (30, 20, 10):
            image(builder, "gc/queued", f"v{age}", age, registry.storage)
        config = _config(tmp_path / "regsweep.yaml", registry)
        worker = start_worker(config, ("gc",), log=tmp_path / "worker.log", extra=HEARTBEAT_OFF)
        try:
            assert cli.main(["-c", str(config), "gc", "--enqueue", "--storage-prune"]) == 0
            job_id = capsys.readouterr().out.strip()
            record = wait_for(lambda: _finished(db10_new_keys, job_id), 60, what="the enqueued GC")
        finally:
            worker.stop(timeout=15)
        assert record["state"] == "succeeded", record.get("errors")
        assert record["report"]["storage_prune"]["pruned"] == ["gc/queued"]
        assert builder.tags("gc/queued") == ["v10"]
