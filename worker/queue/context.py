"""What a worker process holds for its whole life: clients made once, passed in.

Made at ``worker_process_init`` (or on first use in a solo worker), on the
process's own event loop (:mod:`worker.queue.runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.inventory import ManifestCache
from worker.engine.prune import Pruner
from worker.errors import ConfigError
from worker.registry.client import RegistryClient
from worker.settings.model import Config
from worker.store.audit import AuditLog
from worker.store.keys import DEFAULT_PREFIX
from worker.store.metrics import WorkerMetrics
from worker.store.open import redis_audit, tag_index
from worker.store.prunes import PruneRecords
from worker.store.redis import AsyncRedisClient, async_worker_client
from worker.store.state import State
from worker.store.tagindex import TagIndex


@dataclass
class WorkerContext:
    config: Config
    redis: AsyncRedisClient
    client: RegistryClient
    index: TagIndex
    audit: AuditLog
    state: State
    pruner: Pruner
    metrics: WorkerMetrics

    @classmethod
    async def open(cls, config: Config, *, prefix: str = DEFAULT_PREFIX) -> WorkerContext:
        if config.redis_url is None:
            raise ConfigError("workers need Redis: set redis.url or REGSWEEP_REDIS_URL")
        redis = async_worker_client(config.redis_url)
        metrics = WorkerMetrics(prefix=prefix)
        client = RegistryClient.from_settings(
            config.registry, on_response=metrics.registry_response
        )
        index = tag_index(redis, config, prefix=prefix)
        audit = redis_audit(redis, config, prefix=prefix)
        pruner = Pruner(config, client, history=index, audit=audit, manifest_cache=ManifestCache())
        state = State(redis, prefix=prefix)
        return cls(config, redis, client, index, audit, state, pruner, metrics)

    async def aclose(self) -> None:
        await self.metrics.flush(self.redis)
        await self.client.aclose()
        await self.redis.aclose()


def records(ctx: WorkerContext) -> PruneRecords:
    """The prune queue's records of ``ctx``'s installation (:mod:`worker.store.prunes`)."""
    return PruneRecords(ctx.redis, ctx.state.keys)
