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

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from worker.errors import ConfigError
from worker.settings import env
from worker.settings.local import local_problems
from worker.settings.model import (
    DEFAULT_RESTORE_HOLD,
    Config,
)
from worker.settings.sections.hooks import parse_hooks
from worker.settings.sections.maintenance import parse_maintenance
from worker.settings.sections.notify import parse_notify
from worker.settings.sections.policies import parse_policies
from worker.settings.sections.registry import (
    parse_audit_path,
    parse_redis_url,
    parse_registry,
    parse_sweep_every,
)
from worker.settings.validate import Problems, Section
from worker.settings.yamlfile import load_yaml

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
    problems = Problems(source)
    top = Section(load_yaml(text, source, problems.lines), "", problems, _TOP_KEYS)
    registry = parse_registry(top, environ)
    redis_url = parse_redis_url(top, environ)
    sweep_every = parse_sweep_every(top)
    hooks = parse_hooks(top, environ)
    policies = parse_policies(top)
    maintenance = parse_maintenance(top)
    audit_path, audit_given = parse_audit_path(top, source)
    restore_hold = top.section("restore", ("hold",)).duration("hold") or DEFAULT_RESTORE_HOLD
    notify = parse_notify(top, environ)
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
