"""Proof of sameness (issue 22 item 3): the storage-level prune plans and deletes as the API does.

For random repositories pushed into the real registry (2.8.2 and 3.1.0) — images sharing
layers, indexes sharing children, cosign tags, OCI referrers with and without their
fallback index, digests under several tags, holds, protected tags, push ages on the tag
links — two repositories of identical content are made. Then:

1. the plan from the storage inventory equals the plan from the API inventory;
2. the API prune of that plan on one repository and the storage prune on the other,
   then a restart, leave the registry showing the same thing of both: tags (each
   resolved), manifests by digest, and what its garbage collector marks.

A handful of derandomized examples run by default (the suite's time);
``REGSWEEP_SAMENESS_EXAMPLES=200`` runs as many, randomized, for a longer search.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings

from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryBinary, RegistryProcess
from tests.harness.storage_prune import (
    NOW,
    ImageSpec,
    IndexSpec,
    ReferrerSpec,
    RepoSpec,
    dry_run_marks,
    hold_all,
    realize,
    repositories,
    view,
)
from worker.engine.executor import Executor
from worker.engine.inventory import InventoryBuilder
from worker.engine.planner import plan
from worker.engine.storage_executor import StorageExecutor
from worker.engine.storage_inventory import StorageInventoryBuilder
from worker.registry.client import RegistryClient
from worker.registry.storage import RegistryStorage
from worker.settings.model import RegistrySettings
from worker.store.audit import JsonlAuditLog

EXAMPLES_ENV = "REGSWEEP_SAMENESS_EXAMPLES"
_LONG = int(os.environ.get(EXAMPLES_ENV, "0") or 0)
SAMENESS = settings(
    max_examples=_LONG or 6,
    derandomize=not _LONG,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
_numbers = itertools.count()


@pytest.fixture
def registries(tmp_path: Path, registry_binary: RegistryBinary) -> Iterator[Registries]:
    """Two registries of this test's own, of the test's version: one pruned through the API,
    one on storage (and restarted). Their garbage collectors are compared: each marks a
    blob once per run, under the first repository that needs it, so the two registries
    hold the same repositories under the same names."""
    api = RegistryProcess.create(tmp_path / "api", binary=registry_binary)
    storage = RegistryProcess.create(tmp_path / "storage", binary=registry_binary)
    api.start()
    storage.start()
    yield Registries(api, storage)
    api.stop()
    storage.stop()


@dataclass(frozen=True)
class Registries:
    api: RegistryProcess
    storage: RegistryProcess


async def _plans_and_prunes(regs: Registries, spec: RepoSpec, repo: str, work: Path) -> set[str]:
    """Plan ``repo`` of the storage registry from both inventories (they must agree, and
    agree with the API registry's plan), prune it through the API in one registry and on
    storage in the other; every digest an inventory saw."""
    policy = spec.policy("same/**")
    storage = RegistryStorage(regs.storage.storage_path)
    audit = JsonlAuditLog(work / "audit.jsonl")
    layers = regs.storage.binary.major == 2
    async with (
        RegistryClient.from_settings(RegistrySettings(url=regs.storage.url)) as client,
        RegistryClient.from_settings(RegistrySettings(url=regs.api.url)) as api_client,
    ):
        by_api = InventoryBuilder(
            client, history=await hold_all(work / "h1", repo, spec), storage=storage, audit=audit
        )
        by_storage = StorageInventoryBuilder(
            client,
            storage,
            layers_count=layers,
            history=await hold_all(work / "h2", repo, spec),
            audit=audit,
        )
        api_inventory = await by_api.take(repo, policy, now=NOW)
        sto_inventory = await by_storage.take(repo, policy, now=NOW)
        sto_plan = plan(sto_inventory, policy, NOW)
        assert sto_inventory.tags == api_inventory.tags
        assert sto_inventory.manifests == api_inventory.manifests
        assert sto_plan == plan(api_inventory, policy, NOW)

        other = InventoryBuilder(
            api_client,
            history=await hold_all(work / "h3", repo, spec),
            storage=RegistryStorage(regs.api.storage_path),
            audit=audit,
        )
        api_inventory = await other.take(repo, policy, now=NOW)
        api_plan = plan(api_inventory, policy, NOW)
        assert api_plan == sto_plan, "identical repositories planned differently"
        done = await Executor(api_client, audit).run(
            api_plan, api_inventory.manifests, job_id="api"
        )
        assert done.outcome.value == "done", done.errors()
        stored = await StorageExecutor(storage, audit, layers_links=layers).run(
            sto_plan, sto_inventory.manifests, job_id="storage"
        )
        assert stored.outcome.value == "done", stored.errors()
    actions = sorted({d.action.value for d in sto_plan.deletions})
    event(f"deletes: {', '.join(actions) or 'nothing'}")
    return {*api_inventory.manifests, *sto_inventory.manifests}


#: Always tried: an old multi-arch index (children shared with a newer one) with a signature
#: and an OCI referrer, an old image under two tags one of which is held, a newer image.
INDEX_EXAMPLE = RepoSpec(
    images=(
        ImageSpec((0,), ()),
        ImageSpec((1,), ()),
        ImageSpec((0, 2), ("t3", "t4")),
        ImageSpec((3,), ("t5",)),
    ),
    indexes=(IndexSpec((0, 1), ("t1",)), IndexSpec((1,), ("t2",))),
    referrers=(ReferrerSpec(-1, "cosign"), ReferrerSpec(-1, "oci"), ReferrerSpec(2, "oci", False)),
    ages={"t1": 30, "t2": 2, "t3": 20, "t4": 25, "t5": 1},
    holds=("t4",),
    newest=2,
    within_days=None,
    protect="none",
)


@given(spec=repositories())
@example(spec=INDEX_EXAMPLE)
@SAMENESS
def test_storage_prune_plans_and_deletes_as_the_api_does(
    registries: Registries, tmp_path: Path, spec: RepoSpec
) -> None:
    """The storage inventory plans what the API inventory plans, and after both prunes and a
    restart the registry shows both repositories alike: tags, manifests, GC's marks."""
    number = next(_numbers)
    repo = f"same/{number}"
    seed = uuid.uuid4().hex
    work = tmp_path / f"example-{number}"
    with (
        ImageBuilder.connect(registries.api.url) as api,
        ImageBuilder.connect(registries.storage.url) as stored,
    ):
        realize(api, registries.api, repo, spec, seed)
        realize(stored, registries.storage, repo, spec, seed)
        digests = asyncio.run(_plans_and_prunes(registries, spec, repo, work))
        registries.storage.restart()
        assert view(stored, repo, digests) == view(api, repo, digests)
    marks = dry_run_marks(registries.storage, [repo])[repo]
    assert marks == dry_run_marks(registries.api, [repo])[repo]
    assert marks, "the garbage collector marked nothing of the repository"
