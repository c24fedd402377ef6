"""Shared fixtures: a real registry per session (and fresh repositories per test)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.registry import RegistryProcess

_repo_counter = itertools.count()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A plain 2.8.2 registry (no auth, deletes enabled) shared by the session."""
    reg = RegistryProcess.create(tmp_path_factory.mktemp("registry"))
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses, so tests can share one registry."""
    base = request.node.name.lower().replace("[", "-").replace("]", "")
    safe = "".join(c if c.isalnum() else "-" for c in base).strip("-")[:40]
    return f"t/{safe}-{next(_repo_counter)}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
