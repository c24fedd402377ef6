"""Shared fixtures: a real registry per session (and fresh repositories per test).

A test that takes ``registry_binary`` (or is marked ``usefixtures("registry_binary")``)
runs once per registry version, 2.8.2 and 3.x (``tests/harness/registry.py``), and its
``registry``, ``images`` and ``registry_container`` are that version's; every other test
gets 2.8.2. Where no 3.x binary can be had (``../shared`` absent: a user's own clone)
the 3.x runs are skipped with that reason; with ``$REGSWEEP_REQUIRE_V3`` set (CI) they fail.
"""

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
    registry_image,
    remove_session_containers,
)
from tests.harness.images import ImageBuilder
from tests.harness.registry import (
    DISTRIBUTION_2,
    REQUIRE_V3_ENV,
    VERSIONS,
    RegistryBinary,
    RegistryProcess,
    RegistryUnavailable,
    v3_required,
)
from tests.harness.registry import registry_binary as binary_of

_repo_counter = itertools.count()


def _binary(version: str) -> RegistryBinary:
    try:
        return binary_of(version)
    except RegistryUnavailable as exc:
        if v3_required():
            pytest.fail(f"{exc}; ${REQUIRE_V3_ENV} is set, so the 3.x runs may not be skipped")
        pytest.skip(str(exc))


@pytest.fixture(params=VERSIONS)
def registry_binary(request: pytest.FixtureRequest) -> RegistryBinary:
    """The registry binary of this run of the test: once 2.8.2, once 3.x."""
    return _binary(request.param)


@pytest.fixture
def registry_binary_3() -> RegistryBinary:
    """Distribution 3.x, for a test of what only 3.x does (or does differently)."""
    return _binary("3.x")


def binary_for(request: pytest.FixtureRequest) -> RegistryBinary:
    """The version this test runs on: its ``registry_binary``, else 2.8.2."""
    if "registry_binary" in request.fixturenames:
        binary: RegistryBinary = request.getfixturevalue("registry_binary")
        return binary
    return DISTRIBUTION_2


class SessionRegistries:
    """One plain registry per version, started when a test first asks for it."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._started: dict[str, RegistryProcess] = {}

    def get(self, binary: RegistryBinary) -> RegistryProcess:
        if binary.path not in self._started:
            reg = RegistryProcess.create(
                self._factory.mktemp(f"registry-{binary.version}"), binary=binary
            )
            reg.start()
            self._started[binary.path] = reg
        return self._started[binary.path]

    def stop(self) -> None:
        for reg in self._started.values():
            reg.stop()


@pytest.fixture(scope="session")
def session_registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionRegistries]:
    registries = SessionRegistries(tmp_path_factory)
    yield registries
    registries.stop()


@pytest.fixture
def registry(
    request: pytest.FixtureRequest, session_registries: SessionRegistries
) -> RegistryProcess:
    """A plain registry (no auth, deletes enabled) shared by the session: 2.8.2, or the
    ``registry_binary`` of a test that takes it."""
    return session_registries.get(binary_for(request))


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses, so tests can share one registry."""
    base = request.node.name.lower().replace("[", "-").replace("]", "")
    safe = "".join(c if c.isalnum() else "-" for c in base).strip("-")[:40]
    return f"t/{safe}-{next(_repo_counter)}"


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache directory of the test's own (the CLI keeps build times and manifests there), so
    no test sees what another one cached."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


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
    request: pytest.FixtureRequest,
    docker_session: tuple[docker.DockerClient, str],
    tmp_path: Path,
) -> Iterator[RegistryContainer]:
    """A fresh registry container: host network, bind-mounted storage, compose labels,
    restart policy ``unless-stopped`` and an anonymous volume at /scratch; the image of the
    test's registry version (``local/registry:2.8.2``, ``local/registry:3.1.0``)."""
    client, session = docker_session
    image = registry_image(binary_for(request))
    made = RegistryContainer.start(client, tmp_path / "storage", session, image=image)
    yield made
    made.remove()
