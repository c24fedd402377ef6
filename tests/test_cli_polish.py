"""The command's manners: version, help without a policy file, ``--json`` on every command
that reports, a closed pipe, progress bars on a terminal only, shell completion. Each run is
a real ``regsweep`` process; prunes go to the real registry."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cli import REGSWEEP, audit_records, run
from tests.harness.cli import write_config as harness_config
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess

#: The CLI's caches (build times, manifests) are each test's own.
pytestmark = pytest.mark.usefixtures("private_cache")

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (
    "check-config",
    "plan",
    "prune",
    "restore",
    "hold",
    "unhold",
    "audit",
    "gc",
    "jobs",
    "status",
    "replay",
    "serve",
    "worker",
    "beat",
    "completion",
)


def write_config(tmp_path: Path, registry: RegistryProcess) -> Path:
    """One enforced policy over ``t/**``: the newest ``v*`` tag kept."""
    policy = {
        "name": "cli",
        "repositories": ["t/**"],
        "mode": "enforce",
        "keep": [{"tags": ["v*"], "newest": 1}],
    }
    return harness_config(
        tmp_path / "regsweep.yaml",
        registry.url,
        [policy],
        audit_path=tmp_path / "audit.jsonl",
        storage_path=registry.storage_path,
    )


@pytest.fixture
def seeded(registry: RegistryProcess, repo_name: str) -> Iterator[tuple[ImageBuilder, str]]:
    """``v0``..``v3`` pushed a day apart: a prune deletes ``v0``..``v2``."""
    now = dt.datetime.now(dt.UTC)
    with ImageBuilder.connect(registry.url) as builder:
        for i in range(4):
            builder.image(repo_name, f"v{i}")
            registry.set_pushed(repo_name, now - dt.timedelta(days=5 - i), f"v{i}")
        yield builder, repo_name


def test_version_needs_no_policy_file() -> None:
    """`regsweep --version` names the installed version, with no policy file anywhere."""
    result = run("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"regsweep {version}"


def test_help_is_plain_text_and_every_command_has_its_own() -> None:
    """The top help lists each command and the exit codes without reST markup; each
    command's --help (worker and beat: regsweep's words, then Celery's options) works
    without a policy file."""
    top = run("--help")
    assert top.returncode == 0
    for marker in ("``", ":class:", ":mod:", ":func:"):
        assert marker not in top.stdout
    assert "Exit codes: 0 ok, 1 run error, 2 usage or config error." in top.stdout
    for command in COMMANDS:
        assert command in top.stdout
        own = run(command, "--help")
        assert own.returncode == 0, (command, own.stderr)
        assert "no policy file" not in own.stderr
        assert "usage: regsweep" in own.stdout, command
    worker = run("worker", "--help")
    assert "-Q says otherwise" in worker.stdout
    assert "--concurrency" in worker.stdout  # Celery's own options follow
    assert "--schedule" in run("beat", "--help").stdout


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    """`regsweep completion bash`, sourced in a real bash, completes command names and
    each command's options; zsh and tcsh scripts are written too."""
    script = run("completion", "bash")
    assert script.returncode == 0, script.stderr
    (tmp_path / "regsweep.bash").write_text(script.stdout)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (
            f"source {tmp_path / 'regsweep.bash'}; COMP_WORDS=({line}); "
            f"COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; COMP_POINT={len(line)}; "
            '_shtab_regsweep; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout.split()

    assert complete("regsweep", "pr") == ["prune"]
    assert set(complete("regsweep", "p")) == {"plan", "prune"}
    assert {"--dry-run", "--enqueue", "--json"} <= set(complete("regsweep", "prune", "--"))
    assert "--follow" not in complete("regsweep", "prune", "--")
    assert run("completion", "zsh").stdout.startswith("#compdef regsweep")
    assert run("completion", "tcsh").returncode == 0
    assert run("completion", "fish").returncode == 2


def test_prune_json_says_what_was_planned_and_done(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """`prune --dry-run --json` and `prune --json` print one JSON document each: the plan
    as `plan --json` shows it, and each deletion's status; nothing else on stdout."""
    builder, repo = seeded
    config = write_config(tmp_path, registry)
    dry = run("prune", repo, "--dry-run", "--json", config=config)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["failures"] == []
    (planned,) = doc["repositories"]
    assert planned["not_executed"] == "dry run" and planned["report"] is None
    assert {t for d in planned["deletions"] for t in d["tags"]} == {"v0", "v1", "v2"}

    real = run("prune", repo, "--json", config=config)
    assert real.returncode == 0, real.stderr
    doc = json.loads(real.stdout)
    (pruned,) = doc["repositories"]
    report = pruned["report"]
    assert report["outcome"] == "done"
    assert report["counts"]["deleted"] == 3
    assert {(tuple(i["tags"]), i["status"]) for i in report["items"]} == {
        (("v0",), "deleted"),
        (("v1",), "deleted"),
        (("v2",), "deleted"),
    }
    assert doc["job_id"].startswith("cli-")
    assert builder.tags(repo) == ["v3"]
    # The deletion log lines are on stderr, one per deletion: the record of what happened.
    assert real.stderr.count(f"INFO: deleted: {repo} ") == 3


def test_restore_hold_and_unhold_json(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """restore, hold and unhold answer --json with what they did."""
    builder, repo = seeded
    config = write_config(tmp_path, registry)
    assert run("prune", repo, config=config).returncode == 0
    v0 = next(
        r["digest"]
        for r in map(json.loads, run("audit", "--json", config=config).stdout.splitlines())
        if r["tags"] == ["v0"]
    )
    restored = run("restore", repo, v0, "--json", config=config)
    assert restored.returncode == 0, restored.stderr
    doc = json.loads(restored.stdout)
    assert doc["repository"] == repo
    assert [(r["digest"], r["tags"], r["pushed"]) for r in doc["restored"]] == [(v0, ["v0"], True)]
    assert dt.datetime.fromisoformat(doc["held_until"]) > dt.datetime.now(dt.UTC)
    assert builder.tags(repo) == ["v0", "v3"]

    held = json.loads(run("hold", repo, "v3", "--for", "1h", "--json", config=config).stdout)
    assert (held["repository"], held["tag"]) == (repo, "v3")
    until = dt.datetime.fromisoformat(held["held_until"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=59) < until <= dt.timedelta(hours=1)
    ended = run("unhold", repo, "v3", "--json", config=config)
    assert ended.returncode == 0
    assert json.loads(ended.stdout) == {"repository": repo, "tag": "v3", "ended": True}
    again = run("unhold", repo, "v3", "--json", config=config)
    assert again.returncode == 1
    assert json.loads(again.stdout)["ended"] is False
    assert "is not held" in again.stderr


def test_a_closed_pipe_ends_output_quietly_and_the_prune_finishes(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """`regsweep prune | head -0`: the reader is gone before the first line. The prune
    still carries out its whole plan and audits it, exits 0, and prints no traceback."""
    builder, repo = seeded
    config = write_config(tmp_path, registry)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    process = subprocess.Popen(
        [*REGSWEEP, "-c", str(config), "prune", repo],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader goes away
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert builder.tags(repo) == ["v3"]
    audited = audit_records(config)
    assert {tuple(r["tags"]) for r in audited if r["outcome"] == "deleted"} == {
        ("v0",),
        ("v1",),
        ("v2",),
    }


def test_progress_bars_on_a_terminal_and_plain_lines_elsewhere(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """With stderr on a terminal (a real pseudo-terminal) prune draws rich progress bars
    there, the deletion lines scroll above them, and stdout (a file) gets only the plan
    and the report. With stderr a file: no bar, one plain line per deletion."""
    builder, repo = seeded
    config = write_config(tmp_path, registry)
    controller, terminal = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    with open(tmp_path / "stdout.txt", "w") as stdout:
        process = subprocess.Popen(
            [*REGSWEEP, "-c", str(config), "prune", repo],
            stdout=stdout,
            stderr=terminal,
            env=environ | {"TERM": "xterm", "COLUMNS": "100"},
        )
        os.close(terminal)
        shown = _read_until_closed(controller)
        assert process.wait(timeout=120) == 0, shown
    table = (tmp_path / "stdout.txt").read_text()
    assert "━" in shown and "deleting" in shown  # rich's bar, on the terminal
    assert shown.count(f"deleted: {repo} ") == 3
    assert "━" not in table and "\x1b" not in table
    assert f"{repo}: done (3 deleted)" in table and "tags: 3 removed, 1 kept" in table
    assert builder.tags(repo) == ["v3"]

    for i in range(3):
        builder.image(repo, f"w{i}")
    plain = run("prune", repo, config=config)
    assert plain.returncode == 0, plain.stderr
    assert "━" not in plain.stderr and "\x1b" not in plain.stderr
    lines = plain.stderr.splitlines()
    assert len([line for line in lines if f"INFO: deleted: {repo} " in line]) == 3
    # No counter lines repeating what the deletion lines say.
    assert not [line for line in lines if line.startswith(("1/3", "2/3", "3/3"))]


def _read_until_closed(fd: int) -> str:
    """Everything written to a pseudo-terminal until its last writer closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
