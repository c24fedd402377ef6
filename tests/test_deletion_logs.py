"""What a prune tells its logs: one line per deletion and one summary per job, as JSON in
the workers and as lines in the CLI, never a secret; and a registry with deletes disabled
reported once per run, not once per DELETE in flight. Real registry binary throughout."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import cli
from tests.harness.auth import AuthRegistry
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess
from worker.engine.executor import RunOutcome
from worker.engine.prune import Pruner
from worker.logs import JsonFormatter
from worker.queue.pruning import report_summary
from worker.registry.client import RegistryClient
from worker.settings.load import parse_config
from worker.store.open import Stores

POLICY = {
    "name": "web",
    "repositories": ["team/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep"]}],
}
POLICIES = (
    "policies:\n  - {name: web, repositories: ['team/**'], mode: enforce, keep: [{tags: [keep]}]}\n"
)
DELETIONS = 6


def _seed(url: str, repository: str) -> None:
    with ImageBuilder.connect(url) as builder:
        builder.image(repository, "keep")
        for i in range(DELETIONS):
            builder.image(repository, f"old-{i}")


@pytest.fixture(scope="module")
def deletes_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A 2.8.2 registry with storage.delete.enabled false."""
    reg = RegistryProcess.create(tmp_path_factory.mktemp("deletes-off"))
    reg.config["storage"]["delete"] = {"enabled": False}
    reg.start()
    yield reg
    reg.stop()


def test_deletes_disabled_is_reported_once(tmp_path: Path, deletes_off: RegistryProcess) -> None:
    """Six deletions whose DELETEs are all in flight at once against a registry with deletes
    disabled: the CLI says 405 UNSUPPORTED and the setting to change once, the log's
    summary once, no error line per digest; exit 1; nothing deleted."""
    _seed(deletes_off.url, "team/web")
    config = cli.write_config(tmp_path / "regsweep.yaml", deletes_off.url, [POLICY])
    result = cli.run("prune", "team/web", config=config)
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert output.count("UNSUPPORTED") == 2  # the report's line and the log's summary
    assert result.stdout.count("storage.delete.enabled: true") == 1
    assert f"team/web: failed ({DELETIONS} error)" in result.stdout
    assert "error sha256:" not in result.stdout
    summaries = [line for line in result.stderr.splitlines() if "prune job cli-" in line]
    assert len(summaries) == 1 and "storage.delete.enabled: true" in summaries[0]
    assert not [line for line in result.stderr.splitlines() if "error: team/web" in line]
    with ImageBuilder.connect(deletes_off.url) as builder:
        assert len(builder.tags("team/web")) == DELETIONS + 1


@pytest.mark.anyio
async def test_job_record_lists_the_disabled_deletes_once(
    tmp_path: Path, deletes_off: RegistryProcess
) -> None:
    """The job record a worker writes (report_summary) lists the problem once, with its hint,
    where it used to list it once more per DELETE of the wave (1 + N)."""
    _seed(deletes_off.url, "team/job")
    text = f"registry: {{url: '{deletes_off.url}'}}\naudit: {{path: {tmp_path / 'a.jsonl'}}}\n"
    text += POLICIES
    config = parse_config(text, str(tmp_path / "regsweep.yaml"), {})
    stores = Stores.open(config)
    async with RegistryClient.from_settings(config.registry) as client:
        pruner = Pruner(config, client, history=stores.history, audit=stores.audit)
        pruned = await pruner.run("team/job", job_id="job-1")
    assert pruned is not None and pruned.report is not None
    summary = report_summary(pruned.report)
    assert summary["outcome"] == RunOutcome.FAILED.value
    assert summary["counts"]["error"] == DELETIONS
    (error,) = summary["errors"]
    assert "405 UNSUPPORTED" in error and "storage.delete.enabled: true" in error


@pytest.mark.anyio
async def test_worker_logs_one_json_line_per_deletion_and_a_summary_without_secrets(
    tmp_path: Path, registry_htpasswd: AuthRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A prune against a registry behind htpasswd logs, as the workers' JSON lines, each
    deletion with repository, tags, digest, reason, policy and job, and one summary with
    counts, outcome and duration; no record at any level holds the password."""
    reg = registry_htpasswd
    repository = f"team/logs-{secrets.token_hex(4)}"
    with ImageBuilder.connect(reg.url, auth=httpx.BasicAuth(reg.username, reg.password)) as builder:
        builder.image(repository, "keep")
        for i in range(3):
            builder.image(repository, f"old-{i}")
    text = (
        f"registry: {{url: '{reg.url}', username: {reg.username}, password_env: REG_PW}}\n"
        f"audit: {{path: {tmp_path / 'a.jsonl'}}}\n"
        f"{POLICIES}"
    )
    config = parse_config(text, str(tmp_path / "regsweep.yaml"), {"REG_PW": reg.password})
    caplog.set_level(logging.DEBUG)
    stores = Stores.open(config)
    async with RegistryClient.from_settings(config.registry) as client:
        pruner = Pruner(config, client, history=stores.history, audit=stores.audit)
        await pruner.run(repository, job_id="job-logs")
    formatter = JsonFormatter()
    lines = [
        json.loads(formatter.format(r)) for r in caplog.records if r.name == "regsweep.deletions"
    ]
    deleted = [line for line in lines if line.get("status") == "deleted"]
    assert sorted(tag for line in deleted for tag in line["tags"]) == ["old-0", "old-1", "old-2"]
    for line in deleted:
        assert line["level"] == "info" and line["repository"] == repository
        assert line["digest"].startswith("sha256:") and line["digest"] in line["message"]
        assert line["policy"] == "web" and line["job_id"] == "job-logs"
        assert line["rule"] == "retention" and line["reason"].startswith("retention")
    (summary,) = [line for line in lines if "outcome" in line]
    assert summary["outcome"] == "done" and summary["counts"] == {"deleted": 3}
    assert summary["seconds"] >= 0 and "prune job job-logs" in summary["message"]
    everything = "\n".join(formatter.format(r) for r in caplog.records)
    assert reg.password not in everything


def test_cli_prune_logs_each_deletion(tmp_path: Path, registry: RegistryProcess) -> None:
    """regsweep prune writes one info line per deletion and the job's summary to stderr."""
    repository = f"team/cli-logs-{secrets.token_hex(4)}"
    _seed(registry.url, repository)
    config = cli.write_config(tmp_path / "regsweep.yaml", registry.url, [POLICY])
    result = cli.run("prune", repository, config=config)
    assert result.returncode == 0, result.stderr
    infos = [line for line in result.stderr.splitlines() if line.startswith("regsweep: INFO: ")]
    deleted = [line for line in infos if f"deleted: {repository} manifest sha256:" in line]
    assert len(deleted) == DELETIONS
    assert all("retention" in line and "policy web, job cli-" in line for line in deleted)
    (summary,) = [line for line in infos if "prune job cli-" in line]
    assert f"{DELETIONS} deleted" in summary and ": done:" in summary
