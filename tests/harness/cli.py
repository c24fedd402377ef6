"""Run the ``regsweep`` command as an operator does: a real process, its exit code and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REGSWEEP = [sys.executable, "-m", "regsweep.cli"]


def run(
    *args: str,
    config: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``regsweep [-c config] args...`` (in ``cwd``) with no REGSWEEP_* variable from the
    test's environment (only those in ``env``)."""
    environ = environment()
    cmd = [*REGSWEEP, *(["-c", str(config)] if config else []), *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=environ | dict(env or {}),
        cwd=cwd,
        timeout=180,
        check=False,
    )


def environment() -> dict[str, str]:
    """The test's environment without its REGSWEEP_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}


def write_config(
    path: Path,
    registry_url: str,
    policies: Sequence[Mapping[str, Any]],
    *,
    concurrency: int = 4,
    redis_url: str | None = None,
    audit_path: Path | None = None,
    storage_path: Path | None = None,
) -> Path:
    """A policy file at ``path``: the registry (and its storage), the policies, Redis or an
    audit file."""
    document: dict[str, Any] = {"registry": {"url": registry_url, "concurrency": concurrency}}
    if storage_path is not None:
        document["registry"]["storage_path"] = str(storage_path)
    if redis_url is not None:
        document["redis"] = {"url": redis_url}
    if audit_path is not None:
        document["audit"] = {"path": str(audit_path)}
    document["policies"] = list(policies)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def audit_records(config: Path, *args: str) -> list[dict[str, Any]]:
    """``regsweep audit --json`` as records (it must succeed)."""
    result = run("audit", "--json", *args, config=config)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def by_digest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Audit records by digest (the last one of each)."""
    return {r["digest"]: r for r in records}
