"""The API floor: list, resolve and delete by digest with no safety checks at all.

No correct pruner can beat it: it knows the seeded tags sort oldest-first, so
it fetches no manifest body and no config, checks nothing before deleting, and
never re-reads the registry. Usage: ``python -m bench.floor URL KEEP REPO...``
(``--resolve-only`` stops after the list-and-resolve phase).
"""

from __future__ import annotations

import asyncio
import sys

import httpx

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


async def prune(client: httpx.AsyncClient, repo: str, keep: int, resolve_only: bool) -> int:
    tags = sorted((await client.get(f"/v2/{repo}/tags/list")).json()["tags"] or [])
    doomed = tags[:-keep] if keep else tags
    heads = await asyncio.gather(
        *(client.head(f"/v2/{repo}/manifests/{t}", headers={"Accept": ACCEPT}) for t in tags)
    )
    digests = {t: h.headers["Docker-Content-Digest"] for t, h in zip(tags, heads, strict=True)}
    if resolve_only:
        return 0
    await asyncio.gather(*(client.delete(f"/v2/{repo}/manifests/{digests[t]}") for t in doomed))
    return len(doomed)


async def main(url: str, keep: int, repos: list[str], resolve_only: bool) -> None:
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        counts = await asyncio.gather(*(prune(client, r, keep, resolve_only) for r in repos))
    print(sum(counts))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resolve-only"]
    asyncio.run(main(args[0], int(args[1]), args[2:], "--resolve-only" in sys.argv))
