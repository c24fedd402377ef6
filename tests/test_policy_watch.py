"""The policy watch on real files: what a process runs is compared with what the file holds
now, even when the watch is made after the file changed (a worker's pool process inherits
its parent's Config at fork and makes its watch at its first task)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from worker.settings.load import load_config
from worker.settings.model import Config
from worker.settings.watch import PolicyChanging, PolicyWatch, StalePolicy


def _document(mode: str) -> str:
    policy = {
        "name": "p",
        "repositories": ["team/**"],
        "mode": mode,
        "keep": [{"tags": ["*"], "newest": 3}],
    }
    return yaml.safe_dump({"registry": {"url": "http://127.0.0.1:1"}, "policies": [policy]})


def _written(path: Path, text: str, *, age: float = 10.0) -> None:
    """``text`` in ``path``, last written ``age`` seconds ago (settled)."""
    path.write_text(text)
    past = time.time() - age
    os.utime(path, (past, past))


@pytest.fixture
def loaded(tmp_path: Path) -> tuple[Path, Config]:
    path = tmp_path / "regsweep.yaml"
    _written(path, _document("dry-run"))
    return path, load_config(path, {})


def test_a_watch_made_after_an_edit_takes_the_edit(loaded: tuple[Path, Config]) -> None:
    """The Config was loaded from dry-run; the file now says enforce, settled, before the
    watch exists: its first look returns the enforce policy instead of trusting the file."""
    path, config = loaded
    _written(path, _document("enforce"))
    new = PolicyWatch(config, environ={}).check()
    assert new is not None and new.policies[0].mode.value == "enforce"


def test_a_watch_made_after_the_file_broke_holds(loaded: tuple[Path, Config]) -> None:
    """The file broken before the watch exists: its first look is stale, not "unchanged"."""
    path, config = loaded
    _written(path, "policies:\n  - name: [\n")
    watch = PolicyWatch(config, environ={})
    with pytest.raises(StalePolicy, match="cannot be loaded"):
        watch.check()
    with pytest.raises(StalePolicy):  # and it stays so until the file loads
        watch.check()
    _written(path, _document("dry-run"), age=5.0)
    assert watch.check() is None and watch.problem is None


def test_the_same_bytes_need_no_settling_and_no_load(loaded: tuple[Path, Config]) -> None:
    """A file written a moment ago with the bytes that run is what runs (no wait); other
    bytes written a moment ago are still being written."""
    path, config = loaded
    _written(path, _document("dry-run"), age=0.0)
    watch = PolicyWatch(config, environ={})
    assert watch.check() is None
    _written(path, _document("enforce"), age=0.0)
    with pytest.raises(PolicyChanging):
        watch.check()
