"""Invariant 9 with the real CLI and the real registry: restore puts back everything one
deletion removed, byte-identical, in an order the registry accepts, and never moves a tag
that now points elsewhere unless told to; `regsweep audit` shows and filters what it can.

The tests of what differs on 3.x (tag-only removals, which 3.x makes by DELETE of the tag
and restore puts back; index children put back before their index, which 3.x checks on
PUT) run on 2.8.2 and 3.x (``ON_BOTH``); those of the CLI, the audit and what the
registry does alike (a tag moved since, a child shared across jobs) on 2.8.2 alone.

Each test prunes with `regsweep prune` (a subprocess), restores with `regsweep restore`,
and asks the registry itself what is there: same digest and same bytes as pushed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.harness import cli
from tests.harness.images import ImageBuilder, Pushed, random_layer, referrers_tag, sha256_digest
from tests.harness.proxy import Fault, FaultyProxy, Rule
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.service import RedisServer
from worker.engine.prune import Pruner, RepositoryPlan
from worker.oci import OCI_INDEX, OCI_MANIFEST
from worker.registry.client import RegistryClient
from worker.settings.load import load_config
from worker.store.audit import AuditEntry, Outcome, Settlement
from worker.store.history import LocalHistory
from worker.store.open import Stores

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("private_cache")]
#: Runs on 2.8.2 and on 3.x: ``registry``, ``images`` and ``config`` are that version's.
ON_BOTH = pytest.mark.usefixtures("registry_binary")

KEEP_PREFIXED: dict[str, Any] = {
    "name": "restore",
    "repositories": ["t/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep-*"]}],
}


@pytest.fixture
def config(tmp_path: Path, registry: RegistryProcess) -> Path:
    return cli.write_config(
        tmp_path / "regsweep.yaml",
        registry.url,
        [KEEP_PREFIXED],
        audit_path=tmp_path / "audit.jsonl",
    )


def prune(config: Path, repo: str) -> str:
    result = cli.run("prune", repo, config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def restore(config: Path, repo: str, digest: str, *extra: str) -> list[str]:
    """`regsweep restore` by the digest's first 12 hex digits; the lines it printed."""
    result = cli.run("restore", repo, digest.partition(":")[2][:12], *extra, config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def assert_back(images: ImageBuilder, repo: str, *manifests: Pushed) -> None:
    """Each manifest is in the registry again with the very bytes (so digest) pushed."""
    for manifest in manifests:
        assert images.manifest(repo, manifest.digest)[0] == manifest.raw, manifest.digest


def assert_gone(images: ImageBuilder, repo: str, *manifests: Pushed) -> None:
    for manifest in manifests:
        assert images.head(repo, manifest.digest) is None, manifest.digest


def on(images: ImageBuilder, repo: str, tag: str) -> str | None:
    """The digest ``tag`` points at now."""
    head = images.head(repo, tag)
    return head.digest if head else None


def position(lines: Sequence[str], digest: str) -> int:
    return next(i for i, line in enumerate(lines) if digest in line)


# --- everything comes back, byte for byte ---------------------------------------------


@ON_BOTH
def test_three_tags_removed_from_one_digest_all_come_back(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """Three tags removed from one digest that a kept tag still needs (three tag-only removals,
    one job): one restore puts all three back on it, not only the last record's."""
    image = images.image(repo_name, ["drop-a", "drop-b", "drop-c", "keep-1"])
    prune(config, repo_name)
    assert images.tags(repo_name) == ["keep-1"]
    records = cli.audit_records(config)
    assert sorted((r["action"], tuple(r["tags"])) for r in records) == [
        ("untag", ("drop-a",)),
        ("untag", ("drop-b",)),
        ("untag", ("drop-c",)),
    ]
    lines = restore(config, repo_name, image.digest)
    assert any("drop-a, drop-b, drop-c" in line for line in lines), lines
    assert images.tags(repo_name) == ["drop-a", "drop-b", "drop-c", "keep-1"]
    for tag in ("drop-a", "drop-b", "drop-c"):
        assert images.manifest(repo_name, tag)[0] == image.raw


@ON_BOTH
async def test_tags_removed_by_untag_and_by_digest_in_one_job_all_come_back(
    tmp_path: Path, config: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """One job that removed two tags alone and then, resumed later (a deferred job keeps its
    id), deleted the digest with its last tag: restore brings the digest back with all
    three tags."""
    image = images.image(repo_name, ["drop-a", "drop-b", "keep-1"])
    everything = dict(KEEP_PREFIXED, keep=[{"tags": ["none-*"]}])
    later = cli.write_config(
        tmp_path / "later.yaml", registry.url, [everything], audit_path=tmp_path / "audit.jsonl"
    )
    job_id = "job-resumed-1"
    assert [await _prune_in_process(path, repo_name, job_id) for path in (config, later)] == [
        ["untag", "untag"],
        ["manifest"],
    ]
    assert images.head(repo_name, image.digest) is None
    lines = restore(config, repo_name, image.digest)
    assert any("drop-a, drop-b, keep-1" in line for line in lines), lines
    assert images.tags(repo_name) == ["drop-a", "drop-b", "keep-1"]
    assert images.manifest(repo_name, "keep-1")[0] == image.raw


async def _prune_in_process(config_path: Path, repo: str, job_id: str) -> list[str]:
    """Plan and execute ``repo`` as a worker's job ``job_id`` would; the actions carried out."""
    config = load_config(str(config_path), {})
    stores = Stores.open(config)
    async with RegistryClient.from_settings(config.registry) as client:
        pruner = Pruner(config, client, history=stores.history, audit=stores.audit)
        planned = await pruner.plan_one(repo)
        assert isinstance(planned, RepositoryPlan)
        report = await pruner.execute(planned, job_id=job_id)
    await stores.aclose()
    assert report.outcome.value == "done", report.done
    return [d.action.value for d, _, _ in report.done]


@ON_BOTH
def test_fallback_tag_referrers_come_back_children_before_their_index(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """A subject with two OCI referrers listed by its `sha256-<hex>` fallback index and a cosign
    signature: restoring the subject puts back all of it, each referrer before the index
    that lists it (2.8 refuses an index whose entries are missing), every tag on its
    digest again."""
    subject = images.image(repo_name, "drop-app")
    sbom = images.referrer(repo_name, subject, artifact_type="application/spdx+json")
    provenance = images.referrer(repo_name, subject, artifact_type="application/vnd.in-toto+json")
    signature = images.cosign(repo_name, subject, "sig")
    fallback_tag = referrers_tag(subject.digest)
    fallback_raw, _ = images.manifest(repo_name, fallback_tag)
    fallback = images.head(repo_name, fallback_tag)
    assert fallback is not None
    images.image(repo_name, "keep-1")
    prune(config, repo_name)
    assert_gone(images, repo_name, subject, sbom, provenance, signature)
    assert images.head(repo_name, fallback.digest) is None
    lines = restore(config, repo_name, subject.digest)
    assert_back(images, repo_name, subject, sbom, provenance, signature)
    assert images.manifest(repo_name, fallback.digest)[0] == fallback_raw
    assert on(images, repo_name, "drop-app") == subject.digest
    assert on(images, repo_name, fallback_tag) == fallback.digest
    assert on(images, repo_name, f"{fallback_tag}.sig") == signature.digest
    index_at = position(lines, fallback.digest)
    assert position(lines, sbom.digest) < index_at
    assert position(lines, provenance.digest) < index_at


@pytest.mark.parametrize("first", [0, 1])
def test_two_deleted_indexes_sharing_a_child_restore_in_either_order(
    config: Path, images: ImageBuilder, repo_name: str, first: int
) -> None:
    """Two indexes deleted in one job share a child: restoring either one brings the child
    back with it, and restoring the other afterwards finds the child there and succeeds."""
    shared = images.image(repo_name, architecture="amd64")
    own = [images.image(repo_name, architecture="arm64") for _ in range(2)]
    indexes = [images.index(repo_name, [shared, own[n]], f"drop-{n}") for n in range(2)]
    images.image(repo_name, "keep-1")
    prune(config, repo_name)
    assert_gone(images, repo_name, shared, *own, *indexes)
    second = 1 - first
    restore(config, repo_name, indexes[first].digest)
    assert_back(images, repo_name, indexes[first], shared, own[first])
    assert_gone(images, repo_name, indexes[second], own[second])
    lines = restore(config, repo_name, indexes[second].digest)
    assert_back(images, repo_name, indexes[second], shared, own[second])
    assert any(line.startswith("present") and shared.digest in line for line in lines), lines
    assert images.tags(repo_name) == ["drop-0", "drop-1", "keep-1"]


def test_a_child_shared_with_an_index_deleted_by_a_later_job_comes_back_too(
    tmp_path: Path, config: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """Index 1 deleted first (its shared child stays: kept index 2 lists it), index 2 and the
    child deleted by a later job: restoring index 1 finds the child in the later job's
    record and puts it back first."""
    shared = images.image(repo_name, architecture="amd64")
    own = [images.image(repo_name, architecture="arm64") for _ in range(2)]
    first = images.index(repo_name, [shared, own[0]], "drop-1")
    second = images.index(repo_name, [shared, own[1]], "keep-2")
    prune(config, repo_name)
    assert_gone(images, repo_name, first, own[0])
    assert_back(images, repo_name, shared, second)
    nothing_kept = dict(KEEP_PREFIXED, keep=[{"tags": ["none-*"]}])
    later = cli.write_config(
        tmp_path / "later.yaml", registry.url, [nothing_kept], audit_path=tmp_path / "audit.jsonl"
    )
    prune(later, repo_name)
    assert_gone(images, repo_name, second, shared, own[1])
    restore(config, repo_name, first.digest)
    assert_back(images, repo_name, first, shared, own[0])
    assert on(images, repo_name, "drop-1") == first.digest
    assert_gone(images, repo_name, second, own[1])


def test_a_digest_prefix_with_or_without_its_algorithm(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """`sha256:` plus 12 hex digits names a deletion as well as the 12 digits alone do."""
    image = images.image(repo_name, "drop-1")
    prune(config, repo_name)
    result = cli.run("restore", repo_name, image.digest[:19], config=config)
    assert result.returncode == 0, result.stderr
    assert_back(images, repo_name, image)


def test_an_ambiguous_prefix_is_refused_and_nothing_written(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """A prefix two deleted digests share is refused (exit 1, both named) and writes nothing."""
    first_digits: dict[str, Any] = {}
    while True:  # at most 17 images: two then share their first hex digit
        image = images.image(repo_name, f"drop-{len(first_digits)}")
        digit = image.digest[7]
        if digit in first_digits:
            pair = [first_digits[digit], image]
            break
        first_digits[digit] = image
    prune(config, repo_name)
    for prefix in (digit, f"sha256:{digit}"):
        result = cli.run("restore", repo_name, prefix, config=config)
        assert result.returncode == 1, result.stdout
        assert "ambiguous" in result.stderr
        assert all(p.digest in result.stderr for p in pair), result.stderr
    assert_gone(images, repo_name, *pair)
    assert images.tags(repo_name) == []


# --- never clobber ----------------------------------------------------------------------


def test_restore_refuses_a_tag_pushed_elsewhere_since_and_force_moves_it(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """`pr-7` deleted, then pushed again to a new image: restore of the old one names `pr-7`,
    exits 1 and writes nothing (no manifest, no tag, no hold); --force puts it back and
    moves `pr-7` to it."""
    old = images.image(repo_name, "pr-7")
    prune(config, repo_name)
    new = images.image(repo_name, "pr-7")
    refused = cli.run("restore", repo_name, old.digest[:19], config=config)
    assert refused.returncode == 1, refused.stdout
    assert "pr-7 (now " + new.digest[:19] in refused.stderr
    assert "--force" in refused.stderr
    assert images.head(repo_name, old.digest) is None
    assert on(images, repo_name, "pr-7") == new.digest
    plan = cli.run("plan", repo_name, config=config)
    assert "held" not in plan.stdout
    restore(config, repo_name, old.digest, "--force")
    assert on(images, repo_name, "pr-7") == old.digest
    assert_back(images, repo_name, old, new)


# --- holds ------------------------------------------------------------------------------


def test_restored_tags_are_held_and_unhold_ends_it(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """A restored tag is kept by the next prune, whose plan says "held by restore until";
    after `unhold` the policy deletes it again; `hold --for 1h30m` keeps it once more."""
    image = images.image(repo_name, "drop-1")
    prune(config, repo_name)
    restore(config, repo_name, image.digest)
    kept = prune(config, repo_name)
    assert "held (restore of " in kept and "until" in kept
    assert f"{repo_name}: nothing deleted (nothing to delete)" in kept
    assert on(images, repo_name, "drop-1") == image.digest
    held = cli.run("unhold", repo_name, "drop-1", config=config)
    assert held.returncode == 0, held.stderr
    again = cli.run("unhold", repo_name, "drop-1", config=config)
    assert again.returncode == 1 and "is not held" in again.stderr
    prune(config, repo_name)
    assert images.head(repo_name, image.digest) is None
    restore(config, repo_name, image.digest)
    cli.run("unhold", repo_name, "drop-1", config=config)
    by_hand = cli.run("hold", repo_name, "drop-1", "--for", "1h30m", config=config)
    assert by_hand.returncode == 0, by_hand.stderr
    assert "held (regsweep hold) until" in prune(config, repo_name)
    assert on(images, repo_name, "drop-1") == image.digest


# --- regsweep audit ----------------------------------------------------------------------


@pytest.fixture(params=["file", "redis"])
def audit_config(
    request: pytest.FixtureRequest, tmp_path: Path, registry: RegistryProcess
) -> Iterator[Path]:
    """The policy file with the audit in a JSONL file, or in a (private) Redis's stream."""
    if request.param == "file":
        yield cli.write_config(
            tmp_path / "regsweep.yaml",
            registry.url,
            [KEEP_PREFIXED],
            audit_path=tmp_path / "audit.jsonl",
        )
        return
    server = RedisServer(free_port())
    server.start()
    try:
        yield cli.write_config(
            tmp_path / "regsweep.yaml", registry.url, [KEEP_PREFIXED], redis_url=server.url
        )
    finally:
        server.stop()


@pytest.fixture
def audited(audit_config: Path, images: ImageBuilder, repo_name: str) -> dict[str, Any]:
    """A deletion recorded three hours ago, then two repositories pruned in two jobs."""
    old = AuditEntry(
        time=datetime.now(UTC) - timedelta(hours=3),
        repository=f"{repo_name}-old",
        digest="sha256:" + "ab" * 32,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=2,
        tags=("drop-old",),
        action="manifest",
        policy="restore",
        rule="retention",
        reason="no keep rule matches",
        job_id="cli-old",
        manifest=b"{}",
    )
    asyncio.run(_record(audit_config, old))
    repos = [f"{repo_name}-a", f"{repo_name}-b"]
    pushed = {
        repos[0]: [images.image(repos[0], "drop-1"), images.image(repos[0], "drop-2")],
        repos[1]: [images.image(repos[1], "drop-1")],
    }
    for repo in repos:
        prune(audit_config, repo)
    return {"repos": repos, "pushed": pushed, "old": old}


async def _record(config_path: Path, entry: AuditEntry) -> None:
    """Write ``entry`` (and its settlement) into the configuration's audit as regsweep does."""
    stores = Stores.open(load_config(str(config_path), {}))
    try:
        await stores.audit.intend([entry])
        await stores.audit.settle([Settlement.of(entry, Outcome.DELETED)])
    finally:
        await stores.aclose()


def _ago(delta: timedelta) -> str:
    return (datetime.now(UTC) - delta).isoformat()


def test_audit_filters_text_and_json(audit_config: Path, audited: dict[str, Any]) -> None:
    """`audit` filters by repository, digest prefix, job and `--since 1h30m` (or an ISO time),
    in text and in JSON, from the file and from the Redis stream alike; a bad --since is a
    usage error."""
    config = audit_config
    repo_a, repo_b = audited["repos"]
    everything = cli.audit_records(config)
    assert len(everything) == 4
    assert {r["digest"] for r in cli.audit_records(config, "--repository", repo_a)} == {
        p.digest for p in audited["pushed"][repo_a]
    }
    target = audited["pushed"][repo_b][0].digest
    for digest_args in (["--digest", target[7:19]], ["--repository", repo_b, "--digest", target]):
        (found,) = cli.audit_records(config, *digest_args)
        assert (found["repository"], found["digest"], found["outcome"]) == (
            repo_b,
            target,
            "deleted",
        )
    assert "manifest" not in found  # the raw bytes stay out of the listing
    by_job = cli.audit_records(config, "--job", found["job_id"])
    assert [r["digest"] for r in by_job] == [target]
    recent = cli.audit_records(config, "--since", "1h30m")
    assert audited["old"].id not in {r["id"] for r in recent} and len(recent) == 3
    assert len(cli.audit_records(config, "--since", "4h")) == 4
    assert len(cli.audit_records(config, "--since", _ago(timedelta(hours=2)))) == 3
    text = cli.run("audit", "--repository", repo_b, config=config)
    assert text.returncode == 0, text.stderr
    (line,) = text.stdout.splitlines()
    assert f"{repo_b}  {target[:19]}  manifest deleted  tags=drop-1" in line
    bad = cli.run("audit", "--since", "yesterday-ish", config=config)
    assert bad.returncode == 2 and "not a duration or timestamp" in bad.stderr


def test_the_default_audit_file_is_beside_the_policy_file_however_c_is_spelled(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """Without audit.path, a prune run with a relative -c from one directory and `audit` run
    with another spelling from elsewhere use the one file beside the policy file."""
    conf = tmp_path / "etc" / "regsweep.yaml"
    cli.write_config(conf, registry.url, [KEEP_PREFIXED])
    image = images.image(repo_name, "drop-1")
    pruned = cli.run("prune", repo_name, config="etc/regsweep.yaml", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert (tmp_path / "etc" / "regsweep-audit.jsonl").exists()
    for spelling, cwd in (("regsweep.yaml", conf.parent), (str(conf), Path("/"))):
        listed = cli.run("audit", "--json", config=spelling, cwd=cwd)
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(line)["digest"] for line in listed.stdout.splitlines()] == [image.digest]


def test_a_torn_line_is_reported_and_the_rest_still_prints_and_restores(
    tmp_path: Path, config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """A line torn mid-write (no newline): `audit` names its line number on stderr and prints
    every other record; the next prune's record starts on a line of its own; restore works."""
    first = images.image(repo_name, "drop-1")
    prune(config, repo_name)
    audit = tmp_path / "audit.jsonl"
    torn_at = len(audit.read_text().splitlines()) + 1
    with audit.open("a") as fh:
        fh.write('{"record": "intent", "id": "torn", "time": "2026-')
    late = images.image(repo_name, "drop-late")
    prune(config, repo_name)
    result = cli.run("audit", "--json", config=config)
    assert result.returncode == 0, result.stderr
    assert f"{audit}: skipped line {torn_at}: not an audit record" in result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["digest"] for r in printed] == [first.digest, late.digest]
    restore(config, repo_name, late.digest)
    assert_back(images, repo_name, late)


# --- restore is exact (issue 18 item 3) --------------------------------------------------


def _bare_image(images: ImageBuilder, repo: str, architecture: str) -> tuple[str, bytes]:
    """An OCI image manifest whose body does not say its media type (optional in OCI)."""
    layer = images.blob(repo, random_layer())
    config = images.blob(
        repo,
        json.dumps({"architecture": architecture, "os": "linux"}).encode(),
        "application/vnd.oci.image.config.v1+json",
    )
    raw = json.dumps(
        {"schemaVersion": 2, "config": config.descriptor(), "layers": [layer.descriptor()]}
    )
    digest = images.put_manifest(repo, sha256_digest(raw.encode()), raw.encode(), OCI_MANIFEST)
    return digest, raw.encode()


def test_an_index_whose_descriptors_omit_media_types_comes_back_byte_identical_and_pullable(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """An OCI index whose descriptors (and children) leave the optional `mediaType` out,
    planned from the registry's storage: its children are recorded with their real media
    type (from their bytes, not ''), and restore puts the index and children back
    byte-identical and pullable (it used to fail with 400 MANIFEST_INVALID and blame GC)."""
    config = cli.write_config(
        tmp_path / "regsweep.yaml",
        registry.url,
        [KEEP_PREFIXED],
        audit_path=tmp_path / "audit.jsonl",
        storage_path=registry.storage_path,
    )
    children = [_bare_image(images, repo_name, arch) for arch in ("amd64", "arm64")]
    index_raw = json.dumps(
        {"schemaVersion": 2, "manifests": [{"digest": d, "size": len(r)} for d, r in children]}
    ).encode()
    index = images.put_manifest(repo_name, "drop-1", index_raw, OCI_INDEX)
    images.image(repo_name, "keep-1")
    prune(config, repo_name)
    assert all(images.head(repo_name, d) is None for d in [index, *(d for d, _ in children)])
    recorded = {r["digest"]: r["media_type"] for r in cli.audit_records(config)}
    assert recorded == {index: OCI_INDEX} | {d: OCI_MANIFEST for d, _ in children}
    restore(config, repo_name, index)
    assert images.manifest(repo_name, "drop-1") == (index_raw, OCI_INDEX)
    for digest, raw in children:
        assert images.manifest(repo_name, digest) == (raw, OCI_MANIFEST)
        for blob in json.loads(raw)["layers"] + [json.loads(raw)["config"]]:
            assert images.blob_exists(repo_name, blob["digest"])


def test_a_record_made_with_an_empty_media_type_is_restored_with_the_one_its_bytes_imply(
    config: Path, images: ImageBuilder, repo_name: str
) -> None:
    """A record written before the fix (media type '') of a manifest that names none itself:
    restore PUTs it as the OCI image manifest its bytes are, byte-identical."""
    digest, raw = _bare_image(images, repo_name, "amd64")
    images.tag(repo_name, digest, "drop-1")
    assert images.client.delete(f"/v2/{repo_name}/manifests/{digest}").status_code == 202
    entry = AuditEntry(
        time=datetime.now(UTC),
        repository=repo_name,
        digest=digest,
        media_type="",
        size=len(raw),
        tags=("drop-1",),
        action="child",
        policy="restore",
        rule="child",
        reason="of deleted index",
        job_id="cli-before-the-fix",
        manifest=raw,
    )
    asyncio.run(_record(config, entry))
    restore(config, repo_name, digest)
    assert images.manifest(repo_name, "drop-1") == (raw, OCI_MANIFEST)


@pytest.mark.parametrize("store", ["file", "redis"])
def test_tags_removed_from_one_digest_in_two_runs_all_come_back_and_audit_says_so(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str, store: str
) -> None:
    """Run 1 removes tag `drop-a` from a kept digest and fails half-way (another image's
    DELETE never gets through); run 2 removes `drop-b`. Restoring the digest puts back
    both (it used to take only the latest job's), and `audit` marks exactly those two
    records restored by that restore. A second restore, with nothing left undone, does
    again what the latest job's records say (drop-b, present already)."""
    redis_server = RedisServer(free_port()) if store == "redis" else None
    if redis_server:
        redis_server.start()
    where: dict[str, Any] = (
        {"redis_url": redis_server.url} if redis_server else {"audit_path": tmp_path / "a.jsonl"}
    )
    try:
        image = images.image(repo_name, ["drop-a", "drop-b", "keep-1"])
        other = images.image(repo_name, "drop-x")
        with FaultyProxy(("127.0.0.1", registry.port)) as proxy:
            proxy.add(Rule(Fault.RESET, method="DELETE", path=other.digest, times=100))
            first = dict(KEEP_PREFIXED, keep=[{"tags": ["keep-*", "drop-b"]}])
            run1 = cli.write_config(tmp_path / "run1.yaml", proxy.url, [first], **where)
            failed = cli.run("prune", repo_name, config=run1)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert images.tags(repo_name) == ["drop-b", "drop-x", "keep-1"]
        config = cli.write_config(tmp_path / "run2.yaml", registry.url, [KEEP_PREFIXED], **where)
        prune(config, repo_name)
        assert images.tags(repo_name) == ["keep-1"]
        result = cli.run("restore", repo_name, image.digest[:19], "--json", config=config)
        assert result.returncode == 0, result.stderr
        restored = json.loads(result.stdout)
        (item,) = restored["restored"]
        assert (item["digest"], item["tags"], item["pushed"]) == (
            image.digest,
            ["drop-a", "drop-b"],
            False,
        )
        assert len(item["jobs"]) == 2
        assert images.tags(repo_name) == ["drop-a", "drop-b", "keep-1"]
        marked = {
            (tuple(r["tags"]), r["outcome"], r["restored_by"]) for r in cli.audit_records(config)
        }
        assert marked == {
            (("drop-a",), "deleted", restored["job_id"]),
            (("drop-b",), "deleted", restored["job_id"]),
            (("drop-x",), "not-done", None),
            (("drop-x",), "deleted", None),
        }
        text = cli.run("audit", "--digest", image.digest, config=config).stdout.splitlines()
        assert len(text) == 2
        assert all(f"by {restored['job_id']}" in line for line in text), text
        again = cli.run("restore", repo_name, image.digest[:19], "--json", config=config)
        assert again.returncode == 0, again.stderr
        (item,) = json.loads(again.stdout)["restored"]
        assert (item["tags"], item["pushed"], len(item["jobs"])) == (["drop-b"], False, 1)
    finally:
        if redis_server:
            redis_server.stop()


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A registry of the test's own: it is switched read-only or garbage-collected."""
    reg = RegistryProcess.create(tmp_path / "private")
    reg.start()
    yield reg
    reg.stop()


def _holds(config: Path, repo: str) -> dict[str, str]:
    """Tag -> why it is held, as every plan of ``repo`` sees it (the state beside the audit)."""
    history = LocalHistory(config.parent / "regsweep-state")
    held = asyncio.run(history.snapshot(repo)).holds
    return {tag: hold.reason for tag, hold in held.items()}


def test_a_restore_failing_on_a_read_only_registry_leaves_no_hold_and_says_why(
    tmp_path: Path, private_registry: RegistryProcess, repo_name: str
) -> None:
    """A restore during a maintenance window (registry read-only) exits 1 saying so, not
    blaming GC; it leaves no hold of its own (a hold someone set by hand stays as it was),
    and after the window the same restore works."""
    reg = private_registry
    config = cli.write_config(
        tmp_path / "regsweep.yaml", reg.url, [KEEP_PREFIXED], audit_path=tmp_path / "a.jsonl"
    )
    with ImageBuilder.connect(reg.url) as images:
        image = images.image(repo_name, ["drop-1", "drop-2"])
        images.image(repo_name, "keep-1")
    prune(config, repo_name)
    by_hand = cli.run("hold", repo_name, "drop-1", "--for", "30d", config=config)
    assert by_hand.returncode == 0, by_hand.stderr
    reg.set_readonly(True)
    reg.restart()
    failed = cli.run("restore", repo_name, image.digest[:19], config=config)
    reg.set_readonly(False)
    reg.restart()
    assert failed.returncode == 1, failed.stdout
    assert "read-only" in failed.stderr and "nothing was put back or held" in failed.stderr
    assert "garbage collection" not in failed.stderr
    assert _holds(config, repo_name) == {"drop-1": "regsweep hold"}
    restore(config, repo_name, image.digest)
    with ImageBuilder.connect(reg.url) as images:
        assert images.manifest(repo_name, "drop-2")[0] == image.raw
    held = _holds(config, repo_name)
    assert held["drop-1"] == "regsweep hold" and held["drop-2"].startswith("restore of")


def test_a_restore_after_gc_names_the_blobs_gc_removed_and_leaves_no_hold(
    tmp_path: Path, private_registry: RegistryProcess, repo_name: str
) -> None:
    """After garbage collection really removed its blobs, a restore exits 1 naming the
    missing blobs and GC as the cause, and holds nothing."""
    reg = private_registry
    config = cli.write_config(
        tmp_path / "regsweep.yaml", reg.url, [KEEP_PREFIXED], audit_path=tmp_path / "a.jsonl"
    )
    with ImageBuilder.connect(reg.url) as images:
        image = images.image(repo_name, "drop-1")
        images.image(repo_name, "keep-1")
    prune(config, repo_name)
    collected = reg.garbage_collect()
    assert collected.returncode == 0, collected.stdout + collected.stderr
    reg.restart()  # as after a maintenance window: no blob descriptor cached from before GC
    failed = cli.run("restore", repo_name, image.digest[:19], config=config)
    assert failed.returncode == 1, failed.stdout
    assert "no longer has 2 of its blobs" in failed.stderr
    assert image.config_digest[:19] in failed.stderr
    assert "garbage collection has removed them" in failed.stderr
    assert _holds(config, repo_name) == {}
