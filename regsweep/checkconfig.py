"""``regsweep check-config [--online] [--json]``: every problem of the policy file at once.

It loads the file strictly (:mod:`worker.settings.local`: the files and variables
the file names must serve here too), so it runs before, and instead of, the
plain load every other command does: a file that fails it still gets all of its
problems listed, as text or JSON. With ``--online`` the live parts are asked too
(:mod:`regsweep.online`).

Exit codes: 0 ok, 1 an online check failed, 2 the file has problems.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any, Final

from regsweep import online
from worker.errors import ConfigError
from worker.settings.load import load_config
from worker.settings.model import Config

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_CONFIG: Final = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--online",
        action="store_true",
        help="also check the registry, its credentials and deletes, storage_path and Redis",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def check_config(args: argparse.Namespace, path: str, environ: Mapping[str, str]) -> int:
    """Load ``path`` strictly, print what is wrong or what it holds, then the online checks."""
    as_json = bool(getattr(args, "json", False))
    try:
        config = load_config(path, environ, strict=True)
    except ConfigError as exc:
        if as_json:
            _print_json({"config": path, "ok": False, "problems": exc.problems})
        else:
            print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_CONFIG
    checks = asyncio.run(online.online_checks(config)) if args.online else []
    failed = online.failed(checks)
    if as_json:
        _print_json(_summary(config) | {"ok": not failed, "checks": [c.json() for c in checks]})
    else:
        _print_text(config, checks)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _summary(config: Config) -> dict[str, Any]:
    return {
        "config": config.source,
        "problems": [],
        "policies": [
            {
                "name": policy.name,
                "mode": policy.mode.value,
                "repositories": [p.source for p in policy.repositories],
            }
            for policy in config.policies
        ],
    }


def _print_text(config: Config, checks: list[online.Check]) -> None:
    print(f"{config.source}: ok, {len(config.policies)} policies")
    for policy in config.policies:
        repos = ", ".join(p.source for p in policy.repositories)
        print(f"  {policy.name} ({policy.mode.value}): {repos}")
    if checks:
        print(online.render(checks))


def _print_json(document: dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2)
    print()
