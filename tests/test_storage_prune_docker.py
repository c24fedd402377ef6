"""The storage-level prune with the Docker controller: the registry's config read from the
container (the file it serves, its environment's overrides), the prune on its bind-mounted
storage, the container recreated read-write after it (2.8.2 and 3.x images)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.docker import RegistryContainer
from tests.harness.images import ImageBuilder
from tests.harness.maintenance import (
    REDIS_URL,
    RedisSpace,
    keep_newest,
    make_maintenance,
    missing_parts,
    seed,
)
from worker.maintenance.controllers import DockerController
from worker.maintenance.job import GcRequest, run_gc
from worker.maintenance.storage_guards import RegistryConfig, read_registry_config
from worker.maintenance.storage_prune import StoragePrune
from worker.settings.model import (
    Config,
    DockerControllerSettings,
    MaintenanceSettings,
    RegistrySettings,
)

pytestmark = pytest.mark.docker


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    made = RedisSpace()
    yield made
    made.cleanup()


@pytest.mark.usefixtures("registry_binary")
def test_docker_window_prunes_on_the_containers_storage(
    registry_container: RegistryContainer, space: RedisSpace, tmp_path: Path
) -> None:
    """The window reads the config the container serves (filesystem, deletes on, an in-memory
    cache: allowed), prunes the bind-mounted storage, and the recreated container serves
    every kept image whole and none of the doomed."""
    settings = DockerControllerSettings(container=registry_container.name)
    controller = DockerController(settings, registry_container.client)
    found = read_registry_config(settings, controller)
    assert found.problem() is None and found.source.startswith("/etc/")
    config = Config(
        registry=RegistrySettings(
            url=registry_container.url, storage_path=str(registry_container.storage)
        ),
        policies=(keep_newest(2, "gc/**"),),
        maintenance=MaintenanceSettings(controller=settings, storage_prune=True),
        redis_url=REDIS_URL,
        audit_path=str(tmp_path / "audit.jsonl"),
    )
    with ImageBuilder.connect(registry_container.url) as builder:
        kept, doomed = seed(builder, registry_container.storage)
        m = make_maintenance(space, controller, registry_container.url, settings=config.maintenance)
        m.storage_prune = StoragePrune(
            config,
            controller,
            m.probe,
            space.client,
            keys=space.keys,
            prefix=space.prefix,
        )
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {})))
        report = outcome.report
        assert report is not None and outcome.status == "done", report and report.errors
        assert report.storage_prune is not None and report.storage_prune["manifests_removed"] == 6
        for s in kept:
            assert missing_parts(builder, s) == [], s
        for s in doomed:
            assert not builder.manifest_exists(s.repository, s.top.digest)
    assert not controller.is_readonly()


def test_the_containers_environment_overrides_its_config_file() -> None:
    """``REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR=redis`` in the container's environment is a Redis
    cache whatever its file says, and ``REGISTRY_STORAGE_DELETE_ENABLED=false`` disables
    deletes (the registry reads its overrides as YAML)."""
    body = {
        "storage": {
            "filesystem": {"rootdirectory": "/var/lib/registry"},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        }
    }
    assert RegistryConfig("f", body, {}).problem() is None
    cache = RegistryConfig("f", body, {"REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR": "redis"})
    assert "Redis" in (cache.problem() or "")
    deletes = RegistryConfig("f", body, {"REGISTRY_STORAGE_DELETE_ENABLED": "false"})
    assert "deletes are disabled" in (deletes.problem() or "")
    s3 = RegistryConfig("f", {"storage": {"s3": {}, "delete": {"enabled": True}}}, {})
    assert "stores on s3" in (s3.problem() or "")
