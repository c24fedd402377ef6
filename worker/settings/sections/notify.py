"""The ``notify:`` list: where job summaries, GC reports and alerts are sent."""

from __future__ import annotations

import difflib
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from typing import Final

from worker.durations import exact
from worker.settings import env
from worker.settings.model import (
    DEFAULT_NOTIFY_GIVE_UP,
    DEFAULT_NOTIFY_RETRIES,
    DEFAULT_NOTIFY_TIMEOUT,
    NOTIFY_EVENTS,
    NotifySettings,
    NotifyTarget,
    Secret,
)
from worker.settings.validate import Problems, Section

_NOTIFY_KEYS: Final = ("name", "kind", "url_env", "events", "timeout", "retries", "give_up_after")
_NOTIFY_KINDS: Final = ("webhook", "slack")
MAX_NOTIFY_RETRIES: Final = 10
MAX_NOTIFY_TIMEOUT: Final = timedelta(minutes=1)
MAX_NOTIFY_GIVE_UP: Final = timedelta(hours=1)


def parse_notify(top: Section, environ: Mapping[str, str]) -> NotifySettings:
    raw = top.get("notify")
    if raw is None:
        return NotifySettings()
    if not isinstance(raw, list):
        top.problem("notify", "must be a list of targets (name, kind, url_env, events)")
        return NotifySettings()
    targets: list[NotifyTarget] = []
    unset: list[str] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name in names:
            top.problems.add(f"notify[{index}].name", f"another target is named {name!r}")
        names.add(str(name))
        target = _notify_target(item, index, top.problems, environ, unset)
        if target is not None:
            targets.append(target)
    return NotifySettings(targets=tuple(targets), unset=tuple(unset))


def _notify_target(
    value: object,
    index: int,
    problems: Problems,
    environ: Mapping[str, str],
    unset: list[str],
) -> NotifyTarget | None:
    peeked = value.get("name") if isinstance(value, dict) else None
    name = peeked if isinstance(peeked, str) and peeked.strip() else ""
    where = f"notify[{index}] ({name})" if name else f"notify[{index}]"
    section = Section(value, where, problems, _NOTIFY_KEYS, list_item=True)
    section.text("name", required=True)
    kind = section.text("kind", required=True)
    if kind is not None and kind not in _NOTIFY_KINDS:
        section.problem("kind", "must be webhook (JSON POST) or slack (Slack incoming webhook)")
    url = _notify_url(section, environ, unset)
    events = section.strings("events", _notify_event)
    timeout = _bounded(section, "timeout", DEFAULT_NOTIFY_TIMEOUT, MAX_NOTIFY_TIMEOUT)
    give_up = _bounded(section, "give_up_after", DEFAULT_NOTIFY_GIVE_UP, MAX_NOTIFY_GIVE_UP)
    if give_up < timeout:
        section.problem("give_up_after", "must be at least the timeout of one attempt")
    retries = section.integer("retries", low=0, high=MAX_NOTIFY_RETRIES)
    if not name or kind not in _NOTIFY_KINDS or url is None:
        return None
    return NotifyTarget(
        name=name,
        kind="slack" if kind == "slack" else "webhook",
        url=url,
        events=frozenset(events) if section.has("events") else frozenset(NOTIFY_EVENTS),
        timeout=timeout,
        retries=DEFAULT_NOTIFY_RETRIES if retries is None else retries,
        give_up_after=give_up,
    )


def _notify_url(section: Section, environ: Mapping[str, str], unset: list[str]) -> Secret | None:
    """The URL from the variable ``url_env`` names; an unset variable turns the target off
    (named in ``unset``: a variable's name is never a URL, so saying it gives nothing away)."""
    if not section.has("url_env"):
        section.get("url_env", required=True)
        return None
    name = section.variable("url_env")
    if name is None:
        return None
    url = env.secret(environ, name)
    if url is None:
        unset.append(f"{section.at('url_env')}: {name} is not set, so this target is off")
        return None
    if not _is_http_url(url.reveal()):
        # Never the value: it is the secret.
        section.problem("url_env", f"{name} does not hold an http:// or https:// URL")
        return None
    return url


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _notify_event(text: str) -> str:
    if text not in NOTIFY_EVENTS:
        close = difflib.get_close_matches(text, NOTIFY_EVENTS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"one of: {', '.join(NOTIFY_EVENTS)}"
        raise ValueError(f"unknown event {text!r} ({hint})")
    return text


def _bounded(section: Section, key: str, default: timedelta, most: timedelta) -> timedelta:
    value = section.duration(key)
    if value is None:
        return default
    if value > most:
        section.problem(key, f"must be at most {exact(most)}")
        return default
    return value
