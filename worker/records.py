"""What regsweep keeps about tags beside the registry, as value objects: holds, sightings and
what a plan made of the registry's times.

The engine decides from them and the store keeps them, so they live below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from worker.clock import ClockSkew
from worker.oci import Digest


@dataclass(frozen=True, slots=True)
class Hold:
    """A tag every plan keeps until ``until`` (``regsweep hold``, or put back by ``restore``)."""

    tag: str
    until: datetime
    reason: str

    def active(self, now: datetime) -> bool:
        return self.until > now


@dataclass(frozen=True, slots=True)
class Sighting:
    """A tag regsweep first saw on ``digest`` in a listing that started at ``shown`` and
    finished at ``latest``; the listing before, which lacked it (or showed another digest),
    started at ``earliest``."""

    digest: Digest
    earliest: datetime | None
    latest: datetime
    #: None for sightings recorded before this was kept: ``latest`` stands in.
    shown: datetime | None = None


@dataclass(frozen=True)
class EvidenceSummary:
    """What one plan found of the registry's times: kept for ``regsweep status``."""

    repository: str
    at: datetime
    skew: ClockSkew | None
    #: Why the repository's registry times were refused as a whole, if they were.
    refused: str | None
    #: Tags whose registry times were not used as they stand.
    doubted: int
