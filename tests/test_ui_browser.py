"""The dashboard in a real browser: Debian's chromium driven by Playwright, against the real
service (uvicorn), registry 2.8.2 (its notifications reaching the service, GC by the
process controller), a private Redis and a real Celery worker.

One stack for the module; the tests run in file order (GC last: it takes away what a
restore needs). Each page visited is screenshotted into docs/ui/ (docs/ui.md shows them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, cast

import pytest
import redis
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

from tests.harness.dashboard import ADMIN_TOKEN, VIEWER_TOKEN, UiStack, ui_stack
from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.stack import wait_for

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs/ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 760}
SLOW_REPOSITORY = "ui/progress"
POLICIES: list[dict[str, Any]] = [
    {
        "name": "progress",
        "repositories": [SLOW_REPOSITORY],
        "mode": "enforce",
        "keep": [{"tags": ["*"], "newest": 2}],
    },
    {
        "name": "apps",
        "repositories": ["ui/**"],
        "mode": "dry-run",
        "protect": ["latest"],
        "keep": [{"tags": ["v*"]}, {"tags": ["*"], "newest": 3}],
    },
]
#: Generous: a loaded CI machine runs five suites at once.
WAIT: Final = 60.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiStack]:
    with ui_stack(tmp_path_factory.mktemp("ui"), POLICIES, SLOW_REPOSITORY.encode()) as running:
        yield running


@pytest.fixture(scope="module")
def images(stack: UiStack) -> Iterator[ImageBuilder]:
    with ImageBuilder.connect(stack.registry_url) as builder:
        yield builder


@pytest.fixture(scope="module")
def state(stack: UiStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = _launch(playwright)
        yield launched
        launched.close()


def _launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _signed_in(browser: Browser, stack: UiStack, token: str) -> tuple[BrowserContext, Page]:
    context = browser.new_context(base_url=stack.url, viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    page.goto("/ui/")
    expect(page).to_have_url(f"{stack.url}/ui/signin?next=%2Fui%2F")
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Overview")
    return context, page


@pytest.fixture(scope="module")
def admin(browser: Browser, stack: UiStack) -> Iterator[Page]:
    context, page = _signed_in(browser, stack, ADMIN_TOKEN)
    yield page
    context.close()


@pytest.fixture(scope="module")
def seeded(stack: UiStack, images: ImageBuilder, state: redis.Redis) -> dict[str, PushedImage]:
    """ui/app: v1.0 and v1.0-rc sharing a digest, a signed v2.0, old builds and latest; each
    push notified, and the push-time prunes (dry run) done: their plan is on the page."""
    shared = images.image("ui/app", ("v1.0", "v1.0-rc"))
    signed = images.image("ui/app", "v2.0")
    images.cosign("ui/app", signed)
    for i in range(5):
        images.image("ui/app", f"build-{i}")
    images.image("ui/app", "latest")
    wait_for(lambda: _view_has(state, "ui/app", "latest"), timeout=WAIT, what="ui/app planned")
    return {"shared": shared, "signed": signed}


def _view_has(state: redis.Redis, repository: str, tag: str) -> bool:
    raw = state.get(f"regsweep:view:{repository}")
    return raw is not None and any(r["tag"] == tag for r in json.loads(str(raw))["tags"])


def _quiet(state: redis.Redis, repository: str) -> bool:
    """No prune of ``repository`` is waiting, running or recorded unfinished."""
    if state.exists(f"regsweep:pending:prune:{repository}", f"regsweep:lock:prune:{repository}"):
        return False
    for job_id in cast(list[str], state.zrange("regsweep:jobs:recent", 0, -1)):
        job = {k: json.loads(v) for k, v in state.hgetall(f"regsweep:job:{job_id}").items()}
        mine = (job.get("params") or {}).get("repository") == repository
        if mine and job.get("state") not in ("succeeded", "failed", "skipped"):
            return False
    return True


def shot(page: Page, name: str) -> None:
    """``docs/ui/NAME.png``, which docs/ui.md must show (a screenshot nobody sees is lost)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    assert f"(ui/{name}.png)" in (ROOT / "docs/ui.md").read_text(), f"docs/ui.md lacks {name}"


def finished(page: Page, state: str = "succeeded") -> None:
    """The job page's state (updated live over SSE, no reload) reaches ``state``."""
    expect(page.locator("#job-state")).to_have_text(state, timeout=WAIT * 1000)


def test_sign_in_and_browse(
    browser: Browser, stack: UiStack, seeded: dict[str, PushedImage]
) -> None:
    """The sign-in form takes the admin token; the overview, the repositories (searched on the
    server), a repository's tags with push time, source, verdict and reason, and a tag's page
    with the tags sharing its digest all show."""
    context = browser.new_context(base_url=stack.url, viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    page.goto("/ui/signin")
    shot(page, "signin")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Overview")
    shot(page, "overview")
    page.click("nav >> text=Repositories")
    page.fill("#q", "app")
    page.click("text=Search")
    expect(page.locator("#repositories tbody tr")).to_have_count(1)
    shot(page, "repositories")
    page.click("#repositories >> text=ui/app")
    rows = page.locator("#tags tbody tr")
    expect(page.locator("#tags tr[data-tag='build-0'] .badge.v-delete")).to_have_text("delete")
    expect(page.locator("#tags tr[data-tag='v2.0']")).to_contain_text("notification")
    expect(page.locator("#tags tr[data-tag='latest']")).to_contain_text("protected")
    assert rows.count() == 9  # the signature is folded under v2.0
    expect(page.locator("#tags tr[data-tag='v2.0'] details")).to_contain_text("1 referrers")
    shot(page, "repository")
    page.click("#tags >> text=v1.0-rc")
    expect(page.locator("#siblings")).to_have_text("v1.0")
    shot(page, "tag")
    context.close()


def test_delete_one_of_two_tags_sharing_a_digest(
    admin: Page, images: ImageBuilder, seeded: dict[str, PushedImage]
) -> None:
    """Deleting v1.0-rc, whose digest v1.0 shares, is previewed (a tag-only removal, nothing
    deleted yet), then run by a separate button: v1.0-rc is gone, v1.0 and the whole image
    (manifest, config, layers) stay, as the registry's own API says."""
    shared = seeded["shared"]
    admin.goto("/ui/tag?repository=ui/app&tag=v1.0-rc")
    admin.click("#preview-delete-tag")
    finished(admin)
    expect(admin.locator("#plan tbody tr")).to_have_count(1)
    expect(admin.locator("#plan")).to_contain_text("untag")
    assert images.tags("ui/app").count("v1.0-rc") == 1, "a preview deletes nothing"
    shot(admin, "preview")
    admin.click("#run")
    finished(admin)
    expect(admin.locator("#deletions")).to_contain_text("v1.0-rc")
    shot(admin, "job")
    tags = images.tags("ui/app")
    assert "v1.0-rc" not in tags and "v1.0" in tags
    assert images.manifest_exists("ui/app", shared.digest)
    for blob in (shared.config_digest, *shared.layer_digests):
        assert images.blob_exists("ui/app", blob)


def test_restore_it(admin: Page, images: ImageBuilder) -> None:
    """The audit lists the removal with a restore button; the restore job puts v1.0-rc back."""
    admin.goto("/ui/audit?repository=ui/app")
    expect(admin.locator("#audit")).to_contain_text("v1.0-rc")
    shot(admin, "audit")
    admin.locator("#audit tr", has_text="v1.0-rc").locator("text=Restore…").click()
    expect(admin.locator("#to-restore")).to_contain_text("v1.0-rc")
    shot(admin, "restore")
    admin.click("#restore")
    finished(admin)
    assert "v1.0-rc" in images.tags("ui/app")


def test_watch_a_prunes_progress(
    admin: Page, stack: UiStack, images: ImageBuilder, state: redis.Redis
) -> None:
    """A prune of 10 deletions (through a slowed registry) is previewed, then run; its page
    shows the deletions settling one wave after another, live (no reload), to the end."""
    tags = [f"p{i:02d}" for i in range(12)]
    # Held while pushed, so the push-time prunes keep them all; released before the preview.
    for tag in tags:
        state.hset(
            f"regsweep:hold:{SLOW_REPOSITORY}",
            tag,
            json.dumps({"until": "9999999999", "reason": "test"}),
        )
    for tag in tags:
        images.image(SLOW_REPOSITORY, tag)
    wait_for(lambda: _view_has(state, SLOW_REPOSITORY, "p11"), timeout=WAIT, what="planned")
    # No push-time prune may still run or wait once the holds end: it would delete for real.
    wait_for(lambda: _quiet(state, SLOW_REPOSITORY), timeout=WAIT, what="push prunes done")
    state.delete(f"regsweep:hold:{SLOW_REPOSITORY}")
    admin.goto(f"/ui/r/{SLOW_REPOSITORY}")
    admin.click("text=Preview a prune")
    finished(admin)
    expect(admin.locator("#plan tbody tr")).to_have_count(10)
    admin.click("#run")
    admin.evaluate("window.__notReloaded = true")
    progress = admin.locator("#progress")
    expect(progress).to_contain_text("of 10 deletions settled", timeout=WAIT * 1000)
    seen: set[str] = set()

    def settled() -> bool:
        seen.add(progress.inner_text().split(" of ")[0])
        return admin.locator("#job-state").inner_text() == "succeeded"

    wait_for(settled, timeout=WAIT, step=0.05, what="the prune to finish")
    shot(admin, "job-progress")
    assert admin.evaluate("window.__notReloaded") is True, "updated live, not reloaded"
    assert seen - {"0", "10"}, f"no intermediate progress seen: {seen}"
    assert images.tags(SLOW_REPOSITORY) == ["p10", "p11"]


def test_run_gc_and_see_its_report(admin: Page) -> None:
    """GC is previewed (a dry run) and run from the maintenance page; its report shows the
    blobs deleted and bytes reclaimed, and the maintenance page charts it."""
    admin.goto("/ui/maintenance")
    admin.click("#preview-gc")
    finished(admin)
    admin.click("#run")
    finished(admin)
    report = admin.locator("#gc-report")
    expect(report).to_contain_text("Bytes reclaimed")
    assert "deleted" in report.inner_text()
    shot(admin, "gc")
    admin.goto("/ui/maintenance")
    expect(admin.locator("#gc-chart rect")).to_have_count(1)
    shot(admin, "maintenance")
    admin.goto("/ui/jobs")
    shot(admin, "jobs")
    admin.goto("/ui/dead-letters")
    shot(admin, "dead-letters")


def test_a_csrf_less_post_and_the_viewer_change_nothing(
    admin: Page, browser: Browser, stack: UiStack, state: redis.Redis
) -> None:
    """A POST from the admin's own page without the CSRF token is refused (403), as is a
    viewer's with it; the viewer's pages offer no action; no job was recorded by either."""
    before = state.zcard("regsweep:jobs:recent")
    admin.goto("/ui/")
    status = admin.evaluate(
        """async () => (await fetch('/ui/actions/preview', {method: 'POST',
            headers: {'Content-Type': 'application/x-www-form-urlencoded'},
            body: 'action=gc'})).status"""
    )
    assert status == 403
    context, viewer = _signed_in(browser, stack, VIEWER_TOKEN)
    try:
        viewer.goto("/ui/tag?repository=ui/app&tag=v1.0")
        expect(viewer.locator("h1")).to_have_text("ui/app:v1.0")
        assert viewer.locator("form[action^='/ui/actions/']").count() == 0
        refused = viewer.evaluate(
            """async () => {
                const csrf = document.querySelector('input[name=csrf]').value;
                const body = new URLSearchParams({csrf, action: 'gc'});
                return (await fetch('/ui/actions/preview', {method: 'POST', body})).status;
            }"""
        )
        assert refused == 403
    finally:
        context.close()
    assert state.zcard("regsweep:jobs:recent") == before
