"""The maintenance window with the Docker controller: a real dockerd, a registry container
(local/registry:2.8.2, and local/registry:3.1.0 laid out like the upstream registry:3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.docker import RegistryContainer
from tests.harness.images import ImageBuilder, PushError, random_layer
from tests.harness.maintenance import (
    DuringGc,
    RedisSpace,
    engine_config,
    image,
    in_process_defer,
    in_process_prune,
    in_process_release,
    job_record,
    keep_newest,
    make_maintenance,
    missing_parts,
    prune,
    seed,
    upload_status,
)
from tests.harness.registry import RegistryBinary
from worker.errors import Deferred
from worker.maintenance.controllers import DockerController
from worker.maintenance.job import GcRequest, run_gc
from worker.settings.model import DockerControllerSettings
from worker.store.state import JobState

pytestmark = pytest.mark.docker


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    made = RedisSpace()
    yield made
    made.cleanup()


def test_docker_full_cycle(
    registry_container: RegistryContainer,
    registry_binary: RegistryBinary,
    space: RedisSpace,
    tmp_path: Path,
) -> None:
    """Recreating the container read-only and back (2.8.2 and 3.x, GC reading the config the
    container serves): GC reclaims bytes, every kept image stays whole, a push in the window
    gets 405 and works after it, a prune asked for in the window runs after it, and the
    container comes back read-write with its labels."""
    url = registry_container.url
    storage = registry_container.storage
    config = engine_config(url, tmp_path, keep_newest(2), storage)
    controller = DockerController(
        DockerControllerSettings(container=registry_container.name), registry_container.client
    )
    with ImageBuilder.connect(url) as builder:
        kept, doomed = seed(builder, storage)
        for age in (30, 20, 10):
            image(builder, "gc/later", f"d{age}", age, storage)
        prune(config, ["gc/single", "gc/multi", "gc/signed"])

        released: list[dict[str, Any]] = []
        seen: dict[str, Any] = {}

        def during_gc() -> None:
            seen["readonly"] = controller.is_readonly()
            with pytest.raises(PushError) as refused:
                builder.image("gc/single", "pushed-in-window", layers=[random_layer()])
            seen["push"] = refused.value.status
            later = {"repository": "gc/later", "job_id": "p1", "incremental": False}
            with pytest.raises(Deferred):
                in_process_prune(config, space.prefix, later)
            in_process_defer(config, space.prefix, later)

        m = make_maintenance(
            space,
            DuringGc(controller, during_gc),
            url,
            release=in_process_release(config, space.prefix, released),
        )
        job_id = space.state.create_job("gc", {})
        outcome = run_gc(m, GcRequest(job_id))

        report = outcome.report
        assert outcome.status == "done", report and report.errors
        assert report is not None and report.gc is not None
        assert seen == {"readonly": True, "push": 405}
        assert not controller.is_readonly()
        assert report.registry_version == registry_binary.version
        assert report.bytes_reclaimed is not None and report.bytes_reclaimed > 0
        assert report.gc.blobs_deleted >= 9
        assert report.readonly_seconds is not None and report.gc_seconds is not None
        for s in kept:
            assert missing_parts(builder, s) == [], s
        assert all(missing_parts(builder, s) for s in doomed)
        assert builder.image("gc/single", "pushed-after", layers=[random_layer()]).digest
        assert upload_status(url) == 202

        assert released and released[0]["repository"] == "gc/later"
        assert in_process_prune(config, space.prefix, released[0])["counts"]["deleted"] == 1
        assert builder.tags("gc/later") == ["d10", "d20"]

    labels = registry_container.inspect()["Config"]["Labels"]
    assert labels["com.docker.compose.service"] == "registry"
    assert job_record(space.state, job_id)["state"] == JobState.SUCCEEDED.value
