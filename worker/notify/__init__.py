"""Notifications: job summaries, GC reports and alerts sent to webhooks and Slack (``notify:``).

``message.py`` says what happened (a :class:`~worker.notify.message.Notification` per
event), ``payload.py`` how each kind of target wants it, ``sender.py`` delivers it
(a thread per target, retries with backoff, a bounded total time, counted),
``runtime.py`` is the one sender of a worker process.
"""
