"""Notifications bounded in time and memory, and made inert for chat receivers: real senders
(worker.notify.sender) against real receivers that trickle, flood or echo event data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import pytest

from tests.harness import service as h
from tests.harness import stack
from tests.harness.receiver import HUGE_BYTES, FloodServer, Receiver, TrickleServer
from worker.notify.message import dead_letters
from worker.notify.sender import ANSWER_LIMIT, Notifier
from worker.settings.model import NotifyTarget, Secret

T = TypeVar("T")
Outcome = tuple[str, str, str]


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    return stack.wait_for(condition, timeout, what=what)


def target(name: str, url: str, kind: str = "webhook", timeout: float = 1.0) -> NotifyTarget:
    return NotifyTarget(
        name,
        "slack" if kind == "slack" else "webhook",
        Secret(url),
        retries=0,
        timeout=timedelta(seconds=timeout),
        give_up_after=timedelta(seconds=60),
    )


def test_an_attempt_ends_at_its_timeout_however_slowly_the_receiver_answers() -> None:
    """A receiver answering one byte every 0.1 s never lets a read time out; each attempt
    still ends (failed) at its timeout, and the target's next notification is tried."""
    outcomes: list[Outcome] = []
    with TrickleServer(every=0.1) as trickle:
        notifier = Notifier([target("trickle", f"{trickle.url}/hook")], _record(outcomes))
        notifier.publish(dead_letters(1, 1, []))
        notifier.publish(dead_letters(2, 2, []))
        wait_for(lambda: len(outcomes) == 2, "both notifications ended")
        notifier.close(wait=1.0)
        assert trickle.connections == 2
    assert [o[2] for o in outcomes] == ["failed", "failed"]


def test_a_closing_process_ends_the_attempt_under_way_with_a_recorded_outcome() -> None:
    """Closing while an attempt trickles along (timeout 30 s) cancels it: the notification
    is counted failed before close returns, not left without an outcome."""
    outcomes: list[Outcome] = []
    with TrickleServer(every=0.1) as trickle:
        notifier = Notifier([target("trickle", trickle.url, timeout=30.0)], _record(outcomes))
        notifier.publish(dead_letters(1, 1, []))
        wait_for(lambda: trickle.connections == 1, "the attempt under way")
        notifier.close(wait=0.2)
        assert outcomes == [("trickle", "dead_letter", "failed")]
        wait_for(lambda: trickle.closed == 1, "the trickling connection closed")


def test_a_huge_answer_is_read_only_a_few_kib(caplog: pytest.LogCaptureFixture) -> None:
    """A 200 MiB error answer: the sender reads at most ANSWER_LIMIT of it and hangs up, so
    no more of it leaves the receiver than the sockets' buffers hold; the log line stays
    short."""
    outcomes: list[Outcome] = []
    caplog.set_level(logging.INFO, logger="regsweep.notify")
    with FloodServer() as flood:
        notifier = Notifier([target("huge", flood.url, timeout=10.0)], _record(outcomes))
        notifier.publish(dead_letters(1, 1, []))
        wait_for(lambda: outcomes, "the notification ended")
        notifier.close(wait=1.0)
        wait_for(lambda: flood.closed == 1, "the flood's connection closed")
        sent = flood.sent
    assert outcomes == [("huge", "dead_letter", "failed")]
    assert sent < HUGE_BYTES // 8, sent
    [line] = [r.getMessage() for r in caplog.records if "huge failed" in r.getMessage()]
    assert "HTTP 500: xxxx" in line and len(line) < ANSWER_LIMIT // 8, line


def test_slack_text_from_event_data_pings_nobody_and_links_nowhere() -> None:
    """A dead letter's reason (event data: an id, a registry's error) full of mentions and
    links reaches a Slack-compatible receiver with none of them live, the & escaped."""
    outcomes: list[Outcome] = []
    receiver = Receiver()
    reason = (
        "event @here <!channel> <!here|here> @everyone @channel <@U123> "
        "<http://evil.example|click> http://evil.example/x www.evil.example a&b"
    )
    entry = {"time": "2026-01-01T00:00:00+00:00", "source": "registry", "reason": reason}
    with h.running(receiver.app()) as url:
        notifier = Notifier([target("chat", f"{url}/slack/x", "slack")], _record(outcomes))
        notifier.publish(dead_letters(1, 1, [entry]))
        wait_for(lambda: receiver.of("slack"), "the Slack message arrived")
        notifier.close(wait=5.0)
    body = receiver.of("slack")[0].body
    texts = [body["text"], *(_block_texts(body["blocks"]))]
    for text in texts:
        for live in ("@here", "@everyone", "@channel", "<!", "<@", "<http", "http://", "www."):
            assert live not in text, (live, text)
    assert "a&amp;b" in body["text"]
    assert outcomes == [("chat", "dead_letter", "sent")]


def _block_texts(blocks: list[dict[str, object]]) -> list[str]:
    texts: list[str] = []
    for block in blocks:
        text = block.get("text")
        if isinstance(text, dict):
            texts.append(str(text.get("text", "")))
    return texts


def _record(outcomes: list[Outcome]) -> Callable[[str, str, str], None]:
    return lambda target, event, outcome: outcomes.append((target, event, outcome))
