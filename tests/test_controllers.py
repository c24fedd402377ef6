"""Registry controllers driving the real registry, 2.8.2 and 3.x: as a process, and in a real
dockerd (local/registry:2.8.2 and local/registry:3.1.0, laid out like registry:2.8 and
registry:3)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from tests.harness.docker import (
    CONFIG_PATH,
    CONFIG_PATH_3,
    REGISTRY_IMAGE,
    SESSION_LABEL,
    RegistryContainer,
    remove_with_volumes,
)
from tests.harness.images import ImageBuilder, PushedImage, PushError, random_layer
from tests.harness.maintenance import ProcessRegistry
from tests.harness.registry import REGISTRY_BINARY, RegistryBinary
from worker.errors import ControllerError
from worker.maintenance.controllers import (
    BACKUP_SUFFIX,
    READONLY_ENV,
    READONLY_VALUE,
    DockerController,
    ProcessController,
    RegistryController,
    served_config,
)
from worker.maintenance.gc import GcResult, parse_gc_output
from worker.settings.model import DockerControllerSettings, ProcessControllerSettings

LAYER_SIZE = 256 * 1024


# --------------------------------------------------------------------------- helpers


def wait_until_answers(url: str, timeout: float = 15.0) -> None:
    """What the GC job does after a switch: wait until ``GET /v2/`` answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def push(builder: ImageBuilder, repository: str, tag: str) -> PushedImage:
    return builder.image(repository, tag, layers=[random_layer(LAYER_SIZE)])


def delete_manifest(builder: ImageBuilder, repository: str, digest: str) -> httpx.Response:
    return builder.client.delete(f"/v2/{repository}/manifests/{digest}")


def assert_refuses_writes(builder: ImageBuilder, repository: str, digest: str) -> None:
    """A read-only registry answers writes with 405, a plain-text body and an Allow header."""
    for response in (
        builder.client.post(f"/v2/{repository}/blobs/uploads/"),
        delete_manifest(builder, repository, digest),
    ):
        assert response.status_code == 405, response.text
        assert response.headers["Content-Type"].startswith("text/plain")
        assert "Allow" in response.headers
    with pytest.raises(PushError) as refused:
        push(builder, repository, "refused")
    assert refused.value.status == 405


def make_garbage(builder: ImageBuilder, repository: str) -> tuple[PushedImage, PushedImage]:
    """Push two images and delete the first by digest; returns (kept, deleted)."""
    deleted = push(builder, repository, "old")
    kept = push(builder, repository, "new")
    assert delete_manifest(builder, repository, deleted.digest).status_code == 202
    return kept, deleted


def assert_collected(result: GcResult, seen: list[str]) -> None:
    """A clean, real GC that swept the deleted image's manifest, config and layer blobs."""
    assert result.ok, result.lines_tail
    assert result.exit_code == 0
    assert not result.dry_run
    assert result.repositories >= 1
    assert result.manifests_marked >= 1
    assert result.blobs_eligible >= 3
    assert result.blobs_deleted == result.blobs_eligible
    assert any(line.startswith("blob eligible for deletion: sha256:") for line in seen)
    assert result.lines_tail == tuple(seen[-len(result.lines_tail) :])


# --------------------------------------------------------------------------- process


@pytest.fixture
def process_registry(tmp_path: Path) -> Iterator[ProcessRegistry]:
    """Two configs (read-write, read-only) on one storage and a restart script for each."""
    # Warn level, as Debian ships it: the GC's per-blob lines are not printed.
    made = ProcessRegistry.create(tmp_path, log_level="warn")
    yield made
    made.stop()


@pytest.fixture
def versioned_process_registry(
    tmp_path: Path, registry_binary: RegistryBinary
) -> Iterator[ProcessRegistry]:
    """:func:`process_registry` of the test's registry version."""
    made = ProcessRegistry.create(tmp_path, log_level="warn", binary=registry_binary)
    yield made
    made.stop()


def test_process_controller_full_cycle(versioned_process_registry: ProcessRegistry) -> None:
    """Through shell commands the real registry (2.8.2 and 3.x) goes read-only, GC reclaims
    bytes, and writes work again after the switch back."""
    process_registry = versioned_process_registry
    controller = ProcessController(process_registry.settings)
    assert isinstance(controller, RegistryController)
    controller.set_readonly(False)
    wait_until_answers(process_registry.url)
    with ImageBuilder.connect(process_registry.url) as builder:
        kept, deleted = make_garbage(builder, "team/app")

        controller.set_readonly(True)
        wait_until_answers(process_registry.url)
        assert controller.is_readonly()
        assert_refuses_writes(builder, "team/app", kept.digest)

        before = controller.storage_bytes()
        seen: list[str] = []
        result = controller.run_gc(dry_run=False, on_line=seen.append)
        after = controller.storage_bytes()
        assert before is not None and after is not None
        assert before - after >= LAYER_SIZE
        assert_collected(result, seen)
        # The harness config logs at warn, hiding "Deleting blob" lines: counts are derived.
        assert not any("Deleting blob" in line for line in seen)

        controller.set_readonly(False)
        wait_until_answers(process_registry.url)
        assert not controller.is_readonly()
        assert builder.manifest_exists("team/app", kept.digest)
        assert not builder.blob_exists("team/app", deleted.layer_digests[0])
        assert push(builder, "team/app", "after").digest


def test_process_dry_run_reports_without_deleting(process_registry: ProcessRegistry) -> None:
    """A dry run counts the blobs GC would remove, never an untagged manifest (no
    --delete-untagged), deletes nothing, and survives a listener that raises on every line."""
    controller = ProcessController(process_registry.settings)
    controller.set_readonly(False)
    wait_until_answers(process_registry.url)
    with ImageBuilder.connect(process_registry.url) as builder:
        make_garbage(builder, "team/dry")
        push(builder, "team/dry", "new")  # the previous "new" is now untagged
    before = controller.storage_bytes()

    def broken_listener(line: str) -> None:
        raise RuntimeError("listener down")

    result = controller.run_gc(dry_run=True, on_line=broken_listener)
    assert result.ok and result.dry_run
    assert result.manifests_eligible == 0
    assert result.blobs_eligible >= 3
    assert (result.blobs_deleted, result.manifests_deleted) == (0, 0)
    assert not any("manifest eligible" in line for line in result.lines_tail)
    assert controller.storage_bytes() == before


def test_process_gc_failure_is_an_exit_code(tmp_path: Path) -> None:
    """GC on a config that does not exist comes back as exit code 1 with the registry's error."""
    settings = ProcessControllerSettings(
        readonly_command="true",
        readwrite_command="true",
        gc_command=f"{REGISTRY_BINARY} garbage-collect {tmp_path / 'missing.yml'}",
    )
    result = ProcessController(settings).run_gc(dry_run=False)
    assert result.exit_code == 1
    assert not result.ok and not result.completed
    assert result.error is not None and result.error.startswith("configuration error")


def test_process_unknown_flag_is_not_ok(tmp_path: Path) -> None:
    """2.8 exits 0 on an unknown flag; the result still says the run was not ok."""
    settings = ProcessControllerSettings(
        readonly_command="true",
        readwrite_command="true",
        gc_command=f"{REGISTRY_BINARY} garbage-collect --no-such-flag {tmp_path / 'x.yml'}",
    )
    result = ProcessController(settings).run_gc(dry_run=True)
    assert result.exit_code == 0
    assert not result.ok
    assert result.error == "Error: unknown flag: --no-such-flag"


def test_process_failed_switch_raises_and_assumes_readonly() -> None:
    """A switch command that fails raises ControllerError with its stderr, never its text,
    and leaves the controller assuming read-only so the caller switches back."""
    settings = ProcessControllerSettings(
        readonly_command="echo 'unit failed' >&2; : s3cr3t-token; exit 3",
        readwrite_command="true",
        gc_command="true",
    )
    controller = ProcessController(settings)
    with pytest.raises(ControllerError) as failed:
        controller.set_readonly(True)
    assert "readonly_command exited with 3" in str(failed.value)
    assert "unit failed" in str(failed.value)
    assert "s3cr3t-token" not in str(failed.value)
    assert controller.is_readonly()
    controller.set_readonly(False)
    assert not controller.is_readonly()


def test_process_switch_timeout_kills_the_command() -> None:
    """A switch command that hangs is killed (with its children) and reported."""
    settings = ProcessControllerSettings(
        readonly_command="sleep 30 & sleep 30", readwrite_command="true", gc_command="true"
    )
    started = time.monotonic()
    with pytest.raises(ControllerError, match=r"did not finish within 0\.5s"):
        ProcessController(settings, command_timeout=0.5).set_readonly(True)
    assert time.monotonic() - started < 5


class _Interrupt(BaseException):
    """Stands in for Celery's time-limit exception, which is not an ``Exception``."""


def test_process_interrupted_gc_is_killed() -> None:
    """A GC run interrupted by a BaseException does not keep running behind the caller."""
    settings = ProcessControllerSettings(
        readonly_command="true", readwrite_command="true", gc_command="echo $$; exec sleep 30"
    )
    pids: list[int] = []

    def interrupt(line: str) -> None:
        pids.append(int(line))
        raise _Interrupt

    with pytest.raises(_Interrupt):
        ProcessController(settings).run_gc(dry_run=True, on_line=interrupt)
    assert not Path(f"/proc/{pids[0]}").exists()


def test_process_registry_version_from_binary(
    versioned_process_registry: ProcessRegistry, registry_binary: RegistryBinary
) -> None:
    """The version comes from the GC command's binary: ``2.8.2`` for Debian's 2.8.2+ds1,
    ``3.1.0`` for ``github.com/distribution/distribution/v3 v3.1.0``."""
    controller = ProcessController(versioned_process_registry.settings)
    assert controller.registry_version() == registry_binary.version


# --------------------------------------------------------------------------- docker


def docker_controller(made: RegistryContainer, **kwargs: Any) -> DockerController:
    settings = DockerControllerSettings(container=made.name, **kwargs)
    return DockerController(settings, made.client)


def _anonymous_volume(attrs: dict[str, Any], destination: str) -> str:
    return str(next(m["Name"] for m in attrs["Mounts"] if m["Destination"] == destination))


def _kept_settings(attrs: dict[str, Any]) -> dict[str, Any]:
    """What a switch must not change."""
    config, host = attrs["Config"], attrs["HostConfig"]
    return {
        "image": config["Image"],
        "image_id": attrs["Image"],
        "cmd": config["Cmd"],
        "entrypoint": config["Entrypoint"],
        "labels": config["Labels"],
        "storage_bind": host["Binds"][0],
        "network_mode": host["NetworkMode"],
        "restart": host["RestartPolicy"],
        "scratch": _anonymous_volume(attrs, "/scratch"),
        "user": config["User"],
        "workdir": config["WorkingDir"],
    }


@pytest.mark.docker
def test_docker_switch_recreates_with_same_settings(registry_container: RegistryContainer) -> None:
    """Read-only recreates the container with only the read-only variable added, writes get
    405, and switching back restores the original environment and accepts writes."""
    controller = docker_controller(registry_container)
    before = registry_container.inspect()
    controller.set_readonly(True)
    registry_container.wait_ready()
    during = registry_container.inspect()

    assert during["Id"] != before["Id"]
    assert during["State"]["Running"]
    assert _kept_settings(during) == _kept_settings(before)
    assert during["Config"]["Env"] == [*before["Config"]["Env"], f"{READONLY_ENV}={READONLY_VALUE}"]
    assert during["Config"]["Labels"]["com.docker.compose.project"] == registry_container.project
    assert controller.is_readonly()
    with pytest.raises(docker.errors.NotFound):
        registry_container.client.containers.get(registry_container.name + BACKUP_SUFFIX)

    with ImageBuilder.connect(registry_container.url) as builder:
        assert_refuses_writes(builder, "team/web", "sha256:" + "0" * 64)
        controller.set_readonly(False)
        registry_container.wait_ready()
        after = registry_container.inspect()
        assert after["Config"]["Env"] == before["Config"]["Env"]
        assert _kept_settings(after) == _kept_settings(before)
        assert not controller.is_readonly()
        assert push(builder, "team/web", "v1").digest


@pytest.mark.docker
def test_docker_gc_through_exec(
    registry_container: RegistryContainer, registry_binary: RegistryBinary
) -> None:
    """GC runs in the read-only container (registry:2.8 and registry:3 layouts) with a real
    exit code and parsed counts, reading the config the container serves (no config_path
    set: /etc/distribution/config.yml in 3.x), bytes come back, and the kept image survives
    both recreations on the mounted storage."""
    controller = docker_controller(registry_container)
    with ImageBuilder.connect(registry_container.url) as builder:
        kept, deleted = make_garbage(builder, "team/api")
        assert controller.run_gc(dry_run=True).ok  # the config it derived is the served one
        controller.set_readonly(True)
        registry_container.wait_ready()

        before = controller.storage_bytes()
        seen: list[str] = []
        result = controller.run_gc(dry_run=False, on_line=seen.append)
        after = controller.storage_bytes()
        controller.set_readonly(False)
        registry_container.wait_ready()

        assert before is not None and after is not None
        assert before - after >= LAYER_SIZE
        assert_collected(result, seen)
        # The image's config logs at info: deletions are counted from the registry's own lines.
        assert sum("Deleting blob: /docker/registry/v2/blobs/" in line for line in seen) == (
            result.blobs_deleted
        )
        assert builder.manifest_exists("team/api", "new")
        assert builder.blob_exists("team/api", kept.layer_digests[0])
        # 404, not the stale 200 of a blob-descriptor cache from before GC: the switch back
        # restarted the registry (3.1.0 and 2.8.2 both answer 200 without it).
        assert not builder.blob_exists("team/api", deleted.layer_digests[0])
        assert controller.registry_version() == registry_binary.version
        blob_dir = registry_container.storage / "docker/registry/v2/blobs/sha256"
        assert (blob_dir / kept.layer_digests[0][7:9] / kept.layer_digests[0][7:]).is_dir()
        assert push(builder, "team/api", "after-gc").digest


@pytest.mark.docker
def test_docker_gc_failure_is_an_exit_code(registry_container: RegistryContainer) -> None:
    """GC with a config path missing in the container returns its exit code 1, not success."""
    controller = docker_controller(registry_container, config_path="/etc/missing.yml")
    result = controller.run_gc(dry_run=True)
    assert result.exit_code == 1
    assert not result.ok
    assert result.error is not None and "configuration error" in result.error


@pytest.mark.docker
def test_docker_version_and_label_selector(registry_container: RegistryContainer) -> None:
    """A ``label=`` selector finds the container and the version comes from the image label."""
    selector = (
        f"label=com.docker.compose.project={registry_container.project},"
        "label=com.docker.compose.service=registry"
    )
    settings = DockerControllerSettings(container=selector, config_path=CONFIG_PATH)
    controller = DockerController(settings, registry_container.client)
    assert controller.container().name == registry_container.name
    assert controller.registry_version() == "2.8.2"
    assert controller.storage_bytes() is not None


@pytest.mark.docker
def test_docker_missing_container_is_a_controller_error(
    docker_session: tuple[docker.DockerClient, str],
) -> None:
    """A name or label selector that matches nothing raises ControllerError."""
    client, session = docker_session
    for selector in (f"regsweep-absent-{session}", f"label=io.regsweep.absent={session}"):
        controller = DockerController(DockerControllerSettings(container=selector), client)
        with pytest.raises(ControllerError):
            controller.set_readonly(True)


@pytest.mark.docker
def test_docker_recovers_from_a_crash_mid_switch(registry_container: RegistryContainer) -> None:
    """A switch that died after stopping and renaming the container is finished on the next
    call: the container is back under its name, read-write and serving."""
    old = registry_container.container()
    old.stop(timeout=5)
    old.rename(registry_container.name + BACKUP_SUFFIX)

    controller = docker_controller(registry_container)
    controller.set_readonly(False)
    registry_container.wait_ready()
    assert registry_container.container().status == "running"
    assert not controller.is_readonly()
    assert [
        c.name
        for c in registry_container.client.containers.list(all=True)
        if c.name.startswith(registry_container.name)
    ] == [registry_container.name]


@pytest.mark.docker
def test_docker_switch_keeps_networks_and_aliases(
    docker_session: tuple[docker.DockerClient, str], tmp_path: Path
) -> None:
    """A container on two user-defined networks keeps both, with its aliases, after a switch."""
    client, session = docker_session
    networks = [client.networks.create(f"regsweep-test-{session}-{i}") for i in range(2)]
    name = f"regsweep-test-{session}-net"
    try:
        container = client.containers.create(
            REGISTRY_IMAGE,
            name=name,
            network=networks[0].name,
            labels={SESSION_LABEL: session},
            ports={"5000/tcp": None},
        )
        client.api.disconnect_container_from_network(container.id, networks[0].id)
        client.api.connect_container_to_network(container.id, networks[0].id, aliases=["registry"])
        client.api.connect_container_to_network(container.id, networks[1].id, aliases=["cr"])
        container.start()
        DockerController(DockerControllerSettings(container=name), client).set_readonly(True)
        attrs = client.api.inspect_container(name)
        joined = attrs["NetworkSettings"]["Networks"]
        assert sorted(joined) == sorted(n.name for n in networks)
        assert "registry" in joined[networks[0].name]["Aliases"]
        assert "cr" in joined[networks[1].name]["Aliases"]
        assert attrs["HostConfig"]["PortBindings"] == {"5000/tcp": [{"HostIp": "", "HostPort": ""}]}
    finally:
        for leftover in (name, name + BACKUP_SUFFIX):
            with contextlib.suppress(docker.errors.NotFound):
                remove_with_volumes(client.containers.get(leftover))
        for network in networks:
            network.remove()


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "env", "expected"),
    [
        # The upstream images: registry:3, registry:2.8 (entrypoint.sh runs `registry serve`).
        (["/entrypoint.sh"], ["/etc/distribution/config.yml"], [], CONFIG_PATH_3),
        (["/entrypoint.sh"], ["/etc/docker/registry/config.yml"], [], CONFIG_PATH),
        # scripts/images' local images, and compose.yaml's command.
        (["/bin/registry"], ["serve", "/etc/distribution/config.yml"], [], CONFIG_PATH_3),
        (["/entrypoint.sh"], ["serve", "/srv/r.yaml"], [], "/srv/r.yaml"),
        # No file on the command line: the registry reads REGISTRY_CONFIGURATION_PATH.
        (["registry"], ["serve"], ["REGISTRY_CONFIGURATION_PATH=/cfg/r.yml"], "/cfg/r.yml"),
        (None, None, None, CONFIG_PATH),
    ],
)
def test_served_config_is_the_file_the_container_serves(
    entrypoint: list[str] | None, cmd: list[str] | None, env: list[str] | None, expected: str
) -> None:
    """GC reads the config the registry container serves: the last .yml/.yaml word of its
    entrypoint and command, else REGISTRY_CONFIGURATION_PATH, else registry:2's path."""
    attrs = {"Config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": env}}
    assert served_config(attrs) == expected


# --------------------------------------------------------------------------- parser


def test_parser_reads_3x_and_pre_2_7_lines() -> None:
    """Lines only registry 3.x and pre-2.7 print (written from distribution's
    garbagecollect.go and vacuum.go, as the 2.8.2 binary cannot print them) count too."""
    digest = "sha256:" + "ab" * 32
    lines_3x = [
        "team/web",
        f"team/web: marking manifest {digest} ",
        f"team/web: marking blob {digest}",
        f"manifest eligible for deletion: {{team/web {digest} [pr-1]}}",
        "",
        "2 blobs marked, 1 blobs and 1 manifests eligible for deletion",
        f"blob eligible for deletion: {digest}",
        f"team/web: layer link eligible for deletion: {digest}",
        '{"level":"info","msg":"deleting manifest: /docker/registry/v2/repositories/team/web/'
        f'_manifests/revisions/sha256/{"ab" * 32}","time":"2025-01-01T00:00:00Z"}}',
        f'time="2025-01-01T00:00:00Z" level=info msg="Deleting blob: /docker/registry/v2/blobs/'
        f'sha256/ab/{"ab" * 32}"',
    ]
    result = parse_gc_output(lines_3x, exit_code=0, dry_run=False)
    assert (result.repositories, result.manifests_marked, result.blobs_marked) == (1, 1, 2)
    assert (result.blobs_eligible, result.manifests_eligible) == (1, 1)
    assert (result.layer_links_eligible, result.blobs_deleted, result.manifests_deleted) == (
        1,
        1,
        1,
    )
    assert result.ok

    old = parse_gc_output(
        ["3 blobs marked, 5 blobs parsed : 2 blobs eligible for deletion"],
        exit_code=0,
        dry_run=True,
    )
    assert (old.blobs_marked, old.blobs_eligible, old.blobs_deleted) == (3, 2, 0)
    failed = parse_gc_output(
        ["team/web", "failed to garbage collect: failed to mark: boom"], exit_code=1, dry_run=False
    )
    assert failed.error == "failed to garbage collect: failed to mark: boom"
    assert (failed.completed, failed.blobs_deleted) == (False, 0)
