"""Where `-c FILE` may go on the `regsweep` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from regsweep.cli import _parser, split_celery_args

GOOD = "registry: {url: 'http://127.0.0.1:1'}\npolicies: []\n"
BAD = "registry: {url: 'ftp://x'}\npolicies: []\n"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    return subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        [sys.executable, "-m", "regsweep.cli", *args],
        cwd=cwd,
        env=environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_after_the_command_as_the_docs_write_it(tmp_path: Path) -> None:
    """`regsweep check-config -c regsweep.yaml` (docs/policy.md) reads that file, like
    `regsweep -c regsweep.yaml check-config` does."""
    (tmp_path / "regsweep.yaml").write_text(GOOD)
    for args in (["check-config", "-c", "regsweep.yaml"], ["-c", "regsweep.yaml", "check-config"]):
        done = run(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("regsweep.yaml: ok")


def test_config_after_the_command_wins_over_one_before(tmp_path: Path) -> None:
    """Given twice, the `-c` nearer the end counts, whichever side of the command it is on."""
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(BAD)
    assert run("-c", "bad.yaml", "check-config", "-c", "good.yaml", cwd=tmp_path).returncode == 0
    assert run("-c", "good.yaml", "check-config", "-c", "bad.yaml", cwd=tmp_path).returncode == 2


def test_c_after_worker_and_beat_stays_celerys() -> None:
    """After `worker`/`beat`, `-c` is Celery's concurrency, never the policy file."""
    own, celery = split_celery_args(["-c", "p.yaml", "worker", "-Q", "gc", "-c", "1"])
    assert own == ["-c", "p.yaml", "worker"] and celery == ["-Q", "gc", "-c", "1"]
    assert _parser().parse_args(own).config == "p.yaml"
