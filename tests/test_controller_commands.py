"""A process controller's commands run through ``sh``, and regsweep appends ``--dry-run`` /
``--delete-untagged`` to ``gc_command``: a command shaped so that the appended flags would
not reach the garbage collector is refused when the policy file is loaded."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.settings.load import parse_config
from worker.settings.model import ProcessControllerSettings

REGISTRY = "registry: {url: http://127.0.0.1:5000}\n"


def controller(gc_command: str) -> str:
    return (
        REGISTRY
        + "maintenance:\n  controller:\n    kind: process\n"
        + '    readonly_command: "registry-mode readonly"\n'
        + '    readwrite_command: "registry-mode readwrite"\n'
        + f"    gc_command: {gc_command}\n"
    )


@pytest.mark.parametrize(
    ("gc_command", "problem"),
    [
        pytest.param(
            '"registry garbage-collect /etc/registry.yml # weekly"',
            "has a '#' the shell reads as the start of a comment, which would swallow the "
            "--dry-run regsweep appends",
            id="comment",
        ),
        pytest.param(
            '"registry garbage-collect /etc/registry.yml &"',
            "ends with '&': regsweep appends --dry-run / --delete-untagged",
            id="background",
        ),
        pytest.param(
            '"registry garbage-collect /etc/registry.yml | tee /var/log/gc.log"',
            "ends in a pipe: the --dry-run regsweep appends would go to the last command",
            id="pipe",
        ),
    ],
)
def test_a_gc_command_the_flags_would_miss_is_refused(gc_command: str, problem: str) -> None:
    """A comment would swallow --dry-run (a dry run would collect garbage for real), a
    trailing & or a pipe would hand it to another command: each is refused, naming why."""
    with pytest.raises(ConfigError) as refused:
        parse_config(controller(gc_command), "p.yaml", {})
    assert refused.value.problems[0].startswith("p.yaml:7: maintenance.controller.gc_command: ")
    assert problem in refused.value.problems[0]


@pytest.mark.parametrize(
    "gc_command",
    [
        "\"registry garbage-collect '/etc/my registry/config.yml'\"",
        '"touch /run/gc-started; sudo -u registry registry garbage-collect /etc/r.yml"',
        '"registry garbage-collect /etc/r.yml > /var/log/gc.log 2>&1"',
        "|\n      registry garbage-collect /etc/r.yml\n",
    ],
    ids=["quoted-path", "gc-last", "redirect", "block-scalar"],
)
def test_a_gc_command_ending_in_the_gc_is_taken_as_written(gc_command: str) -> None:
    """Quotes, earlier commands, redirections: the flags still reach garbage-collect. A YAML
    block scalar's final newline, which sh would read as the end of the command (running
    --dry-run as a command of its own), is stripped."""
    settings = parse_config(controller(gc_command), "p.yaml", {}).maintenance.controller
    assert isinstance(settings, ProcessControllerSettings)
    assert not settings.gc_command.endswith("\n")
