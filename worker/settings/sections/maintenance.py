"""The ``maintenance:`` section: window, GC, the registry controller and its commands."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime
from typing import Final

from croniter import croniter

from worker.settings.model import (
    DEFAULT_WINDOW_DURATION,
    DEFAULT_WINDOW_MARGIN,
    ControllerSettings,
    DockerControllerSettings,
    GcGrace,
    MaintenanceSettings,
    ProcessControllerSettings,
)
from worker.settings.validate import Section

_MAINTENANCE_KEYS: Final = (
    "window",
    "gc",
    "controller",
    "registry_version",
    "storage_prune",
    "gc_grace",
    "remove_empty_repositories",
)
_WINDOW_KEYS: Final = ("cron", "duration", "margin")
_DOCKER_KEYS: Final = ("kind", "container", "config_path")
_PROCESS_KEYS: Final = (
    "kind",
    "readonly_command",
    "readwrite_command",
    "gc_command",
    "storage_path",
    "config_path",
)
#: ``maintenance.gc.delete_untagged`` values that mean "not passed", which is all regsweep
#: does; ``true`` is refused with the reason (:data:`_DELETE_UNTAGGED_REFUSED`).
_DELETE_UNTAGGED_OFF: Final = ("auto", False, "false")
_DELETE_UNTAGGED_REFUSED: Final = (
    "true is refused: registry garbage-collect --delete-untagged deletes what regsweep keeps "
    "(2.8: children of kept multi-arch indexes; 3.x: referrers of kept images and untagged "
    "manifests of repositories no policy covers), unaudited and beyond restore; untagged "
    "manifests go by the policies' untagged.delete_after (docs/safety.md); set auto or false"
)

_VERSION: Final = re.compile(r"\d+\.\d+")


def parse_maintenance(top: Section) -> MaintenanceSettings:
    section = top.section("maintenance", _MAINTENANCE_KEYS)
    window = section.section("window", _WINDOW_KEYS)
    duration = window.duration("duration") or DEFAULT_WINDOW_DURATION
    margin = window.duration("margin", zero_ok=True)
    if margin is not None and margin >= duration:
        window.problem("margin", "must be shorter than the window's duration")
    elif margin is None and duration <= DEFAULT_WINDOW_MARGIN:
        # Beat's GC starts only with the margin left: such a window never runs one.
        window.problem(
            "duration",
            f"must be longer than the margin ({DEFAULT_WINDOW_MARGIN.seconds // 60}m "
            "unless maintenance.window.margin says otherwise)",
        )
    cron = _cron(window)
    _check_delete_untagged(section)
    return MaintenanceSettings(
        window_cron=cron,
        window_duration=duration,
        window_margin=DEFAULT_WINDOW_MARGIN if margin is None else margin,
        controller=_controller(section),
        registry_version=_registry_version(section),
        storage_prune=_flag(section, "storage_prune"),
        gc_grace=_gc_grace(section),
        remove_empty_repositories=_flag(section, "remove_empty_repositories"),
    )


def _flag(section: Section, key: str) -> bool:
    value = section.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    section.problem(key, "must be true or false")
    return False


def _gc_grace(section: Section) -> GcGrace:
    """``next-window`` (the default) or ``0``; any longer wait would have to hold back every
    GC, the API prunes' reclaim with it (docs/safety.md)."""
    value = section.get("gc_grace")
    if value is None:
        return GcGrace.NEXT_WINDOW
    text = "" if isinstance(value, bool) else str(value).strip()
    if text in ("0", "0s"):
        return GcGrace.NONE
    if text == GcGrace.NEXT_WINDOW.value:
        return GcGrace.NEXT_WINDOW
    section.problem("gc_grace", "must be next-window (the default) or 0 (this window's GC)")
    return GcGrace.NEXT_WINDOW


def _cron(window: Section) -> str | None:
    expression = window.text("cron", required=True)
    if expression is None:
        return None
    # croniter also takes a sixth (seconds) field; a window starts on a minute.
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        window.problem("cron", f"{expression!r} is not a 5-field cron expression (UTC)")
        return None
    if not _cron_runs(expression):
        window.problem("cron", f"{expression!r} never fires")
        return None
    return expression


def _cron_runs(expression: str) -> bool:
    """Whether croniter, which both beat and the window rules use, finds a fire time of
    ``expression`` before and after now (``0 0 30 2 *`` parses and never fires)."""
    try:
        now = datetime.now(UTC)
        croniter(expression, now).get_next(datetime)
        croniter(expression, now).get_prev(datetime)
    except (ValueError, KeyError, TypeError):  # croniter's own errors are ValueErrors
        return False
    return True


def _check_delete_untagged(section: Section) -> None:
    """``gc.delete_untagged`` is read for its problems only: nothing is ever passed."""
    gc = section.section("gc", ("delete_untagged",))
    value = gc.get("delete_untagged")
    # isinstance first: 0 == False, and 0 is no answer here.
    if value is None or (isinstance(value, bool | str) and value in _DELETE_UNTAGGED_OFF):
        return
    if value is True or value == "true":
        gc.problem("delete_untagged", _DELETE_UNTAGGED_REFUSED)
        return
    gc.problem("delete_untagged", "must be auto or false")


def _registry_version(section: Section) -> str | None:
    value = section.get("registry_version")
    if value is None:
        return None
    # Unquoted 3.0 reads as a float; str() gives it back as written.
    text = str(value) if isinstance(value, str | float) else ""
    if _VERSION.fullmatch(text) is None:
        section.problem("registry_version", "must be major.minor, like 2.8 or 3.0")
        return None
    return text


def _controller(section: Section) -> ControllerSettings | None:
    raw = section.get("controller")
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind == "docker":
        docker = section.section("controller", _DOCKER_KEYS)
        return DockerControllerSettings(
            container=docker.text("container") or DockerControllerSettings.container,
            config_path=docker.text("config_path"),
        )
    if kind == "process":
        process = section.section("controller", _PROCESS_KEYS)
        return ProcessControllerSettings(
            readonly_command=_command(process, "readonly_command"),
            readwrite_command=_command(process, "readwrite_command"),
            gc_command=_command(process, "gc_command"),
            storage_path=process.text("storage_path"),
            config_path=process.text("config_path"),
        )
    if raw is None:
        return None
    if not isinstance(raw, dict):
        section.problem("controller", "must be a mapping")
    else:
        message = "required: docker or process" if kind is None else "must be docker or process"
        section.problem("controller.kind", message)
    return None


def _command(controller: Section, key: str) -> str:
    command = controller.text(key, required=True)
    if command is None:
        return ""
    # A YAML block scalar ends in a newline, which the shell would read as the end of the
    # command: whatever regsweep appends would then run as a command of its own.
    command = command.strip()
    try:
        words = shlex.split(command)
    except ValueError as exc:
        # Not the command itself: it may carry a credential.
        controller.problem(key, f"is not a valid command line: {exc}")
        return ""
    if not words:
        controller.problem(key, "is empty")
    elif key == "gc_command" and (problem := _flags_go_astray(command)) is not None:
        controller.problem(key, problem)
    return command


#: Shell operators after which appended words no longer belong to the command before them.
_SEPARATORS: Final = frozenset({";", "&", "&&", "||", "|", "|&", ";;"})


def _flags_go_astray(command: str) -> str | None:
    """Why ``--dry-run`` appended to ``command`` (which runs through ``sh``) would not reach
    the garbage collector: a comment would swallow it, or a trailing operator or a
    pipe would hand it to another command. None when it reaches the last command."""
    plain = shlex.shlex(command, posix=True, punctuation_chars=True)
    plain.commenters = ""
    words = list(plain)
    commented = shlex.shlex(command, posix=True, punctuation_chars=True)
    if list(commented) != words:
        return (
            "has a '#' the shell reads as the start of a comment, which would swallow the "
            "--dry-run regsweep appends: quote it, or remove the comment"
        )
    if words[-1] in _SEPARATORS or words[-1] in ("(", ")", "{", "}"):
        return (
            f"ends with {words[-1]!r}: regsweep appends --dry-run / --delete-untagged, so it "
            "must end with the garbage-collect invocation"
        )
    last = max((i for i, w in enumerate(words) if w in _SEPARATORS - {"|", "|&"}), default=-1)
    if any(w in ("|", "|&") for w in words[last + 1 :]):
        return (
            "ends in a pipe: the --dry-run regsweep appends would go to the last command of "
            "the pipe, not to garbage-collect (wrap it in a script)"
        )
    return None
