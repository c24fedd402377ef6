"""Load and validate the policy file (``regsweep.yaml``) into a frozen
:class:`~worker.settings.model.Config`.

Validation happens once, here, when the process starts. Every problem is
collected and raised together in one :class:`~worker.errors.ConfigError`, one
line each, naming the file, the policy and the key::

    regsweep.yaml: policies[0] (web).keep[1].newest: must be at least 1

Messages never echo a secret: not a password, not a URL that may hold one, not
even the name in ``*_env`` (people paste the secret itself there by mistake).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import os
import re
import shlex
import string
import urllib.parse
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml
from croniter import croniter

from worker.engine.policy import (
    AgeSource,
    EventTemplates,
    KeepRule,
    Mode,
    Policy,
    RepositoryPattern,
    Sources,
    TagPattern,
)
from worker.errors import ConfigError
from worker.settings import env
from worker.settings.local import local_problems
from worker.settings.model import (
    DEFAULT_AUDIT_PATH,
    DEFAULT_BODY_LIMIT,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_CONCURRENCY,
    DEFAULT_HEAD_LIMIT,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_JOBS,
    DEFAULT_MAX_QUEUED_JOBS_PER_TOKEN,
    DEFAULT_NOTIFY_GIVE_UP,
    DEFAULT_NOTIFY_RETRIES,
    DEFAULT_NOTIFY_TIMEOUT,
    DEFAULT_RESTORE_HOLD,
    DEFAULT_SWEEP_EVERY,
    DEFAULT_WINDOW_DURATION,
    DEFAULT_WINDOW_MARGIN,
    NOTIFY_EVENTS,
    Config,
    ControllerSettings,
    DockerControllerSettings,
    GcGrace,
    HookSettings,
    MaintenanceSettings,
    NotifySettings,
    NotifyTarget,
    ProcessControllerSettings,
    RegistrySettings,
    Secret,
)
from worker.settings.patterns import repository_glob_problem, tag_glob_problem

_T = TypeVar("_T")

MAX_CONCURRENCY: Final = 64
MIN_BODY_LIMIT: Final = 1024
#: A head smaller than this cannot carry a signed webhook's headers.
MIN_HEAD_LIMIT: Final = 4096
#: Standard Webhooks signing keys: ``whsec_`` and the base64 of 24 to 64 random bytes.
SIGNING_KEY_PREFIX: Final = "whsec_"
MIN_SIGNING_KEY_BYTES: Final = 16

_TOP_KEYS: Final = (
    "registry",
    "redis",
    "sweep",
    "hooks",
    "policies",
    "maintenance",
    "audit",
    "restore",
    "notify",
)
_REGISTRY_KEYS: Final = (
    "url",
    "username",
    "password_env",
    "ca_file",
    "concurrency",
    "storage_path",
)
_HOOK_SECRET_KEYS: Final = (
    "registry_token_env",
    "github_secret_env",
    "gitlab_token_env",
    "gitlab_signing_key_env",
    "api_token_env",
    "viewer_token_env",
)
_HOOK_KEYS: Final = (
    *_HOOK_SECRET_KEYS,
    "metrics_token_env",
    "metrics_listen",
    "body_limit",
    "head_limit",
    "head_timeout",
    "body_timeout",
    "max_connections",
    "max_queued_jobs",
    "max_queued_jobs_per_token",
)
_POLICY_KEYS: Final = (
    "name",
    "repositories",
    "mode",
    "protect",
    "keep",
    "untagged",
    "on",
    "sources",
    "age_from",
)
_KEEP_KEYS: Final = ("tags", "newest", "pushed_within")
#: The fields each CI event fills in a template.
_EVENT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "pull_request_closed": ("number", "branch", "branch_slug"),
    "branch_deleted": ("branch", "branch_slug"),
}
#: Values used only to check that a filled-in template is a valid tag pattern.
_SAMPLE_FIELDS: Final = {"number": "1", "branch": "main", "branch_slug": "main"}
_MAINTENANCE_KEYS: Final = (
    "window",
    "gc",
    "controller",
    "registry_version",
    "storage_prune",
    "gc_grace",
    "remove_empty_repositories",
)
_WINDOW_KEYS: Final = ("cron", "duration", "margin")
_DOCKER_KEYS: Final = ("kind", "container", "config_path")
_PROCESS_KEYS: Final = (
    "kind",
    "readonly_command",
    "readwrite_command",
    "gc_command",
    "storage_path",
    "config_path",
)
#: ``maintenance.gc.delete_untagged`` values that mean "not passed", which is all regsweep
#: does; ``true`` is refused with the reason (:data:`_DELETE_UNTAGGED_REFUSED`).
_DELETE_UNTAGGED_OFF: Final = ("auto", False, "false")
_DELETE_UNTAGGED_REFUSED: Final = (
    "true is refused: registry garbage-collect --delete-untagged deletes what regsweep keeps "
    "(2.8: children of kept multi-arch indexes; 3.x: referrers of kept images and untagged "
    "manifests of repositories no policy covers), unaudited and beyond restore; untagged "
    "manifests go by the policies' untagged.delete_after (docs/safety.md); set auto or false"
)

_DURATION: Final = re.compile(
    r"(?:(?P<weeks>\d+)w)?(?:(?P<days>\d+)d)?(?:(?P<hours>\d+)h)?"
    r"(?:(?P<minutes>\d+)m)?(?:(?P<seconds>\d+)s)?",
    re.ASCII,
)
_DURATION_HINT: Final = "must be a duration like 30s, 15m, 1h30m, 14d or 2w"
#: The longest duration anywhere (policy file, --for, --since): now plus or minus it is
#: still a date (200000w back from now is not, and a plan or hold would crash on it).
MAX_DURATION: Final = timedelta(days=36500)
_VERSION: Final = re.compile(r"\d+\.\d+")


# -- public API ---------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, strict: bool = False
) -> Config:
    """Read, parse and validate the policy file at ``path``; raises :class:`ConfigError`.

    ``strict`` (``check-config``): also refuse files and variables the file names that
    cannot serve on this machine (:mod:`worker.settings.local`)."""
    source = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
        # utf-8-sig: editors on Windows save a BOM, which YAML would read as content.
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a policy file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    return parse_config(text, source, environ, strict=strict, digest=policy_digest(raw))


def policy_digest(raw: bytes) -> str:
    """What ``status`` and the processes' reports name a policy file's content by."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def parse_config(
    text: str,
    source: str,
    environ: Mapping[str, str] | None = None,
    *,
    strict: bool = False,
    digest: str | None = None,
) -> Config:
    """Parse and validate policy-file ``text``; ``source`` names it in messages, ``digest``
    its bytes (by default, those of ``text`` as UTF-8)."""
    environ = env.current() if environ is None else environ
    problems = _Problems(source)
    top = _Section(_load_yaml(text, source, problems), "", problems, _TOP_KEYS)
    registry = _registry(top, environ)
    redis_url = _redis_url(top, environ)
    sweep_every = _sweep_every(top)
    hooks = _hooks(top, environ)
    policies = _policies(top)
    maintenance = _maintenance(top)
    audit_path, audit_given = _audit_path(top, source)
    restore_hold = top.section("restore", ("hold",)).duration("hold") or DEFAULT_RESTORE_HOLD
    notify = _notify(top, environ)
    if maintenance.storage_prune and registry.storage_path is None:
        problems.add(
            "maintenance.storage_prune",
            "needs registry.storage_path (the storage it prunes)",
            problems.key_lines.get("maintenance.storage_prune"),
        )
    if strict:
        # The audit file is written without Redis, and beside it when audit.path is given.
        file_redis = None if audit_given else redis_url
        for key, message in local_problems(registry, hooks, audit_path, file_redis):
            problems.add(key, message, problems.key_lines.get(key))
        for unset in notify.unset:  # a notification target that would never send
            key, _, message = unset.partition(": ")
            problems.add(key, message, problems.key_lines.get(key))
    problems.raise_if_any()
    return Config(
        registry=registry,
        policies=policies,
        redis_url=redis_url,
        sweep_every=sweep_every,
        hooks=hooks,
        maintenance=maintenance,
        audit_path=audit_path,
        # With Redis, the file is a second copy of the audit only when asked for.
        audit_mirror=audit_path if audit_given and redis_url is not None else None,
        restore_hold=restore_hold,
        source=source,
        notify=notify,
        digest=digest or policy_digest(text.encode()),
    )


def config_source(given: str | None, environ: Mapping[str, str]) -> str:
    """The policy file to load: ``-c FILE`` when given, else ``REGSWEEP_CONFIG``."""
    path = given or env.config_path(environ)
    if path is None:
        raise ConfigError(f"no policy file: pass -c FILE or set {env.CONFIG_PATH_VAR}")
    return path


class DurationTooLong(ValueError):
    """A duration written right that is longer than :data:`MAX_DURATION`."""


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``1h30m``, ``14d``, ``2w`` as a timedelta; raises ``ValueError``
    (:class:`DurationTooLong` past :data:`MAX_DURATION`)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or not any(match.groupdict().values()):
        raise ValueError(_DURATION_HINT)
    parts = {unit: amount for unit, amount in match.groupdict().items() if amount}
    try:
        # More digits than any bounded duration has: no int() of thousands of digits.
        digits = max(len(amount.lstrip("0")) for amount in parts.values())
        duration = None if digits > 12 else timedelta(**_ints(parts))
    except OverflowError:
        duration = None
    if duration is None or duration > MAX_DURATION:
        raise DurationTooLong(f"is too long: at most {MAX_DURATION.days}d (about 100 years)")
    return duration


def _ints(parts: Mapping[str, str]) -> dict[str, int]:
    return {unit: int(amount) for unit, amount in parts.items()}


# -- YAML ---------------------------------------------------------------------------------


class _Map(dict[Hashable, Any]):
    """A YAML mapping that remembers its line and each key's (1-based), for messages."""

    line: int | None = None
    key_lines: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.key_lines = {}


class _Seq(list[Any]):
    """A YAML sequence that remembers each item's line (1-based), for messages."""

    item_lines: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.item_lines = []


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (``on:`` is a key, not ``True``), lines kept, duplicate keys listed.

    A duplicate key is a problem, not the end of the load: the first occurrence is
    kept and the rest of the file is still checked, so one run lists everything.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        #: (line, column, message) of each duplicate key, 1-based.
        self.duplicates: list[tuple[int, int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # PyYAML keeps the last of two equal keys; a policy file silently losing
        # half a policy is worse than refusing it.
        first: dict[str, int] = {}
        kept = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and not key_node.tag.endswith(":merge"):
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    earlier = first[key_node.value]
                    message = f"duplicate key {key_node.value!r} (first at line {earlier})"
                    self.duplicates.append((line, key_node.start_mark.column + 1, message))
                    continue
                first[key_node.value] = line
            kept.append((key_node, value_node))
        node.value = kept
        return super().construct_mapping(node, deep=deep)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Map]:
    data = _Map()
    data.line = node.start_mark.line + 1
    yield data
    data.update(loader.construct_mapping(node))
    # After construct_mapping: merge keys (<<) are flattened in by then.
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            data.key_lines[str(key_node.value)] = key_node.start_mark.line + 1


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Iterator[_Seq]:
    data = _Seq()
    yield data
    data.extend(loader.construct_sequence(node))
    data.item_lines = [item.start_mark.line + 1 for item in node.value]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str, source: str, problems: _Problems) -> dict[object, object]:
    """The document; duplicate keys go to ``problems`` (with line and column)."""
    loader = _Loader(text)  # a SafeLoader: builds plain data only
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    for line, column, message in loader.duplicates:
        problems.lines.append(f"{source}:{line}:{column}: {message}")
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise ConfigError(f"{source}: the top level must be a mapping (registry:, ...), not {kind}")
    return data


# -- reading with problems collected ------------------------------------------------------


class _Problems:
    """Every problem found, each with its place, so the user sees them all at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []
        #: The line of every key read (``registry.ca_file``: 4), for later checks' messages.
        self.key_lines: dict[str, int] = {}

    def add(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{self.source}:{line}" if line else self.source
        self.lines.append(f"{where}: {path}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def _unknown_key(key: str, keys: Sequence[str]) -> str:
    if key == "password":
        return "unknown key: the password comes from the variable named by password_env"
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (expected one of: {', '.join(keys)})"
    return f"unknown key{hint}"


def _not_a_string(value: object) -> str:
    if isinstance(value, bool | int | float):
        return "must be a string (put it in quotes)"
    return "must be a non-empty string"


class _Section:
    """One YAML mapping being read: typed getters that record problems instead of raising.

    A getter returns ``None`` (or an empty list) for a value that is absent or
    wrong; the wrong ones are in ``problems`` and the load fails as a whole.
    """

    def __init__(
        self,
        value: object,
        path: str,
        problems: _Problems,
        keys: Sequence[str],
        *,
        list_item: bool = False,
        line: int | None = None,
    ) -> None:
        self.path = path
        self.problems = problems
        self._data: dict[str, object] = {}
        #: Where this mapping starts, and where each of its keys is.
        self.line = value.line if isinstance(value, _Map) else line
        self._key_lines = value.key_lines if isinstance(value, _Map) else {}
        # "required" is only worth saying inside a mapping that exists.
        self._present = isinstance(value, dict)
        # An absent section is empty; an empty list entry (`- `) is a mistake.
        if (value is not None or list_item) and not isinstance(value, dict):
            problems.add(path, "must be a mapping", self.line)
        for key, item in value.items() if isinstance(value, dict) else ():
            if isinstance(key, str) and key in keys:
                self._data[key] = item
                problems.key_lines[self.at(key)] = self.line_of(key) or 0
            else:
                self.problem(str(key), _unknown_key(str(key), keys))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line_of(self, key: str) -> int | None:
        """The line of ``key`` (of its first part for ``a.b``), else of this mapping."""
        head = key.partition(".")[0]
        return self._key_lines.get(key) or self._key_lines.get(head) or self.line

    def problem(self, key: str, message: str) -> None:
        self.problems.add(self.at(key), message, self.line_of(key))

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def get(self, key: str, *, required: bool = False) -> object:
        value = self._data.get(key)
        if value is None and required and self._present:
            self.problem(key, "required")
        return value

    def section(self, key: str, keys: Sequence[str], *, required: bool = False) -> _Section:
        value = self.get(key, required=required)
        return _Section(value, self.at(key), self.problems, keys, line=self.line_of(key))

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.get(key, required=required)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None:
            self.problem(key, _not_a_string(value))
        return None

    def integer(self, key: str, *, low: int, high: int | None = None) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, "must be a whole number")
        elif value < low:
            self.problem(key, f"must be at least {low}")
        elif high is not None and value > high:
            self.problem(key, f"must be at most {high}")
        else:
            return value
        return None

    def duration(
        self, key: str, *, zero_ok: bool = False, required: bool = False
    ) -> timedelta | None:
        value = self.get(key, required=required)
        if value is None:
            return None
        try:
            # A bare 0 needs no unit; any other bare number is ambiguous.
            result = timedelta(0) if type(value) is int and value == 0 else _duration_of(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return None
        if result == timedelta(0) and not zero_ok:
            self.problem(key, "must be longer than 0s")
            return None
        return result

    def strings(
        self, key: str, convert: Callable[[str], _T], *, required: bool = False
    ) -> tuple[_T, ...]:
        """Each item of a list of non-empty strings, through ``convert`` (which raises
        ``ValueError`` with the message for a bad item)."""
        value = self.get(key, required=required)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(key, "must be a list of strings")
            return ()
        if not value and required:
            self.problem(key, "must list at least one entry")
        converted: list[_T] = []
        for index, item in enumerate(value):
            where = f"{self.at(key)}[{index}]"
            try:
                if not (isinstance(item, str) and item.strip()):
                    raise ValueError(_not_a_string(item))
                converted.append(convert(item))
            except ValueError as exc:
                self.problems.add(where, str(exc), _item_line(value, index) or self.line_of(key))
        return tuple(converted)

    def variable(self, key: str) -> str | None:
        """The name of an environment variable (never echoed: it may be a pasted secret)."""
        name = self.text(key)
        if name is not None and not env.is_variable_name(name):
            self.problem(key, "must be the name of an environment variable, like REGSWEEP_X")
            return None
        return name


def _item_line(value: object, index: int) -> int | None:
    """The line of item ``index`` of a YAML sequence, when it has one."""
    if isinstance(value, _Seq) and index < len(value.item_lines):
        return value.item_lines[index]
    return None


def _duration_of(value: object) -> timedelta:
    if not isinstance(value, str):
        raise ValueError(_DURATION_HINT)
    return parse_duration(value)


# -- registry, redis, sweep, hooks --------------------------------------------------------


def _registry(top: _Section, environ: Mapping[str, str]) -> RegistrySettings:
    section = top.section("registry", _REGISTRY_KEYS, required=True)
    username = section.text("username")
    return RegistrySettings(
        url=_registry_url(section),
        username=username,
        password=_registry_password(section, username, environ),
        ca_file=section.text("ca_file"),
        concurrency=section.integer("concurrency", low=1, high=MAX_CONCURRENCY)
        or DEFAULT_CONCURRENCY,
        storage_path=_storage_path(section),
    )


def _storage_path(section: _Section) -> str | None:
    """Only its form here: the service shares the file but not the registry's volume, so the
    directory is checked where it is read (the CLI, the workers) and by ``check-config``."""
    path = section.text("storage_path")
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _audit_path(top: _Section, source: str) -> tuple[str, bool]:
    """The JSONL audit file: ``audit.path``, relative to the policy file's directory, by
    default ``regsweep-audit.jsonl`` beside it, whatever the working directory is; and
    whether the file names it."""
    given = top.section("audit", ("path",)).text("path")
    base = Path(source).resolve().parent if source and not source.startswith("<") else Path.cwd()
    return str(base / Path(given or DEFAULT_AUDIT_PATH).expanduser()), given is not None


def _registry_url(section: _Section) -> str:
    url = section.text("url", required=True)
    if url is None:
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        section.problem("url", "must be an http:// or https:// URL with a host")
    elif parts.username is not None or parts.password is not None:
        section.problem("url", "must not hold credentials: use username and password_env")
    elif parts.query or parts.fragment:
        section.problem("url", "must not have a query or a fragment")
    elif parts.path.rstrip("/").endswith("/v2"):
        section.problem("url", "must be the registry's base URL, without /v2")
    return url.rstrip("/")


def _registry_password(
    section: _Section, username: str | None, environ: Mapping[str, str]
) -> Secret | None:
    name = section.variable("password_env")
    if username is None:
        if name is not None:
            section.problem("password_env", "needs username")
        return None
    if name is None:
        if not section.has("password_env"):
            section.problem("password_env", "required with username")
        return None
    password = env.secret(environ, name)
    if password is None:
        section.problem(
            "password_env",
            f"names an environment variable that is not set: {env.shown_name(name)} "
            "(export it, non-empty, where regsweep runs)",
        )
    return password


def _is_redis_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    return parts.scheme in ("redis", "rediss") and bool(parts.hostname)


def _redis_url(top: _Section, environ: Mapping[str, str]) -> str | None:
    # The URL may hold a password, so neither message repeats it.
    from_file = top.section("redis", ("url",)).text("url")
    if from_file is not None and not _is_redis_url(from_file):
        top.problem("redis.url", "must be a redis://, rediss:// or unix:// URL")
    override = env.redis_url(environ)
    if override is None:
        return from_file
    if not _is_redis_url(override):
        top.problems.add(f"${env.REDIS_URL_VAR}", "must be a redis://, rediss:// or unix:// URL")
    return override


def _sweep_every(top: _Section) -> timedelta:
    return top.section("sweep", ("every",)).duration("every") or DEFAULT_SWEEP_EVERY


def _hooks(top: _Section, environ: Mapping[str, str]) -> HookSettings:
    section = top.section("hooks", _HOOK_KEYS)
    unset: list[str] = []
    variables: list[tuple[str, str]] = []

    def secret(key: str) -> Secret | None:
        # An unset variable disables its hook (404): the service starts and warns,
        # check-config refuses it (HookSettings.unset).
        name = section.variable(key)
        value = None if name is None else env.secret(environ, name)
        if name is not None:
            variables.append((f"hooks.{key}", env.shown_name(name)))
        if name is not None and value is None:
            unset.append(f"hooks.{key}")
        return value

    signing_key = secret("gitlab_signing_key_env")
    if signing_key is not None and not valid_signing_key(signing_key):
        # Every signed delivery would then be refused; never echo the value.
        section.problem(
            "gitlab_signing_key_env",
            "names a variable that does not hold a Standard Webhooks key (whsec_ and base64)",
        )
        signing_key = None
    return HookSettings(
        registry_token=secret("registry_token_env"),
        github_secret=secret("github_secret_env"),
        gitlab_token=secret("gitlab_token_env"),
        gitlab_signing_key=signing_key,
        api_token=secret("api_token_env"),
        viewer_token=secret("viewer_token_env"),
        metrics_token=secret("metrics_token_env"),
        metrics_listen=_listen_address(section, "metrics_listen"),
        body_limit=section.integer("body_limit", low=MIN_BODY_LIMIT) or DEFAULT_BODY_LIMIT,
        head_limit=section.integer("head_limit", low=MIN_HEAD_LIMIT) or DEFAULT_HEAD_LIMIT,
        head_timeout=section.duration("head_timeout") or DEFAULT_HEAD_TIMEOUT,
        body_timeout=section.duration("body_timeout") or DEFAULT_BODY_TIMEOUT,
        max_connections=section.integer("max_connections", low=1) or DEFAULT_MAX_CONNECTIONS,
        max_queued_jobs=section.integer("max_queued_jobs", low=1) or DEFAULT_MAX_QUEUED_JOBS,
        max_queued_jobs_per_token=section.integer("max_queued_jobs_per_token", low=1)
        or DEFAULT_MAX_QUEUED_JOBS_PER_TOKEN,
        unset=tuple(sorted(unset)),
        variables=tuple(variables),
    )


def _listen_address(section: _Section, key: str) -> str | None:
    """``host:port`` (``[v6]:port`` for IPv6), port 1-65535."""
    value = section.text(key)
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        section.problem(key, "must be host:port, like 127.0.0.1:9100 or [::1]:9100")
        return None
    return value


def valid_signing_key(key: Secret) -> bool:
    """``whsec_<base64>`` (the prefix optional), at least 16 bytes once decoded."""
    value = key.reveal().removeprefix(SIGNING_KEY_PREFIX)
    try:
        return len(base64.b64decode(value, validate=True)) >= MIN_SIGNING_KEY_BYTES
    except binascii.Error:
        return False


# -- policies -----------------------------------------------------------------------------


def _policies(top: _Section) -> tuple[Policy, ...]:
    raw = top.get("policies")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        top.problem("policies", "must be a list of policies")
        return ()
    policies = tuple(
        _policy(item, index, top.problems, _item_line(raw, index)) for index, item in enumerate(raw)
    )
    _check_unique_names(policies, top.problems, raw)
    _check_shadowed_repositories(policies, top.problems, raw)
    return policies


def _policy_path(index: int, name: str) -> str:
    return f"policies[{index}] ({name})" if name else f"policies[{index}]"


def _policy(value: object, index: int, problems: _Problems, line: int | None) -> Policy:
    # The name goes into every path of this policy, so it is read before the rest.
    peeked = value.get("name") if isinstance(value, dict) else None
    name = peeked if isinstance(peeked, str) and peeked.strip() else ""
    path = _policy_path(index, name)
    section = _Section(value, path, problems, _POLICY_KEYS, list_item=True, line=line)
    section.text("name", required=True)
    return Policy(
        name=name,
        repositories=section.strings("repositories", _repository_pattern, required=True),
        mode=_mode(section),
        protect=section.strings("protect", _tag_pattern),
        keep=_keep_rules(section),
        untagged_delete_after=_untagged(section),
        on=_event_templates(section),
        sources=_sources(section),
        age_from=_age_from(section),
    )


def _age_from(section: _Section) -> AgeSource:
    value = section.text("age_from")
    if value is None:
        return AgeSource.PUSH
    if value not in {source.value for source in AgeSource}:
        section.problem("age_from", "must be push or build_time")
        return AgeSource.PUSH
    return AgeSource(value)


def _event_templates(section: _Section) -> EventTemplates:
    on = section.section("on", tuple(_EVENT_FIELDS))
    templates = EventTemplates(
        pull_request_closed=_templates(on, "pull_request_closed"),
        branch_deleted=_templates(on, "branch_deleted"),
    )
    # CI events reach a policy only through its sources: templates without them never fire.
    if (templates.pull_request_closed or templates.branch_deleted) and not section.has("sources"):
        section.problem("on", "has no effect without sources (github: or gitlab: projects)")
    return templates


def _line_in(
    raw: Sequence[object], index: int, key: str, position: int | None = None
) -> int | None:
    """The line of ``raw[index][key]`` (of its item ``position``), where YAML gave one."""
    item = raw[index] if index < len(raw) else None
    if not isinstance(item, _Map):
        return None
    if position is not None:
        return _item_line(item.get(key), position) or item.key_lines.get(key)
    return item.key_lines.get(key) or item.line


def _check_unique_names(
    policies: Sequence[Policy], problems: _Problems, raw: Sequence[object]
) -> None:
    first: dict[str, int] = {}
    for index, policy in enumerate(policies):
        if not policy.name:
            continue
        if policy.name in first:
            where = f"{_policy_path(index, policy.name)}.name"
            message = f"policies[{first[policy.name]}] already has this name: rename one"
            problems.add(where, message, _line_in(raw, index, "name"))
        first.setdefault(policy.name, index)


def _check_shadowed_repositories(
    policies: Sequence[Policy], problems: _Problems, raw: Sequence[object]
) -> None:
    # A repository uses the first policy that matches it, so a later pattern that
    # an earlier policy already covers can never take effect. Only exact names and
    # identical globs are checked: glob-covers-glob is not worth its complexity.
    for index, policy in enumerate(policies):
        for position, pattern in enumerate(policy.repositories):
            earlier = _covering_policy(policies[:index], pattern)
            if earlier is not None:
                where = f"{_policy_path(index, policy.name)}.repositories[{position}]"
                line = _line_in(raw, index, "repositories", position)
                problems.add(where, f"never used: {earlier} comes first and matches it", line)


def _covering_policy(earlier: Sequence[Policy], pattern: RepositoryPattern) -> str | None:
    is_literal = not any(char in pattern.source for char in "*?")
    for index, policy in enumerate(earlier):
        for other in policy.repositories:
            if other.source == pattern.source or (is_literal and other.matches(pattern.source)):
                return _policy_path(index, policy.name)
    return None


def _mode(section: _Section) -> Mode:
    value = section.text("mode")
    if value is None:
        return Mode.DRY_RUN
    if value not in {mode.value for mode in Mode}:
        section.problem("mode", "must be dry-run or enforce")
        return Mode.DRY_RUN
    return Mode(value)


def _repository_pattern(text: str) -> RepositoryPattern:
    if text.startswith("re:"):
        raise ValueError("repositories are globs; re: is only for tag patterns")
    if text.startswith("/") or text.endswith("/") or "//" in text:
        raise ValueError("must not start or end with / nor contain //")
    problem = repository_glob_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return RepositoryPattern.compile(text)


def _tag_pattern(text: str) -> TagPattern:
    if text.strip() == "re:":
        raise ValueError("the regular expression after re: is empty")
    problem = None if text.startswith("re:") else tag_glob_problem(text)
    if problem is not None:
        raise ValueError(problem)
    try:
        return TagPattern.compile(text)
    except re.error as exc:
        raise ValueError(f"bad regular expression in {text!r}: {exc}") from None


def _keep_rules(section: _Section) -> tuple[KeepRule, ...] | None:
    raw = section.get("keep")
    if raw is None:
        return None
    if not isinstance(raw, list):
        section.problem("keep", "must be a list of rules")
        return None
    if not raw:
        # `keep: []` would keep nothing, i.e. delete every unprotected tag: too
        # easy to write by accident to mean "no retention".
        section.problem("keep", "must list at least one rule (leave keep out for no retention)")
        return None
    return tuple(
        _keep_rule(item, index, section, _item_line(raw, index)) for index, item in enumerate(raw)
    )


def _keep_rule(value: object, index: int, policy: _Section, line: int | None) -> KeepRule:
    path = f"{policy.at('keep')}[{index}]"
    rule = _Section(value, path, policy.problems, _KEEP_KEYS, list_item=True, line=line)
    return KeepRule(
        index=index,
        tags=rule.strings("tags", _tag_pattern, required=True),
        newest=rule.integer("newest", low=1),
        pushed_within=rule.duration("pushed_within"),
    )


def _untagged(section: _Section) -> timedelta | None:
    if not section.has("untagged"):
        return None
    untagged = section.section("untagged", ("delete_after",))
    return untagged.duration("delete_after", zero_ok=True, required=True)


def _templates(on: _Section, event: str) -> tuple[str, ...]:
    return on.strings(event, partial(_template, allowed=_EVENT_FIELDS[event]))


def _template(text: str, allowed: Sequence[str]) -> str:
    offered = ", ".join(f"{{{name}}}" for name in allowed)
    try:
        fields = [part for part in string.Formatter().parse(text) if part[1] is not None]
    except ValueError as exc:
        message = f"bad template {text!r}: {exc} (write {{{{ and }}}} for literal braces)"
        raise ValueError(message) from None
    for _, name, spec, conversion in fields:
        if name not in allowed:
            raise ValueError(f"unknown field {{{name}}} in {text!r}; this event offers {offered}")
        if spec or conversion:
            raise ValueError(f"{{{name}}} in {text!r} takes no conversion or format spec")
    if not fields:
        # A template without a field names the same tags on every event.
        raise ValueError(f"{text!r} uses none of {offered}")
    _tag_pattern(text.format(**_SAMPLE_FIELDS))
    return text


def _sources(section: _Section) -> Sources:
    sources = section.section("sources", ("github", "gitlab"))
    return Sources(
        github=sources.strings("github", _github_project),
        gitlab=sources.strings("gitlab", _gitlab_project),
    )


def _github_project(text: str) -> RepositoryPattern:
    segments = text.split("/")
    if len(segments) != 2 or not all(segments):
        raise ValueError("must look like owner/name")
    return RepositoryPattern.compile(text)


def _gitlab_project(text: str) -> RepositoryPattern:
    # GitLab nests groups: group/subgroup/project.
    segments = text.split("/")
    if len(segments) < 2 or not all(segments):
        raise ValueError("must look like group/project or group/subgroup/project")
    return RepositoryPattern.compile(text)


# -- maintenance --------------------------------------------------------------------------


def _maintenance(top: _Section) -> MaintenanceSettings:
    section = top.section("maintenance", _MAINTENANCE_KEYS)
    window = section.section("window", _WINDOW_KEYS)
    duration = window.duration("duration") or DEFAULT_WINDOW_DURATION
    margin = window.duration("margin", zero_ok=True)
    if margin is not None and margin >= duration:
        window.problem("margin", "must be shorter than the window's duration")
    elif margin is None and duration <= DEFAULT_WINDOW_MARGIN:
        # Beat's GC starts only with the margin left: such a window never runs one.
        window.problem(
            "duration",
            f"must be longer than the margin ({DEFAULT_WINDOW_MARGIN.seconds // 60}m "
            "unless maintenance.window.margin says otherwise)",
        )
    cron = _cron(window)
    _check_delete_untagged(section)
    return MaintenanceSettings(
        window_cron=cron,
        window_duration=duration,
        window_margin=DEFAULT_WINDOW_MARGIN if margin is None else margin,
        controller=_controller(section),
        registry_version=_registry_version(section),
        storage_prune=_flag(section, "storage_prune"),
        gc_grace=_gc_grace(section),
        remove_empty_repositories=_flag(section, "remove_empty_repositories"),
    )


def _flag(section: _Section, key: str) -> bool:
    value = section.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    section.problem(key, "must be true or false")
    return False


def _gc_grace(section: _Section) -> GcGrace:
    """``next-window`` (the default) or ``0``; any longer wait would have to hold back every
    GC, the API prunes' reclaim with it (docs/safety.md)."""
    value = section.get("gc_grace")
    if value is None:
        return GcGrace.NEXT_WINDOW
    text = "" if isinstance(value, bool) else str(value).strip()
    if text in ("0", "0s"):
        return GcGrace.NONE
    if text == GcGrace.NEXT_WINDOW.value:
        return GcGrace.NEXT_WINDOW
    section.problem("gc_grace", "must be next-window (the default) or 0 (this window's GC)")
    return GcGrace.NEXT_WINDOW


def _cron(window: _Section) -> str | None:
    expression = window.text("cron", required=True)
    if expression is None:
        return None
    # croniter also takes a sixth (seconds) field; a window starts on a minute.
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        window.problem("cron", f"{expression!r} is not a 5-field cron expression (UTC)")
        return None
    if not _cron_runs(expression):
        window.problem("cron", f"{expression!r} never fires")
        return None
    return expression


def _cron_runs(expression: str) -> bool:
    """Whether croniter, which both beat and the window rules use, finds a fire time of
    ``expression`` before and after now (``0 0 30 2 *`` parses and never fires)."""
    try:
        now = datetime.now(UTC)
        croniter(expression, now).get_next(datetime)
        croniter(expression, now).get_prev(datetime)
    except (ValueError, KeyError, TypeError):  # croniter's own errors are ValueErrors
        return False
    return True


def _check_delete_untagged(section: _Section) -> None:
    """``gc.delete_untagged`` is read for its problems only: nothing is ever passed."""
    gc = section.section("gc", ("delete_untagged",))
    value = gc.get("delete_untagged")
    # isinstance first: 0 == False, and 0 is no answer here.
    if value is None or (isinstance(value, bool | str) and value in _DELETE_UNTAGGED_OFF):
        return
    if value is True or value == "true":
        gc.problem("delete_untagged", _DELETE_UNTAGGED_REFUSED)
        return
    gc.problem("delete_untagged", "must be auto or false")


def _registry_version(section: _Section) -> str | None:
    value = section.get("registry_version")
    if value is None:
        return None
    # Unquoted 3.0 reads as a float; str() gives it back as written.
    text = str(value) if isinstance(value, str | float) else ""
    if _VERSION.fullmatch(text) is None:
        section.problem("registry_version", "must be major.minor, like 2.8 or 3.0")
        return None
    return text


def _controller(section: _Section) -> ControllerSettings | None:
    raw = section.get("controller")
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind == "docker":
        docker = section.section("controller", _DOCKER_KEYS)
        return DockerControllerSettings(
            container=docker.text("container") or DockerControllerSettings.container,
            config_path=docker.text("config_path"),
        )
    if kind == "process":
        process = section.section("controller", _PROCESS_KEYS)
        return ProcessControllerSettings(
            readonly_command=_command(process, "readonly_command"),
            readwrite_command=_command(process, "readwrite_command"),
            gc_command=_command(process, "gc_command"),
            storage_path=process.text("storage_path"),
            config_path=process.text("config_path"),
        )
    if raw is None:
        return None
    if not isinstance(raw, dict):
        section.problem("controller", "must be a mapping")
    else:
        message = "required: docker or process" if kind is None else "must be docker or process"
        section.problem("controller.kind", message)
    return None


def _command(controller: _Section, key: str) -> str:
    command = controller.text(key, required=True)
    if command is None:
        return ""
    # A YAML block scalar ends in a newline, which the shell would read as the end of the
    # command: whatever regsweep appends would then run as a command of its own.
    command = command.strip()
    try:
        words = shlex.split(command)
    except ValueError as exc:
        # Not the command itself: it may carry a credential.
        controller.problem(key, f"is not a valid command line: {exc}")
        return ""
    if not words:
        controller.problem(key, "is empty")
    elif key == "gc_command" and (problem := _flags_go_astray(command)) is not None:
        controller.problem(key, problem)
    return command


#: Shell operators after which appended words no longer belong to the command before them.
_SEPARATORS: Final = frozenset({";", "&", "&&", "||", "|", "|&", ";;"})


def _flags_go_astray(command: str) -> str | None:
    """Why ``--dry-run`` appended to ``command`` (which runs through ``sh``) would not reach
    the garbage collector: a comment would swallow it, or a trailing operator or a
    pipe would hand it to another command. None when it reaches the last command."""
    plain = shlex.shlex(command, posix=True, punctuation_chars=True)
    plain.commenters = ""
    words = list(plain)
    commented = shlex.shlex(command, posix=True, punctuation_chars=True)
    if list(commented) != words:
        return (
            "has a '#' the shell reads as the start of a comment, which would swallow the "
            "--dry-run regsweep appends: quote it, or remove the comment"
        )
    if words[-1] in _SEPARATORS or words[-1] in ("(", ")", "{", "}"):
        return (
            f"ends with {words[-1]!r}: regsweep appends --dry-run / --delete-untagged, so it "
            "must end with the garbage-collect invocation"
        )
    last = max((i for i, w in enumerate(words) if w in _SEPARATORS - {"|", "|&"}), default=-1)
    if any(w in ("|", "|&") for w in words[last + 1 :]):
        return (
            "ends in a pipe: the --dry-run regsweep appends would go to the last command of "
            "the pipe, not to garbage-collect (wrap it in a script)"
        )
    return None


# -- notifications --------------------------------------------------------------------------

_NOTIFY_KEYS: Final = ("name", "kind", "url_env", "events", "timeout", "retries", "give_up_after")
_NOTIFY_KINDS: Final = ("webhook", "slack")
MAX_NOTIFY_RETRIES: Final = 10
MAX_NOTIFY_TIMEOUT: Final = timedelta(minutes=1)
MAX_NOTIFY_GIVE_UP: Final = timedelta(hours=1)


def _notify(top: _Section, environ: Mapping[str, str]) -> NotifySettings:
    raw = top.get("notify")
    if raw is None:
        return NotifySettings()
    if not isinstance(raw, list):
        top.problem("notify", "must be a list of targets (name, kind, url_env, events)")
        return NotifySettings()
    targets: list[NotifyTarget] = []
    unset: list[str] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name in names:
            top.problems.add(f"notify[{index}].name", f"another target is named {name!r}")
        names.add(str(name))
        target = _notify_target(item, index, top.problems, environ, unset)
        if target is not None:
            targets.append(target)
    return NotifySettings(targets=tuple(targets), unset=tuple(unset))


def _notify_target(
    value: object,
    index: int,
    problems: _Problems,
    environ: Mapping[str, str],
    unset: list[str],
) -> NotifyTarget | None:
    peeked = value.get("name") if isinstance(value, dict) else None
    name = peeked if isinstance(peeked, str) and peeked.strip() else ""
    where = f"notify[{index}] ({name})" if name else f"notify[{index}]"
    section = _Section(value, where, problems, _NOTIFY_KEYS, list_item=True)
    section.text("name", required=True)
    kind = section.text("kind", required=True)
    if kind is not None and kind not in _NOTIFY_KINDS:
        section.problem("kind", "must be webhook (JSON POST) or slack (Slack incoming webhook)")
    url = _notify_url(section, environ, unset)
    events = section.strings("events", _notify_event)
    timeout = _bounded(section, "timeout", DEFAULT_NOTIFY_TIMEOUT, MAX_NOTIFY_TIMEOUT)
    give_up = _bounded(section, "give_up_after", DEFAULT_NOTIFY_GIVE_UP, MAX_NOTIFY_GIVE_UP)
    if give_up < timeout:
        section.problem("give_up_after", "must be at least the timeout of one attempt")
    retries = section.integer("retries", low=0, high=MAX_NOTIFY_RETRIES)
    if not name or kind not in _NOTIFY_KINDS or url is None:
        return None
    return NotifyTarget(
        name=name,
        kind="slack" if kind == "slack" else "webhook",
        url=url,
        events=frozenset(events) if section.has("events") else frozenset(NOTIFY_EVENTS),
        timeout=timeout,
        retries=DEFAULT_NOTIFY_RETRIES if retries is None else retries,
        give_up_after=give_up,
    )


def _notify_url(section: _Section, environ: Mapping[str, str], unset: list[str]) -> Secret | None:
    """The URL from the variable ``url_env`` names; an unset variable turns the target off
    (named in ``unset``: a variable's name is never a URL, so saying it gives nothing away)."""
    if not section.has("url_env"):
        section.get("url_env", required=True)
        return None
    name = section.variable("url_env")
    if name is None:
        return None
    url = env.secret(environ, name)
    if url is None:
        unset.append(f"{section.at('url_env')}: {name} is not set, so this target is off")
        return None
    if not _is_http_url(url.reveal()):
        # Never the value: it is the secret.
        section.problem("url_env", f"{name} does not hold an http:// or https:// URL")
        return None
    return url


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _notify_event(text: str) -> str:
    if text not in NOTIFY_EVENTS:
        close = difflib.get_close_matches(text, NOTIFY_EVENTS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"one of: {', '.join(NOTIFY_EVENTS)}"
        raise ValueError(f"unknown event {text!r} ({hint})")
    return text


def _bounded(section: _Section, key: str, default: timedelta, most: timedelta) -> timedelta:
    value = section.duration(key)
    if value is None:
        return default
    if value > most:
        section.problem(key, f"must be at most {_short_duration(most)}")
        return default
    return value


def _short_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds // 60}m"
