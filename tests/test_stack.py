"""The shipped stack, brought up for real: ``scripts/stack up`` on compose.yaml.

Registry, Redis, service, workers and beat run as containers of locally built
images (scripts/images); the tests reach them only through what a user has:
the published registry and service ports, the CI examples' commands, Docker
(to kill a container), ``scripts/stack`` itself. The tests run in file order on
one stack; the last one takes it down and looks for anything left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from service.ui.app import VENDOR
from tests.harness import service as payloads
from tests.harness import stack as s
from tests.harness.compose import UP_TIMEOUT, ComposeStack, json_log_lines, remove_project
from tests.harness.docker import docker_engine
from tests.harness.images import ImageBuilder, PushedImage, random_layer
from tests.harness.registry import RegistryBinary
from worker import oci

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
LAYER_SIZE = 256 * 1024
#: The `ci` policy keeps `pr-*` tags this long; the CI examples' prune removes them after.
CI_RETENTION = 20.0
KILL_TAGS = 60

POLICIES: list[dict[str, Any]] = [
    {
        "name": "ci",
        "repositories": ["e2e/ci-*"],
        "mode": "enforce",
        "keep": [{"tags": ["main-*"]}, {"tags": ["pr-*"], "pushed_within": f"{CI_RETENTION:.0f}s"}],
    },
    {
        "name": "main",
        "repositories": ["e2e/**"],
        "mode": "enforce",
        "protect": ["latest"],
        "keep": [{"tags": ["main-*"], "newest": 2}, {"tags": ["pr-*"], "pushed_within": "30d"}],
        "untagged": {"delete_after": "0s"},
        "on": {"pull_request_closed": ["pr-{number}", "pr-{number}-*"]},
        "sources": {"github": ["acme/web"]},
    },
]


#: Notifications go to a receiver container on the stack's network (test_notifications_...).
NOTIFY_SECRET = f"T0{uuid.uuid4().hex}"
NOTIFY_ENV = {"REGSWEEP_NOTIFY_WEBHOOK_URL": f"http://notify-receiver:8080/hook/{NOTIFY_SECRET}"}
NOTIFY: list[dict[str, Any]] = [
    {
        "name": "stack-webhook",
        "kind": "webhook",
        "url_env": "REGSWEEP_NOTIFY_WEBHOOK_URL",
        "events": ["prune.deleted", "gc.finished"],
        "timeout": "2s",
    }
]


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    engine = docker_engine()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, client: docker.DockerClient
) -> Iterator[ComposeStack]:
    made = ComposeStack(
        tmp_path_factory.mktemp("compose"), POLICIES, notify=NOTIFY, extra_env=NOTIFY_ENV
    )
    try:
        made.up()
        yield made
    finally:
        made.down()
        remove_project(client, made.project)


@pytest.fixture(scope="module")
def images(stack: ComposeStack) -> Iterator[ImageBuilder]:
    with ImageBuilder.connect(stack.registry_url) as builder:
        yield builder


@pytest.fixture(scope="module")
def ci_tags(images: ImageBuilder) -> dict[str, Any]:
    """`pr-*` tags for the CI examples, pushed as early as possible (they must age first)."""
    pushed = {
        repository: (image(images, repository, "pr-11"), image(images, repository, "main-1"))
        for repository in ("e2e/ci-github", "e2e/ci-gitlab")
    }
    return {"pushed_at": time.monotonic(), "images": pushed}


@pytest.fixture(scope="module")
def http(stack: ComposeStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.service_url, timeout=10) as session:
        yield session


def image(images: ImageBuilder, repository: str, tag: str) -> PushedImage:
    return images.image(repository, tag, layers=[random_layer(LAYER_SIZE)])


def manifest_status(images: ImageBuilder, repository: str, reference: str) -> int:
    response = images.client.head(
        f"/v2/{repository}/manifests/{reference}", headers={"Accept": oci.MANIFEST_ACCEPT}
    )
    return response.status_code


def assert_whole(images: ImageBuilder, pushed: PushedImage) -> None:
    """The image's manifest and every blob it references still answer 200."""
    assert manifest_status(images, pushed.repository, pushed.digest) == 200, pushed.tags
    for blob in (pushed.config_digest, *pushed.layer_digests):
        response = images.client.head(f"/v2/{pushed.repository}/blobs/{blob}")
        assert response.status_code == 200, (pushed.tags, blob)


def wait_gone(
    images: ImageBuilder, stack: ComposeStack, repository: str, reference: str, timeout: float = 60
) -> None:
    try:
        s.wait_for(lambda: manifest_status(images, repository, reference) == 404, timeout, 0.1)
    except AssertionError as exc:
        logs = stack.logs("worker", "service", "registry")
        raise AssertionError(f"{repository}:{reference} still there\n{logs}") from exc


def tags(images: ImageBuilder, repository: str) -> set[str]:
    response = images.client.get(f"/v2/{repository}/tags/list")
    return set(response.json().get("tags") or []) if response.status_code == 200 else set()


def finished_job(http: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(f"/api/v1/jobs/{job_id}", headers=s.API_HEADERS).json()
        return job if job["state"] in ("succeeded", "failed", "skipped", "deferred") else None

    return s.wait_for(final, timeout=timeout, step=0.2)


def read_live(http: httpx.Client, repository: str) -> None:
    """Have regsweep read ``repository`` live once (a dry-run prune over the API).

    The first prune of a repository lists its tags live and makes the tag index
    agree; a tag pushed while that listing is in flight is dropped from the index
    until the next sweep (a missed deletion, never a wrong one; reported). Tests
    that push a burst to a new repository push it after this read, so they test
    what they name rather than that race.
    """
    response = http.post(
        "/api/v1/jobs",
        json={"kind": "prune", "repository": repository, "dry_run": True},
        headers=s.API_HEADERS,
    )
    assert response.status_code == 202, response.text
    job = finished_job(http, response.json()["job_id"])
    assert job["state"] == "succeeded", job


def post_github_pull_request_closed(http: httpx.Client, number: int) -> None:
    body = payloads.github_pull_request("closed", merged=True, number=number)
    headers = payloads.github_headers(s.GITHUB_SECRET, body, "pull_request")
    response = http.post("/hooks/github", content=body, headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "accepted", response.text


def health(container: Any) -> str:
    container.reload()
    return str(container.attrs["State"].get("Health", {}).get("Status", "none"))


# --------------------------------------------------------------------------- tests


def test_up_brings_every_service_up_healthy(stack: ComposeStack, ci_tags: dict[str, Any]) -> None:
    """`scripts/stack up` prints the published URLs; `scripts/stack status` lists all six
    services healthy; the service answers /readyz.

    (``ci_tags`` is pushed here, first, so that those tags have aged by the CI examples' test.)
    """
    assert f"{stack.registry_url}/v2/" in stack.up_output
    assert f"{stack.service_url}/api/v1/jobs" in stack.up_output
    done = stack.run("status")
    assert done.returncode == 0, done.stderr
    states = dict(line.split() for line in done.stdout.splitlines())
    expected = {"registry", "redis", "service", "worker", "gc-worker", "beat"}
    assert states == {name: "healthy" for name in expected}
    assert httpx.get(f"{stack.service_url}/readyz", timeout=5).status_code == 200
    # The image serves the dashboard's JavaScript that scripts/setup's `npm ci` installed.
    for name in ("htmx.min.js", "sse.js"):
        script = httpx.get(f"{stack.service_url}/ui/static/vendor/{name}", timeout=5)
        assert script.status_code == 200, name
        assert script.content == VENDOR[name].read_bytes(), name


def test_push_prunes_the_superseded_tag(
    stack: ComposeStack, images: ImageBuilder, http: httpx.Client
) -> None:
    """Pushes through the published port reach the worker by notification: the build pushed
    out of `newest: 2` goes, the two kept images stay whole."""
    repository = "e2e/push"
    builds = [image(images, repository, "main-1")]
    read_live(http, repository)
    builds += [image(images, repository, f"main-{n}") for n in (2, 3)]
    wait_gone(images, stack, repository, builds[0].digest)
    assert manifest_status(images, repository, "main-1") == 404
    for kept in builds[1:]:
        assert_whole(images, kept)


def test_github_pull_request_closed_deletes_its_tags(
    stack: ComposeStack, images: ImageBuilder, http: httpx.Client
) -> None:
    """A signed `pull_request` closed hook deletes `pr-7` and `pr-7-*`, not `pr-70`."""
    repository = "e2e/web"
    gone = [image(images, repository, tag) for tag in ("pr-7", "pr-7-arm64")]
    kept = [image(images, repository, tag) for tag in ("pr-70", "main-1")]
    read_live(http, repository)
    post_github_pull_request_closed(http, 7)
    for pushed in gone:
        wait_gone(images, stack, repository, pushed.digest)
    for pushed in kept:
        assert_whole(images, pushed)


def test_gc_job_recreates_the_registry_read_only_and_back(
    stack: ComposeStack, images: ImageBuilder, http: httpx.Client, client: docker.DockerClient
) -> None:
    """A GC job through the docker controller reclaims bytes; the registry container comes back
    with its name, network alias, published port, restart policy and healthcheck, read-write."""
    before = stack.container(client, "registry").attrs
    response = http.post("/api/v1/jobs", json={"kind": "gc"}, headers=s.API_HEADERS)
    assert response.status_code == 202, response.text
    job = finished_job(http, response.json()["job_id"], timeout=180)
    assert job["state"] == "succeeded", f"{job}\n{stack.logs('gc-worker')}"
    assert job["bytes"] > 0 and job["report"]["readonly_seconds"] > 0
    assert job["report"]["left_readonly"] is False
    after_container = stack.container(client, "registry")
    after = after_container.attrs
    assert after["Id"] != before["Id"] and after["Name"] == before["Name"]
    network = f"{stack.project}_default"
    assert "registry" in after["NetworkSettings"]["Networks"][network]["Aliases"]
    for key in ("PortBindings", "RestartPolicy"):
        assert after["HostConfig"][key] == before["HostConfig"][key], key
    assert after["Config"]["Healthcheck"] == before["Config"]["Healthcheck"]
    assert not any("MAINTENANCE_READONLY" in e for e in after["Config"]["Env"])
    s.wait_for(lambda: health(after_container) == "healthy", timeout=60, step=0.5)
    # Writable again, and still notifying: the next push prunes as before.
    builds = [image(images, "e2e/after-gc", "main-1")]
    read_live(http, "e2e/after-gc")
    builds += [image(images, "e2e/after-gc", f"main-{n}") for n in (2, 3)]
    wait_gone(images, stack, "e2e/after-gc", builds[0].digest)


def ci_script(example: str) -> tuple[str, dict[str, str]]:
    """The shell script and the non-secret variables of one of examples/ci/."""
    document = yaml.safe_load((ROOT / "examples" / "ci" / example).read_text())
    if example == "github-actions.yml":
        job = document["jobs"]["prune"]
        return job["steps"][0]["run"], {"REPOSITORY": job["env"]["REPOSITORY"]}
    job = document["regsweep-prune"]
    return "\n".join(job["script"]), dict(document["variables"])


@pytest.mark.parametrize("example", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_example_prunes_through_the_job_api(
    stack: ComposeStack, images: ImageBuilder, ci_tags: dict[str, Any], example: str
) -> None:
    """The CI example's own commands enqueue a prune over the job API and wait for it: the
    `pr-*` tag past its `pushed_within` goes, `main-1` stays whole."""
    repository = f"e2e/ci-{example.split('-', maxsplit=1)[0]}"
    pr, main = ci_tags["images"][repository]
    script, variables = ci_script(example)
    assert variables["REPOSITORY"] == "team/web"
    # The tag must have outlived its retention before the prune can take it.
    s.wait_for(lambda: time.monotonic() - ci_tags["pushed_at"] > CI_RETENTION + 1, 60, 0.5)
    environment = {
        **os.environ,
        **variables,
        "REPOSITORY": repository,
        "REGSWEEP_URL": stack.service_url,
        "REGSWEEP_API_TOKEN": s.API_TOKEN,
    }
    done = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        ["sh", "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.logs('worker')}"
    assert '"state":"succeeded"' in done.stdout.replace(" ", "")
    assert manifest_status(images, repository, pr.digest) == 404
    assert_whole(images, main)


def test_beat_sends_ticks_the_worker_runs(stack: ComposeStack, client: docker.DockerClient) -> None:
    """Beat stays up and its 30 s `tick` reaches the worker, which runs it."""

    def ticked() -> bool:
        beat = stack.container(client, "beat").logs().decode()
        worker = stack.container(client, "worker").logs().decode()
        return "Sending due task tick (regsweep.tick)" in beat and any(
            "regsweep.tick[" in line and "succeeded" in line for line in worker.splitlines()
        )

    s.wait_for(ticked, timeout=90, step=1.0)
    assert stack.container(client, "beat").attrs["RestartCount"] == 0


def test_worker_killed_mid_prune_finishes_every_deletion(
    stack: ComposeStack, images: ImageBuilder, http: httpx.Client, client: docker.DockerClient
) -> None:
    """The worker container SIGKILLed while a closed pull request's 60 tags are being deleted is
    restarted by Docker, and every deletion gets done; the kept images stay whole."""
    repository = "e2e/kill"
    doomed = [image(images, repository, f"pr-9-{n}") for n in range(KILL_TAGS)]
    kept = [image(images, repository, tag) for tag in ("main-1", "pr-90")]
    assert len(tags(images, repository)) == KILL_TAGS + 2
    read_live(http, repository)
    worker = stack.container(client, "worker")
    # A slow worker, so that the kill lands mid-prune rather than after it.
    worker.update(cpu_quota=5000, cpu_period=100000)
    post_github_pull_request_closed(http, 9)
    s.wait_for(lambda: 0 < KILL_TAGS + 2 - len(tags(images, repository)) < KILL_TAGS, 60, 0.02)
    worker.reload()
    os.kill(worker.attrs["State"]["Pid"], signal.SIGKILL)
    worker.update(cpu_quota=-1)
    remaining = {d.tags[0] for d in doomed} & tags(images, repository)
    assert remaining, "the prune finished before the kill"
    s.wait_for(lambda: health(worker) == "healthy" and worker.attrs["RestartCount"] == 1, 90, 0.5)
    try:
        s.wait_for(lambda: tags(images, repository) == {"main-1", "pr-90"}, 120, 0.5)
    except AssertionError as exc:
        left = sorted(tags(images, repository) - {"main-1", "pr-90"})
        raise AssertionError(f"{len(left)} deletions never done: {left}") from exc
    for pushed in doomed:
        assert manifest_status(images, repository, pushed.digest) == 404
    for pushed in kept:
        assert_whole(images, pushed)


@pytest.mark.parametrize("service", ["service", "worker", "gc-worker", "beat"])
def test_every_log_line_is_one_json_record(
    stack: ComposeStack, client: docker.DockerClient, service: str
) -> None:
    """Everything regsweep's containers wrote is one JSON record per line, with no secret; a
    traceback sits inside one record's `exception`, never split over lines."""
    text = stack.container(client, service).logs().decode()
    records = json_log_lines(text)
    assert records, f"{service} logged nothing"
    for record in records:
        assert not record["message"].startswith(("Traceback", "  File ")), record
    for secret in s.SECRETS:
        assert secret not in text


# A receiver that prints each POST as one JSON line (python3 from the regsweep image).
RECEIVER = """
import http.server, json
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print(json.dumps({"path": self.path, "body": body}), flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hook).serve_forever()
"""


def received(receiver: Any, event: str) -> list[dict[str, Any]]:
    lines = receiver.logs(stderr=False).decode().splitlines()
    posts = [json.loads(line) for line in lines if line.startswith("{")]
    return [p["body"] for p in posts if p["body"]["event"] == event]


def test_notifications_reach_a_receiver_on_the_stack_network(
    stack: ComposeStack, images: ImageBuilder, http: httpx.Client, client: docker.DockerClient
) -> None:
    """With a webhook target in the policy and its URL in .env, the worker tells a receiver
    container what a push-triggered prune deleted, and the gc-worker what a GC window
    reclaimed; the URL's secret is in no container's log."""
    network = f"{stack.project}_default"
    receiver = client.containers.run(
        stack.container(client, "worker").image.id,
        entrypoint=["python3", "-c", RECEIVER],
        command=[],
        detach=True,
        name=f"{stack.project}-notify-receiver",
        network=network,
        labels={"regsweep-test": stack.project},
    )
    try:
        client.networks.get(network).disconnect(receiver)
        client.networks.get(network).connect(receiver, aliases=["notify-receiver"])
        repository = "e2e/notify"
        builds = [image(images, repository, "main-1")]
        read_live(http, repository)
        builds += [image(images, repository, f"main-{n}") for n in (2, 3)]
        wait_gone(images, stack, repository, builds[0].digest)
        # Earlier tests' prunes are told too (retried until the receiver came up): not those.
        told = s.wait_for(
            lambda: [
                body
                for body in received(receiver, "prune.deleted")
                if body["details"]["repository"] == repository
            ],
            timeout=60,
            step=0.5,
        )
        assert told[0]["details"]["deleted"][0]["tags"] == ["main-1"]

        response = http.post("/api/v1/jobs", json={"kind": "gc"}, headers=s.API_HEADERS)
        job = finished_job(http, response.json()["job_id"], timeout=180)
        assert job["state"] == "succeeded", job
        # Earlier GC windows' reports may arrive too (retried until the receiver came up).
        reports = s.wait_for(
            lambda: [
                body
                for body in received(receiver, "gc.finished")
                if body["details"]["job_id"] == job["id"]
            ],
            timeout=60,
            step=0.5,
        )
        assert len(reports) == 1, reports
        assert reports[0]["details"]["report"]["bytes_reclaimed"] == job["bytes"] > 0
        for service in ("worker", "gc-worker"):
            assert NOTIFY_SECRET not in stack.container(client, service).logs().decode()
    finally:
        receiver.remove(force=True)


def test_check_config_online_in_the_worker_container(
    stack: ComposeStack, client: docker.DockerClient, images: ImageBuilder
) -> None:
    """`regsweep check-config --online --json`, run where the workers run, finds the registry
    reachable, its catalog readable, deletes enabled, the mounted storage holding what the
    registry lists, and Redis answering: every check ok, exit 0."""
    image(images, "e2e/check-config", "main-1")
    worker = stack.container(client, "worker")
    done = worker.exec_run(
        ["regsweep", "-c", "/etc/regsweep/regsweep.yaml", "check-config", "--online", "--json"],
        demux=True,
    )
    stdout, stderr = (part.decode() if part else "" for part in done.output)
    output = stdout + stderr
    assert done.exit_code == 0, output
    document = json.loads(stdout)
    statuses = {check["check"]: check["status"] for check in document["checks"]}
    assert statuses == dict.fromkeys(
        [
            "registry",
            "credentials",
            "deletes",
            "tag delete",
            "clock",
            "storage",
            "push-times",
            "redis",
        ],
        "ok",
    )
    for secret in s.SECRETS:
        assert secret not in output


def regsweep_in(container: Any, *args: str) -> tuple[int, str, str]:
    """``regsweep -c <the stack's policy> ARGS`` run in a container: exit code, stdout, stderr."""
    done = container.exec_run(["regsweep", "-c", "/etc/regsweep/regsweep.yaml", *args], demux=True)
    stdout, stderr = (part.decode() if part else "" for part in done.output)
    return done.exit_code, stdout, stderr


def test_jobs_and_status_in_the_worker_container(
    stack: ComposeStack, client: docker.DockerClient, images: ImageBuilder
) -> None:
    """Where the workers run, `regsweep jobs` lists the job a push caused with what it
    deleted, `jobs ID --follow` ends at once on a finished job with its deletion, `status`
    names the next maintenance window and the last prune, and `--version` answers."""
    repository = "e2e/jobs"
    superseded = image(images, repository, "main-1")
    for tag in ("main-2", "main-3"):
        image(images, repository, tag)
    wait_gone(images, stack, repository, superseded.digest)
    worker = stack.container(client, "worker")

    def deleting_job() -> dict[str, Any] | None:
        code, stdout, stderr = regsweep_in(worker, "jobs", "--json", "--limit", "100")
        assert code == 0, stderr
        return next(
            (
                job
                for job in json.loads(stdout)
                if job["state"] == "succeeded"
                and any(d["digest"] == superseded.digest for d in job["deletions"])
            ),
            None,
        )

    job = s.wait_for(deleting_job, timeout=60, step=1)
    (deletion,) = [d for d in job["deletions"] if d["digest"] == superseded.digest]
    assert (deletion["repository"], deletion["tags"]) == (repository, ["main-1"])

    code, stdout, stderr = regsweep_in(worker, "jobs", job["id"], "--follow")
    assert code == 0, stderr
    assert "main-1" in stdout and "succeeded" in stdout

    code, stdout, stderr = regsweep_in(worker, "status", "--json")
    assert code == 0, stderr
    status = json.loads(stdout)
    window = status["maintenance"]["window"]
    assert window["cron"] == "0 3 * * sun" and window["next"] is not None
    assert status["last_successful_prune"] is not None
    assert status["jobs"]["by_state"].get("succeeded", 0) >= 1

    code, stdout, _ = regsweep_in(worker, "--version")
    assert code == 0 and stdout.startswith("regsweep ")


def test_an_edited_policy_is_taken_by_every_process_after_stack_up(
    stack: ComposeStack, client: docker.DockerClient
) -> None:
    """The policy file replaced by a new one (renamed over it, which a running container's
    single-file mount never shows) and `scripts/stack up` run again: the containers that
    mount it are recreated, and `regsweep status` in the worker lists the service, both
    workers and beat, every one on the new file's digest."""
    roles = ("service", "worker", "gc-worker", "beat")
    before = {role: stack.container(client, role).id for role in roles}
    document = yaml.safe_load(stack.policy_file.read_text())
    stack.write_policy(document | {"sweep": {"every": "5h"}})
    digest = "sha256:" + hashlib.sha256(stack.policy_file.read_bytes()).hexdigest()
    done = stack.run("up", timeout=UP_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {role: stack.container(client, role).id for role in roles}
    assert [role for role in roles if after[role] == before[role]] == []
    worker = stack.container(client, "worker")

    def every_process_on_the_new_policy() -> list[str] | None:
        code, stdout, _ = regsweep_in(worker, "status", "--json")
        if code != 0:
            return None
        reported = json.loads(stdout)["processes"]
        on_it = sorted(p["role"] for p in reported if p["policy"] == digest)
        return on_it if on_it == ["beat", "service", "worker", "worker"] else None

    s.wait_for(every_process_on_the_new_policy, timeout=90, step=1)


def test_the_command_line_as_operations_md_runs_it_in_the_stack(
    stack: ComposeStack, client: docker.DockerClient, http: httpx.Client
) -> None:
    """docs/operations.md's command lines against the stack: plan and status in the worker,
    a GC enqueued from the worker (the gc-worker runs it), a GC run in the gc-worker (the
    one with the Docker socket): each exits 0."""
    worker = stack.container(client, "worker")
    code, stdout, stderr = regsweep_in(worker, "plan", "e2e/jobs")
    assert code == 0 and "e2e/jobs" in stdout, stderr
    code, stdout, stderr = regsweep_in(worker, "status")
    assert code == 0 and "processes:" in stdout, stderr
    code, stdout, stderr = regsweep_in(worker, "gc", "--enqueue", "--dry-run")
    assert code == 0, stderr
    job = finished_job(http, stdout.split()[0], timeout=120)
    assert job["state"] == "succeeded", job
    code, stdout, stderr = regsweep_in(stack.container(client, "gc-worker"), "gc", "--dry-run")
    assert code == 0, stdout + stderr


def test_down_leaves_nothing_behind(stack: ComposeStack, client: docker.DockerClient) -> None:
    """`scripts/stack down` removes every container (the recreated registry's too), network
    and volume of the stack."""
    done = stack.down()
    assert done.returncode == 0, done.stderr
    assert stack.leftovers(client) == {"containers": [], "networks": [], "volumes": []}


# --------------------------------------------------------------------------- registry:3


@pytest.fixture
def stack_3(
    tmp_path: Path, client: docker.DockerClient, registry_binary_3: RegistryBinary
) -> Iterator[ComposeStack]:
    """The same stack with ``REGISTRY_VERSION=3``: local/registry:3.1.0, laid out like the
    upstream registry:3 (its own config at /etc/distribution/config.yml)."""
    made = ComposeStack(tmp_path / "compose-3", POLICIES, registry_version="3")
    try:
        made.up()
        yield made
    finally:
        made.down()
        remove_project(client, made.project)


def _revisions_seen_by_worker(
    stack: ComposeStack, client: docker.DockerClient, repository: str
) -> set[str]:
    """Every manifest the repository's storage ever held (a revision directory stays after
    its manifest is deleted), read where the worker sees the registry's volume."""
    root = f"/var/lib/registry/docker/registry/v2/repositories/{repository}"
    revisions = f"{root}/_manifests/revisions/sha256"
    done = stack.container(client, "worker").exec_run(["ls", revisions])
    assert done.exit_code == 0, done.output
    return {"sha256:" + name for name in done.output.decode().split()}


def test_registry_3_stack_prunes_by_tag_delete_and_collects_garbage(
    stack_3: ComposeStack, client: docker.DockerClient
) -> None:
    """`REGISTRY_VERSION=3 scripts/stack up` runs local/registry:3.1.0 with every service
    healthy. Pushes reach the worker by notification: the build out of `newest: 2` goes by
    digest, and the one `latest` still needs loses its tag by one DELETE (no placeholder
    ever stored). `check-config --online` in the worker says tag delete is supported, and a
    GC job through the docker controller (reading the config the container serves, which
    compose.yaml names) reclaims bytes and leaves the registry read-write."""
    stack = stack_3
    registry = stack.container(client, "registry")
    assert registry.attrs["Config"]["Image"] == "local/registry:3.1.0"
    states = dict(line.split() for line in stack.run("status").stdout.splitlines())
    assert set(states.values()) == {"healthy"}, states
    repository = "e2e/on-3"
    with (
        ImageBuilder.connect(stack.registry_url) as images,
        httpx.Client(base_url=stack.service_url, timeout=10) as http,
    ):
        first = images.image(repository, ("main-1", "latest"), layers=[random_layer(LAYER_SIZE)])
        read_live(http, repository)
        builds = [image(images, repository, f"main-{n}") for n in (2, 3, 4)]
        wait_gone(images, stack, repository, builds[0].digest)
        s.wait_for(lambda: tags(images, repository) == {"latest", "main-3", "main-4"}, 60, 0.2)
        assert_whole(images, first)
        pushed = {first.digest, *(b.digest for b in builds)}
        assert _revisions_seen_by_worker(stack, client, repository) == pushed

        code, stdout, _ = regsweep_in(
            stack.container(client, "worker"), "check-config", "--online", "--json"
        )
        checks = {c["check"]: c for c in json.loads(stdout)["checks"]}
        assert code == 0 and checks["tag delete"]["detail"].startswith("supported"), checks

        response = http.post("/api/v1/jobs", json={"kind": "gc"}, headers=s.API_HEADERS)
        job = finished_job(http, response.json()["job_id"], timeout=180)
        assert job["state"] == "succeeded", f"{job}\n{stack.logs('gc-worker')}"
        assert job["report"]["registry_version"] == "3.1.0" and job["bytes"] > 0
        assert not any(
            "MAINTENANCE_READONLY" in e
            for e in stack.container(client, "registry").attrs["Config"]["Env"]
        )
        after = image(images, repository, "main-5")
        assert_whole(images, after)
        for kept in (first, builds[2]):
            assert_whole(images, kept)
