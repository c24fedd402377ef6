"""The registry client: every call regsweep makes to a distribution registry.

One :class:`RegistryClient` (one ``httpx.AsyncClient``) per process, made at
start-up with :meth:`RegistryClient.from_settings` and passed to whatever
needs it. It speaks the distribution / OCI distribution API as 2.8 and 3.x
serve it, and turns every answer regsweep does not expect into a
:mod:`worker.errors` type:

=====================================  =============================================
answer                                 raised
=====================================  =============================================
connection error, timeout, 5xx         retried (``DEFAULT_RETRIES`` attempts,
                                       exponential backoff with jitter), then
                                       :class:`RegistryUnavailable`
401 / 403 after the auth flow          :class:`RegistryAuthError`
405, plain text, ``Allow`` header      :class:`RegistryReadOnly` (maintenance mode)
405, JSON ``UNSUPPORTED``              :class:`DeletesDisabled`
404 where a value is required          :class:`ManifestUnknown`
429                                    :class:`RegistryUnavailable` (not retried here)
anything else unexpected               :class:`RegistryProtocolError`
=====================================  =============================================

4xx answers are never retried: they do not get better by asking again.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Protocol, Self

import httpx

from worker import oci
from worker.backoff import backoff
from worker.clock import ClockSkew
from worker.errors import (
    ConfigError,
    DeletesDisabled,
    DeleteUnsettled,
    ManifestUnknown,
    RegistryAuthError,
    RegistryError,
    RegistryProtocolError,
    RegistryReadOnly,
    RegistryUnavailable,
    SafetyViolation,
)
from worker.oci import Descriptor, Digest, Manifest, is_digest, parse_manifest
from worker.registry.auth import RegistryAuth
from worker.registry.diagnosis import (
    API_VERSION_HEADER,
    DELETES_DISABLED_HINT,
    describe,
    operation,
    response_hint,
    shown_url,
    transport_failure,
)

log = logging.getLogger(__name__)

#: Attempts per request (the first one included) for connection errors, timeouts and 5xx.
DEFAULT_RETRIES: Final = 4
#: Backoff before retry k is ``DEFAULT_BACKOFF * 2**(k-1)`` seconds, give or take half.
DEFAULT_BACKOFF: Final = 0.2
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0, pool=60.0)
#: Page size asked for first for the catalog and tag lists. A registry refuses n above
#: its limit with 400 PAGINATION_NUMBER_INVALID (2.8's and 3.x's catalog:
#: ``catalog.maxentries``; 3.x's tag lists: ``tags.maxtags``; both default 1000), and
#: the client then halves it until one is accepted (:meth:`RegistryClient._paginated`).
DEFAULT_PAGE_SIZE: Final = 1000
#: A pagination loop longer than this is a registry bug, not a big registry.
MAX_PAGES: Final = 100_000
#: A digest no content has: what ``deletes_enabled`` asks the registry to delete.
IMPOSSIBLE_DIGEST: Final = "sha256:" + "0" * 64
#: The tag-delete probe's tag starts with this and ends with 128 random bits: a tag nobody
#: has pushed, so asking deletes nothing (:meth:`RegistryClient.tag_delete`).
PROBE_TAG_PREFIX: Final = "regsweep-probe-"
#: The OCI empty descriptor's content, the config of the throw-away manifest.
EMPTY_CONFIG: Final = b"{}"

_LINK_NEXT: Final = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)
_HASHES: Final = frozenset({"sha256", "sha512"})


class Secret(Protocol):
    """A password that shows itself only when asked (:class:`worker.settings.model.Secret`)."""

    def reveal(self) -> str: ...


class RegistryAccess(Protocol):
    """Where the registry is and how to talk to it (``registry:`` in the policy file,
    :class:`worker.settings.model.RegistrySettings`)."""

    @property
    def url(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> Secret | None: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def concurrency(self) -> int: ...


#: Called after every HTTP exchange: (method, path template, status or None on a
#: transport error, seconds). Where Prometheus metrics plug in.
ResponseHook = Callable[[str, str, int | None, float], None]


class Removal(StrEnum):
    """What a DELETE did."""

    DELETED = "deleted"
    #: The answer was lost (a dropped connection, a 5xx, a restart in between) and a
    #: HEAD afterwards found the manifest or tag gone: this DELETE removed it.
    DELETED_UNANSWERED = "deleted, answer lost"
    #: A tag-only removal by placeholder (2.8): the tag is off its digest, but the
    #: placeholder could not be deleted afterwards (the registry went read-only, say).
    #: Done all the same; the next run deletes the placeholder with its tag.
    PLACEHOLDER_LEFT = "tag removed, placeholder left"
    #: It was gone before this DELETE (404 at the first attempt).
    ABSENT = "already gone"

    @property
    def removed(self) -> bool:
        return self is not Removal.ABSENT


@dataclass(frozen=True, slots=True)
class ManifestRef:
    """What a manifest HEAD tells: its digest, media type and size, without the body."""

    digest: Digest
    media_type: str
    size: int


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The content digest of ``data``."""
    if algorithm not in _HASHES:
        raise RegistryProtocolError(f"unsupported digest algorithm {algorithm!r}")
    return Digest(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


def error_codes(response: httpx.Response) -> list[str]:
    """The ``errors[].code`` values of a distribution error body (empty if it has none)."""
    try:
        body = response.json()
    except ValueError:
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return []
    return [str(e.get("code")) for e in errors if isinstance(e, dict) and e.get("code")]


def next_link(response: httpx.Response) -> httpx.URL | None:
    """The ``Link: <...>; rel="next"`` target, resolved against the request URL."""
    match = _LINK_NEXT.search(response.headers.get("Link", ""))
    return response.url.join(match.group(1)) if match else None


def error_for(response: httpx.Response, what: str | None = None) -> RegistryError:
    """The :mod:`worker.errors` type for an answer the caller did not expect: its message
    names the operation and URL, the status and error codes, and what to change where
    that is knowable (:mod:`worker.registry.diagnosis`)."""
    status = response.status_code
    codes = error_codes(response)
    where = operation(response.request)
    head = where if what is None else f"{what} ({where})"
    message = f"{head}: {status} {' '.join(codes)}".rstrip()
    hint = response_hint(response, codes)
    if status in (401, 403):
        return RegistryAuthError(message, status=status, hint=hint)
    if status == 405:
        if "UNSUPPORTED" in codes:
            return DeletesDisabled(message, status=status, hint=hint)
        if "Allow" in response.headers and not codes:
            return RegistryReadOnly(f"{message} (read-only maintenance mode)", status=status)
    if status == 404:
        return ManifestUnknown(message, status=status, hint=hint, codes=tuple(codes))
    if status == 429 or status >= 500:
        return RegistryUnavailable(message, status=status, hint=hint, codes=tuple(codes))
    return RegistryProtocolError(message, status=status, hint=hint, codes=tuple(codes))


def untag_manifest(config: Descriptor) -> bytes:
    """A unique throw-away OCI manifest; the nonce makes its digest nobody else's."""
    body = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {
            "mediaType": config.media_type,
            "digest": config.digest,
            "size": config.size,
        },
        "layers": [],
        "annotations": {oci.UNTAG_ANNOTATION: secrets.token_hex(16)},
    }
    return json.dumps(body, separators=(",", ":")).encode()


#: The config descriptor of every placeholder: the OCI empty descriptor.
PLACEHOLDER_CONFIG: Final = Descriptor(digest_of(EMPTY_CONFIG), oci.OCI_EMPTY, len(EMPTY_CONFIG))


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """TLS verification always on; ``ca_file`` adds the registry's CA to the defaults."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"registry.ca_file: cannot load {ca_file}: {exc}") from exc


class TagWriteGate:
    """Keeps this process's tag writes apart from its DELETEs by digest, in one repository.

    2.8 answers a DELETE by digest by reading every tag link of the repository to
    find the tags to remove, and writes a tag link in place (truncate, then
    write). A link read while another request rewrites it is empty: the DELETE
    fails with 500 "invalid checksum digest format" *after* removing the manifest,
    leaving its tags listed and pointing at nothing (distribution#2514, open;
    such tags answer 404, distribution#1293). regsweep's own placeholder
    PUTs (tag-only removals) therefore wait until no DELETE of the repository is in
    flight, and DELETEs wait for a placeholder PUT in flight (or waiting) to end.
    A push by someone else at that moment can still meet the registry's race.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._deleting = 0
        self._writers = 0  # writing or waiting to
        self._writing = False

    @contextlib.asynccontextmanager
    async def deleting(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._writers == 0)
            self._deleting += 1
        try:
            yield
        finally:
            async with self._changed:
                self._deleting -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def writing_tag(self) -> AsyncIterator[None]:
        async with self._changed:
            self._writers += 1
            await self._changed.wait_for(lambda: self._deleting == 0 and not self._writing)
            self._writing = True
        try:
            yield
        finally:
            async with self._changed:
                self._writing = False
                self._writers -= 1
                self._changed.notify_all()


#: The latest ``Date`` a skew is measured from (one second more overflows a datetime).
END_OF_TIME: Final = datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC)


class RegistryClock:
    """The registry's clock as the ``Date`` headers of its answers show it: the skew of the
    latest answer that carried one (tag links and notifications are on that clock)."""

    def __init__(self) -> None:
        self.skew: ClockSkew | None = None

    def observe(self, date: str | None, sent: float, received: float) -> None:
        """An answer dated ``date`` to a request sent at ``sent``, answered at ``received``
        (``time.time()``); an answer without a readable date changes nothing."""
        try:
            at = email.utils.parsedate_to_datetime(date) if date else None
        except (TypeError, ValueError, IndexError):
            return
        if at is None or at.tzinfo is None:
            return
        asked, answered = datetime.fromtimestamp(sent, UTC), datetime.fromtimestamp(received, UTC)
        try:
            self.skew = ClockSkew.observed(at, asked, answered)
        except OverflowError:
            # A date at the end of time (9999-12-31 23:59:59, or an offset carrying it past
            # year 9999): as far ahead as a datetime goes, never a failed request.
            self.skew = ClockSkew.observed(END_OF_TIME, asked, answered)


class RegistryClient:
    """Async client for one registry; make one per process and share it."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        concurrency: int,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        on_response: ResponseHook | None = None,
    ) -> None:
        self._http = http
        self._slots = asyncio.Semaphore(concurrency)
        self._retries = max(1, retries)
        self._backoff = backoff
        self._on_response = on_response
        #: Whether ``DELETE /v2/<name>/manifests/<tag>`` removes a tag (3.x); ``None``
        #: until :meth:`tag_delete` has asked (once per client).
        self.tag_delete_supported: bool | None = None
        #: Whether the registry has the OCI referrers API (3.x does, 2.8 does not);
        #: learnt from the first answer, so a 2.8 registry is asked once per process.
        self.referrers_supported: bool | None = None
        self._tag_gates: dict[str, TagWriteGate] = {}
        #: The registry's clock, from every answer's ``Date`` header.
        self.clock = RegistryClock()
        #: Per list endpoint, the page size the registry accepted (see ``_paginated``).
        self._page_sizes: dict[str, int] = {}
        #: One probe at a time: a wave's concurrent untags wait for the first one's answer.
        self._probing = asyncio.Lock()

    def _gate(self, repo: str) -> TagWriteGate:
        return self._tag_gates.setdefault(repo, TagWriteGate())

    @classmethod
    def from_settings(
        cls,
        settings: RegistryAccess,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        on_response: ResponseHook | None = None,
    ) -> RegistryClient:
        """The process's client for ``settings`` (``transport`` only for tests)."""
        password = settings.password.reveal() if settings.password else None
        limits = httpx.Limits(
            max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
        )
        http = httpx.AsyncClient(
            base_url=settings.url,
            auth=RegistryAuth(settings.username, password),
            verify=ssl_context(settings.ca_file),
            timeout=DEFAULT_TIMEOUT,
            limits=limits,
            transport=transport,
            headers={"User-Agent": "regsweep"},
        )
        return cls(
            http,
            concurrency=settings.concurrency,
            retries=retries,
            backoff=backoff,
            on_response=on_response,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        url = self._http.base_url  # userinfo, if someone put credentials there, stays out
        return f"<RegistryClient {url.scheme}://{url.host}:{url.port or ''}{url.path}>"

    # -- reads -----------------------------------------------------------------

    async def ping(self) -> None:
        """Check the registry answers the API root (and that the credentials work)."""
        response = await self._request("GET", "/v2/", template="/v2/")
        if response.status_code != 200:
            raise error_for(response)
        if API_VERSION_HEADER not in response.headers and json_object(response) is None:
            raise RegistryProtocolError(
                f"{operation(response.request)}: 200 with a body that is not JSON and no "
                f"{API_VERSION_HEADER} header: this is not a registry's API; registry.url must "
                "be the registry's base URL, without /v2"
            )

    async def deletes_enabled(self, repo: str) -> bool:
        """Whether the registry carries out DELETEs (``storage.delete.enabled``), asked by
        deleting a manifest that cannot exist: 404 means enabled, 405 ``UNSUPPORTED``
        disabled. Nothing can be deleted by this (no content hashes to all zeros)."""
        response = await self._request(
            "DELETE",
            f"/v2/{repo}/manifests/{IMPOSSIBLE_DIGEST}",
            template="/v2/{name}/manifests/{reference}",
            headers={"Accept": oci.MANIFEST_ACCEPT},
        )
        if response.status_code == 404 and error_codes(response):
            return True
        if response.status_code == 404:
            # Not the registry's 404 (it always names an error code): something in front
            # of it refuses DELETE. Taken for "no such tag", a removal would be settled as
            # already gone while the tag stays.
            raise RegistryProtocolError(
                f"DELETE probe of {repo}: 404 without the registry's error body; a proxy "
                "in front of the registry may not pass DELETE on",
                status=404,
            )
        failure = error_for(response, f"DELETE probe of {repo}")
        if isinstance(failure, DeletesDisabled):
            return False
        raise failure

    async def tag_delete(self, repo: str) -> bool:
        """Whether the registry removes a tag by ``DELETE /v2/<name>/manifests/<tag>`` (OCI
        distribution-spec 1.1, distribution 3.x), asked once per client by deleting a tag
        nobody has pushed in ``repo`` (a repository whose deletes regsweep may make).

        What the real binaries answer to that DELETE:

        - 3.1.0: 404 ``MANIFEST_UNKNOWN`` (detail ``filesystem: Path not found:
          .../_manifests/tags/regsweep-probe-...``), in any repository: it looked the tag
          up. To a tag that exists it answers 202 and removes the tag, not the manifest.
        - 2.8.2: 400 ``DIGEST_INVALID`` ("provided digest did not match uploaded
          content"): it parses every DELETE reference as a digest.

        Only 404 ``MANIFEST_UNKNOWN`` counts as support; any other 400 or 405 (the spec's
        answers where tag deletion is disabled) as none, and the placeholder method is
        used. A read-only registry (:class:`RegistryReadOnly`) cannot tell: nothing is
        remembered. Never read from a version string.

        3.1.0 removes tags even with ``storage.delete.enabled: false`` (its tag store does
        not look at the setting; 2.8 answers 405 ``UNSUPPORTED``), so deletes are asked
        about first (:meth:`deletes_enabled`): where they are disabled this raises
        :class:`DeletesDisabled`, and no tag is removed on either version.
        """
        async with self._probing:
            if self.tag_delete_supported is None:
                self.tag_delete_supported = await self._probe_tag_delete(repo)
        return self.tag_delete_supported

    async def _probe_tag_delete(self, repo: str) -> bool:
        if not await self.deletes_enabled(repo):
            raise DeletesDisabled(
                f"DELETE probe of {repo}: 405 UNSUPPORTED", status=405, hint=DELETES_DISABLED_HINT
            )
        tag = PROBE_TAG_PREFIX + secrets.token_hex(16)
        response = await self._request(
            "DELETE",
            f"/v2/{repo}/manifests/{tag}",
            template="/v2/{name}/manifests/{reference}",
            headers={"Accept": oci.MANIFEST_ACCEPT},
        )
        return _tag_delete_answer(response, repo)

    async def repository_exists(self, repo: str) -> bool:
        """Whether the registry has ``repo``: its tag list answers, or (a repository only
        ever pushed to by digest has no tag list on 2.8) the catalog lists it."""
        response = await self._request(
            "GET", f"/v2/{repo}/tags/list", template="/v2/{name}/tags/list", params={"n": 1}
        )
        if response.status_code == 200:
            return True
        if response.status_code == 404 and "NAME_UNKNOWN" in error_codes(response):
            try:
                return repo in await self.catalog()
            except RegistryAuthError:  # no catalog access: the tag list's answer stands
                return False
        raise error_for(response)

    async def catalog(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> list[str]:
        """Every repository name, following the catalog's pagination."""
        return await self._paginated("/v2/_catalog", "repositories", page_size, "/v2/_catalog")

    async def tags(self, repo: str, *, page_size: int = DEFAULT_PAGE_SIZE) -> list[str]:
        """Every tag of ``repo``; an empty or unknown repository has none."""
        path = f"/v2/{repo}/tags/list"
        return await self._paginated(path, "tags", page_size, "/v2/{name}/tags/list")

    async def head_manifest(self, repo: str, reference: str) -> ManifestRef | None:
        """Digest, media type and size of a manifest by tag or digest; ``None`` if unknown."""
        response = await self._manifest_request("HEAD", repo, reference)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise error_for(response, f"HEAD manifest {repo}:{reference}")
        digest = response.headers.get("Docker-Content-Digest")
        if not digest:
            # Some proxies drop the header on HEAD; the body tells the truth.
            manifest = await self.get_manifest(repo, reference)
            return ManifestRef(manifest.digest, manifest.media_type, manifest.size)
        return ManifestRef(
            digest=Digest(digest),
            media_type=_media_type(response),
            size=int(response.headers.get("Content-Length") or 0),
        )

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        """The manifest by tag or digest, its bytes checked against the digest."""
        response = await self._manifest_request("GET", repo, reference)
        what = f"GET manifest {repo}:{reference}"
        if response.status_code != 200:
            raise error_for(response, what)
        raw = response.content
        digest = _verified_digest(raw, reference, response.headers.get("Docker-Content-Digest"))
        return parse_manifest(digest, _media_type(response), raw)

    async def get_blob(self, repo: str, digest: str) -> bytes:
        """A small blob (an image config), following redirects to storage; checked."""
        response = await self._request(
            "GET",
            f"/v2/{repo}/blobs/{digest}",
            template="/v2/{name}/blobs/{digest}",
            follow_redirects=True,
        )
        if response.status_code != 200:
            raise error_for(response, f"GET blob {repo}@{digest}")
        _verified_digest(response.content, digest, None)
        return response.content

    async def blob_exists(self, repo: str, digest: str) -> bool:
        response = await self._request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            template="/v2/{name}/blobs/{digest}",
            follow_redirects=True,
        )
        if response.status_code in (200, 404):
            return response.status_code == 200
        raise error_for(response, f"HEAD blob {repo}@{digest}")

    async def referrers(self, repo: str, digest: str) -> list[Descriptor] | None:
        """Manifests whose ``subject`` is ``digest``; ``None`` if the registry lacks the API."""
        if self.referrers_supported is False:
            return None
        url: httpx.URL | str | None = f"/v2/{repo}/referrers/{digest}"
        found: list[Descriptor] = []
        while url is not None:
            response = await self._request(
                "GET",
                url,
                template="/v2/{name}/referrers/{digest}",
                headers={"Accept": oci.OCI_INDEX},
            )
            index = json_object(response)
            if response.status_code == 404 and not _is_index(index):
                self.referrers_supported = False
                return None
            self.referrers_supported = True
            if response.status_code not in (200, 404) or index is None:
                raise error_for(response, f"GET referrers {repo}@{digest}")
            found.extend(parse_manifest(digest, oci.OCI_INDEX, response.content).children)
            url = next_link(response)
        return found

    # -- writes ----------------------------------------------------------------

    async def upload_blob(self, repo: str, data: bytes) -> Digest:
        """Upload ``data`` monolithically (POST, then PUT with the digest); its digest."""
        digest = digest_of(data)
        start = await self._request(
            "POST", f"/v2/{repo}/blobs/uploads/", template="/v2/{name}/blobs/uploads/"
        )
        location = start.headers.get("Location")
        if start.status_code != 202 or not location:
            raise error_for(start, f"POST blob upload {repo}")
        # The Location carries upload state in its query (2.8's _state); add to it, not replace.
        target = start.url.join(location).copy_merge_params({"digest": digest})
        done = await self._request(
            "PUT",
            target,
            template="/v2/{name}/blobs/uploads/{uuid}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if done.status_code != 201:
            raise error_for(done, f"PUT blob {repo}@{digest}")
        return digest

    async def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> Digest:
        """Store ``raw`` under a tag or its digest; the digest the registry gives it."""
        response = await self._request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            template="/v2/{name}/manifests/{reference}",
            content=raw,
            headers={"Content-Type": media_type},
        )
        if response.status_code != 201:
            raise error_for(response, f"PUT manifest {repo}:{reference}")
        return Digest(response.headers.get("Docker-Content-Digest") or digest_of(raw))

    async def delete_manifest(self, repo: str, digest: str) -> Removal:
        """Delete a manifest by digest; 404 (already gone) is success too.

        A DELETE whose answer is lost (the connection dropped, a 5xx, a retry met
        404 or the registry's read-only 405 after a restart) is settled by looking:
        a HEAD that finds the manifest gone means this DELETE removed it, and the
        result says so; one that finds it still there means it is tried again.
        """
        if not is_digest(digest):
            raise ValueError(f"delete_manifest needs a digest, not {digest!r}")

        async def gone() -> bool:
            return await self.head_manifest(repo, digest) is None

        async with self._gate(repo).deleting():
            return await self._settled_delete(f"/v2/{repo}/manifests/{digest}", gone)

    async def delete_tag(self, repo: str, tag: str, expected_digest: str) -> Removal:
        """Remove one tag and leave its manifest alone (:attr:`Removal.ABSENT`: already gone).

        Raises :class:`SafetyViolation` when the tag no longer points at
        ``expected_digest`` (a push moved it since the plan was made).
        """
        if is_digest(tag):
            raise ValueError(f"delete_tag needs a tag, not {tag!r}")
        current = await self.head_manifest(repo, tag)
        if current is None:
            return Removal.ABSENT
        if current.digest != expected_digest:
            raise SafetyViolation(
                f"{repo}:{tag} now points at {current.digest}, not {expected_digest}; left alone"
            )
        if await self.tag_delete(repo):
            removed = await self._delete_tag_reference(repo, tag, expected_digest)
            if removed is not None:
                return removed
        return await self._untag_with_dummy(repo, tag)

    async def _delete_tag_reference(
        self, repo: str, tag: str, expected_digest: str
    ) -> Removal | None:
        """``DELETE /manifests/<tag>`` (3.x): the tag goes, its manifest stays, nothing is
        written. Like the placeholder PUT, it is not atomic with the re-check before it: a
        push to the same tag in between loses that tag (never its manifest). ``None`` when
        the registry now refuses tag references (replaced by a 2.8 since the probe)."""

        async def gone() -> bool:
            now = await self.head_manifest(repo, tag)
            return now is None or now.digest != expected_digest

        try:
            removal = await self._settled_delete(f"/v2/{repo}/manifests/{tag}", gone)
        except RegistryProtocolError as exc:
            # 2.8 parses the reference as a digest and answers 400 DIGEST_INVALID.
            if exc.status == 400 and "DIGEST_INVALID" in str(exc):
                self.tag_delete_supported = False
                return None
            raise
        self.tag_delete_supported = True
        return removal

    async def _settled_delete(self, path: str, gone: Callable[[], Awaitable[bool]]) -> Removal:
        """One DELETE, its lost answers settled with ``gone()`` (see :meth:`delete_manifest`).

        An attempt that never reached the registry (no connection) is not a lost answer.
        When an answer was lost and ``gone()`` cannot be asked either, the outcome is
        unknown: :class:`DeleteUnsettled`, never "not deleted".
        """
        lost = False
        for attempt in range(1, self._retries + 1):
            try:
                response = await self._request(
                    "DELETE",
                    path,
                    template="/v2/{name}/manifests/{reference}",
                    headers={"Accept": oci.MANIFEST_ACCEPT},
                    attempts=1,
                )
            except RegistryUnavailable as exc:
                lost = lost or not _never_sent(exc)
            else:
                if response.status_code == 202:
                    return Removal.DELETED
                if response.status_code == 404:
                    return Removal.DELETED_UNANSWERED if lost else Removal.ABSENT
                failure = error_for(response, f"DELETE {path}")
                # Read-only after a lost attempt: the registry may have restarted read-only
                # right after carrying out our DELETE.
                if isinstance(failure, RegistryReadOnly) and lost and await _look(gone, path):
                    return Removal.DELETED_UNANSWERED
                raise failure
            if lost and await _look(gone, path):
                return Removal.DELETED_UNANSWERED
            if attempt < self._retries:
                await asyncio.sleep(self._delay(attempt))
        url = shown_url(self._http.base_url.join(path))
        raise RegistryUnavailable(f"DELETE {url}: no answer after {self._retries} attempts")

    # -- tag removal by placeholder (2.8: no DELETE by tag) -------------------------------

    async def prepare_placeholder(self, repo: str) -> None:
        """Give ``repo`` the placeholder's config blob (``{}``) unless it has it: once before
        a run's tag removals, not once per removal. Uploads of one blob rewrite its link in
        place (2.8), and a manifest PUT that reads the link meanwhile is refused with
        MANIFEST_BLOB_UNKNOWN: concurrent removals each uploading it failed one run in
        three at concurrency 16. Inside the tag-write gate, so never while this process
        PUTs a placeholder."""
        async with self._gate(repo).writing_tag():
            if not await self.blob_exists(repo, PLACEHOLDER_CONFIG.digest):
                await self.upload_blob(repo, EMPTY_CONFIG)

    async def _untag_with_dummy(self, repo: str, tag: str) -> Removal:
        """Point ``tag`` at a unique throw-away manifest, then delete that by digest.

        The re-check before this is not atomic with the PUT: a push to the same
        tag in between would lose that tag (never its manifest). Once the PUT is
        done the tag is off its digest: a placeholder that cannot be deleted after
        that (the registry went read-only) does not undo the removal.
        """
        placeholder = untag_manifest(PLACEHOLDER_CONFIG)
        dummy = await self._put_placeholder(repo, tag, placeholder)
        try:
            await self.delete_manifest(repo, dummy)
        except RegistryError as exc:
            log.warning("%s:%s is on placeholder %s, not deleted yet: %s", repo, tag, dummy, exc)
            return Removal.PLACEHOLDER_LEFT
        return Removal.DELETED

    async def _put_placeholder(self, repo: str, tag: str, raw: bytes) -> Digest:
        """PUT the placeholder onto ``tag``; a failed answer is settled by a HEAD of the tag
        (a lost answer, then a retry refused by a registry restarted read-only)."""
        try:
            async with self._gate(repo).writing_tag():
                return await self._put_placeholder_once_more(repo, tag, raw)
        except RegistryError:
            now = await self.head_manifest(repo, tag)
            if now is not None and now.digest == digest_of(raw):
                return now.digest
            raise

    async def _put_placeholder_once_more(self, repo: str, tag: str, raw: bytes) -> Digest:
        """The PUT, and once more after uploading the config again if the registry lacks it
        (never uploaded, collected since :meth:`prepare_placeholder`, or its link caught
        mid-rewrite by someone else's upload). The caller holds the gate, so the other
        removals' PUTs wait for the upload instead of failing too."""
        try:
            return await self.put_manifest(repo, tag, oci.OCI_MANIFEST, raw)
        except RegistryError as exc:
            if "MANIFEST_BLOB_UNKNOWN" not in exc.codes:
                raise
        await self.upload_blob(repo, EMPTY_CONFIG)
        return await self.put_manifest(repo, tag, oci.OCI_MANIFEST, raw)

    # -- plumbing --------------------------------------------------------------

    async def _paginated(self, path: str, key: str, page_size: int, template: str) -> list[str]:
        """Every item of a paginated list, following ``Link: <...>; rel="next"``.

        2.8 pages the catalog only (its tag list ignores n); 3.x pages both. The first
        page asks for ``page_size`` items, or less once the registry has refused that:
        a 400 PAGINATION_NUMBER_INVALID (n above ``tags.maxtags`` or
        ``catalog.maxentries``) halves n until one is accepted, remembered per endpoint.
        """
        items: list[str] = []
        url: httpx.URL | str | None = path
        size = min(page_size, self._page_sizes.get(template, page_size))
        params: dict[str, int] | None = {"n": size}
        for _ in range(MAX_PAGES):
            if url is None:
                return items
            response = await self._request("GET", url, template=template, params=params)
            if params is not None and _page_too_large(response) and params["n"] > 1:
                params = {"n": params["n"] // 2}
                self._page_sizes[template] = params["n"]
                continue
            if response.status_code == 404 and "NAME_UNKNOWN" in error_codes(response):
                return items
            body = json_object(response)
            if response.status_code != 200 or body is None:
                raise error_for(response)
            page = body.get(key) or []  # 2.8 answers "tags": null for an emptied repository
            if not isinstance(page, list):
                raise RegistryProtocolError(f"GET {path}: {key!r} is not a list")
            items.extend(str(item) for item in page)
            # The next link already carries n and last; an empty page ends a buggy loop.
            url, params = (next_link(response) if page else None), None
        raise RegistryProtocolError(f"GET {path}: more than {MAX_PAGES} pages")

    async def _manifest_request(self, method: str, repo: str, reference: str) -> httpx.Response:
        return await self._request(
            method,
            f"/v2/{repo}/manifests/{reference}",
            template="/v2/{name}/manifests/{reference}",
            headers={"Accept": oci.MANIFEST_ACCEPT},
        )

    async def _request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        template: str,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        follow_redirects: bool = False,
        attempts: int | None = None,
    ) -> httpx.Response:
        """One request with retries: returns any answer below 500, raises the rest."""
        failure: RegistryError | None = None
        attempts = attempts or self._retries
        for attempt in range(1, attempts + 1):
            # A fresh request per attempt: the auth flow leaves its header on the old one.
            request = self._http.build_request(
                method, url, params=params, headers=headers, content=content
            )
            try:
                response = await self._send(request, template, follow_redirects)
            except RegistryUnavailable as exc:
                failure = exc
            else:
                if response.status_code < 500:
                    return response
                failure = error_for(response)
            if attempt < attempts:
                delay = self._delay(attempt)
                log.warning("%s; retry %d in %.2fs", failure, attempt, delay)
                await asyncio.sleep(delay)
        raise failure or RegistryUnavailable(f"{operation(request)}: not attempted")

    def _delay(self, attempt: int) -> float:
        """Before retry ``attempt + 1``: exponential, jittered (many requests retry at once)."""
        return backoff(attempt, base=self._backoff, jitter=0.5)

    async def _send(
        self, request: httpx.Request, template: str, follow_redirects: bool
    ) -> httpx.Response:
        """One exchange under the concurrency limit, timed, httpx errors wrapped."""
        status: int | None = None
        async with self._slots:
            started = time.perf_counter()
            sent = time.time()
            try:
                response = await self._http.send(request, follow_redirects=follow_redirects)
                status = response.status_code
                self.clock.observe(response.headers.get("Date"), sent, time.time())
                return response
            except httpx.TransportError as exc:
                message, hint = transport_failure(request, exc)
                raise RegistryUnavailable(message, hint=hint) from exc
            except httpx.HTTPError as exc:
                raise RegistryProtocolError(f"{operation(request)}: {describe(exc)}") from exc
            except RegistryError as exc:
                # Raised by the auth flow (the token server refused, failed, answered
                # nonsense): say which request needed the token.
                where = f"{operation(request)}: {exc.detail}"
                raise type(exc)(where, status=exc.status, hint=exc.hint) from exc
            finally:
                if self._on_response is not None:
                    self._on_response(
                        request.method, template, status, time.perf_counter() - started
                    )


def _tag_delete_answer(response: httpx.Response, repo: str) -> bool:
    """What the answer to a DELETE of a tag nobody pushed says (see ``tag_delete``)."""
    codes = error_codes(response)
    if response.status_code == 404 and "MANIFEST_UNKNOWN" in codes:
        return True
    failure = error_for(response, f"DELETE-by-tag probe of {repo}")
    if isinstance(failure, RegistryReadOnly | RegistryAuthError | DeletesDisabled):
        raise failure
    if response.status_code in (400, 404, 405):
        return False
    raise failure


def _page_too_large(response: httpx.Response) -> bool:
    return response.status_code == 400 and "PAGINATION_NUMBER_INVALID" in error_codes(response)


def _never_sent(exc: RegistryUnavailable) -> bool:
    """The request never left: no connection could be made (or had from the pool)."""
    return isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


async def _look(gone: Callable[[], Awaitable[bool]], path: str) -> bool:
    """``gone()`` after a lost answer; when even that fails, the outcome is unknown."""
    try:
        return await gone()
    except RegistryError as exc:
        raise DeleteUnsettled(
            f"DELETE {path}: answer lost, and the registry could not be asked whether it was "
            f"carried out ({exc})",
            status=exc.status,
        ) from exc


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("Content-Type", "")).split(";")[0].strip()


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _is_index(body: dict[str, Any] | None) -> bool:
    return body is not None and isinstance(body.get("manifests"), list)


def _verified_digest(raw: bytes, reference: str, header: str | None) -> Digest:
    """The digest of ``raw``; it must match a digest reference and the registry's header."""
    claimed = reference if is_digest(reference) else header
    algorithm = claimed.partition(":")[0] if claimed else "sha256"
    actual = digest_of(raw, algorithm)
    if claimed and actual != claimed:
        raise RegistryProtocolError(f"content of {reference} has digest {actual}, not {claimed}")
    return actual
