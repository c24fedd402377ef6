"""What ``registry garbage-collect`` printed, turned into counts.

The registry prints its mark phase and the list of what is eligible on stdout
(``fmt.Printf`` in ``registry/storage/garbagecollect.go``) and the actual
deletions as info-level log lines on stderr (``vacuum.go``). Real 2.8.2 output::

    team/web
    team/web: marking manifest sha256:72d4...
    team/web: marking blob sha256:9675...
    manifest eligible for deletion: sha256:72d4...           (--delete-untagged, never
                                                             passed by regsweep)

    3 blobs marked, 3 blobs and 0 manifests eligible for deletion
    blob eligible for deletion: sha256:36a7...
    time="..." level=info msg="deleting manifest: /docker/registry/v2/repositories/..."
    time="..." level=info msg="Deleting blob: /docker/registry/v2/blobs/sha256/36/36a7..."

3.x adds ``<repo>: layer link eligible for deletion: <digest>`` and prints
``manifest eligible for deletion: {<repo> <digest> [<tags>]}``; releases before
2.7 summarised as ``N blobs marked, P blobs parsed : M blobs eligible for
deletion``. Log lines may be logfmt or JSON (``log.formatter``); both carry the
message text verbatim, so the patterns below search rather than anchor.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from worker.oci import DIGEST_SYNTAX

#: How many of the last output lines a result keeps for the report.
DEFAULT_TAIL_LINES: Final = 50

_DIGEST: Final = DIGEST_SYNTAX
_REPOSITORY_LINE: Final = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_MARK_MANIFEST: Final = re.compile(rf"^\S+: marking manifest {_DIGEST}")
_MARK_BLOB: Final = re.compile(rf"^\S+: marking blob {_DIGEST}")
_SUMMARY: Final = re.compile(
    r"^(?P<marked>\d+) blobs marked, (?P<blobs>\d+) blobs and "
    r"(?P<manifests>\d+) manifests eligible for deletion"
)
_SUMMARY_BEFORE_2_7: Final = re.compile(
    r"^(?P<marked>\d+) blobs marked, \d+ blobs parsed : (?P<blobs>\d+) blobs eligible"
)
_BLOB_ELIGIBLE: Final = re.compile(rf"^blob eligible for deletion: {_DIGEST}")
_MANIFEST_ELIGIBLE: Final = re.compile(rf"manifest eligible for deletion: .*?{_DIGEST}")
_LAYER_LINK_ELIGIBLE: Final = re.compile(rf"^\S+: layer link eligible for deletion: {_DIGEST}")
_BLOB_DELETED: Final = re.compile(r"Deleting blob: /")
_MANIFEST_DELETED: Final = re.compile(r"deleting manifest: /")
_ERROR: Final = re.compile(
    r"^(?:failed to garbage collect|configuration error|Error: |panic: )"
    r"|level=(?:error|fatal|panic)\b"
    r'|"level":\s*"(?:error|fatal|panic)"'
)
_VERSION: Final = re.compile(r"(?<![\w.])v?(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class GcResult:
    """One ``registry garbage-collect`` run: its exit code and what its output says it did."""

    exit_code: int
    dry_run: bool
    duration_s: float
    repositories: int = 0
    manifests_marked: int = 0
    blobs_marked: int = 0
    blobs_eligible: int = 0
    manifests_eligible: int = 0
    #: 3.x only: per-repository layer links of blobs that were swept.
    layer_links_eligible: int = 0
    blobs_deleted: int = 0
    manifests_deleted: int = 0
    #: The summary line was printed: the mark phase finished.
    completed: bool = False
    #: The last line that reads as an error (``failed to garbage collect: ...``, ...).
    error: str | None = None
    lines_tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Exit 0, a summary, and no error line.

        2.8's command line exits 0 on an unknown flag (it only prints
        ``Error: unknown flag``), so the exit code alone is not enough.
        """
        return self.exit_code == 0 and self.completed and self.error is None


class GcOutputParser:
    """Counts what a GC run reports, one line at a time, as the lines stream in."""

    def __init__(self, tail_lines: int = DEFAULT_TAIL_LINES) -> None:
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._counts = dict.fromkeys(
            (
                "repositories",
                "manifests_marked",
                "blob_lines",
                "blob_eligible_lines",
                "manifests_eligible_lines",
                "layer_links_eligible",
                "blobs_deleted",
                "manifests_deleted",
            ),
            0,
        )
        self._summary: dict[str, int] | None = None
        self._error: str | None = None

    def feed(self, line: str) -> None:
        """Account for one output line (stdout or stderr, without its newline)."""
        line = line.rstrip("\r\n")
        self._tail.append(line)
        text = line.strip()
        if not text:
            return
        if _ERROR.search(text):
            self._error = text
        summary = _SUMMARY.search(text) or _SUMMARY_BEFORE_2_7.search(text)
        if summary is not None:
            self._summary = {key: int(value) for key, value in summary.groupdict().items()}
            return
        key = _classify(text)
        if key is not None:
            self._counts[key] += 1

    def result(self, *, exit_code: int, dry_run: bool, duration_s: float) -> GcResult:
        """The result of the run whose lines were fed."""
        counts = self._counts
        summary = self._summary or {}
        blobs_eligible = summary.get("blobs", counts["blob_eligible_lines"])
        manifests_eligible = summary.get("manifests", counts["manifests_eligible_lines"])
        swept = not dry_run and exit_code == 0 and self._summary is not None
        return GcResult(
            exit_code=exit_code,
            dry_run=dry_run,
            duration_s=duration_s,
            repositories=counts["repositories"],
            manifests_marked=counts["manifests_marked"],
            blobs_marked=summary.get("marked", counts["manifests_marked"] + counts["blob_lines"]),
            blobs_eligible=blobs_eligible,
            manifests_eligible=manifests_eligible,
            layer_links_eligible=counts["layer_links_eligible"],
            blobs_deleted=_deleted(counts["blobs_deleted"], blobs_eligible, swept),
            manifests_deleted=_deleted(counts["manifests_deleted"], manifests_eligible, swept),
            completed=self._summary is not None,
            error=self._error,
            lines_tail=tuple(self._tail),
        )


def parse_gc_output(
    lines: Iterable[str], *, exit_code: int, dry_run: bool, duration_s: float = 0.0
) -> GcResult:
    """Parse a finished run's whole output at once."""
    parser = GcOutputParser()
    for line in lines:
        parser.feed(line)
    return parser.result(exit_code=exit_code, dry_run=dry_run, duration_s=duration_s)


def gc_flags(*, dry_run: bool) -> list[str]:
    """The ``garbage-collect`` flags for these options (the long name exists in 2.7+ and 3.x).

    Never ``--delete-untagged``: on 2.8 it deletes the children of kept multi-arch
    indexes (distribution#3178); on 3.1.0 it deletes kept images' OCI referrers, every
    untagged manifest of repositories no policy covers, and the blobs (not the
    manifests) of repositories pushed by digest only (docs/safety.md, invariant 3).
    """
    return ["--dry-run"] if dry_run else []


def parse_registry_version(text: str) -> str | None:
    """``2.8.2`` from ``registry --version`` or an image label (``v3.0.0``, ``2.8.2+ds1``)."""
    match = _VERSION.search(text)
    return match.group(1) if match else None


def _classify(text: str) -> str | None:
    """Which counter a line feeds; ``None`` for lines that count nothing."""
    patterns = (
        (_MARK_MANIFEST, "manifests_marked"),
        (_MARK_BLOB, "blob_lines"),
        (_BLOB_ELIGIBLE, "blob_eligible_lines"),
        (_LAYER_LINK_ELIGIBLE, "layer_links_eligible"),
        (_MANIFEST_ELIGIBLE, "manifests_eligible_lines"),
        (_BLOB_DELETED, "blobs_deleted"),
        (_MANIFEST_DELETED, "manifests_deleted"),
    )
    for pattern, key in patterns:
        if pattern.search(text):
            return key
    return "repositories" if _REPOSITORY_LINE.fullmatch(text) else None


def _deleted(logged: int, eligible: int, swept: bool) -> int:
    """Deletions as logged; when the log level hides them, all eligible items after a clean run.

    ``Deleting blob`` and ``deleting manifest`` are info-level log lines, and
    GC stops at the first failed deletion, so a clean non-dry run deleted
    everything it listed as eligible.
    """
    if logged:
        return logged
    return eligible if swept else 0
