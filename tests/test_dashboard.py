"""The dashboard's guards over HTTP on a real uvicorn and Redis: sign-in and roles, the
session cookie, CSRF, the CSP, escaping, failed sign-ins rate-limited, a read-only
deployment, and what its actions enqueue (the workers' side: tests/test_dashboard_jobs.py;
in a browser: tests/test_ui_browser.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from service.access import SIGNIN_ATTEMPTS
from service.app import create_app
from service.ui.app import CSP
from tests.harness import service as h
from tests.harness.dashboard import POLICY, seed_repository
from tests.harness.sinks import RedisListSink
from worker.engine.policy import Policy, RepositoryPattern
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.keys import Keys
from worker.store.state import State

ADMIN = "admin-token-Hd7"
VIEWER = "viewer-token-Pq1"


@dataclass
class Ui:
    url: str
    prefix: str
    sync: redis.Redis

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def enqueued(self) -> list[dict[str, Any]]:
        raw = self.sync.lrange(f"{self.prefix}queue:jobs", 0, -1)
        return [json.loads(m) for m in reversed(raw)]

    def job(self, job_id: str) -> dict[str, Any]:
        raw = self.sync.hgetall(f"{self.prefix}job:{job_id}")
        return {k.decode(): json.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def sign_in(
    http: httpx.Client, token: str, client_headers: dict[str, str] | None = None
) -> httpx.Response:
    csrf = csrf_of(http.get("/ui/signin"))
    return http.post("/ui/signin", data={"csrf": csrf, "token": token}, headers=client_headers)


def _start(hooks: HookSettings, policies: tuple[Policy, ...] = (POLICY,)) -> Iterator[Ui]:
    prefix = h.unique_prefix()

    async def seed() -> None:
        client = aioredis.Redis.from_url(h.REDIS_TEST_URL)
        await seed_repository(client, Keys(prefix), "team/web", 30, index=True)
        await State(client, prefix=prefix).dead_letter(
            "registry", "<script>alert(1)</script>", "<img src=x onerror=alert(2)>"
        )
        await client.aclose()

    asyncio.run(seed())
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"), hooks=hooks, policies=policies
    )
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    sync = redis.Redis.from_url(h.REDIS_TEST_URL)
    with h.running(create_app(config, sink=sink, state=state)) as url:
        yield Ui(url, prefix, sync)
    h.delete_prefix(sync, prefix)
    sync.close()


@pytest.fixture(scope="module")
def ui() -> Iterator[Ui]:
    yield from _start(HookSettings(api_token=Secret(ADMIN), viewer_token=Secret(VIEWER)))


@pytest.fixture(scope="module")
def read_only() -> Iterator[Ui]:
    yield from _start(HookSettings(viewer_token=Secret(VIEWER)))


PAGES = (
    "/ui/",
    "/ui/repositories",
    "/ui/r/team/web",
    "/ui/tag?repository=team/web&tag=build-0029",
    "/ui/jobs",
    "/ui/audit",
    "/ui/maintenance",
    "/ui/dead-letters",
)


def test_pages_need_a_session_and_signing_in_gives_one(ui: Ui) -> None:
    """Signed out, every page redirects to the sign-in form (naming where to come back);
    the viewer token signs in, and every page answers with the strict CSP."""
    with ui.client() as http:
        for path in PAGES:
            answer = http.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith(
                "/ui/signin?next="
            )
        signed = sign_in(http, VIEWER)
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
        for path in PAGES:
            page = http.get(path)
            assert page.status_code == 200, path
            assert page.headers["content-security-policy"] == CSP
            assert page.headers["x-frame-options"] == "DENY"
            assert "<script>" not in page.text.replace('<script src="/ui/static/vendor/', "")


def test_the_session_cookie_is_signed_httponly_strict_and_secure_behind_https(ui: Ui) -> None:
    """The cookie is HttpOnly, SameSite=Strict, scoped to /ui; Secure only when the request
    came over https; a cookie changed by one character is no session."""
    with ui.client() as http:
        plain = sign_in(http, VIEWER).headers["set-cookie"]
        assert "HttpOnly" in plain and "SameSite=strict" in plain and "Path=/ui" in plain
        assert "Secure" not in plain
    with ui.client() as http:
        secure = sign_in(http, VIEWER, {"X-Forwarded-Proto": "https"}).headers["set-cookie"]
        assert "Secure" in secure
        cookie = http.cookies["regsweep_session"]
        tampered = cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1]
        http.cookies.set("regsweep_session", tampered, path="/ui")
        assert http.get("/ui/").status_code == 303


def test_a_wrong_token_is_refused_and_failures_are_rate_limited(ui: Ui) -> None:
    """A wrong token: 401 and no session. After SIGNIN_ATTEMPTS failures from one address,
    even the right token gets 429 with Retry-After (the guesser learns nothing more)."""
    ui.sync.delete(f"{ui.prefix}ui:signin:127.0.0.1")
    try:
        with ui.client() as http:
            for _ in range(SIGNIN_ATTEMPTS):
                assert sign_in(http, "guess").status_code == 401
            blocked = sign_in(http, ADMIN)
            assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
            assert http.get("/ui/").status_code == 303
    finally:
        ui.sync.delete(f"{ui.prefix}ui:signin:127.0.0.1")


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(ui: Ui) -> None:
    """An admin's POST without the session's CSRF token, with another session's, or from
    another site's Origin is refused (403) and enqueues nothing."""
    with ui.client() as http, ui.client() as other:
        sign_in(http, ADMIN)
        stranger = csrf_of(other.get("/ui/signin"))
        form = {"action": "delete-tag", "repository": "team/web", "tag": "build-0001"}
        before = len(ui.enqueued())
        assert http.post("/ui/actions/preview", data=form).status_code == 403
        assert http.post("/ui/actions/preview", data=form | {"csrf": stranger}).status_code == 403
        csrf = csrf_of(http.get("/ui/"))
        evil = {"Origin": "https://evil.example"}
        assert (
            http.post("/ui/actions/preview", data=form | {"csrf": csrf}, headers=evil).status_code
            == 403
        )
        assert len(ui.enqueued()) == before
        assert http.get("/ui/actions/preview").status_code == 405
        # Nor is another site's form signing the admin out.
        signout = http.post("/ui/signout", data={"csrf": csrf}, headers=evil)
        assert signout.status_code == 403
        assert http.get("/ui/").status_code == 200  # still signed in
        assert http.post("/ui/signout", data={"csrf": csrf}).status_code == 303
        assert http.get("/ui/").status_code != 200  # signed out by its own form


def test_the_viewer_changes_nothing(ui: Ui) -> None:
    """Signed in as viewer, no page offers an action, and every action POST (with a valid
    CSRF token) is refused 403 with nothing enqueued or held."""
    with ui.client() as http:
        sign_in(http, VIEWER)
        tag_page = http.get("/ui/tag?repository=team/web&tag=build-0001").text
        assert "/ui/actions/" not in tag_page
        csrf = csrf_of(http.get("/ui/"))
        before = len(ui.enqueued())
        for path, form in (
            (
                "/ui/actions/preview",
                {"action": "delete-tag", "repository": "team/web", "tag": "build-0001"},
            ),
            ("/ui/actions/hold", {"repository": "team/web", "tag": "build-0001"}),
            ("/ui/actions/restore", {"repository": "team/web", "digest": "sha256:" + "a" * 64}),
            ("/ui/actions/run", {"preview": "0" * 32}),
        ):
            assert http.post(path, data=form | {"csrf": csrf}).status_code == 403, path
        assert len(ui.enqueued()) == before
        assert ui.sync.hgetall(f"{ui.prefix}hold:team/web") == {}


def test_a_preview_is_a_dry_run_job_and_its_run_is_bound_to_it(ui: Ui) -> None:
    """The admin's preview enqueues a dry-run delete job of exactly that tag; a preview that
    has not succeeded cannot be run; a succeeded one runs as a new job, not a dry run,
    carrying the preview's plan fingerprint."""
    with ui.client() as http:
        sign_in(http, ADMIN)
        csrf = csrf_of(http.get("/ui/"))
        form = {"csrf": csrf, "action": "delete-tag", "repository": "team/web", "tag": "build-0001"}
        answer = http.post("/ui/actions/preview", data=form)
        preview_id = answer.headers["location"].rsplit("/", 1)[1]
        message = ui.enqueued()[-1]
        assert message["job_id"] == preview_id and message["kind"] == "delete"
        assert message["params"] | {"by": None} == {
            "repository": "team/web",
            "tags": ["build-0001"],
            "dry_run": True,
            "by": None,
        }
        refused = http.post("/ui/actions/run", data={"csrf": csrf, "preview": preview_id})
        assert refused.status_code == 400 and "not succeeded" in refused.text
        plan = {"fingerprint": "f" * 64, "deletions": 1, "listed": []}
        ui.sync.hset(
            f"{ui.prefix}job:{preview_id}",
            mapping={"state": '"succeeded"', "plan": json.dumps(plan)},
        )
        run = http.post("/ui/actions/run", data={"csrf": csrf, "preview": preview_id})
        run_id = run.headers["location"].rsplit("/", 1)[1]
        params = ui.enqueued()[-1]["params"]
        assert ui.enqueued()[-1]["job_id"] == run_id != preview_id
        assert params["dry_run"] is False and params["expect"] == "f" * 64
        assert params["preview"] == preview_id and params["tags"] == ["build-0001"]


def test_hold_and_unhold_are_recorded_as_jobs(ui: Ui) -> None:
    """The admin holds a tag for 3 days (every plan then keeps it) and ends the hold; each is
    a job, which the tag page it leads back to links to; a tag that is no tag name is a 400."""
    with ui.client() as http:
        sign_in(http, ADMIN)
        csrf = csrf_of(http.get("/ui/"))
        form = {"csrf": csrf, "repository": "team/web", "tag": "build-0002"}
        held = http.post("/ui/actions/hold", data=form | {"days": "3"})
        assert held.status_code == 303
        assert b"build-0002" in ui.sync.hkeys(f"{ui.prefix}hold:team/web")
        page = http.get(held.headers["location"]).text
        assert "held" in page and 'id="unhold"' in page
        hold_job = _shown_job(page)
        assert ui.job(hold_job)["kind"] == "hold"
        ended = http.post("/ui/actions/unhold", data=form)
        assert ended.status_code == 303
        assert ui.sync.hgetall(f"{ui.prefix}hold:team/web") == {}
        unhold_job = _shown_job(http.get(ended.headers["location"]).text)
        assert ui.job(unhold_job)["kind"] == "unhold"
        # Another tag's page is not told of this job.
        other = http.get(f"/ui/tag?repository=team/web&tag=build-0001&job={unhold_job}").text
        assert 'id="done"' not in other
        bad = http.post("/ui/actions/hold", data=form | {"tag": "-bad tag"})
        assert bad.status_code == 400 and "tag" in bad.text


def _shown_job(page: str) -> str:
    """The job a tag page says recorded the hold or unhold just made."""
    found = re.search(r'id="done">[^<]*<a href="/ui/jobs/([0-9a-f]{32})"', page)
    assert found is not None, page
    return found.group(1)


def test_everything_shown_is_escaped(ui: Ui) -> None:
    """A dead letter's reason and body holding markup show as text, never as markup."""
    with ui.client() as http:
        sign_in(http, VIEWER)
        page = http.get("/ui/dead-letters").text
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page
        assert "<img src=x" not in page


def test_sign_in_never_redirects_off_the_dashboard(ui: Ui) -> None:
    """``next`` naming another site, or a path outside /ui/, lands on the overview."""
    with ui.client() as http:
        for target in ("https://evil.example/", "//evil.example/ui/", "/metrics"):
            csrf = csrf_of(http.get("/ui/signin"))
            answer = http.post(f"/ui/signin?next={target}", data={"csrf": csrf, "token": VIEWER})
            assert answer.headers["location"] == "/ui/", target


def _dead_letter(ui: Ui, replay: dict[str, Any] | None) -> str:
    async def keep() -> str:
        client = aioredis.Redis.from_url(h.REDIS_TEST_URL)
        try:
            state = State(client, prefix=ui.prefix)
            return await state.dead_letter("prune", "registry down", "{}", replay=replay)
        finally:
            await client.aclose()

    return asyncio.run(keep())


def test_a_dead_letters_work_is_replayed_once_from_its_page(ui: Ui) -> None:
    """A prune that failed for good shows a replay button to the admin (the viewer sees only
    that it is replayable, and is refused); replaying makes one job exactly as
    `regsweep replay` does, and asking again shows that job instead of making another."""
    work = {"kind": "prune", "params": {"repository": "team/web", "trigger": "github"}}
    letter = _dead_letter(ui, work)
    with ui.client() as viewer:
        sign_in(viewer, VIEWER)
        seen = viewer.get("/ui/dead-letters").text
        assert letter in seen and "replayable" in seen
        assert 'action="/ui/dead-letters/replay"' not in seen
        csrf = csrf_of(viewer.get("/ui/"))
        refused = viewer.post("/ui/dead-letters/replay", data={"csrf": csrf, "letter": letter})
        assert refused.status_code == 403
    before = len(ui.enqueued())
    with ui.client() as http:
        sign_in(http, ADMIN)
        page = http.get("/ui/dead-letters")
        assert f'name="letter" value="{letter}"' in page.text
        form = {"csrf": csrf_of(page), "letter": letter}
        first = http.post("/ui/dead-letters/replay", data=form)
        assert first.status_code == 303 and first.headers["location"].startswith("/ui/jobs/")
        job_id = first.headers["location"].removeprefix("/ui/jobs/")
        again = http.post("/ui/dead-letters/replay", data=form)
        assert again.headers["location"] == first.headers["location"]
    queued = ui.enqueued()[before:]
    assert [(m["job_id"], m["kind"]) for m in queued] == [(job_id, "prune")]
    assert queued[0]["params"]["repository"] == "team/web"
    assert queued[0]["params"]["trigger"] == f"replay of dead letter {letter}"
    assert ui.job(job_id)["kind"] == "prune"


def test_a_replay_of_nothing_says_why_and_queues_nothing(ui: Ui) -> None:
    """An unknown id, a malformed one, and a dead letter that holds no work (an unusable
    delivery) are each a 400 naming the reason; nothing is queued."""
    delivery = _dead_letter(ui, None)
    before = len(ui.enqueued())
    with ui.client() as http:
        sign_in(http, ADMIN)
        csrf = csrf_of(http.get("/ui/"))
        for letter, reason in (
            ("0123456789abcdef", "no dead letter"),
            ("../../x", "not a dead letter id"),
            (delivery, "holds nothing to run again"),
        ):
            answer = http.post("/ui/dead-letters/replay", data={"csrf": csrf, "letter": letter})
            assert answer.status_code == 400 and reason in answer.text, (letter, answer.text)
    assert len(ui.enqueued()) == before


def test_a_read_only_deployment_has_no_admin(read_only: Ui) -> None:
    """With only the viewer token the API token signs nobody in, pages say read-only, and an
    action is refused 403."""
    with read_only.client() as http:
        assert sign_in(http, ADMIN).status_code == 401
        sign_in(http, VIEWER)
        assert "read-only" in http.get("/ui/").text
        csrf = csrf_of(http.get("/ui/"))
        form = {"csrf": csrf, "action": "gc"}
        assert http.post("/ui/actions/preview", data=form).status_code == 403
        assert read_only.enqueued() == []


def test_dashboard_jobs_share_the_api_tokens_bound_and_need_a_governing_policy() -> None:
    """The admin's previews and restores count against the API token's bound on queued jobs
    (the admin signed in with that token): past it the form gets 429 with Retry-After and
    nothing is queued, and the job API, sharing the bound, is refused too. A preview or a hold
    in a repository no policy governs is refused naming it, as the job API and `regsweep hold`
    refuse them."""
    hooks = HookSettings(
        api_token=Secret(ADMIN), viewer_token=Secret(VIEWER), max_queued_jobs_per_token=2
    )
    team_only = replace(POLICY, repositories=(RepositoryPattern.compile("team/**"),))
    for ui in _start(hooks, (team_only,)):
        with ui.client() as http:
            sign_in(http, ADMIN)
            form = {"csrf": csrf_of(http.get("/ui/")), "action": "prune"}
            ungoverned = http.post("/ui/actions/preview", data=form | {"repository": "other/app"})
            assert ungoverned.status_code == 400
            assert "no policy governs other/app" in ungoverned.text
            assert ui.enqueued() == []
            hold = {"csrf": form["csrf"], "repository": "other/app", "tag": "v1"}
            refused = http.post("/ui/actions/hold", data=hold)
            assert refused.status_code == 400 and "nothing was held" in refused.text
            assert ui.sync.keys(f"{ui.prefix}hold:*") == []
            for _ in range(2):
                queued = http.post("/ui/actions/preview", data=form | {"repository": "team/web"})
                assert queued.status_code == 303
            full = http.post("/ui/actions/preview", data=form | {"repository": "team/web"})
            assert full.status_code == 429 and full.headers["retry-after"].isdigit()
            assert full.headers["content-type"].startswith("text/html")  # the dashboard's page
            assert "jobs of this API token are queued (at most 2)" in full.text
            assert len(ui.enqueued()) == 2
            api = http.post(
                "/api/v1/jobs",
                json={"kind": "prune", "repository": "team/web"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert api.status_code == 429
            assert len(ui.enqueued()) == 2


def _rows(page: str) -> list[str]:
    """The tags of a repository page's table, top to bottom (folded referrers are no rows)."""
    return re.findall(r'<tr class="v-[^"]+" data-tag="([^"]+)"', page)


def test_the_tag_table_sorts_filters_and_pages_on_the_server(ui: Ui) -> None:
    """A repository page orders its rows by push time (newest first) unless asked otherwise,
    by tag either way, keeps the verdict asked for, pages what it sorted, and its column
    links flip the order."""
    with ui.client() as http:
        sign_in(http, VIEWER)
        by_tag = _rows(http.get("/ui/r/team/web?sort=tag&order=asc").text)
        assert len(by_tag) > 20 and by_tag == sorted(by_tag)
        assert _rows(http.get("/ui/r/team/web?sort=tag&order=desc").text) == by_tag[::-1]
        plan = http.get(
            "/api/v1/repositories/team/web/plan", headers={"Authorization": f"Bearer {VIEWER}"}
        ).json()
        rows = {row["tag"]: row for row in plan["tags"]}
        pushed = [
            (rows[t]["pushed"] or {}).get("latest") or ""
            for t in _rows(http.get("/ui/r/team/web").text)
        ]
        assert pushed == sorted(pushed, reverse=True) and len(set(pushed)) > 1
        kept = _rows(http.get("/ui/r/team/web?verdict=keep").text)
        assert kept == [
            t for t in _rows(http.get("/ui/r/team/web").text) if rows[t]["verdict"] == "keep"
        ]
        assert kept and len(kept) < len(by_tag)
        second = http.get("/ui/r/team/web?sort=tag&order=asc&per_page=10&page=2").text
        assert _rows(second) == by_tag[10:20]
        flip = re.search(r'href="\?([^"]*sort=tag[^"]*)">Tag ▲', second)
        assert flip is not None and "order=desc" in flip.group(1)
