"""Seed a throw-away registry with a realistic history and run regsweep on it.

The registry is Debian's CNCF distribution 2.8.2 on a free loopback port with
its storage in a temporary directory; everything is removed at the end.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess

REPO = "team/web"
POLICY = """\
registry:
  url: {url}
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


def seed(builder: ImageBuilder) -> None:
    now = dt.datetime.now(dt.UTC)
    shared_base = b"base layer shared by every build" * 64
    for i in range(8):
        created = now - dt.timedelta(days=20 - 2 * i)
        image = builder.image(REPO, f"main-{i}", created=created, layers=[shared_base])
        if i == 2:
            builder.tag(REPO, image, "v1.0")  # a release: protected, shares main-2's digest
        if i % 3 == 0:
            builder.cosign(REPO, image, "sig")
    amd = builder.image(REPO, created=now - dt.timedelta(days=30))
    arm = builder.image(REPO, created=now - dt.timedelta(days=30), architecture="arm64")
    builder.index(REPO, [amd, arm], "multiarch-old", attest=True)
    latest = builder.image(REPO, ["latest", "main-8"], created=now - dt.timedelta(hours=2))
    builder.cosign(REPO, latest, "sig")
    builder.image(REPO, "pr-17", created=now - dt.timedelta(days=1))


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
                seed(builder)
                print(f"registry {registry.url}: {REPO} has tags {builder.tags(REPO)}")
                config = Path(tmp) / "regsweep.yaml"
                config.write_text(POLICY.format(url=registry.url, audit=Path(tmp) / "audit.jsonl"))
                regsweep(config, "check-config")
                regsweep(config, "plan")
                regsweep(config, "prune")
                regsweep(config, "audit")
                print(f"\n{REPO} now has tags {builder.tags(REPO)}")
        finally:
            registry.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
