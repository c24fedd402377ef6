"""Shared fixtures: a real registry per session (and fresh repositories per test)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.harness.auth import AuthRegistry, TokenIssuer, write_htpasswd
from tests.harness.docker import (
    RegistryContainer,
    docker_engine,
    new_session_id,
    remove_session_containers,
)
from tests.harness.images import ImageBuilder
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


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """A 2.8.2 registry behind htpasswd Basic auth, with one bcrypt user."""
    root = tmp_path_factory.mktemp("registry-htpasswd")
    username, password = "regsweep", secrets.token_urlsafe(12)
    htpasswd = root / "htpasswd"
    write_htpasswd(htpasswd, {username: password})
    auth = {"htpasswd": {"realm": "regsweep-test", "path": str(htpasswd)}}
    reg = RegistryProcess.create(root, {"auth": auth})
    reg.start()
    yield AuthRegistry(reg, username, password)
    reg.stop()


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """A 2.8.2 registry behind token auth, trusting a real RS256 token issuer the tests run.

    ``.issuer`` has two users: ``.username`` (every action) and ``reader`` (pull only,
    password in ``.issuer.users["reader"]``). Call ``.issuer.reset()`` after changing it.
    """
    root = tmp_path_factory.mktemp("registry-token")
    username, password = "regsweep", secrets.token_urlsafe(12)
    issuer = TokenIssuer.create(
        {username: password, "reader": secrets.token_urlsafe(12)},
        permissions={"reader": frozenset({"pull"})},
    )
    issuer.start()
    bundle = root / "token-ca.pem"
    issuer.write_certificate(bundle)
    reg = RegistryProcess.create(root, {"auth": issuer.registry_auth_config(bundle)})
    reg.start()
    yield AuthRegistry(reg, username, password, issuer)
    reg.stop()
    issuer.stop()


@pytest.fixture
def images(registry: RegistryProcess) -> Iterator[ImageBuilder]:
    """An image builder pushing into the plain session registry."""
    with ImageBuilder.connect(registry.url) as builder:
        yield builder


@pytest.fixture
def registry_token_reset(registry_token: AuthRegistry) -> Iterator[AuthRegistry]:
    """The token registry, its issuer's records cleared before and its settings restored after."""
    assert registry_token.issuer is not None
    registry_token.issuer.reset()
    yield registry_token
    registry_token.issuer.reset()


# --- Docker: a real dockerd and registry containers made from Debian's binary ---------------


@pytest.fixture(scope="session")
def docker_session() -> Iterator[tuple[docker.DockerClient, str]]:
    """dockerd up and local/registry:2.8.2 built (``.ci/dockerd.sh``), plus this session's id.

    Every container the session made (recreated ones included) is removed at its end.
    """
    client = docker_engine()
    session = new_session_id()
    yield client, session
    remove_session_containers(client, session)
    client.close()


@pytest.fixture
def registry_container(
    docker_session: tuple[docker.DockerClient, str], tmp_path: Path
) -> Iterator[RegistryContainer]:
    """A fresh registry container: host network, bind-mounted storage, compose labels,
    restart policy ``unless-stopped`` and an anonymous volume at /scratch."""
    client, session = docker_session
    made = RegistryContainer.start(client, tmp_path / "storage", session)
    yield made
    made.remove()
