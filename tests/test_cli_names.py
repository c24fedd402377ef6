"""Every name and duration a person types is checked one way, by every command that takes one.

`hold`, `unhold`, `restore`, `audit`, `plan` and `prune --enqueue` refuse a repository
typed the `docker pull` way (`host:port/` prefix, capitals, `repo:tag`) with exit 2,
naming the input and saying what it most likely meant, before anything is written: a
hold on a name no plan sees would hold nothing while saying "held". Durations are
bounded where they are parsed, so none passes `check-config` and crashes a plan later.
Real processes, and the real 2.8.2 registry where a command reads it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Final

import pytest

from tests.harness import cli
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess

LONGEST: Final = "36500d"
TOO_LONG: Final = "is too long: at most 36500d (about 100 years)"


def policy(**extra: Any) -> dict[str, Any]:
    return {"name": "names", "repositories": ["team/**"], "mode": "enforce", **extra}


@pytest.fixture
def repo() -> str:
    """A repository name of the policy's that no other test uses."""
    return f"team/web{uuid.uuid4().hex[:8]}"


@pytest.fixture
def config(tmp_path: Path, registry: RegistryProcess) -> Path:
    return cli.write_config(
        tmp_path / "regsweep.yaml",
        registry.url,
        [policy(keep=[{"tags": ["keep-*"]}])],
        audit_path=tmp_path / "audit.jsonl",
    )


def refused(config: Path, *args: str) -> list[str]:
    """Run a command that must be refused as a usage error; its stderr lines."""
    result = cli.run(*args, config=config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return result.stderr.splitlines()


def nothing_held(tmp_path: Path) -> bool:
    """Without Redis, holds live in the state directory beside the audit file."""
    state = tmp_path / "regsweep-state"
    return not state.exists() or not any(state.iterdir())


@pytest.mark.parametrize("command", ["hold", "unhold"])
def test_hold_and_unhold_refuse_docker_style_names_and_say_what_was_meant(
    tmp_path: Path, config: Path, repo: str, command: str
) -> None:
    """`hold 127.0.0.1:5000/team/web pr-7`, `hold Team/Web pr-7`, `hold team/web
    team/web:pr-7` and `hold team/web:pr-7` (and the same for unhold) exit 2 naming the
    input and suggesting `team/web pr-7`; nothing is held. The suggestion then works."""
    upper = repo.replace("team/web", "Team/Web")
    cases = [
        (
            [f"127.0.0.1:5000/{repo}", "pr-7"],
            f"127.0.0.1:5000/{repo}: not a repository name (leave out the registry's "
            f"address 127.0.0.1:5000); did you mean {repo} pr-7?",
        ),
        (
            [upper, "pr-7"],
            f"{upper}: not a repository name (repository names are lowercase); "
            f"did you mean {repo} pr-7?",
        ),
        (
            [repo, f"{repo}:pr-7"],
            f"{repo}:pr-7: not a tag (give the tag apart); did you mean {repo} pr-7?",
        ),
        (
            [f"{repo}:pr-7"],
            f"{repo}:pr-7: not a repository name (give the tag apart); did you mean {repo} pr-7?",
        ),
        (
            [f"localhost:5000/{upper}:pr-7"],
            f"localhost:5000/{upper}:pr-7: not a repository name (leave out the registry's "
            f"address localhost:5000; give the tag apart; repository names are lowercase); "
            f"did you mean {repo} pr-7?",
        ),
        (
            [repo, ".pr-7"],
            ".pr-7: not a tag (up to 128 letters, digits, _ . or -, not starting with . or -)",
        ),
        ([repo], "TAG is missing"),
    ]
    for args, problem in cases:
        assert refused(config, command, *args) == [f"regsweep: {problem}"], args
        assert nothing_held(tmp_path), args
    held = cli.run("hold", repo, "pr-7", config=config)
    assert held.returncode == 0, held.stderr
    assert cli.run("unhold", repo, "pr-7", config=config).returncode == 0


def test_hold_in_a_repository_no_policy_governs_holds_nothing_and_says_so(
    tmp_path: Path, config: Path
) -> None:
    """A hold that no plan would ever see is refused (exit 2) instead of "held until"."""
    assert refused(config, "hold", "other/web", "pr-7") == [
        "regsweep: other/web: no policy's repositories match it; "
        "nothing deletes its tags, so nothing was held"
    ]
    assert nothing_held(tmp_path)


def test_prune_in_place_and_enqueued_refuse_a_repository_no_policy_governs(config: Path) -> None:
    """`prune --enqueue other/web` is refused (exit 2) before anything is queued, with the words
    of `prune other/web`, instead of a job that ends "skipped" while the CI step stays green."""
    said = ["regsweep: other/web: no policy's repositories match it; nothing to plan"]
    assert refused(config, "prune", "other/web") == said
    assert refused(config, "prune", "--enqueue", "other/web") == said


def test_a_refused_hold_then_the_suggested_one_keeps_the_tag(
    config: Path, images: ImageBuilder, repo: str
) -> None:
    """The adversary's case end to end: `hold 127.0.0.1:5000/team/web pr-7` used to say
    "held" and `prune` deleted pr-7; now it is refused, and the hold it suggests keeps
    pr-7 through a prune that deletes its neighbour."""
    images.image(repo, "keep-1")
    pr = images.image(repo, "pr-7")
    other = images.image(repo, "pr-8")
    refused(config, "hold", f"127.0.0.1:5000/{repo}", "pr-7")
    assert cli.run("hold", repo, "pr-7", config=config).returncode == 0
    pruned = cli.run("prune", repo, config=config)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert images.tags(repo) == ["keep-1", "pr-7"]
    assert images.head(repo, pr.digest) is not None
    assert images.head(repo, other.digest) is None


def test_restore_audit_plan_and_enqueue_check_names_the_same_way(config: Path, repo: str) -> None:
    """restore, audit --repository/--digest, plan and prune --enqueue refuse the same forms
    with the same words (the suggestion written as each command takes it)."""
    host = f"127.0.0.1:5000/{repo}"
    because = "leave out the registry's address 127.0.0.1:5000"
    cases = [
        (
            ["restore", host, "0123abcd"],
            f"{host}: not a repository name ({because}); did you mean {repo} 0123abcd?",
        ),
        (
            ["restore", f"{repo}@sha256:0123abcd"],
            f"{repo}@sha256:0123abcd: not a repository name (give the digest apart); "
            f"did you mean {repo} sha256:0123abcd?",
        ),
        (
            ["restore", repo, "pr-7"],
            "pr-7: not a digest (sha256:<64 hex digits>, or the first hex digits of one)",
        ),
        (
            ["audit", "--repository", host],
            f"{host}: not a repository name ({because}); did you mean --repository {repo}?",
        ),
        (
            ["audit", "--digest", "pr-7"],
            "pr-7: not a digest (sha256:<64 hex digits>, or the first hex digits of one)",
        ),
        (["plan", host], f"{host}: not a repository name ({because}); did you mean {repo}?"),
        (
            ["prune", "--enqueue", host],
            f"{host}: not a repository name ({because}); did you mean {repo}?",
        ),
    ]
    for args, problem in cases:
        assert refused(config, *args) == [f"regsweep: {problem}"], args


# --- durations ----------------------------------------------------------------------------


def test_huge_durations_on_the_command_line_are_usage_errors(tmp_path: Path, config: Path) -> None:
    """`hold --for 600000w`, `hold --for 0s`, `audit --since 200000w` and a --since before the
    first UTC moment exit 2 naming the flag, never a traceback; nothing is held."""
    for args, said in [
        (["hold", "team/web", "pr-7", "--for", "600000w"], f"--for: '600000w' {TOO_LONG}"),
        (["hold", "team/web", "pr-7", "--for", "0s"], "--for: '0s' must be longer than 0s"),
        (["audit", "--since", "200000w"], f"--since: '200000w' {TOO_LONG}"),
        (
            ["audit", "--since", "0001-01-01T00:00:00+14:00"],
            "--since: not a time regsweep can hold: '0001-01-01T00:00:00+14:00'",
        ),
    ]:
        assert said in refused(config, *args)[-1], args
    assert nothing_held(tmp_path)


def test_huge_durations_in_the_policy_file_fail_check_config_naming_each_key(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """`pushed_within: 200000w`, `restore.hold: 600000w` and every other duration key past
    the bound: check-config and plan exit 2 naming each key (they used to pass check-config
    and crash the plan with an OverflowError)."""
    path = tmp_path / "huge.yaml"
    path.write_text(
        f"""registry: {{url: "{registry.url}"}}
sweep: {{every: 200000w}}
hooks: {{head_timeout: 200000w, body_timeout: 200000w}}
restore: {{hold: 600000w}}
maintenance:
  window: {{cron: "0 3 * * sun", duration: 200000w, margin: 200000w}}
policies:
  - name: huge
    repositories: ["team/**"]
    keep: [{{tags: ["*"], pushed_within: 200000w}}]
    untagged: {{delete_after: 200000w}}
"""
    )
    keys = [
        "sweep.every",
        "hooks.head_timeout",
        "hooks.body_timeout",
        "restore.hold",
        "maintenance.window.duration",
        "maintenance.window.margin",
        "policies[0] (huge).keep[0].pushed_within",
        "policies[0] (huge).untagged.delete_after",
    ]
    for command in (["check-config"], ["plan", "team/web"]):
        lines = refused(path, *command)
        for key in keys:
            assert any(f": {key}: {TOO_LONG}" in line for line in lines), (key, lines)


def test_the_longest_durations_work_everywhere(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo: str
) -> None:
    """At the bound (36500d) nothing overflows: a plan whose keep rule is `pushed_within:
    36500d`, a hold `--for 36500d`, and a restore holding for 36500d all succeed."""
    path = cli.write_config(
        tmp_path / "long.yaml",
        registry.url,
        [policy(keep=[{"tags": ["keep-*"], "pushed_within": LONGEST}])],
        audit_path=tmp_path / "audit.jsonl",
    )
    path.write_text(path.read_text() + f"restore: {{hold: {LONGEST}}}\n")
    images.image(repo, "keep-1")
    dropped = images.image(repo, "drop-1")
    assert cli.run("check-config", config=path).returncode == 0
    held = cli.run("hold", repo, "keep-1", "--for", LONGEST, config=path)
    assert held.returncode == 0, held.stderr
    pruned = cli.run("prune", repo, config=path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert images.tags(repo) == ["keep-1"]
    restored = cli.run("restore", repo, dropped.digest, config=path)
    assert restored.returncode == 0, restored.stderr
    assert images.tags(repo) == ["drop-1", "keep-1"]
