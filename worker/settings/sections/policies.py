"""The ``policies:`` list: repositories, mode, protect, keep, untagged, on, sources."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Final

from worker.engine.events import CI_SOURCES, ProjectForm
from worker.engine.policy import (
    AgeSource,
    EventTemplates,
    KeepRule,
    Mode,
    Policy,
    RepositoryPattern,
    Sources,
    TagPattern,
)
from worker.settings.patterns import repository_glob_problem, tag_glob_problem
from worker.settings.validate import Problems, Section, item_line
from worker.settings.yamlfile import Map

_POLICY_KEYS: Final = (
    "name",
    "repositories",
    "mode",
    "protect",
    "keep",
    "untagged",
    "on",
    "sources",
    "age_from",
)
_KEEP_KEYS: Final = ("tags", "newest", "pushed_within")
#: The fields each CI event fills in a template.
_EVENT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "pull_request_closed": ("number", "branch", "branch_slug"),
    "branch_deleted": ("branch", "branch_slug"),
}
#: Values used only to check that a filled-in template is a valid tag pattern.
_SAMPLE_FIELDS: Final = {"number": "1", "branch": "main", "branch_slug": "main"}


def parse_policies(top: Section) -> tuple[Policy, ...]:
    raw = top.get("policies")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        top.problem("policies", "must be a list of policies")
        return ()
    policies = tuple(
        _policy(item, index, top.problems, item_line(raw, index)) for index, item in enumerate(raw)
    )
    _check_unique_names(policies, top.problems, raw)
    _check_shadowed_repositories(policies, top.problems, raw)
    return policies


def _policy_path(index: int, name: str) -> str:
    return f"policies[{index}] ({name})" if name else f"policies[{index}]"


def _policy(value: object, index: int, problems: Problems, line: int | None) -> Policy:
    # The name goes into every path of this policy, so it is read before the rest.
    peeked = value.get("name") if isinstance(value, dict) else None
    name = peeked if isinstance(peeked, str) and peeked.strip() else ""
    path = _policy_path(index, name)
    section = Section(value, path, problems, _POLICY_KEYS, list_item=True, line=line)
    section.text("name", required=True)
    return Policy(
        name=name,
        repositories=section.strings("repositories", _repository_pattern, required=True),
        mode=_mode(section),
        protect=section.strings("protect", _tag_pattern),
        keep=_keep_rules(section),
        untagged_delete_after=_untagged(section),
        on=_event_templates(section),
        sources=_sources(section),
        age_from=_age_from(section),
    )


def _age_from(section: Section) -> AgeSource:
    value = section.text("age_from")
    if value is None:
        return AgeSource.PUSH
    if value not in {source.value for source in AgeSource}:
        section.problem("age_from", "must be push or build_time")
        return AgeSource.PUSH
    return AgeSource(value)


def _event_templates(section: Section) -> EventTemplates:
    on = section.section("on", tuple(_EVENT_FIELDS))
    templates = EventTemplates(
        pull_request_closed=_templates(on, "pull_request_closed"),
        branch_deleted=_templates(on, "branch_deleted"),
    )
    # CI events reach a policy only through its sources: templates without them never fire.
    if (templates.pull_request_closed or templates.branch_deleted) and not section.has("sources"):
        offered = " or ".join(f"{name}:" for name in CI_SOURCES)
        section.problem("on", f"has no effect without sources ({offered} projects)")
    return templates


def _line_in(
    raw: Sequence[object], index: int, key: str, position: int | None = None
) -> int | None:
    """The line of ``raw[index][key]`` (of its item ``position``), where YAML gave one."""
    item = raw[index] if index < len(raw) else None
    if not isinstance(item, Map):
        return None
    if position is not None:
        return item_line(item.get(key), position) or item.key_lines.get(key)
    return item.key_lines.get(key) or item.line


def _check_unique_names(
    policies: Sequence[Policy], problems: Problems, raw: Sequence[object]
) -> None:
    first: dict[str, int] = {}
    for index, policy in enumerate(policies):
        if not policy.name:
            continue
        if policy.name in first:
            where = f"{_policy_path(index, policy.name)}.name"
            message = f"policies[{first[policy.name]}] already has this name: rename one"
            problems.add(where, message, _line_in(raw, index, "name"))
        first.setdefault(policy.name, index)


def _check_shadowed_repositories(
    policies: Sequence[Policy], problems: Problems, raw: Sequence[object]
) -> None:
    # A repository uses the first policy that matches it, so a later pattern that
    # an earlier policy already covers can never take effect. Only exact names and
    # identical globs are checked: glob-covers-glob is not worth its complexity.
    for index, policy in enumerate(policies):
        for position, pattern in enumerate(policy.repositories):
            earlier = _covering_policy(policies[:index], pattern)
            if earlier is not None:
                where = f"{_policy_path(index, policy.name)}.repositories[{position}]"
                line = _line_in(raw, index, "repositories", position)
                problems.add(where, f"never used: {earlier} comes first and matches it", line)


def _covering_policy(earlier: Sequence[Policy], pattern: RepositoryPattern) -> str | None:
    is_literal = not any(char in pattern.source for char in "*?")
    for index, policy in enumerate(earlier):
        for other in policy.repositories:
            if other.source == pattern.source or (is_literal and other.matches(pattern.source)):
                return _policy_path(index, policy.name)
    return None


def _mode(section: Section) -> Mode:
    value = section.text("mode")
    if value is None:
        return Mode.DRY_RUN
    if value not in {mode.value for mode in Mode}:
        section.problem("mode", "must be dry-run or enforce")
        return Mode.DRY_RUN
    return Mode(value)


def _repository_pattern(text: str) -> RepositoryPattern:
    if text.startswith("re:"):
        raise ValueError("repositories are globs; re: is only for tag patterns")
    if text.startswith("/") or text.endswith("/") or "//" in text:
        raise ValueError("must not start or end with / nor contain //")
    problem = repository_glob_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return RepositoryPattern.compile(text)


def _tag_pattern(text: str) -> TagPattern:
    if text.strip() == "re:":
        raise ValueError("the regular expression after re: is empty")
    problem = None if text.startswith("re:") else tag_glob_problem(text)
    if problem is not None:
        raise ValueError(problem)
    try:
        return TagPattern.compile(text)
    except re.error as exc:
        raise ValueError(f"bad regular expression in {text!r}: {exc}") from None


def _keep_rules(section: Section) -> tuple[KeepRule, ...] | None:
    raw = section.get("keep")
    if raw is None:
        return None
    if not isinstance(raw, list):
        section.problem("keep", "must be a list of rules")
        return None
    if not raw:
        # `keep: []` would keep nothing, i.e. delete every unprotected tag: too
        # easy to write by accident to mean "no retention".
        section.problem("keep", "must list at least one rule (leave keep out for no retention)")
        return None
    return tuple(
        _keep_rule(item, index, section, item_line(raw, index)) for index, item in enumerate(raw)
    )


def _keep_rule(value: object, index: int, policy: Section, line: int | None) -> KeepRule:
    path = f"{policy.at('keep')}[{index}]"
    rule = Section(value, path, policy.problems, _KEEP_KEYS, list_item=True, line=line)
    return KeepRule(
        index=index,
        tags=rule.strings("tags", _tag_pattern, required=True),
        newest=rule.integer("newest", low=1),
        pushed_within=rule.duration("pushed_within"),
    )


def _untagged(section: Section) -> timedelta | None:
    if not section.has("untagged"):
        return None
    untagged = section.section("untagged", ("delete_after",))
    return untagged.duration("delete_after", zero_ok=True, required=True)


def _templates(on: Section, event: str) -> tuple[str, ...]:
    return on.strings(event, partial(_template, allowed=_EVENT_FIELDS[event]))


def _template(text: str, allowed: Sequence[str]) -> str:
    offered = ", ".join(f"{{{name}}}" for name in allowed)
    try:
        fields = [part for part in string.Formatter().parse(text) if part[1] is not None]
    except ValueError as exc:
        message = f"bad template {text!r}: {exc} (write {{{{ and }}}} for literal braces)"
        raise ValueError(message) from None
    for _, name, spec, conversion in fields:
        if name not in allowed:
            raise ValueError(f"unknown field {{{name}}} in {text!r}; this event offers {offered}")
        if spec or conversion:
            raise ValueError(f"{{{name}}} in {text!r} takes no conversion or format spec")
    if not fields:
        # A template without a field names the same tags on every event.
        raise ValueError(f"{text!r} uses none of {offered}")
    _tag_pattern(text.format(**_SAMPLE_FIELDS))
    return text


def _sources(section: Section) -> Sources:
    sources = section.section("sources", tuple(CI_SOURCES))
    found = {
        name: sources.strings(name, partial(_project, form)) for name, form in CI_SOURCES.items()
    }
    return Sources(**found)


def _project(form: ProjectForm, text: str) -> RepositoryPattern:
    problem = form.problem(text)
    if problem is not None:
        raise ValueError(problem)
    return RepositoryPattern.compile(text)
