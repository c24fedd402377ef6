"""What went wrong talking to the registry, said so an operator can act on it.

Every registry error names the operation and the URL it went to (never a
route template), the exception type with a description when the exception
itself says nothing (httpx raises ``ReadError('')``), and, where the cause
is a common mistake, what to change:

- ``https://`` to a plain-HTTP registry (``[SSL: WRONG_VERSION_NUMBER]``), or
  ``http://`` to a TLS one (Go answers 400 "Client sent an HTTP request to an
  HTTPS server");
- an untrusted or misnamed certificate (``registry.ca_file``);
- nothing listening, a host that does not resolve;
- 401: no credentials sent, or the ones sent refused (``registry.username``,
  ``registry.password_env``); 403: accepted but not allowed;
- an answer without the ``Docker-Distribution-Api-Version`` header and without
  a distribution error body: the URL is not a registry's API.

Nothing here ever shows a credential: URLs lose their query (upload state) and
user info, headers are only looked at.
"""

from __future__ import annotations

import httpx

#: Every distribution registry (2.x, 3.x) sends this header on every answer.
API_VERSION_HEADER = "Docker-Distribution-Api-Version"
#: What to change when the registry answers a DELETE with 405 UNSUPPORTED.
DELETES_DISABLED_HINT = (
    "deletes are disabled on the registry: set storage.delete.enabled: true in its "
    "config.yml (or REGISTRY_STORAGE_DELETE_ENABLED=true) and restart it"
)
#: Go's TLS server answers a plain-HTTP request with this 400 body.
_HTTP_TO_HTTPS = "Client sent an HTTP request to an HTTPS server"
_CREDENTIAL_KEYS = "registry.username and registry.password_env"


def shown_url(url: httpx.URL) -> str:
    """``url`` without user info, query or fragment: what a message may show."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def operation(request: httpx.Request) -> str:
    """``GET http://registry:5000/v2/team/web/tags/list``."""
    return f"{request.method} {shown_url(request.url)}"


def _origin(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port else ""
    return f"{url.host}{port}"


def describe(exc: BaseException) -> str:
    """``ConnectError: [Errno 111] Connection refused``; never an empty ``ReadError:``."""
    text = str(exc).strip()
    if not text:
        doc = (type(exc).__doc__ or "").strip()
        text = doc.splitlines()[0] if doc else "no detail given"
    return f"{type(exc).__name__}: {text}"


def _causes(exc: BaseException) -> str:
    """The text of ``exc`` and of everything it was raised from, for matching."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8:
        seen.append(f"{type(current).__name__} {current}")
        current = current.__cause__ or current.__context__
    return " | ".join(seen)


def transport_hint(exc: httpx.TransportError, url: httpx.URL) -> str | None:
    """What to change for a connection that failed, when the cause is a known mistake."""
    text = _causes(exc)
    origin = _origin(url)
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return f"the registry speaks plain HTTP: use http://{origin} in registry.url"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        if "mismatch" in text:
            return (
                f"the registry's certificate is not issued for {url.host}: use the name it "
                "was issued for in registry.url"
            )
        return (
            "the registry's certificate is not trusted: set registry.ca_file to the CA "
            "bundle (PEM) that signed it"
        )
    if "Connection refused" in text:
        return f"nothing listens on {origin}: is the registry running, and is registry.url right?"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return f"{url.host} does not resolve: check the host in registry.url"
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection to {origin} in time: a firewall, or the wrong host or port"
    return None


def transport_failure(request: httpx.Request, exc: httpx.TransportError) -> tuple[str, str | None]:
    """The message for a request that got no answer, and the hint for it."""
    return f"{operation(request)}: {describe(exc)}", transport_hint(exc, request.url)


def looks_like_registry(response: httpx.Response, codes: list[str]) -> bool:
    return API_VERSION_HEADER in response.headers or bool(codes)


def response_hint(response: httpx.Response, codes: list[str]) -> str | None:
    """What to change for an answer the caller did not expect, when that is knowable."""
    status = response.status_code
    if status == 400 and _HTTP_TO_HTTPS in response.text:
        return f"the registry speaks HTTPS: use https://{_origin(response.url)} in registry.url"
    if status == 401:
        return _unauthorized_hint(response)
    if status == 403:
        return (
            "the credentials were accepted but do not allow this: the account needs access "
            "to the repository"
        )
    if status == 405 and "UNSUPPORTED" in codes:
        return DELETES_DISABLED_HINT
    if not looks_like_registry(response, codes):
        return (
            f"this is not a registry's API (no {API_VERSION_HEADER} header): registry.url must "
            "be the registry's base URL, without /v2"
        )
    return None


def _unauthorized_hint(response: httpx.Response) -> str:
    sent = response.request.headers.get("Authorization", "").partition(" ")[0].lower()
    if sent == "basic":
        return (
            "the registry refused the credentials sent: wrong user or password "
            f"({_CREDENTIAL_KEYS}; the password is read from the variable password_env names)"
        )
    if sent == "bearer":
        return (
            "the registry refused the token its token server issued: the account "
            "(registry.username) lacks access to this repository, or none was configured"
        )
    return f"the registry wants credentials and none were sent: set {_CREDENTIAL_KEYS}"
