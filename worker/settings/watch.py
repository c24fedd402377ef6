"""Notice that the policy file a long-running process loaded has changed, and load it again.

``serve``, ``worker`` and ``beat`` load the policy file once, at start. An
operator who edits it (``mode: dry-run`` → ``enforce``) expects the change to
take effect without restarting anything, and certainly not a worker that
goes on pruning by the old rules while ``regsweep plan`` shows the new ones.
So each process asks :meth:`PolicyWatch.check` at a safe point of its own
(a worker before each task, the service between requests, beat at each
tick); the answer is one of:

- ``None``: the file is what the process runs (or changed back to it);
- a new :class:`~worker.settings.model.Config`: the file changed and loads;
  the caller switches to it there and then (and logs it; see :func:`changes`);
- :class:`StalePolicy`: the file changed and does not load (or vanished).
  The caller must not go on as if nothing happened: a worker holds its tasks
  until the file loads, the service refuses what the policy decides.

A file is read only when its ``stat`` changed (inode, size, mtime, ctime), or
at a watch's first look (the Config it watches may have been loaded from an
earlier version of the file: a worker's pool process inherits the Config its
parent had when it forked), and is taken only once it has not been written
for :data:`SETTLE` (an editor that truncates and then writes would otherwise
be caught half-way, and a policy cut after its first ``keep`` rule is valid
YAML that deletes more):
meanwhile :class:`PolicyChanging` says how long to wait.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from worker.errors import ConfigError
from worker.settings.load import load_config, policy_digest
from worker.settings.model import Config

log = logging.getLogger("regsweep.policy")

#: A file written less than this long ago is still being written.
SETTLE: Final = 1.0

#: Settings a process reads once, at start: a changed value is logged and waits for a
#: restart (the rest of the file is applied at once). Key → what reads it.
RESTART_ONLY: Final[Mapping[str, Callable[[Config], object]]] = {
    "redis.url": lambda c: c.redis_url,
    "hooks.head_limit": lambda c: c.hooks.head_limit,
    "hooks.head_timeout": lambda c: c.hooks.head_timeout,
    "hooks.body_timeout": lambda c: c.hooks.body_timeout,
    "hooks.max_connections": lambda c: c.hooks.max_connections,
    "hooks.metrics_listen": lambda c: c.hooks.metrics_listen,
    # The broker's visibility timeout (the window's length plus an hour).
    "maintenance.window.duration": lambda c: c.maintenance.window_duration,
}


class StalePolicy(ConfigError):
    """The policy file changed and cannot be loaded: the process runs an older one."""


class PolicyChanging(StalePolicy):
    """The policy file is being written: look again in ``wait`` seconds."""

    def __init__(self, problems: list[str] | str, wait: float) -> None:
        super().__init__(problems)
        self.wait = wait


@dataclass(frozen=True)
class _Stat:
    inode: int
    device: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _stat(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stat(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changes(old: Config, new: Config) -> list[str]:
    """The settings of :data:`RESTART_ONLY` that differ between ``old`` and ``new``."""
    return [key for key, read in RESTART_ONLY.items() if read(old) != read(new)]


class PolicyWatch:
    """The policy file of one process: what it runs, and whether the file still says that."""

    def __init__(
        self, config: Config, environ: Mapping[str, str] | None = None, settle: float = SETTLE
    ) -> None:
        if config.source.startswith("<"):
            raise ConfigError(f"{config.source} is not a file to watch")
        self.path = os.path.abspath(config.source)
        self.config = config
        self.settle = settle
        self._environ = environ
        #: The file as last read. None at first: ``config`` may have been loaded long before
        #: this watch is made (a worker's pool process inherits the Config its parent had
        #: when it forked), so the first look reads the file and compares digests rather
        #: than trusting that the file as it is now is what ``config`` was loaded from.
        self._seen: _Stat | None = None
        #: Why the file as it is now cannot be run (None while it can).
        self.problem: str | None = None
        #: The restart-only settings that changed since the process started.
        self.restart_needed: tuple[str, ...] = ()
        self._started = config

    @property
    def digest(self) -> str | None:
        """The digest of the policy this process runs."""
        return self.config.digest

    def check(self) -> Config | None:
        """The new Config when the file changed and loads; None when it is what runs.

        Raises :class:`StalePolicy` while the changed file does not load, and
        :class:`PolicyChanging` while it is being written."""
        seen = _stat(self.path)
        if seen is not None and seen == self._seen:
            if self.problem is not None:
                raise StalePolicy(self.problem)
            return None
        if seen is not None and self._holds_what_runs():
            self._seen = seen
            self._recovered()
            return None
        if seen is not None and (age := time.time() - seen.mtime_ns / 1e9) < self.settle:
            raise PolicyChanging(f"{self.path} is being written", self.settle - max(age, 0.0))
        self._seen = seen
        try:
            new = load_config(self.path, self._environ)
        except ConfigError as exc:
            return self._refused(exc)
        if new.digest == self.config.digest:
            self._recovered()
            return None
        return self._taken(new)

    def _holds_what_runs(self) -> bool:
        """Whether the file's bytes are the ones the running Config was loaded from (touched,
        or changed back, or this watch's first look): nothing to load."""
        try:
            with open(self.path, "rb") as fh:
                return policy_digest(fh.read()) == self.config.digest
        except OSError:
            return False

    def _refused(self, exc: ConfigError) -> Config | None:
        problem = f"{self.path} changed and cannot be loaded: {'; '.join(exc.problems)[:2000]}"
        if problem != self.problem:
            log.error(
                "policy file %s changed and does not load; still on %s, which is no longer "
                "what the file says: %s",
                self.path,
                self.config.digest,
                "; ".join(exc.problems)[:2000],
            )
        self.problem = problem
        raise StalePolicy(problem)

    def _recovered(self) -> None:
        if self.problem is not None:
            log.warning("policy file %s is back to %s", self.path, self.config.digest)
        self.problem = None

    def _taken(self, new: Config) -> Config:
        old, self.config, self.problem = self.config, new, None
        self.restart_needed = tuple(changes(self._started, new))
        log.warning(
            "policy file %s changed (%s -> %s): reloaded",
            self.path,
            old.digest,
            new.digest,
            extra={"old_digest": old.digest, "new_digest": new.digest},
        )
        if self.restart_needed:
            log.warning(
                "policy file %s: %s changed, which this process reads only at start: "
                "restart it for that to take effect",
                self.path,
                ", ".join(self.restart_needed),
            )
        return new


def wait_until_loaded(
    watch: PolicyWatch, *, sleep: Callable[[float], None] = time.sleep, poll: float = 1.0
) -> Config | None:
    """:meth:`PolicyWatch.check`, waiting while the file is being written or does not load.

    What a worker does before a task: it never starts one under a policy the
    file no longer holds. Returns the new Config, or None when nothing changed."""
    reminded = time.monotonic()
    while True:
        try:
            return watch.check()
        except PolicyChanging as exc:
            sleep(min(max(exc.wait, 0.05), poll))
        except StalePolicy as exc:
            if time.monotonic() - reminded >= REMIND_EVERY:
                log.error("tasks wait until the policy file loads: %s", exc)
                reminded = time.monotonic()
            sleep(poll)


#: How often a process waiting for a loadable policy file says so again.
REMIND_EVERY: Final = 60.0
