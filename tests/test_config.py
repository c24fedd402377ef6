"""Loading and validating the policy file: good files, bad files, the environment, secrets."""

from __future__ import annotations

import base64
import re
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from worker.durations import DurationTooLong, parse_duration
from worker.engine.policy import Mode
from worker.errors import ConfigError
from worker.registry.storage import RegistryStorage, check_storage_root
from worker.settings import env
from worker.settings.load import config_source, load_config, parse_config
from worker.settings.model import (
    DEFAULT_BODY_LIMIT,
    DEFAULT_CONCURRENCY,
    DEFAULT_SWEEP_EVERY,
    DEFAULT_WINDOW_DURATION,
    DEFAULT_WINDOW_MARGIN,
    Config,
    DockerControllerSettings,
    ProcessControllerSettings,
    Secret,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "regsweep.yaml"
REGISTRY = "registry:\n  url: http://127.0.0.1:5000\n"


def _policy(body: str = "", head: str = "name: web\nrepositories: [team/web]\n") -> str:
    """A file with the minimal registry and one policy whose keys are ``head`` + ``body``."""
    lines = textwrap.dedent(head + textwrap.dedent(body)).strip().splitlines()
    indented = "\n".join(("  - " if i == 0 else "    ") + line for i, line in enumerate(lines))
    return f"{REGISTRY}policies:\n{indented}\n"


def _parse(text: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "p.yaml", {} if environ is None else environ)


def _problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(text, environ)
    error = info.value
    # Never a traceback: the third-party exception must not ride along.
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None
    return error.problems


# -- good files ---------------------------------------------------------------------------


def test_minimal_file_gets_every_default() -> None:
    """A file with only registry.url loads with the named defaults everywhere else."""
    config = _parse(REGISTRY)
    assert config.registry.url == "http://127.0.0.1:5000"
    assert config.registry.concurrency == DEFAULT_CONCURRENCY
    assert (config.registry.username, config.registry.password) == (None, None)
    assert config.policies == ()
    assert config.redis_url is None
    assert config.audit_path == str(Path("p.yaml").resolve().parent / "regsweep-audit.jsonl")
    assert config.sweep_every == DEFAULT_SWEEP_EVERY
    assert config.hooks.registry_token is None and config.hooks.api_token is None
    assert config.hooks.body_limit == DEFAULT_BODY_LIMIT
    assert config.maintenance.window_cron is None
    assert config.maintenance.window_duration == DEFAULT_WINDOW_DURATION
    assert config.maintenance.controller is None
    assert config.source == "p.yaml"


def test_example_file_loads() -> None:
    """examples/regsweep.yaml, DESIGN.md's example, loads into the policy it describes."""
    environ = {"REGSWEEP_REGISTRY_PASSWORD": "pw", "REGSWEEP_GITHUB_SECRET": "gh"}
    config = load_config(EXAMPLE, environ)
    assert config.source == str(EXAMPLE)
    assert config.registry.password == Secret("pw")
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.sweep_every == timedelta(hours=6)
    assert config.hooks.github_secret == Secret("gh")
    assert config.hooks.gitlab_token is None
    (web,) = config.policies
    assert config.policy_for("team/web-api") is web
    assert config.policy_for("team/webapi") is None
    assert web.mode is Mode.DRY_RUN
    assert [p.source for p in web.protect] == ["latest", "stable", "v[0-9]*"]
    assert web.keep is not None
    assert [(r.index, r.newest, r.pushed_within) for r in web.keep] == [
        (0, 10, None),
        (1, None, timedelta(days=14)),
    ]
    assert web.untagged_delete_after == timedelta(hours=1)
    assert web.on.pull_request_closed == ("pr-{number}", "pr-{number}-*")
    assert web.on.branch_deleted == ("{branch}", "{branch}-*")
    assert web.sources["github"][0].matches("acme/web")
    assert config.maintenance.window_cron == "0 3 * * sun"
    assert config.maintenance.controller == DockerControllerSettings(
        container="registry", config_path="/etc/docker/registry/config.yml"
    )


def test_docs_examples_load() -> None:
    """Every YAML example in docs/policy.md is a valid policy file (given a registry)."""
    text = (EXAMPLE.parent.parent / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        full = block if block.startswith("registry:") else REGISTRY + block
        assert _parse(full).policies


def test_on_key_is_not_read_as_yaml_true() -> None:
    """``on:`` (and ``yes``/``off`` values) stay strings instead of YAML 1.1 booleans."""
    config = _parse(
        _policy(
            "on:\n  branch_deleted: ['{branch_slug}']\nsources: {github: [a/b]}\n"
            "protect: [on, off, yes]"
        )
    )
    policy = config.policies[0]
    assert policy.on.branch_deleted == ("{branch_slug}",)
    assert [p.source for p in policy.protect] == ["on", "off", "yes"]


def test_policy_values_are_compiled() -> None:
    """Patterns compile to matchers, mode and limits are typed, and `**` crosses slashes."""
    config = _parse(
        _policy(
            """
            mode: enforce
            protect: ["re:v\\\\d+\\\\.\\\\d+"]
            keep:
              - tags: ["*"]
            untagged: {delete_after: 0s}
            """,
            head="name: all\nrepositories: ['team/**', 'x/*']\n",
        )
    )
    (policy,) = config.policies
    assert policy.mode is Mode.ENFORCE
    assert policy.protected_by("v1.2") is not None and policy.protected_by("v1.2x") is None
    assert policy.keep is not None and policy.keep[0].newest is None
    assert policy.keep[0].pushed_within is None
    assert policy.untagged_delete_after == timedelta(0)
    assert policy.matches_repository("team/a/b") and policy.matches_repository("x/y")
    assert not policy.matches_repository("x/y/z")


def test_policy_without_keep_has_none() -> None:
    """A policy without ``keep:`` (or with ``keep:`` left empty) has keep None: no retention."""
    assert _parse(_policy()).policies[0].keep is None
    assert _parse(_policy("keep:")).policies[0].keep is None


def test_on_without_sources_is_refused() -> None:
    """Event templates in a policy without sources could never fire, so they are refused."""
    problems = _problems(_policy("on:\n  pull_request_closed: ['pr-{number}']\n"))
    assert problems == [
        "p.yaml:6: policies[0] (web).on: has no effect without sources "
        "(github: or gitlab: projects)"
    ]


@pytest.mark.parametrize("value", ["auto", "false", "'false'"])
def test_delete_untagged_auto_or_false_loads(value: str) -> None:
    """gc.delete_untagged auto and false load (both mean what regsweep always does: the flag
    is never passed)."""
    assert _parse(REGISTRY + f"maintenance:\n  gc:\n    delete_untagged: {value}\n")


@pytest.mark.parametrize("value", ["true", "'true'"])
def test_delete_untagged_true_is_refused_with_the_reason(value: str) -> None:
    """gc.delete_untagged: true is refused at load, saying what the flag would delete on
    2.8 and on 3.x and where untagged manifests go instead."""
    problems = _problems(REGISTRY + f"maintenance:\n  gc:\n    delete_untagged: {value}\n")
    assert len(problems) == 1
    (problem,) = problems
    assert problem.startswith("p.yaml:5: maintenance.gc.delete_untagged: true is refused: ")
    for reason in ("children of kept multi-arch indexes", "referrers of kept images"):
        assert reason in problem
    assert "untagged.delete_after" in problem and "docs/safety.md" in problem


def test_process_controller_and_window() -> None:
    """A process controller with its commands and a full window loads as written."""
    config = _parse(
        REGISTRY
        + """
maintenance:
  window: {cron: "30 2 * * mon-fri", duration: 1h30m, margin: 0s}
  registry_version: 3.0
  controller:
    kind: process
    readonly_command: "systemctl restart registry-readonly"
    readwrite_command: "systemctl restart registry"
    gc_command: "registry garbage-collect '/etc/my registry/config.yml'"
    storage_path: /var/lib/registry
"""
    )
    maintenance = config.maintenance
    assert maintenance.window_cron == "30 2 * * mon-fri"
    assert maintenance.window_duration == timedelta(hours=1, minutes=30)
    assert maintenance.window_margin == timedelta(0)
    assert maintenance.registry_version == "3.0"
    assert maintenance.controller == ProcessControllerSettings(
        readonly_command="systemctl restart registry-readonly",
        readwrite_command="systemctl restart registry",
        gc_command="registry garbage-collect '/etc/my registry/config.yml'",
        storage_path="/var/lib/registry",
    )


def test_window_margin_defaults() -> None:
    """A window without margin gets the default margin."""
    config = _parse(REGISTRY + "maintenance:\n  window: {cron: '0 3 * * *'}\n")
    assert config.maintenance.window_margin == DEFAULT_WINDOW_MARGIN


def test_registry_url_trailing_slash_dropped_and_audit_path() -> None:
    """The registry URL loses its trailing slash; a relative audit.path is taken relative to
    the policy file, whatever the working directory."""
    config = _parse("registry: {url: 'https://reg.example:5000/'}\naudit: {path: a.jsonl}\n")
    assert config.registry.url == "https://reg.example:5000"
    assert config.audit_path == str(Path("p.yaml").resolve().parent / "a.jsonl")


def test_audit_file_sits_beside_the_policy_file_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-c spelled relative or absolute, from any directory: the same audit file."""
    conf = tmp_path / "etc" / "regsweep.yaml"
    conf.parent.mkdir()
    conf.write_text(REGISTRY)
    expected = str(conf.parent / "regsweep-audit.jsonl")
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/regsweep.yaml", {}).audit_path == expected
    monkeypatch.chdir(conf.parent)
    assert load_config("regsweep.yaml", {}).audit_path == expected
    assert load_config(str(conf), {}).audit_path == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("6h", timedelta(hours=6)),
        ("14d", timedelta(days=14)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1w2d3h4m5s", timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_accepts(text: str, expected: timedelta) -> None:
    """Durations with units w, d, h, m, s (combined largest first) parse."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0", "6", "1x", "h", "-1h", "1.5h", "30m1h", "1 h"])
def test_parse_duration_refuses(text: str) -> None:
    """Anything else, including negative and unit-less numbers, is refused."""
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text", ["5215w", "36501d", "200000w", "600000w", "9" * 30 + "d", "9" * 5000 + "s"]
)
def test_parse_duration_refuses_more_than_100_years(text: str) -> None:
    """Past 36500d a duration is refused where it is parsed: now minus or plus it would be no
    date (200000w passed and then crashed a plan with OverflowError)."""
    assert parse_duration("36500d") == parse_duration("5214w2d") == timedelta(days=36500)
    with pytest.raises(DurationTooLong, match=r"too long: at most 36500d \(about 100 years\)"):
        parse_duration(text)


_NOTIFY = "notify: [{{name: n, kind: webhook, url_env: N_URL, {key}: {value}}}]\n"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (REGISTRY + "sweep: {{every: {value}}}\n", "sweep.every"),
        (REGISTRY + "hooks: {{head_timeout: {value}}}\n", "hooks.head_timeout"),
        (REGISTRY + "hooks: {{body_timeout: {value}}}\n", "hooks.body_timeout"),
        (REGISTRY + "restore: {{hold: {value}}}\n", "restore.hold"),
        (
            REGISTRY + "maintenance: {{window: {{cron: '0 3 * * sun', duration: {value}}}}}\n",
            "maintenance.window.duration",
        ),
        (
            REGISTRY + "maintenance: {{window: {{cron: '0 3 * * sun', margin: {value}}}}}\n",
            "maintenance.window.margin",
        ),
        (_policy("keep: [{{tags: ['*'], pushed_within: {value}}}]"), "keep[0].pushed_within"),
        (_policy("untagged: {{delete_after: {value}}}"), "untagged.delete_after"),
        (REGISTRY + _NOTIFY.replace("{key}", "timeout"), "notify[0] (n).timeout"),
        (REGISTRY + _NOTIFY.replace("{key}", "give_up_after"), "notify[0] (n).give_up_after"),
    ],
)
@pytest.mark.parametrize("value", ["200000w", "600000w"])
def test_every_duration_key_refuses_a_huge_duration_naming_the_key(
    text: str, key: str, value: str
) -> None:
    """Each duration key of the policy file refuses a duration past the bound with one
    problem naming it (never a traceback, never accepted)."""
    (problem,) = _problems(text.format(value=value))
    assert problem.endswith(f"{key}: is too long: at most 36500d (about 100 years)"), problem


# -- bad files: every problem, with its key ------------------------------------------------


P = "p.yaml: policies[0] (web)"

BAD_FILES = [
    pytest.param(
        "registy:\n  url: http://x\n",
        [
            "p.yaml: registy: unknown key (did you mean registry?)",
            "p.yaml: registry: required",
        ],
        id="unknown-top-key",
    ),
    pytest.param(
        REGISTRY + "sweep: {every: 0s}\nredis: {url: 'http://x'}\naudit: {path: 3}\n",
        [
            "p.yaml: redis.url: must be a redis://, rediss:// or unix:// URL",
            "p.yaml: sweep.every: must be longer than 0s",
            "p.yaml: audit.path: must be a string (put it in quotes)",
        ],
        id="sweep-redis-audit",
    ),
    pytest.param(
        "registry: {url: 'ftp://x', concurrency: 65, ca_file: ''}\n",
        [
            "p.yaml: registry.url: must be an http:// or https:// URL with a host",
            "p.yaml: registry.ca_file: must be a non-empty string",
            "p.yaml: registry.concurrency: must be at most 64",
        ],
        id="registry-url-concurrency",
    ),
    pytest.param(
        "registry: {url: 'http://', concurrency: '8'}\n",
        [
            "p.yaml: registry.url: must be an http:// or https:// URL with a host",
            "p.yaml: registry.concurrency: must be a whole number",
        ],
        id="registry-no-host",
    ),
    pytest.param(
        "registry: {url: 'http://h:5000/v2/', concurrency: 0}\n",
        [
            "p.yaml: registry.url: must be the registry's base URL, without /v2",
            "p.yaml: registry.concurrency: must be at least 1",
        ],
        id="registry-v2-path",
    ),
    pytest.param(
        "registry: {url: 'http://h', password_env: REG_PW}\n",
        ["p.yaml: registry.password_env: needs username"],
        id="password-without-username",
    ),
    pytest.param(
        "registry: {url: 'http://h', username: bot}\n",
        ["p.yaml: registry.password_env: required with username"],
        id="username-without-password",
    ),
    pytest.param(
        "registry: {url: 'http://h', username: 12, password_env: 'not a name'}\n",
        [
            "p.yaml: registry.username: must be a string (put it in quotes)",
            "p.yaml: registry.password_env: must be the name of an environment variable, "
            "like REGSWEEP_X",
        ],
        id="username-number-bad-variable",
    ),
    pytest.param(
        REGISTRY + "hooks: {github_secret: X, api_token_env: 'a b', body_limit: 10}\n",
        [
            "p.yaml: hooks.github_secret: unknown key (did you mean github_secret_env?)",
            "p.yaml: hooks.api_token_env: must be the name of an environment variable, "
            "like REGSWEEP_X",
            "p.yaml: hooks.body_limit: must be at least 1024",
        ],
        id="hooks",
    ),
    pytest.param(
        REGISTRY + "policies: {name: web}\n",
        ["p.yaml: policies: must be a list of policies"],
        id="policies-not-list",
    ),
    pytest.param(
        REGISTRY
        + "policies:\n  - repositories: []\n  - name: ' '\n    repositories: [a]\n  - b\n  -\n",
        [
            "p.yaml: policies[0].name: required",
            "p.yaml: policies[0].repositories: must list at least one entry",
            "p.yaml: policies[1].name: must be a non-empty string",
            "p.yaml: policies[2]: must be a mapping",
            "p.yaml: policies[3]: must be a mapping",
        ],
        id="policy-names-and-repositories",
    ),
    pytest.param(
        REGISTRY
        + "policies:\n  - {name: web, repositories: [a]}\n  - {name: web, repositories: [b]}\n",
        ["p.yaml: policies[1] (web).name: policies[0] already has this name: rename one"],
        id="duplicate-policy-name",
    ),
    pytest.param(
        REGISTRY
        + "policies:\n  - {name: all, repositories: ['team/**']}\n"
        + "  - {name: web, repositories: [team/web, 'team/*', other]}\n",
        [
            "p.yaml: policies[1] (web).repositories[0]: never used: policies[0] (all) "
            "comes first and matches it"
        ],
        id="shadowed-repository",
    ),
    pytest.param(
        _policy(head="name: web\nrepositories: ['', 're:team/.*', '/team', 7]\n"),
        [
            f"{P}.repositories[0]: must be a non-empty string",
            f"{P}.repositories[1]: repositories are globs; re: is only for tag patterns",
            f"{P}.repositories[2]: must not start or end with / nor contain //",
            f"{P}.repositories[3]: must be a string (put it in quotes)",
        ],
        id="repository-globs",
    ),
    pytest.param(
        _policy("mode: enforced\nprotect: latest\nkep: []\n"),
        [
            f"{P}.kep: unknown key (did you mean keep?)",
            f"{P}.mode: must be dry-run or enforce",
            f"{P}.protect: must be a list of strings",
        ],
        id="mode-protect-unknown",
    ),
    pytest.param(
        _policy("protect: ['re:v[0-9', 're:', 'ok']\n"),
        [
            f"{P}.protect[0]: bad regular expression in 're:v[0-9': "
            "unterminated character set at position 1",
            f"{P}.protect[1]: the regular expression after re: is empty",
        ],
        id="bad-regex",
    ),
    pytest.param(
        _policy(
            """
            keep:
              - tags: ["main-*"]
                newest: 0
              - newest: ten
                pushed_within: 14
              - tags: []
                pushed_within: 0s
              - tags: ["re:("]
                pushed_within: -1d
                max: 3
              - "*"
              -
            """
        ),
        [
            f"{P}.keep[0].newest: must be at least 1",
            f"{P}.keep[1].tags: required",
            f"{P}.keep[1].newest: must be a whole number",
            f"{P}.keep[1].pushed_within: must be a duration like 30s, 15m, 1h30m, 14d or 2w",
            f"{P}.keep[2].tags: must list at least one entry",
            f"{P}.keep[2].pushed_within: must be longer than 0s",
            f"{P}.keep[3].max: unknown key (expected one of: tags, newest, pushed_within)",
            f"{P}.keep[3].tags[0]: bad regular expression in 're:(': "
            "missing ), unterminated subpattern at position 0",
            f"{P}.keep[3].pushed_within: must be a duration like 30s, 15m, 1h30m, 14d or 2w",
            f"{P}.keep[4]: must be a mapping",
            f"{P}.keep[5]: must be a mapping",
        ],
        id="keep-rules",
    ),
    pytest.param(
        _policy("keep: []\n"),
        [f"{P}.keep: must list at least one rule (leave keep out for no retention)"],
        id="keep-empty-list",
    ),
    pytest.param(
        _policy("keep: {tags: ['*']}\nuntagged: {}\n"),
        [f"{P}.keep: must be a list of rules", f"{P}.untagged.delete_after: required"],
        id="keep-not-list-untagged-empty",
    ),
    pytest.param(
        _policy("untagged: {delete_after: 1 hour}\n"),
        [f"{P}.untagged.delete_after: must be a duration like 30s, 15m, 1h30m, 14d or 2w"],
        id="untagged-bad-duration",
    ),
    pytest.param(
        _policy(
            """
            on:
              pull_request_closed: ["pr-{nmber}", "pr-{number", "staging", "pr-{number:04}"]
              branch_deleted: ["{number}", "re:{branch}-(", "{branch!r}"]
              tag_pushed: ["x"]
            sources: {gitlab: [g/p]}
            """
        ),
        [
            f"{P}.on.tag_pushed: unknown key (expected one of: pull_request_closed, "
            "branch_deleted)",
            f"{P}.on.pull_request_closed[0]: unknown field {{nmber}} in 'pr-{{nmber}}'; "
            "this event offers {number}, {branch}, {branch_slug}",
            f"{P}.on.pull_request_closed[1]: bad template 'pr-{{number': expected '}}' before "
            "end of string (write {{ and }} for literal braces)",
            f"{P}.on.pull_request_closed[2]: 'staging' uses none of {{number}}, {{branch}}, "
            "{branch_slug}",
            f"{P}.on.pull_request_closed[3]: {{number}} in 'pr-{{number:04}}' takes no "
            "conversion or format spec",
            f"{P}.on.branch_deleted[0]: unknown field {{number}} in '{{number}}'; "
            "this event offers {branch}, {branch_slug}",
            f"{P}.on.branch_deleted[1]: bad regular expression in 're:main-(': "
            "missing ), unterminated subpattern at position 5",
            f"{P}.on.branch_deleted[2]: {{branch}} in '{{branch!r}}' takes no "
            "conversion or format spec",
        ],
        id="event-templates",
    ),
    pytest.param(
        _policy("sources:\n  github: [acme, 'a/b/c', '*/web']\n  gitlab: ['g//p', g]\n"),
        [
            f"{P}.sources.github[0]: must look like owner/name",
            f"{P}.sources.github[1]: must look like owner/name",
            f"{P}.sources.gitlab[0]: must look like group/project or group/subgroup/project",
            f"{P}.sources.gitlab[1]: must look like group/project or group/subgroup/project",
        ],
        id="sources",
    ),
    pytest.param(
        REGISTRY
        + "maintenance:\n  window: {cron: '0 3 * *', duration: 0s}\n"
        + "  gc: {delete_untagged: maybe}\n  registry_version: three\n",
        [
            "p.yaml: maintenance.window.duration: must be longer than 0s",
            "p.yaml: maintenance.window.cron: '0 3 * *' is not a 5-field cron expression (UTC)",
            "p.yaml: maintenance.gc.delete_untagged: must be auto or false",
            "p.yaml: maintenance.registry_version: must be major.minor, like 2.8 or 3.0",
        ],
        id="maintenance-window-gc",
    ),
    pytest.param(
        REGISTRY + "maintenance:\n  window: {cron: '0 0 3 * * sun', duration: 1h, margin: 1h}\n",
        [
            "p.yaml: maintenance.window.margin: must be shorter than the window's duration",
            "p.yaml: maintenance.window.cron: '0 0 3 * * sun' is not a 5-field cron "
            "expression (UTC)",
        ],
        id="maintenance-six-fields-margin",
    ),
    pytest.param(
        REGISTRY + "maintenance:\n  window: {duration: 2h}\n",
        ["p.yaml: maintenance.window.cron: required"],
        id="window-without-cron",
    ),
    pytest.param(
        REGISTRY + "maintenance:\n  controller: {container: registry}\n",
        ["p.yaml: maintenance.controller.kind: required: docker or process"],
        id="controller-without-kind",
    ),
    pytest.param(
        REGISTRY + "maintenance:\n  controller: {kind: kubernetes}\n",
        ["p.yaml: maintenance.controller.kind: must be docker or process"],
        id="controller-unknown-kind",
    ),
    pytest.param(
        REGISTRY
        + 'maintenance:\n  controller: {kind: process, readonly_command: "x \'y", '
        + "container: r}\n",
        [
            "p.yaml: maintenance.controller.container: unknown key (expected one of: kind, "
            "readonly_command, readwrite_command, gc_command, storage_path, config_path)",
            "p.yaml: maintenance.controller.readonly_command: is not a valid command line: "
            "No closing quotation",
            "p.yaml: maintenance.controller.readwrite_command: required",
            "p.yaml: maintenance.controller.gc_command: required",
        ],
        id="process-controller",
    ),
    pytest.param(
        REGISTRY + "maintenance:\n  controller: {kind: docker, gc_command: gc}\n",
        [
            "p.yaml: maintenance.controller.gc_command: unknown key (expected one of: kind, "
            "container, config_path)"
        ],
        id="docker-controller-process-key",
    ),
]


_LINE = re.compile(r"^p\.yaml:\d+: ")


def _unlined(problem: str) -> str:
    """A problem without its line number (test_problems_carry_their_line checks those)."""
    return _LINE.sub("p.yaml: ", problem)


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_bad_file_lists_every_problem_with_its_key(text: str, expected: list[str]) -> None:
    """A bad file is refused with exactly these problems, all at once, each naming its key
    and, unless the key is missing from the top level, its line."""
    problems = _problems(text)
    assert [_unlined(p) for p in problems] == expected
    assert all(_LINE.match(p) or p == "p.yaml: registry: required" for p in problems)


def test_problems_across_sections_come_together() -> None:
    """Problems in the registry, a policy and maintenance are all reported in one error."""
    text = (
        "registry: {url: nope}\n"
        "policies:\n  - {name: web, repositories: [a], keep: [{tags: ['*'], newest: 0}]}\n"
        "maintenance: {gc: {delete_untagged: 1}}\n"
    )
    with pytest.raises(ConfigError) as info:
        _parse(text)
    assert str(info.value).splitlines() == [
        "p.yaml:1: registry.url: must be an http:// or https:// URL with a host",
        "p.yaml:3: policies[0] (web).keep[0].newest: must be at least 1",
        "p.yaml:4: maintenance.gc.delete_untagged: must be auto or false",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "p.yaml: the file is empty"),
        ("# only a comment\n", "p.yaml: the file is empty"),
        ("- a\n- b\n", "p.yaml: the top level must be a mapping (registry:, ...), not list"),
        ("just text\n", "p.yaml: the top level must be a mapping (registry:, ...), not str"),
        (
            "registry:\n  url: [\n",
            "p.yaml:3:1: expected the node content, but found '<stream end>'",
        ),
        ("registry:\n\turl: x\n", "p.yaml:2:1: found character '\\t' that cannot start any token"),
        (
            "registry:\n  url: http://a\n  url: http://b\n",
            "p.yaml:3:3: duplicate key 'url' (first at line 2)",
        ),
    ],
)
def test_unusable_file_gives_one_clear_problem(text: str, expected: str) -> None:
    """Empty, non-mapping and syntactically broken files give one problem, with line:column."""
    assert _problems(text) == [expected]


def test_yaml_merge_keys_are_not_duplicates() -> None:
    """A key overriding one brought in by ``<<:`` is not reported as a duplicate."""
    config = _parse("registry: {<<: {url: 'http://a', concurrency: 2}, concurrency: 3}\n")
    assert (config.registry.url, config.registry.concurrency) == ("http://a", 3)


def test_missing_file(tmp_path: Path) -> None:
    """A policy file that does not exist is one problem naming it."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [f"{path}: no such file"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the policy file is one problem naming it."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    assert info.value.problems == [f"{tmp_path}: is a directory, not a policy file"]


def test_not_utf8_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is one problem, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"registry:\n  url: http://caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [f"{path}: not UTF-8 text"]


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    """Problems found in a loaded file start with that file's path."""
    path = tmp_path / "regsweep.yaml"
    path.write_text(_policy("mode: fast\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [f"{path}:6: policies[0] (web).mode: must be dry-run or enforce"]


# -- the environment ----------------------------------------------------------------------


def test_redis_url_env_overrides_file() -> None:
    """REGSWEEP_REDIS_URL wins over redis.url; an empty one counts as unset."""
    text = REGISTRY + "redis: {url: 'redis://file:6379/0'}\n"
    assert _parse(text).redis_url == "redis://file:6379/0"
    assert _parse(text, {"REGSWEEP_REDIS_URL": ""}).redis_url == "redis://file:6379/0"
    override = {"REGSWEEP_REDIS_URL": "redis://env:6379/1"}
    assert _parse(text, override).redis_url == "redis://env:6379/1"
    assert _parse(REGISTRY, override).redis_url == "redis://env:6379/1"


def test_bad_redis_url_env_is_a_problem() -> None:
    """A REGSWEEP_REDIS_URL that is not a Redis URL is refused under its variable's name."""
    problems = _problems(REGISTRY, {"REGSWEEP_REDIS_URL": "localhost:6379"})
    assert problems == ["p.yaml: $REGSWEEP_REDIS_URL: must be a redis://, rediss:// or unix:// URL"]


def test_hook_secrets_come_from_named_variables() -> None:
    """Each hook's secret is read from the variable it names; unset or empty disables it."""
    text = REGISTRY + (
        "hooks:\n  registry_token_env: HOOK_TOKEN\n  github_secret_env: GH\n"
        "  gitlab_token_env: GL\n  api_token_env: API\n"
    )
    config = _parse(text, {"HOOK_TOKEN": "t0k", "GH": "", "API": "api-secret"})
    assert config.hooks.registry_token == Secret("t0k")
    assert config.hooks.github_secret is None
    assert config.hooks.gitlab_token is None
    assert config.hooks.gitlab_signing_key is None
    assert config.hooks.api_token is not None
    assert config.hooks.api_token.reveal() == "api-secret"


def test_configured_hooks_with_unset_variables_are_listed() -> None:
    """A hooks.*_env key whose variable is unset (or empty) is named in hooks.unset, which
    check-config refuses; keys the file leaves out are not."""
    text = REGISTRY + "hooks:\n  registry_token_env: HOOK_TOKEN\n  github_secret_env: GH\n"
    config = _parse(text, {"GH": ""})
    assert config.hooks.unset == ("hooks.github_secret_env", "hooks.registry_token_env")
    assert _parse(REGISTRY, {}).hooks.unset == ()


@pytest.mark.parametrize(
    "key",
    ["whsec_", "whsec_not base64!", "whsec_c2hvcnQ=", "plain text", "whsec_" + "A" * 21],
    ids=["empty", "not-base64", "too-short", "text", "bad-padding"],
)
def test_signing_key_that_cannot_verify_anything_is_refused(key: str) -> None:
    """A GitLab signing key that is not whsec_ + base64 of at least 16 bytes would make
    every signed delivery 401: refused at load, its value never echoed."""
    text = REGISTRY + "hooks: {gitlab_signing_key_env: GLKEY}\n"
    problems = _problems(text, {"GLKEY": key})
    assert problems == [
        "p.yaml:3: hooks.gitlab_signing_key_env: names a variable that does not hold a "
        "Standard Webhooks key (whsec_ and base64)"
    ]
    good = "whsec_" + base64.b64encode(b"k" * 24).decode()
    assert _parse(text, {"GLKEY": good}).hooks.gitlab_signing_key == Secret(good)


@pytest.mark.parametrize(
    ("cron", "problem"),
    [
        ("0 0 30 2 *", "never fires"),
        ("H 3 * * *", "is not a 5-field cron expression"),
        ("0 3 * * * *", "is not a 5-field cron expression"),
    ],
)
def test_cron_the_scheduler_cannot_run_is_refused(cron: str, problem: str) -> None:
    """A cron expression is refused unless croniter (beat's engine too) finds fire times."""
    text = REGISTRY + f"maintenance:\n  window: {{cron: '{cron}', duration: 2h}}\n"
    (line,) = _problems(text)
    assert line.startswith("p.yaml:4: maintenance.window.cron:") and problem in line


def test_window_no_longer_than_the_default_margin_is_refused() -> None:
    """A 10-minute window with the default 10-minute margin would never start a GC."""
    text = REGISTRY + "maintenance:\n  window: {cron: '0 3 * * *', duration: 10m}\n"
    (line,) = _problems(text)
    assert line.startswith("p.yaml:4: maintenance.window.duration: must be longer than the margin")
    allowed = text.replace("duration: 10m", "duration: 10m, margin: 5m")
    assert _parse(allowed, {}).maintenance.window_margin == timedelta(minutes=5)


def test_registry_password_comes_from_its_variable() -> None:
    """registry.password_env names the variable holding the password."""
    text = "registry: {url: 'http://h', username: bot, password_env: REG_PW}\n"
    config = _parse(text, {"REG_PW": "hunter2"})
    assert config.registry.username == "bot"
    assert config.registry.password == Secret("hunter2")


def test_unset_registry_password_is_an_error() -> None:
    """With a username, an unset password variable is refused (not silently anonymous)."""
    text = "registry: {url: 'http://h', username: bot, password_env: REG_PW}\n"
    expected = [
        "p.yaml:1: registry.password_env: names an environment variable that is not set: "
        "REG_PW (export it, non-empty, where regsweep runs)"
    ]
    assert _problems(text, {"REG_PW": ""}) == expected
    assert _problems(text, {}) == expected


def test_config_source_prefers_flag_then_env() -> None:
    """-c FILE beats REGSWEEP_CONFIG, which beats nothing (a config error)."""
    environ = {env.CONFIG_PATH_VAR: "/etc/regsweep.yaml"}
    assert config_source("local.yaml", environ) == "local.yaml"
    assert config_source(None, environ) == "/etc/regsweep.yaml"
    with pytest.raises(ConfigError, match="pass -c FILE or set REGSWEEP_CONFIG"):
        config_source(None, {})


def test_env_module_reads_only_what_it_is_asked() -> None:
    """env.secret treats unset and empty alike, and variable names are checked."""
    assert env.secret({"A": "x"}, "A") == Secret("x")
    assert env.secret({"A": ""}, "A") is None
    assert env.secret({}, "A") is None
    assert env.is_variable_name("REGSWEEP_API_TOKEN")
    assert not env.is_variable_name("1ABC") and not env.is_variable_name("A-B")


# -- secrets stay secret ------------------------------------------------------------------

SECRETS = {
    "REG_PW": "pw-Zq81",
    "HOOK": "hook-Zq82",
    "GH": "gh-Zq83",
    "GL": "gl-Zq84",
    "GLKEY": "whsec_Zq85Zq85Zq85Zq85Zq85Zq85",
    "API": "api-Zq86",
    "REGSWEEP_REDIS_URL": "redis://:redispw-Zq87@127.0.0.1:6379/0",
}


def test_secrets_never_in_repr_or_str_of_config() -> None:
    """No secret value, the Redis URL's password included, shows in the Config's repr or str."""
    text = (
        "registry: {url: 'http://h', username: bot, password_env: REG_PW}\n"
        "hooks: {registry_token_env: HOOK, github_secret_env: GH, gitlab_token_env: GL,"
        " gitlab_signing_key_env: GLKEY, api_token_env: API}\n"
    )
    config = _parse(text, SECRETS)
    assert config.hooks.gitlab_signing_key == Secret(SECRETS["GLKEY"])
    shown = repr(config) + str(config) + repr(config.hooks) + repr(config.registry)
    assert "Zq8" not in shown
    assert "Secret('**********')" in shown


def test_secrets_never_in_error_messages() -> None:
    """Neither a URL's credentials nor a secret pasted where a variable name goes is echoed."""
    text = (
        "registry: {url: 'http://bot:pw-Zq81@h', username: bot, password_env: pwZq88}\n"
        "redis: {url: 'http://:redispw-Zq87@h'}\n"
        'maintenance:\n  controller: {kind: process, readonly_command: "x --pw \'Zq89",'
        " readwrite_command: x, gc_command: x}\n"
    )
    problems = _problems(text, {"REGSWEEP_REDIS_URL": "bad://:redispw-Zq87@h"})
    assert len(problems) == 5
    assert not any("Zq8" in line for line in problems)


def test_storage_path_is_made_absolute_and_checked_where_it_is_read(tmp_path: Path) -> None:
    """The loader only takes the path (the service shares the file, not the registry's
    volume); reading a missing directory or a pull-through cache's storage is refused with
    the key named."""
    good = tmp_path / "registry"
    good.mkdir()
    config = _parse(f"registry: {{url: 'http://r:5000', storage_path: '{good}'}}\n")
    assert config.registry.storage_path == str(good)
    assert check_storage_root(str(good)) is None
    assert "is not a directory" in (check_storage_root(str(good / "nope")) or "")
    (good / "scheduler-state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"registry\.storage_path .*pull-through cache"):
        RegistryStorage(good)


def test_age_from_and_restore_hold() -> None:
    """A policy's age_from is push (default) or build_time; restore.hold is a duration."""
    text = REGISTRY + (
        "restore: {hold: 3d}\n"
        "policies:\n"
        "  - {name: a, repositories: [x]}\n"
        "  - {name: b, repositories: [y], age_from: build_time}\n"
    )
    config = _parse(text)
    assert [p.age_from.value for p in config.policies] == ["push", "build_time"]
    assert config.restore_hold == timedelta(days=3)
    (problem,) = _problems(REGISTRY + "policies:\n  - {name: a, repositories: [x], age_from: x}\n")
    assert "policies[0] (a).age_from: must be push or build_time" in problem
