"""Normalising registry envelopes, GitHub and GitLab payloads and job requests."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from service.api import parse_job_request
from service.hooks.github import github_zen, parse_github
from service.hooks.gitlab import parse_gitlab
from service.hooks.registry import parse_registry_envelope
from tests.harness import service as h
from worker.engine.events import CiEvent, RegistryEvent, RegistryEventKind
from worker.errors import BadEvent
from worker.queue.messages import JobKind, JobRequest


def test_manifest_push_is_parsed_with_every_field() -> None:
    """A 2.8 manifest push becomes a RegistryEvent with digest, tag, type, size and UTC time."""
    raw = h.registry_event(tag="v1", digest=h.digest_of("x"), event_id="ev-1")
    parsed = parse_registry_envelope(h.envelope(raw))
    assert parsed.ignored == 0 and parsed.dead == ()
    (event,) = parsed.events
    assert event.id == "ev-1"
    assert event.kind is RegistryEventKind.MANIFEST_PUSH
    assert (event.repository, event.tag, event.digest) == ("team/web", "v1", h.digest_of("x"))
    assert event.media_type == h.OCI_MANIFEST and event.size == 528
    assert event.timestamp == datetime(2025, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)


def test_event_round_trips_through_dict() -> None:
    """to_dict/from_dict give back an equal event, so the sink's JSON loses nothing."""
    (event,) = parse_registry_envelope(h.envelope(h.registry_event())).events
    assert RegistryEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    ci = CiEvent("github", "d-1", "acme/web", "pull_request_closed", 4, "feat", True)
    assert CiEvent.from_dict(json.loads(json.dumps(ci.to_dict()))) == ci


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (h.registry_event("push", media_type="application/octet-stream", tag=None), "ignored"),
        (h.registry_event("pull"), "ignored"),
        (h.registry_event("mount", media_type="application/octet-stream", tag=None), "ignored"),
        (h.registry_event("delete", tag=None, media_type=None, digest=h.digest_of("d")), "md"),
        (h.registry_event("delete", tag="v1", media_type=None), "td"),
        (h.registry_event("delete", tag=None, media_type=None), "rd"),
    ],
    ids=["blob-push", "pull", "mount", "digest-delete", "tag-delete-3x", "repo-delete"],
)
def test_events_are_classified(raw: dict[str, object], kind: str) -> None:
    """Blob pushes, pulls (HEADs) and mounts are ignored; the three delete shapes are told apart."""
    parsed = parse_registry_envelope(h.envelope(raw))
    if kind == "ignored":
        assert parsed.ignored == 1 and parsed.events == ()
        return
    expected = {
        "md": RegistryEventKind.MANIFEST_DELETE,
        "td": RegistryEventKind.TAG_DELETE,
        "rd": RegistryEventKind.REPOSITORY_DELETE,
    }[kind]
    (event,) = parsed.events
    assert event.kind is expected


def test_tag_delete_without_digest_is_kept() -> None:
    """A 3.x tag delete carries no digest; it still parses, with digest None."""
    (event,) = parse_registry_envelope(
        h.envelope(h.registry_event("delete", tag="pr-7", media_type=None))
    ).events
    assert event.digest is None and event.tag == "pr-7"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e["target"].update(repository="team/../etc"), "target.repository"),
        (lambda e: e["target"].update(repository="team%2fweb"), "target.repository"),
        (lambda e: e["target"].update(repository="Team/Web"), "target.repository"),
        (lambda e: e["target"].update(tag="t" * 129), "target.tag"),
        (lambda e: e["target"].update(tag="-bad"), "target.tag"),
        (lambda e: e["target"].update(digest="sha256:1234"), "target.digest"),
        (lambda e: e.pop("id"), "id is missing"),
        (lambda e: e.update(timestamp="yesterday"), "timestamp"),
        (lambda e: e.update(target="nope"), "no target"),
        (lambda e: e.update(timestamp="9999-12-31T23:59:59-23:59"), "timestamp"),
        (lambda e: e.update(timestamp="2001-01-01T00:00:00Z"), "before 2013-03-20"),
        (lambda e: e.update(timestamp="2999-01-01T00:00:00Z"), "ahead of this clock"),
        (lambda e: e.update(id="x" * 257), "id is longer than 256"),
        (lambda e: e.update(id="caf\u00e9 id"), "printable ASCII"),
        (lambda e: e["target"].update(mediaType="not a media type"), "target.mediaType"),
        (lambda e: e["target"].update(size=2**64), "64-bit"),
        (lambda e: e["target"].update(url="http://x/\u0000"), "target.url"),
    ],
    ids=[
        "dotdot",
        "pct2f",
        "upper",
        "long-tag",
        "tag-dash",
        "digest",
        "no-id",
        "time",
        "target",
        "year-10000-in-utc",
        "before-docker",
        "far-future",
        "long-id",
        "non-ascii-id",
        "media-type",
        "huge-size",
        "url-control",
    ],
)
def test_invalid_events_become_dead_letters(mutate: object, reason: str) -> None:
    """An event with a bad name, tag, digest, id or time is dead-lettered, never raised."""
    raw = h.registry_event(event_id="bad-1")
    mutate(raw)  # type: ignore[operator]
    good = h.registry_event(event_id="good-1")
    parsed = parse_registry_envelope(h.envelope(raw, good))
    assert [e.id for e in parsed.events] == ["good-1"]
    (dead,) = parsed.dead
    assert reason in dead.reason
    assert dead.event_id in ("bad-1", None)


def test_an_envelope_is_read_to_its_first_thousand_events_and_summarised_once() -> None:
    """Events past the 1000th are not read but counted as dead letters; a summary names the
    first five unusable events and counts the rest, in one line."""
    good = [h.registry_event(event_id=f"g{i}", tag=f"t{i}") for i in range(1003)]
    long = parse_registry_envelope(h.envelope(*good))
    assert (len(long.events), long.dead_count) == (1000, 3)
    assert long.dead_summary() == "3 events beyond the first 1000 were not read"
    bad = [h.registry_event(event_id=f"b{i}", tag="-bad") for i in range(8)]
    mixed = parse_registry_envelope(h.envelope(*good[:12], *bad))
    assert (len(mixed.events), mixed.dead_count) == (12, 8)
    summary = mixed.dead_summary()
    assert summary.count("target.tag") == 5 and summary.endswith("; 3 more unusable events")
    assert summary.startswith("event b0: ") and "b5" not in summary


def test_tag_of_128_characters_is_valid() -> None:
    """The tag grammar allows exactly 128 characters, so the limit is not off by one."""
    (event,) = parse_registry_envelope(h.envelope(h.registry_event(tag="t" * 128))).events
    assert event.tag == "t" * 128


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"events": 3}', b"\xff\xfe"])
def test_unusable_envelope_is_one_dead_letter(body: bytes) -> None:
    """A body that is not an envelope gives one dead letter and no events."""
    parsed = parse_registry_envelope(body)
    assert parsed.events == () and len(parsed.dead) == 1


def test_github_pull_request_closed_unmerged() -> None:
    """A closed, unmerged pull request is a pull_request_closed event with number and branch."""
    event = parse_github("pull_request", h.github_pull_request(merged=False, number=9), "d1")
    assert event == CiEvent(
        source="github",
        delivery_id="d1",
        project="acme/web",
        kind="pull_request_closed",
        number=9,
        branch="feature/login",
        merged=False,
    )


def test_github_branch_deletes() -> None:
    """Both `delete` (short ref) and `push` with deleted: true name the deleted branch."""
    for event in (
        parse_github("delete", h.github_delete(), "d2"),
        parse_github("push", h.github_push(), "d3"),
    ):
        assert event is not None
        assert (event.kind, event.branch, event.project) == (
            "branch_deleted",
            "feature/login",
            "acme/web",
        )


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("pull_request", h.github_pull_request(action="opened")),
        ("delete", h.github_delete(ref_type="tag")),
        ("push", h.github_push(deleted=False)),
        ("push", h.github_push(ref="refs/tags/v1")),
        ("issues", b'{"action": "opened"}'),
    ],
    ids=["pr-opened", "tag-delete", "push", "tag-push-delete", "issues"],
)
def test_github_events_that_delete_nothing_are_none(name: str, body: bytes) -> None:
    """Opened PRs, tag deletes, ordinary pushes and other event types give None."""
    assert parse_github(name, body, "d") is None


def test_github_malformed_payloads_raise_bad_event() -> None:
    """A closed PR without a number, or a non-JSON body, raises BadEvent naming the problem."""
    document = json.loads(h.github_pull_request())
    del document["pull_request"]["number"]
    with pytest.raises(BadEvent, match=r"pull_request\.number"):
        parse_github("pull_request", json.dumps(document).encode(), "d")
    with pytest.raises(BadEvent, match="not JSON"):
        parse_github("push", b"{", "d")
    assert github_zen(h.github_ping()) == "Keep it logically awesome."


@pytest.mark.parametrize(("action", "merged"), [("merge", True), ("close", False)])
def test_gitlab_merge_request_closed(action: str, merged: bool) -> None:
    """A Merge Request Hook with action merge or close gives the iid and source branch."""
    event = parse_gitlab("Merge Request Hook", h.gitlab_merge_request(action, iid=11), "u1")
    assert event == CiEvent(
        "gitlab", "u1", "acme/web", "pull_request_closed", 11, "feature/login", merged
    )


def test_gitlab_push_hook_branch_delete() -> None:
    """A Push Hook whose `after` is 40 zeros deletes the branch; other pushes give None."""
    event = parse_gitlab("Push Hook", h.gitlab_push(), "u2")
    assert event is not None and (event.kind, event.branch) == ("branch_deleted", "feature/login")
    assert parse_gitlab("Push Hook", h.gitlab_push(after="e" * 40), "u3") is None
    assert parse_gitlab("Merge Request Hook", h.gitlab_merge_request("open"), "u4") is None
    assert parse_gitlab("Note Hook", b"{}", "u5") is None
    with pytest.raises(BadEvent, match="object_attributes"):
        parse_gitlab("Merge Request Hook", b'{"object_kind": "merge_request"}', "u6")


def test_job_requests_are_validated() -> None:
    """Job requests parse into JobRequest (a restore's digest whole or a prefix) and refuse bad
    kinds, names, digests, fields and shapes."""
    assert parse_job_request(b'{"kind": "prune", "repository": "team/web"}') == JobRequest(
        JobKind.PRUNE, "team/web"
    )
    restore = parse_job_request(
        json.dumps({"kind": "restore", "repository": "a/b", "digest": h.digest_of("r")}).encode()
    )
    assert restore.params == {"repository": "a/b", "digest": h.digest_of("r")}
    for prefix in (h.digest_of("r")[:19], h.digest_of("r")[7:19]):
        request = {"kind": "restore", "repository": "a/b", "digest": prefix}
        assert parse_job_request(json.dumps(request).encode()).digest == prefix
    for body, message in [
        (b'{"kind": "restore", "repository": "a/b", "digest": "sha256:"}', "digest"),
        (b'{"kind": "restore", "repository": "a/b", "digest": "ABC123"}', "digest"),
        (b'{"kind": "restore", "repository": "a/b", "digest": "md5:abc"}', "digest"),
        (b'{"kind": "nuke"}', "kind must be"),
        (b'{"kind": "prune", "repository": "a/../b"}', "repository"),
        (b'{"kind": "gc", "repository": "a/b"}', "gc runs"),
        (b'{"kind": "restore", "repository": "a/b"}', "restore needs"),
        (b'{"kind": "sweep", "dry_run": "yes"}', "dry_run"),
        (b'{"kind": "sweep", "force": true}', "unknown fields: force"),
    ]:
        with pytest.raises(BadEvent, match=message):
            parse_job_request(body)
