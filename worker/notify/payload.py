"""The body each kind of target wants for a :class:`~worker.notify.message.Notification`.

``webhook``: the notification as JSON (``event``, ``id``, ``time``, ``title``,
``text``, ``details``), for any receiver. ``slack``: Slack's incoming-webhook
message, ``text`` (what notifications and old clients show) plus Block Kit
``blocks`` (a header, the lines, a context line); Mattermost, Rocket.Chat and
Discord's ``/slack`` endpoint take the same ``text``.
"""

from __future__ import annotations

from typing import Any, Final

from worker.notify.message import Notification

#: Slack's limits: a header's plain text, a section's mrkdwn.
SLACK_HEADER_LIMIT: Final = 150
SLACK_SECTION_LIMIT: Final = 3000


def webhook(notification: Notification) -> dict[str, Any]:
    return {
        "event": notification.event,
        "id": notification.id,
        "time": notification.time.isoformat(),
        "title": notification.title,
        "text": "\n".join(notification.lines),
        "details": dict(notification.details),
    }


def slack(notification: Notification) -> dict[str, Any]:
    lines = "\n".join(_escape(line) for line in notification.lines)
    icon = ":rotating_light: " if notification.alert else ""
    context = f"regsweep · `{notification.event}` · {notification.time:%Y-%m-%d %H:%M:%S} UTC"
    return {
        "text": _cut(f"{icon}{_escape(notification.title)}\n{lines}", SLACK_SECTION_LIMIT),
        "blocks": [
            {
                "type": "header",
                "text": {
                    "type": "plain_text",
                    "text": _cut(notification.title, SLACK_HEADER_LIMIT),
                },
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _cut(lines, SLACK_SECTION_LIMIT)},
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


def body(kind: str, notification: Notification) -> dict[str, Any]:
    return slack(notification) if kind == "slack" else webhook(notification)


def _escape(text: str) -> str:
    """Slack reads ``&``, ``<`` and ``>`` as markup (links, mentions): escaped, as it asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
