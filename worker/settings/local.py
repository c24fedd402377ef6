"""What ``check-config`` adds to loading: whether this machine can do what the file asks.

Loading checks the file; these check the files and variables it names, here:
the CA bundle, the registry's storage, the audit log's directory, the hook
secrets. They are not part of every load because the processes share one
policy file but not one machine (the service reads no registry storage and
makes no registry calls). Each problem is a (key, message) pair, the message
saying what to do.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Final

from worker.registry.storage import check_storage_root, layout_problem
from worker.settings.model import DEFAULT_AUDIT_PATH, HookSettings, RegistrySettings

Problem = tuple[str, str]


def local_problems(
    registry: RegistrySettings, hooks: HookSettings, audit_path: str | None, redis_url: str | None
) -> list[Problem]:
    """Every file or variable the settings name that cannot serve here."""
    problems = [*_registry_files(registry), *_unset_hooks(hooks)]
    audit = audit_unwritable(audit_path, redis_url)
    if audit is not None:
        problems.append(("audit.path", audit))
    return problems


def _registry_files(registry: RegistrySettings) -> list[Problem]:
    problems: list[Problem] = []
    if registry.ca_file is not None:
        ca = ca_file_problem(registry.ca_file)
        if ca is not None:
            problems.append(("registry.ca_file", ca))
    if registry.storage_path is not None:
        storage = check_storage_root(registry.storage_path) or layout_problem(registry.storage_path)
        if storage is not None:
            problems.append(("registry.storage_path", f"{registry.storage_path} {storage}"))
    return problems


def ca_file_problem(path: str) -> str | None:
    """Why ``path`` cannot verify the registry's certificate; ``None`` when it can be loaded."""
    file = Path(path).expanduser()
    if not file.exists():
        return f"{path} does not exist (the CA bundle, PEM, that signed the registry's certificate)"
    if not file.is_file():
        return f"{path} is not a file (a PEM bundle of CA certificates)"
    if not os.access(file, os.R_OK):
        return f"{path} is not readable by this user"
    try:
        ssl.create_default_context(cafile=str(file))
    except (ssl.SSLError, ValueError):
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    return None


#: What a configured but unset ``hooks.*_env`` turns off.
_SWITCHED_OFF: Final = {
    "hooks.api_token_env": "the job API answers 404",
    "hooks.viewer_token_env": "the viewer token signs nobody in",
    "hooks.metrics_token_env": "/metrics answers 404",
}


def _unset_hooks(hooks: HookSettings) -> list[Problem]:
    """Configured hooks whose secret is missing: the service would answer 404 to every
    delivery, a failure no sender reports."""
    return [
        (
            key,
            f"names {hooks.variable(key)}, which is not set: "
            f"{_SWITCHED_OFF.get(key, 'the hook answers 404 to every delivery')} until it is "
            "(export it where regsweep serve runs, or remove the key)",
        )
        for key in hooks.unset
    ]


def audit_unwritable(audit_path: str | None, redis_url: str | None) -> str | None:
    """Why the audit file (used without Redis) cannot be written; None when it can."""
    if redis_url is not None:
        return None
    path = Path(audit_path or DEFAULT_AUDIT_PATH)
    where = path if path.exists() else path.parent
    if not where.exists():
        return f"{path.parent} does not exist (the audit log goes to {path})"
    if not os.access(where, os.W_OK):
        return f"{where} is not writable: every deletion is recorded there first"
    if os.statvfs(where).f_bavail == 0:
        return f"{where}: no space left on device: every deletion is recorded there first"
    return None
