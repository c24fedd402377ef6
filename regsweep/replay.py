"""``regsweep replay ID [--json]``: run again a dead letter's work, or a recorded CI event.

ID is a dead letter's id (or a unique prefix of one: ``regsweep status`` lists them) or
a CI event's delivery id. A dead-lettered prune or sweep is queued again as a new job,
once (a second replay names the job the first one made); a CI event is queued again as
the workers received it. Exit 0 queued (or already replayed), 1 nothing by that id,
nothing in it to replay, or Redis not answering; 2 without ``redis.url``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from regsweep.records import reading
from worker.queue.messages import follow_hint
from worker.settings.model import Config


def add_parser(sub: Any) -> None:
    replay = sub.add_parser("replay", help="run again a dead letter's work, or a recorded CI event")
    replay.add_argument("id", metavar="ID", help="a dead letter id (or prefix), or a delivery id")
    replay.add_argument("--json", action="store_true", help="machine-readable output")


async def replay_command(args: argparse.Namespace, config: Config) -> int:
    # Celery and the service's modules only for the command that sends (as cli.py does).
    from service.replay import replay  # noqa: PLC0415
    from worker.queue.enqueue import Enqueuer  # noqa: PLC0415

    async with reading(config, "replay") as records:
        sink = Enqueuer.from_config(config)
        try:
            done = await replay(args.id, records.state, sink)
        finally:
            sink.close()
    if args.json:
        print(json.dumps(done.as_dict()))
    elif done.kind == "ci_event":
        print(f"CI event {done.id} queued again ({done.detail}); its prunes: regsweep jobs")
    elif done.again:
        print(f"dead letter {done.id} was already replayed: {done.kind} job {done.job_id}")
    else:
        print(f"dead letter {done.id} replayed: {done.kind} job {done.job_id}")
    if done.job_id is not None:
        print(follow_hint(done.job_id), file=sys.stderr)
    return 0
