"""Docs that are run: every command in README.md and docs/ works as written.

The commands come from the Markdown itself (tests/harness/doccommands.py), so a
command someone adds to the docs later is run too, or this test says it is
neither run nor listed in ``NOT_RUN`` with the reason. They run in a directory
holding a ``regsweep.yaml``, as a user's shell would run them, against a real
registry started and switched by the shipped process-controller example
(examples/process/registry-mode, configured as docs/operations.md shows), a
real Redis, and a ``regsweep serve`` and ``regsweep worker`` in the background.
What the examples leave for the reader to fill in is filled in by
``SUBSTITUTIONS``; a curl that gets an HTTP error fails (``--fail-with-body``
from a curlrc), a long-running command must come up and stay up.
"""

from __future__ import annotations

import base64
import datetime as dt
import glob
import io
import os
import re
import shlex
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import redis
import yaml

from tests.harness import redisdb
from tests.harness import stack as s
from tests.harness.compose import hooks
from tests.harness.doccommands import REPO_ROOT, DocCommand, commands, commands_in, documents
from tests.harness.docker import docker_engine
from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.registry import free_port, set_pushed
from tests.harness.workers import WorkerProcess, start_worker

pytestmark = pytest.mark.docker

REDIS_URL: Final = redisdb.url(14)
REGISTRY_MODE: Final = REPO_ROOT / "examples" / "process" / "registry-mode"
VENV_BIN: Final = Path(s.REGSWEEP).parent
DAEMONS: Final = ("serve", "worker", "beat")
FINAL_STATES: Final = ("succeeded", "failed", "skipped", "deferred", "interrupted")
JOB_ID: Final = re.compile(r"\b[0-9a-f]{32}\b")

REPLAYED: Final = (
    "needs a dead letter or a recorded CI event: tests/test_worker_jobs.py, "
    "tests/test_e2e_nolost.py"
)
#: The compose stack's command lines: tests/test_stack.py runs each in its container.
_IN_STACK: Final = "tests/test_stack.py runs it in the stack's container (docker exec)"
_EXEC_WORKER: Final = "docker compose exec worker regsweep -c /etc/regsweep/regsweep.yaml"
#: Commands the docs show that this test does not run, and where they are run instead.
NOT_RUN: Final[dict[str, str]] = {
    "scripts/test": "the suite itself: CI runs it",
    "pip install -c constraints.txt .": "the Dockerfile's install step (see test below)",
    "scripts/stack up": "tests/test_stack.py",
    "scripts/stack status": "tests/test_stack.py",
    "scripts/stack logs worker": "tests/test_stack.py",
    "scripts/stack down": "tests/test_stack.py",
    "REGSWEEP_POLICY_DIGEST=$(sha256sum deploy/regsweep.yaml | cut -c1-64) docker compose up -d": (
        "what scripts/stack up does; tests/test_stack.py edits the policy and runs it again"
    ),
    f"{_EXEC_WORKER} plan team/web": _IN_STACK,
    f"{_EXEC_WORKER} status": _IN_STACK,
    f"{_EXEC_WORKER} gc --enqueue --dry-run": _IN_STACK,
    "docker compose exec gc-worker regsweep -c /etc/regsweep/regsweep.yaml gc --dry-run": _IN_STACK,
    "regsweep completion zsh > ~/.zfunc/_regsweep": "writes into the home directory; "
    "tests/test_cli_polish.py checks the zsh script",
    "regsweep -c regsweep.yaml gc --storage-prune": "tests/test_storage_prune_cli.py runs it "
    "on a registry it prunes; here its window would delete the site's builds before the "
    "commands that show them",
    "regsweep -c regsweep.yaml replay 7c1e0a92d4b4": REPLAYED,
    "regsweep -c regsweep.yaml replay 2f1c8e40-5a7b-11ef-9d1e-0e3b": REPLAYED,
    "curl -X POST -H Authorization: Bearer $TOKEN "
    "http://regsweep:8000/api/v1/dead-letters/7c1e0a92d4b4/replay": REPLAYED,
}
#: Command prefixes not run here, with the reason.
NOT_RUN_PREFIXES: Final[dict[str, str]] = {
    "PYTHONPATH=. .venv/bin/python -m bench.": "benchmarks: minutes each, run by hand for "
    "docs/performance.md",
}


def not_run(command: DocCommand) -> str | None:
    """Why ``command`` is not run here, or ``None`` when it is."""
    text = strip_comment(command.text)
    if text in NOT_RUN:
        return NOT_RUN[text]
    return next((why for p, why in NOT_RUN_PREFIXES.items() if text.startswith(p)), None)


def strip_comment(text: str) -> str:
    """The command without its trailing comment, words single-spaced (as the shell reads it)."""
    try:
        return " ".join(shlex.split(text, comments=True))
    except ValueError:  # unbalanced quotes: the shell would refuse it too; compare as written
        return text.strip()


DOC_COMMANDS: Final = [c for c in commands() if not_run(c) is None]


# --------------------------------------------------------------------------- the site


@dataclass
class Site:
    """The reader's machine: a directory with regsweep.yaml, a registry, Redis, a service."""

    root: Path
    registry_port: int = field(default_factory=free_port)
    service_port: int = field(default_factory=free_port)
    background: list[s.Process] = field(default_factory=list)
    worker: WorkerProcess | None = None
    #: What the docs leave to the reader: filled in as the commands run.
    deleted_digest: str = ""
    job_ids: list[str] = field(default_factory=list)

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("REGSWEEP_", "REGMODE_"))}
        return (
            base
            | s.ENVIRONMENT
            | {
                "PATH": f"{VENV_BIN}:{REGISTRY_MODE.parent}:{base['PATH']}",
                "REGSWEEP_CONFIG": str(self.workdir / "regsweep.yaml"),
                "REGMODE_CONFIG": str(self.root / "registry" / "config.yml"),
                "REGMODE_PIDFILE": str(self.root / "registry" / "registry.pid"),
                "REGMODE_LOG": str(self.root / "registry" / "registry.log"),
                "CURL_HOME": str(self.root),
                "TOKEN": s.API_TOKEN,
                "IMAGE": f"127.0.0.1:{self.registry_port}/docs/pushed:1",
            }
        )

    def registry_mode(self, *args: str) -> None:
        done = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
            [str(REGISTRY_MODE), *args], env=self.env(), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def process_controller() -> dict[str, Any]:
    """The `kind: process` controller exactly as docs/operations.md shows it."""
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    found = [yaml.safe_load(b) for b in blocks if "kind: process" in b]
    assert len(found) == 1, "docs/operations.md shows the process controller once"
    return dict(found[0]["maintenance"]["controller"])


def write_site_files(site: Site) -> None:
    registry_root = site.root / "registry"
    registry_root.mkdir(parents=True)
    storage = registry_root / "data"
    config = {
        "version": 0.1,
        # Info, so that GC's "Deleting blob" lines reach the report.
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": f"127.0.0.1:{site.registry_port}", "secret": uuid.uuid4().hex},
    }
    (registry_root / "config.yml").write_text(yaml.safe_dump(config))
    controller = process_controller() | {"storage_path": str(storage)}
    policy = {
        "registry": {"url": site.registry_url, "storage_path": str(storage)},
        "redis": {"url": REDIS_URL},
        "hooks": hooks(),
        "policies": [
            {
                "name": "web",
                "repositories": ["team/web"],
                "mode": "enforce",
                "protect": ["latest"],
                "keep": [{"tags": ["main-*"], "newest": 2}],
            }
        ],
        "maintenance": {
            "window": {"cron": "0 3 * * sun", "duration": "2h"},
            "controller": controller,
        },
    }
    site.workdir.mkdir(parents=True)
    (site.workdir / "regsweep.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    # Every curl the docs show fails on an HTTP error, as a reader would notice one.
    (site.root / ".curlrc").write_text("fail-with-body\n")
    (site.root / "state").mkdir()


def seed(site: Site) -> list[PushedImage]:
    """team/web: three builds and `latest`; the policy keeps two builds, so `prune` deletes one."""
    storage = site.root / "registry" / "data"
    now = dt.datetime.now(dt.UTC)
    with ImageBuilder.connect(site.registry_url) as images:
        builds = [images.image("team/web", f"main-{n}") for n in (1, 2, 3)]
        images.tag("team/web", builds[-1], "latest")
    for n in (1, 2, 3):  # a day apart, as the storage tells regsweep
        set_pushed(storage, "team/web", now - dt.timedelta(days=4 - n), f"main-{n}")
    return builds


def local_image(name: str) -> None:
    """A one-file image made with ``docker import`` (nothing can be pulled here), as ``name``."""
    client = docker_engine()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = uuid.uuid4().hex.encode()
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    repository, tag = name.rsplit(":", 1)
    client.api.import_image_from_data(buffer.getvalue(), repository=repository, tag=tag)
    client.close()


def flush() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    made = Site(tmp_path_factory.mktemp("docs"))
    flush()
    write_site_files(made)
    made.registry_mode("readwrite")
    try:
        s.wait_for(lambda: answers(made.registry_url + "/v2/"), timeout=15)
        made.deleted_digest = seed(made)[0].digest
        local_image(made.env()["IMAGE"])
        serve = ["serve", "--port", str(made.service_port)]
        service = s.Process("service", [s.REGSWEEP, *serve], made.root / "service.log", made.env())
        service.start()
        made.background.append(service)
        made.worker = start_worker(
            made.workdir / "regsweep.yaml",
            log=made.root / "worker.log",
            extra=("--without-mingle", "--without-gossip"),
            env=made.env(),
        )
        s.wait_for(lambda: answers(made.service_url + "/healthz"), timeout=30)
        made.worker.wait_ready(timeout=60)
        yield made
    finally:
        for process in made.background:
            process.stop()
        if made.worker is not None:
            made.worker.stop(timeout=15)
        made.registry_mode("stop")
        docker_engine().images.remove(made.env()["IMAGE"], force=True)
        flush()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.TransportError:
        return False


# --------------------------------------------------------------------------- running


#: What the docs leave to the reader, and what this test puts there.
SUBSTITUTIONS: Final[dict[str, Callable[[Site], str]]] = {
    "https://regsweep.example.com": lambda site: site.service_url,
    "http://regsweep:8000": lambda site: site.service_url,
    "3f9e41c80220": lambda site: site.deleted_digest.removeprefix("sha256:")[:12],
    "3f0c...": lambda site: site.job_ids[-1],
    # Where a reader's beat keeps its schedule; here, the site's own directory.
    "/var/lib/regsweep/": lambda site: f"{site.root / 'state'}/",
}


def substituted(text: str, site: Site) -> str:
    for placeholder, value in SUBSTITUTIONS.items():
        if placeholder in text:
            text = text.replace(placeholder, value(site))
    return text


def daemon(text: str) -> str | None:
    """``serve``/``worker``/``beat`` when ``text`` starts one of them, else ``None``."""
    words = shlex.split(text, comments=True)
    if not words or words[0] != "regsweep":
        return None
    rest = words[1:]
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] in ("-c", "--config") else rest[1:]
    return rest[0] if rest and rest[0] in DAEMONS else None


def run_once(command: DocCommand, site: Site) -> None:
    """Run a command to its end: exit 0, its jobs finished (none failed)."""
    cwd = REPO_ROOT if command.text.startswith("scripts/") else site.workdir
    done = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        ["bash", "-c", substituted(command.text, site)],
        cwd=cwd,
        env=site.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = (
        f"{command.where}: {command.text}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    assert done.returncode == 0, output
    assert "Traceback" not in done.stderr, output
    jobs = JOB_ID.findall(done.stdout)
    site.job_ids += jobs
    for job_id in jobs:
        job = finished_job(site, job_id)
        assert job["state"] in ("succeeded", "skipped"), f"{output}\n--- job\n{job}"


def finished_job(site: Site, job_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        response = httpx.get(
            f"{site.service_url}/api/v1/jobs/{job_id}", headers=s.API_HEADERS, timeout=5
        )
        job: dict[str, Any] = response.json()
        return job if job.get("state") in FINAL_STATES else None

    try:
        return s.wait_for(final, timeout=120, step=0.2)
    except AssertionError as exc:
        logs = "\n".join(p.tail() for p in site.background)
        logs += f"\n{site.worker.tail()}" if site.worker else ""
        raise AssertionError(f"job {job_id} never finished\n{logs}") from exc


def run_daemon(command: DocCommand, kind: str, site: Site) -> None:
    """Start a long-running command; it must come up and still run when it is stopped."""
    port = free_port()
    text = substituted(command.text, site).replace("--port 8000", f"--port {port}")
    log = site.root / f"daemon-{uuid.uuid4().hex[:6]}.log"
    process = s.Process(kind, ["bash", "-c", f"exec {text}"], log, site.env())
    before = set(glob.glob(str(site.workdir / "celerybeat-schedule*")))
    process.proc = proc = subprocess.Popen(
        process.argv,
        cwd=site.workdir,
        env=process.env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ready: dict[str, Callable[[], bool]] = {
        "serve": lambda: answers(f"http://127.0.0.1:{port}/healthz"),
        "worker": lambda: "ready." in process.tail(),
        # Past opening its schedule (where a beat that cannot write it dies) and running.
        "beat": lambda: beat_schedule_made(text, site, before) and "Starting" in process.tail(),
    }
    try:
        s.wait_for(lambda: ready[kind]() or proc.poll() is not None, 60, 0.1)
        assert proc.poll() is None, f"{command.where}: {text}\n{process.tail()}"
        assert ready[kind](), f"{command.where}: {text}\n{process.tail()}"
    finally:
        process.stop()


def beat_schedule_made(text: str, site: Site, before: set[str]) -> bool:
    match = re.search(r"-s\s+(\S+)", text)
    pattern = f"{match.group(1)}*" if match else str(site.workdir / "celerybeat-schedule*")
    return bool(set(glob.glob(pattern)) - before)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_doc_command_works_as_written(command: DocCommand, site: Site) -> None:
    """The command, pasted into a shell next to a regsweep.yaml, does what the docs say:
    exit 0 and its jobs finished, or, for serve/worker/beat, up and running."""
    kind = daemon(command.text)
    if kind is None:
        run_once(command, site)
    else:
        run_daemon(command, kind, site)


def test_every_doc_command_is_run_or_says_where() -> None:
    """A command in the docs is run above or listed in NOT_RUN with its reason; nothing in
    NOT_RUN is stale; every placeholder substituted is still in the docs."""
    texts = {strip_comment(c.text) for c in commands()}
    assert set(NOT_RUN) <= texts, set(NOT_RUN) - texts
    every = "\n".join(c.text for c in commands())
    for placeholder in SUBSTITUTIONS:
        assert placeholder in every, placeholder
    assert DOC_COMMANDS, "no commands found in the docs"


def test_example_policy_passes_the_check_its_header_shows() -> None:
    """examples/regsweep.yaml's header command, run from the repository root with every
    variable the file names set (as the header says), exits 0."""
    text = (REPO_ROOT / "examples" / "regsweep.yaml").read_text()
    match = re.search(r"^#\s+(regsweep check-config .*)$", text, re.MULTILINE)
    assert match, "the header shows no check-config command"
    names = re.findall(r"^\s*\w+_env:\s*(\w+)", text, re.MULTILINE)
    values = {name: f"value-of-{name.lower()}" for name in names}
    values["REGSWEEP_GITLAB_SIGNING_KEY"] = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    done = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        ["bash", "-c", match.group(1)],
        cwd=REPO_ROOT,
        env=environ | values | {"PATH": f"{VENV_BIN}:{environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_installs_as_the_readme_says() -> None:
    """The README's `pip install -c constraints.txt .` is the Dockerfile's install step, which
    scripts/images builds for the stack test."""
    assert (
        "pip install --no-cache-dir -c constraints.txt ." in (REPO_ROOT / "Dockerfile").read_text()
    )


def test_extraction_reads_prompts_continuations_and_skips_output() -> None:
    """`console` blocks yield only `$ ` lines (joined over `\\`), `sh` blocks every non-comment
    line, other blocks nothing."""
    markdown = (
        '```console\n$ curl -X POST \\\n    http://x/y\n{"out": 1}\n```\n'
        "```sh\n# a comment\nregsweep plan\n\n```\n"
        "```yaml\nregistry: {}\n```\n"
    )
    assert list(commands_in(markdown)) == [
        (2, "curl -X POST \\\n    http://x/y"),
        (8, "regsweep plan"),
    ]


def test_commands_are_matched_without_their_comments() -> None:
    """A trailing comment (quotes in it included) is no part of the command it follows."""
    assert strip_comment("regsweep audit --since 1h30m   # the config's syntax") == (
        "regsweep audit --since 1h30m"
    )
    assert daemon("regsweep -c r.yaml beat -s /x   # don't run two") == "beat"
    assert daemon("regsweep -c r.yaml plan   # 'serve' is not run here") is None


# Files the docs mention, by path: a reference to a file that is not in the repository
# (a design note users never get, a renamed script) is a broken promise to the reader.
_PATH: Final = re.compile(
    r"(?<![\w/.$-])((?:\.ci|scripts|docs|examples|deploy|tests|bench|worker|service)"
    r"/[\w./-]*[\w]|[\w.-]+\.md)\b"
)
#: Relative Markdown link targets (not URLs, not anchors within the page).
_LINK: Final = re.compile(r"\]\((?![a-z]+:|#)([^)#\s]+)")


def test_docs_reference_only_files_in_the_repository() -> None:
    """Every repository path README.md, docs/, examples/ and deploy/ mention exists."""
    sources = [
        *documents(),
        *(REPO_ROOT / "examples").rglob("*"),
        *(REPO_ROOT / "deploy").glob("*"),
        REPO_ROOT / "compose.yaml",
        REPO_ROOT / "Dockerfile",
        REPO_ROOT / ".env.example",
    ]
    missing = []
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text()
        for reference in _PATH.findall(text):
            if not any((base / reference).exists() for base in (REPO_ROOT, source.parent)):
                missing.append(f"{source.relative_to(REPO_ROOT)}: {reference}")
        for link in _LINK.findall(text):
            if not (source.parent / link).exists():
                missing.append(f"{source.relative_to(REPO_ROOT)}: ({link})")
    assert missing == []
