"""Seed a throw-away registry with a realistic history and run regsweep on it.

The registry is Debian's CNCF distribution 2.8.2 on a free loopback port with
its storage in a temporary directory; everything is removed at the end. The
history spans weeks: each tag's link in the storage is dated as if it had been
pushed then, and regsweep reads push times from there (``registry.storage_path``).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, set_pushed

REPO = "team/web"
POLICY = """\
registry:
  url: {url}
  storage_path: {storage}
policies:
  - name: web
    repositories: ["team/**"]
    mode: enforce
    protect: ["latest", "v[0-9]*"]
    keep:
      - tags: ["main-*"]
        newest: 3
      - tags: ["*"]
        pushed_within: 7d
audit:
  path: {audit}
"""


def seed(builder: ImageBuilder, storage: Path) -> str:
    """Push the history, date it in storage; the digest of ``main-0`` (deleted by the prune)."""
    now = dt.datetime.now(dt.UTC)

    def pushed(age: dt.timedelta, *tags: str) -> None:
        set_pushed(storage, REPO, now - age, *tags)

    shared_base = b"base layer shared by every build" * 64
    first = ""
    for i in range(8):
        age = dt.timedelta(days=20 - 2 * i)
        image = builder.image(REPO, f"main-{i}", created=now - age, layers=[shared_base])
        pushed(age, f"main-{i}")
        first = first or image.digest
        if i == 2:
            builder.tag(REPO, image, "v1.0")  # a release: protected, shares main-2's digest
            pushed(age, "v1.0")
        if i % 3 == 0:
            builder.cosign(REPO, image, "sig")
    amd = builder.image(REPO, created=now - dt.timedelta(days=30))
    arm = builder.image(REPO, created=now - dt.timedelta(days=30), architecture="arm64")
    builder.index(REPO, [amd, arm], "multiarch-old", attest=True)
    pushed(dt.timedelta(days=30), "multiarch-old")
    latest = builder.image(REPO, ["latest", "main-8"], created=now - dt.timedelta(hours=2))
    pushed(dt.timedelta(hours=2), "latest", "main-8")
    builder.cosign(REPO, latest, "sig")
    builder.image(REPO, "pr-17", created=now - dt.timedelta(days=1))
    pushed(dt.timedelta(days=1), "pr-17")
    return first


def regsweep(config: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "regsweep.cli", "-c", str(config), *args]
    print(f"\n$ regsweep {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="regsweep-demo-") as tmp:
        registry = RegistryProcess.create(Path(tmp))
        registry.start()
        try:
            with ImageBuilder.connect(registry.url) as builder:
                oldest = seed(builder, registry.storage_path)
                print(f"registry {registry.url}: {REPO} has tags {builder.tags(REPO)}")
                config = Path(tmp) / "regsweep.yaml"
                config.write_text(
                    POLICY.format(
                        url=registry.url,
                        storage=registry.storage_path,
                        audit=Path(tmp) / "audit.jsonl",
                    )
                )
                regsweep(config, "check-config")
                regsweep(config, "plan")
                regsweep(config, "prune")
                regsweep(config, "audit")
                print(f"\n{REPO} now has tags {builder.tags(REPO)}")
                regsweep(config, "restore", REPO, oldest.partition(":")[2][:12])
                regsweep(config, "plan", REPO)
                print(f"\n{REPO} now has tags {builder.tags(REPO)}")
        finally:
            registry.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
