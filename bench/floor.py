"""The API floor: list, resolve and delete by digest with no safety checks at all.

No correct pruner can beat it: it knows the seeded tags sort oldest-first, so
it fetches no manifest body and no config, checks nothing before deleting, and
never re-reads the registry. Usage: ``python -m bench.floor URL KEEP REPO...``
(``--resolve-only`` stops after the list-and-resolve phase).

``--configs`` is the floor of a pruner that does not know the order and has to
learn every image's push time the only way the registry API offers, as the
image config's ``created``: it GETs each tag's manifest (the body names the
config) and each config, then ranks by ``created``. Still no safety checks.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx

ACCEPT = "application/vnd.oci.image.manifest.v1+json"
CONCURRENCY = 8


class Floor:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        # A semaphore, not only the pool limit: thousands of requests queued inside
        # httpx's connection pool cost quadratic time there, which would flatter regsweep
        # (regsweep's client gates its requests the same way).
        self.gate = asyncio.Semaphore(CONCURRENCY)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with self.gate:
            return await self.client.request(method, path, **kwargs)

    async def resolve(self, repo: str, tags: list[str]) -> dict[str, str]:
        """Tag -> digest, one HEAD per tag."""
        heads = await asyncio.gather(
            *(
                self.request("HEAD", f"/v2/{repo}/manifests/{t}", headers={"Accept": ACCEPT})
                for t in tags
            )
        )
        return {t: h.headers["Docker-Content-Digest"] for t, h in zip(tags, heads, strict=True)}

    async def resolve_with_created(self, repo: str, tags: list[str]) -> dict[str, tuple[str, str]]:
        """Tag -> (created, digest): the manifest's GET, then its config's GET."""

        async def one(tag: str) -> tuple[str, str]:
            manifest = await self.request(
                "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}
            )
            config = manifest.json()["config"]["digest"]
            created = (await self.request("GET", f"/v2/{repo}/blobs/{config}")).json()["created"]
            return created, manifest.headers["Docker-Content-Digest"]

        return dict(zip(tags, await asyncio.gather(*(one(t) for t in tags)), strict=True))

    async def prune(self, repo: str, keep: int, resolve_only: bool, configs: bool) -> int:
        listed = await self.request("GET", f"/v2/{repo}/tags/list")
        tags = listed.json()["tags"] or []
        if configs:
            known = await self.resolve_with_created(repo, tags)
            tags = sorted(tags, key=lambda t: known[t][0])
            digests = {t: digest for t, (_, digest) in known.items()}
        else:
            tags = sorted(tags)
            digests = await self.resolve(repo, tags)
        doomed = tags[:-keep] if keep else tags
        if resolve_only:
            return 0
        await asyncio.gather(
            *(self.request("DELETE", f"/v2/{repo}/manifests/{digests[t]}") for t in doomed)
        )
        return len(doomed)


async def main(url: str, keep: int, repos: list[str], resolve_only: bool, configs: bool) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        floor = Floor(client)
        counts = await asyncio.gather(*(floor.prune(r, keep, resolve_only, configs) for r in repos))
    print(sum(counts))


if __name__ == "__main__":
    flags = {"--resolve-only", "--configs"}
    args = [a for a in sys.argv[1:] if a not in flags]
    asyncio.run(
        main(
            args[0],
            int(args[1]),
            args[2:],
            "--resolve-only" in sys.argv,
            "--configs" in sys.argv,
        )
    )
