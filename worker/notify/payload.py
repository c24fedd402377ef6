"""The body each kind of target wants for a :class:`~worker.notify.message.Notification`.

``webhook``: the notification as JSON (``event``, ``id``, ``time``, ``title``,
``text``, ``details``), for any receiver. ``slack``: Slack's incoming-webhook
message, ``text`` (what notifications and old clients show) plus Block Kit
``blocks`` (a header, the lines, a context line); Mattermost, Rocket.Chat and
Discord's ``/slack`` endpoint take the same ``text``; whatever comes from event
data is made inert for all of them (:func:`escape`).
"""

from __future__ import annotations

import re
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
    lines = "\n".join(escape(line) for line in notification.lines)
    icon = ":rotating_light: " if notification.alert else ""
    context = f"regsweep · `{notification.event}` · {notification.time:%Y-%m-%d %H:%M:%S} UTC"
    return {
        "text": _cut(f"{icon}{escape(notification.title)}\n{lines}", SLACK_SECTION_LIMIT),
        # Slack: no mention or channel name is looked up in the text, no preview fetched.
        "link_names": False,
        "unfurl_links": False,
        "unfurl_media": False,
        "blocks": [
            {
                "type": "header",
                "text": {
                    # plain_text is never markup; the mentions are broken all the same, for
                    # a receiver that shows it as text.
                    "type": "plain_text",
                    "text": _cut(_defused(notification.title), SLACK_HEADER_LIMIT),
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


#: U+2060 WORD JOINER: invisible, and no receiver's mention or link syntax spans it.
JOINER: Final = "\u2060"
#: Mentions (``@here``, ``@channel``, ``@everyone``, ``@all``, ``@user``): the ``@`` of one.
_MENTION: Final = re.compile(r"@(?=[\w.-])")
#: Auto-linked URLs: ``scheme://`` and ``www.``.
_LINK: Final = re.compile(r"(?i)(?<=[a-z0-9+.-]:)(?=//)|(?<=\bwww)(?=\.)")


def escape(text: str) -> str:
    """Text built from event data, made inert for every Slack-compatible receiver.

    Slack reads ``&``, ``<`` and ``>`` as markup (``<!here>``, ``<@U123>``,
    ``<http://x|label>``): escaped, as it asks. Mattermost, Rocket.Chat and
    Discord's ``/slack`` endpoint take the same ``text`` but also read
    ``@here``, ``@channel``, ``@everyone`` and ``@name`` as mentions, and
    every one of them turns ``http://...`` and ``www....`` into links: a
    word joiner after the ``@``, after the scheme's colon and after ``www``
    breaks each without changing what a person reads. An event id, a tag, a
    registry's error text: none can ping a channel or plant a link.
    """
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _defused(escaped)


def _defused(text: str) -> str:
    """``text`` with its mentions and auto-links broken (see :func:`escape`)."""
    return _LINK.sub(JOINER, _MENTION.sub("@" + JOINER, text))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
