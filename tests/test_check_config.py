"""check-config refuses what cannot work, every problem at once with its line, and
``--online`` asks the real parts: the 2.8.2 registry binary with deletes on and off,
behind TLS, behind htpasswd; something that is not a registry; Redis up and down.
Also: what registry errors say (URL, operation, hint, never a secret), and ``plan``
of a repository that cannot be planned."""

from __future__ import annotations

import http.server
import json
import secrets
import shutil
import socket
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import binary_for
from tests.harness import cli, redisdb
from tests.harness import service as h
from tests.harness.auth import AuthRegistry
from tests.harness.images import ImageBuilder
from tests.harness.proxy import FaultyProxy
from tests.harness.registry import RegistryBinary, RegistryProcess, free_port
from worker.errors import ConfigError, RegistryAuthError, RegistryUnavailable
from worker.registry.client import RegistryClient
from worker.registry.diagnosis import describe
from worker.registry.storage import layout_problem
from worker.settings.load import parse_config
from worker.settings.model import RegistrySettings, Secret
from worker.settings.patterns import repository_glob_problem, tag_glob_problem

POLICY = {
    "name": "web",
    "repositories": ["team/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep-*"]}],
}


def _problems(text: str, environ: dict[str, str] | None = None, strict: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "p.yaml", environ or {}, strict=strict)
    return info.value.problems


# -- patterns that can never match ---------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("Team/Web", "repository names are lowercase (did you mean 'team/web'?)"),
        (
            "team/web:latest",
            "names a tag (:...): a repository pattern matches repository names only "
            "(did you mean 'team/web'?)",
        ),
        ("team/web@sha256:abc", "names a digest"),
        ("team/[ab]", "[...] sets are not supported in repository globs"),
        ("team/{a,b}", "{a,b} alternatives are not supported"),
        ("team/-web", "can never match a repository name"),
        ("team/web-", "can never match a repository name"),
        ("team/*_", "can never match a repository name"),
        ("team/a___b", "can never match a repository name"),
        ("team web", "can never match a repository name"),
    ],
)
def test_repository_globs_that_match_no_name_are_refused(glob: str, expected: str) -> None:
    """A repository pattern no valid name can match is refused with the reason and, where
    there is one, the pattern meant."""
    assert expected in (repository_glob_problem(glob) or "")


@pytest.mark.parametrize(
    "glob",
    ["team/web", "team/*", "**", "team/**", "a/b-*/c", "?", "a__b", "a.b", "a--b/c_d", "*-web"],
)
def test_repository_globs_that_can_match_are_accepted(glob: str) -> None:
    """Globs some valid name matches pass, ``*-web`` included (``a-web``)."""
    assert repository_glob_problem(glob) is None


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("[abc", "unbalanced brackets in '[abc': a '[' that no ']' closes"),
        ("v[0-9*", "unbalanced brackets"),
        ("rc]", "a ']' without its '['"),
        (
            "team/web:latest",
            "names a repository and a tag: a tag pattern matches the tag only "
            "(did you mean 'latest'?)",
        ),
        ("-x", "can never match a tag"),
        ("[.]x", "can never match a tag"),
    ],
)
def test_tag_globs_that_match_no_tag_are_refused(glob: str, expected: str) -> None:
    """A tag glob with an unclosed set (a literal '[', which no tag holds) or characters no
    tag has is refused with the reason."""
    assert expected in (tag_glob_problem(glob) or "")


@pytest.mark.parametrize(
    "glob", ["latest", "v[0-9]*", "[!a]*", "[]a]x", "*", "pr-?", "_x", "[a-z]"]
)
def test_tag_globs_that_can_match_are_accepted(glob: str) -> None:
    """fnmatch's own syntax ([...], [!...], ']' first in a set) passes when a tag fits."""
    assert tag_glob_problem(glob) is None


def test_every_problem_listed_with_its_line_even_with_a_duplicate_key() -> None:
    """A duplicate key no longer hides the rest: it, the impossible patterns in repositories,
    protect, keep and on:, and an unknown key are all listed, each with its line."""
    problems = _problems(
        """\
        registry:
          url: http://127.0.0.1:5000
          url: http://127.0.0.1:5001
        policies:
          - name: web
            repositories: ["Team/Web", "team/web:latest", "team/[ab]", "team//web"]
            protect: ["[abc", "latest"]
            keep:
              - tags: ["main-*", "x]"]
            on:
              branch_deleted: ["{branch}-["]
            sources: {github: [acme/web]}
            kep: []
        """
    )
    p = "policies[0] (web)"
    assert problems[0] == "p.yaml:3:3: duplicate key 'url' (first at line 2)"
    located = {line.split(": ", 2)[1]: line.split(": ", 1)[0] for line in problems[1:]}
    assert located == {
        f"{p}.kep": "p.yaml:13",
        f"{p}.repositories[0]": "p.yaml:6",
        f"{p}.repositories[1]": "p.yaml:6",
        f"{p}.repositories[2]": "p.yaml:6",
        f"{p}.repositories[3]": "p.yaml:6",
        f"{p}.protect[0]": "p.yaml:7",
        f"{p}.keep[0].tags[1]": "p.yaml:9",
        f"{p}.on.branch_deleted[0]": "p.yaml:11",
    }
    assert len(problems) == 9


def test_block_lists_locate_each_item() -> None:
    """In a block-style list each item is named by its own line."""
    problems = _problems(
        """\
        registry: {url: "http://r"}
        policies:
          - name: web
            repositories:
              - team/web
              - Team/Api
            protect:
              - latest
              - "[oops"
        """
    )
    assert problems == [
        "p.yaml:6: policies[0] (web).repositories[1]: can never match: repository names are "
        "lowercase (did you mean 'team/api'?)",
        "p.yaml:9: policies[0] (web).protect[1]: unbalanced brackets in '[oops': a '[' that no "
        "']' closes (a set like [abc] matches one of a, b, c; a tag never contains '[' itself)",
    ]


# -- check-config: files and variables, strictly -------------------------------------------


def test_strict_load_names_missing_files_and_unset_hook_variables(tmp_path: Path) -> None:
    """check-config refuses a missing ca_file, one that is no PEM, a missing storage_path,
    an audit directory that does not exist and configured hooks whose variable is unset,
    all in one run with their lines; a plain load (the service) accepts the same file."""
    bogus = tmp_path / "not-a-ca.pem"
    bogus.write_text("hello\n")
    text = f"""\
        registry:
          url: https://r:5000
          ca_file: {tmp_path / "nope.pem"}
          storage_path: {tmp_path / "no-storage"}
        audit: {{path: {tmp_path / "no-dir" / "audit.jsonl"}}}
        hooks:
          github_secret_env: REGSWEEP_TEST_GH
          api_token_env: pastedZq9secret
        """
    problems = _problems(text, strict=True)
    assert problems == [
        f"p.yaml:3: registry.ca_file: {tmp_path / 'nope.pem'} does not exist (the CA bundle, "
        "PEM, that signed the registry's certificate)",
        f"p.yaml:4: registry.storage_path: {tmp_path / 'no-storage'} is not a directory (the "
        "registry's storage.filesystem.rootdirectory)",
        "p.yaml:8: hooks.api_token_env: names the variable it names (not shown: it does not look "
        "like a variable name), which is not set: the job API answers 404 until it is (export "
        "it where regsweep serve runs, or remove the key)",
        "p.yaml:7: hooks.github_secret_env: names REGSWEEP_TEST_GH, which is not set: the hook "
        "answers 404 to every delivery until it is (export it where regsweep serve runs, or "
        "remove the key)",
        f"p.yaml:5: audit.path: {tmp_path / 'no-dir'} does not exist (the audit log goes to "
        f"{tmp_path / 'no-dir' / 'audit.jsonl'})",
    ]
    assert not any("Zq9" in line for line in problems)
    assert parse_config(textwrap.dedent(text), "p.yaml", {}).registry.ca_file
    not_pem = text.replace(str(tmp_path / "nope.pem"), str(bogus))
    assert any("holds no PEM certificate" in line for line in _problems(not_pem, strict=True))


def test_check_config_json_lists_problems(tmp_path: Path) -> None:
    """check-config --json prints every problem as JSON on stdout and exits 2."""
    path = tmp_path / "regsweep.yaml"
    path.write_text("registry: {url: 'http://r'}\nregistry: {url: 'http://s'}\nsweep: {every: 0}\n")
    result = cli.run("check-config", "--json", config=path)
    assert result.returncode == 2, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["problems"] == [
        f"{path}:2:1: duplicate key 'registry' (first at line 1)",
        f"{path}:3: sweep.every: must be longer than 0s",
    ]


# -- check-config --online, against the real parts ------------------------------------------


def _online(config: Path, **env: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    result = cli.run("check-config", "--online", "--json", config=config, env=env)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    document = json.loads(result.stdout)
    checks = {c["check"]: c for c in document["checks"]}
    assert list(checks) == [
        "registry",
        "credentials",
        "deletes",
        "tag delete",
        "clock",
        "storage",
        "push-times",
        "redis",
    ]
    return result.returncode, checks, result.stdout + result.stderr


def _statuses(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def _config(tmp_path: Path, url: str, redis_url: str | None = None, **registry: Any) -> Path:
    path = cli.write_config(
        tmp_path / "regsweep.yaml", url, [POLICY], redis_url=redis_url or redisdb.url(5)
    )
    text = path.read_text()
    extra = "".join(f"  {key}: {value}\n" for key, value in registry.items())
    path.write_text(text.replace("registry:\n", "registry:\n" + extra, 1))
    return path


@pytest.fixture(scope="module")
def deletes_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A 2.8.2 registry with storage.delete.enabled false, holding one image."""
    reg = RegistryProcess.create(tmp_path_factory.mktemp("deletes-off"))
    reg.config["storage"]["delete"] = {"enabled": False}
    reg.start()
    with ImageBuilder.connect(reg.url) as builder:
        for i in range(6):
            builder.image("team/web", f"old-{i}")
    yield reg
    reg.stop()


@pytest.fixture
def own_registry(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RegistryProcess]:
    """A registry of this test's own, holding only what it pushes (and the times it sets):
    the test's ``registry_binary`` when it takes one, else 2.8.2."""
    binary = binary_for(request)
    reg = RegistryProcess.create(tmp_path / "own-registry", binary=binary)
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def persistent_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis with its append-only file on (else the redis check warns)."""
    server = h.RedisServer(free_port(), data_dir=tmp_path_factory.mktemp("redis-aof"))
    server.start()
    yield server.url
    server.stop()


def test_online_all_ok(
    tmp_path: Path,
    own_registry: RegistryProcess,
    registry_binary: RegistryBinary,
    persistent_redis: str,
) -> None:
    """Against the real registry (deletes on) with its storage and a Redis that persists,
    every check is ok and check-config exits 0: the clock agrees, the storage holds the tags
    on the digests the registry answers, its link times are a day apart; the text form has
    one line per check; `tag delete` says what the probe found: DELETE by tag on 3.x, the
    placeholder method on 2.8 (whose 400 DIGEST_INVALID it names), and the probe deleted
    nothing."""
    registry = own_registry
    with ImageBuilder.connect(registry.url) as builder:
        for i, repo in enumerate(("team/web", "team/api")):
            builder.image(repo, "v1")
            builder.image(repo, "v2")
            registry.set_pushed(repo, datetime.now(UTC) - timedelta(days=2 + i), "v1")
        config = _config(
            tmp_path, registry.url, persistent_redis, storage_path=registry.storage_path
        )
        code, checks, _ = _online(config)
        assert builder.tags("team/web") == ["v1", "v2"]
    assert code == 0, checks
    assert _statuses(checks) == dict.fromkeys(checks, "ok")
    assert "answered 404" in checks["deletes"]["detail"]
    expected = "supported (" if registry_binary.major >= 3 else "not supported (asked in"
    assert checks["tag delete"]["detail"].startswith(expected), checks["tag delete"]
    assert checks["clock"]["detail"].startswith("the registry's clock agrees with regsweep's")
    assert "holds the repositories and digests the registry lists" in checks["storage"]["detail"]
    assert checks["push-times"]["detail"].startswith("4 tag links in 2 repositories")
    text = cli.run("check-config", "--online", config=config)
    assert text.returncode == 0
    last = text.stdout.splitlines()[-len(checks) :]
    assert [line.split("  ")[0].strip() for line in last] == list(checks)
    assert all(" ok " in line for line in last)


def test_online_clock_days_behind_fails_saying_what_it_stops(
    tmp_path: Path, own_registry: RegistryProcess
) -> None:
    """A registry whose Date header is 3 days behind (through a proxy that moves it: the
    real clock cannot be moved here): ``clock`` fails naming the offset and NTP."""
    with FaultyProxy(("127.0.0.1", own_registry.port), date_offset=-timedelta(days=3)) as proxy:
        code, checks, _ = _online(_config(tmp_path, proxy.url))
    assert code == 1
    clock = checks["clock"]
    assert clock["status"] == "fail", clock
    assert clock["detail"].startswith("the registry's clock is 3d 0h behind regsweep's")
    assert "NTP" in clock["hint"] and "nothing is deleted on them" in clock["hint"]


def test_online_storage_with_the_same_names_and_other_digests_fails(
    tmp_path: Path, own_registry: RegistryProcess
) -> None:
    """A copy of the registry's storage taken before ``team/web:v1`` was pushed again (a stale
    copy, a replica): same repositories, but the tag names another digest than the registry
    answers. ``storage`` fails naming both."""
    registry = own_registry
    with ImageBuilder.connect(registry.url) as builder:
        builder.image("team/web", "v1")
        stale = tmp_path / "stale"
        shutil.copytree(registry.storage_path, stale)
        now = builder.image("team/web", "v1")
    code, checks, _ = _online(_config(tmp_path, registry.url, storage_path=stale))
    assert code == 1
    storage = checks["storage"]
    assert storage["status"] == "fail", storage
    assert f"team/web:v1 is {now.digest} as the registry answers" in storage["detail"]
    assert checks["push-times"]["status"] == "skip"


def test_online_deletes_disabled_fails_with_the_setting_to_change(
    tmp_path: Path, deletes_off: RegistryProcess, persistent_redis: str
) -> None:
    """storage.delete.enabled false: the DELETE probe gets 405 UNSUPPORTED, the check fails
    naming the setting, the exit code is 1, and nothing was deleted."""
    config = _config(tmp_path, deletes_off.url, persistent_redis)
    code, checks, _ = _online(config)
    assert code == 1
    assert _statuses(checks) == {
        "registry": "ok",
        "credentials": "ok",
        "deletes": "fail",
        "tag delete": "skip",
        "clock": "ok",
        "storage": "skip",
        "push-times": "skip",
        "redis": "ok",
    }
    assert "405 UNSUPPORTED" in checks["deletes"]["detail"]
    assert "storage.delete.enabled: true" in checks["deletes"]["hint"]
    with ImageBuilder.connect(deletes_off.url) as builder:
        assert len(builder.tags("team/web")) == 6


def test_online_storage_of_another_registry_and_redis_down(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A storage_path that does not hold what the registry lists, and a Redis nobody
    listens for, each fail with what to change."""
    with ImageBuilder.connect(registry.url) as builder:
        builder.image("team/storage-check", "v1")
    other = tmp_path / "other-storage"
    other.mkdir()
    config = _config(tmp_path, registry.url, storage_path=other)
    config.write_text(
        config.read_text().replace(redisdb.url(5), f"redis://127.0.0.1:{free_port()}/0")
    )
    code, checks, _ = _online(config)
    assert code == 1
    assert checks["storage"]["status"] == "fail"
    detail = checks["storage"]["detail"]
    assert "registry.storage_path has no repository" in detail
    assert "which the registry has" in detail
    assert "storage.filesystem.rootdirectory" in checks["storage"]["hint"]
    assert checks["redis"]["status"] == "fail" and "Redis" in checks["redis"]["hint"]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl as an operator would."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RegistryProcess, Path]]:
    """The registry binary serving TLS with a self-signed certificate."""
    root = tmp_path_factory.mktemp("tls-registry")
    cert, key = _self_signed(root)
    reg = RegistryProcess.create(root / "reg")
    reg.config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
    reg.start()  # the harness's plain-http probe gets the TLS port's 400: it is up
    yield reg, cert
    reg.stop()


def test_online_tls_mismatches_say_which_scheme(
    tmp_path: Path, registry: RegistryProcess, tls_registry: tuple[RegistryProcess, Path]
) -> None:
    """https:// to the plain registry says to use http://, http:// to the TLS one says to use
    https://, an untrusted certificate says registry.ca_file, and with ca_file it works."""
    tls, cert = tls_registry
    plain_port, tls_port = registry.port, tls.port
    cases = {
        f"https://127.0.0.1:{plain_port}": f"the registry speaks plain HTTP: use http://127.0.0.1:{plain_port}",
        f"http://127.0.0.1:{tls_port}": f"the registry speaks HTTPS: use https://127.0.0.1:{tls_port}",
        f"https://127.0.0.1:{tls_port}": "set registry.ca_file",
    }
    for url, hint in cases.items():
        code, checks, _ = _online(_config(tmp_path, url))
        assert code == 1
        assert checks["registry"]["status"] == "fail", url
        assert hint in checks["registry"]["hint"], (url, checks["registry"])
        assert url in checks["registry"]["detail"]
        assert checks["credentials"]["status"] == checks["deletes"]["status"] == "skip"
    code, checks, _ = _online(_config(tmp_path, f"https://127.0.0.1:{tls_port}", ca_file=cert))
    assert (code, checks["registry"]["status"], checks["deletes"]["status"]) == (0, "ok", "ok")


@pytest.fixture(scope="module")
def not_a_registry() -> Iterator[str]:
    """A plain web server (Python's http.server) answering 404 to everything."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.directory = "/nonexistent"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_online_not_a_registry(tmp_path: Path, not_a_registry: str) -> None:
    """A URL that answers HTTP but is no registry: the check says so, not a bare 404."""
    code, checks, _ = _online(_config(tmp_path, not_a_registry))
    assert code == 1
    registry = checks["registry"]
    assert registry["status"] == "fail" and f"GET {not_a_registry}/v2/: 404" in registry["detail"]
    assert "this is not a registry's API" in registry["hint"]


def test_online_credentials_wrong_none_and_right(
    tmp_path: Path, registry_htpasswd: AuthRegistry
) -> None:
    """htpasswd registry: no credentials and a wrong password fail differently, each with
    the keys to set; the right ones pass; the password never appears in the output."""
    reg = registry_htpasswd
    anonymous = _config(tmp_path, reg.url)
    code, checks, _ = _online(anonymous)
    assert code == 1 and checks["registry"]["status"] == "ok"
    assert checks["credentials"]["status"] == "fail"
    assert (
        "none were sent: set registry.username and registry.password_env"
        in checks["credentials"]["hint"]
    )
    with_user = _config(tmp_path, reg.url, username=reg.username, password_env="REGSWEEP_TEST_PW")
    wrong = "Zq7-" + secrets.token_hex(8)
    code, checks, output = _online(with_user, REGSWEEP_TEST_PW=wrong)
    assert code == 1 and checks["credentials"]["status"] == "fail"
    assert "wrong user or password" in checks["credentials"]["hint"]
    assert wrong not in output
    code, checks, output = _online(with_user, REGSWEEP_TEST_PW=reg.password)
    assert code == 0, checks
    assert reg.password not in output


# -- what registry errors say -------------------------------------------------------------


def test_describe_never_leaves_an_empty_exception() -> None:
    """httpx raises ReadError('') for a connection that broke: the message then says what
    that type means instead of 'ReadError: '."""
    assert describe(httpx.ReadError("")) == "ReadError: Failed to receive data from the network."
    assert describe(httpx.ConnectError("boom")) == "ConnectError: boom"


@pytest.fixture
def resetting_server() -> Iterator[int]:
    """A TCP server that accepts, reads the request and resets the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.anyio
async def test_dropped_connection_names_the_url_and_operation(resetting_server: int) -> None:
    """A connection the server drops: the error names the request's method and real URL
    (the repository in it), the exception type and a non-empty description."""
    url = f"http://127.0.0.1:{resetting_server}"
    async with RegistryClient.from_settings(RegistrySettings(url=url), retries=1) as client:
        with pytest.raises(RegistryUnavailable) as info:
            await client.tags("team/web")
    message = str(info.value)
    assert message.startswith(f"GET {url}/v2/team/web/tags/list: ")
    assert "{name}" not in message
    _, kind, description = message.split(": ", 2)
    assert kind.endswith("Error") and description.strip()


@pytest.mark.anyio
async def test_unauthorized_errors_say_whether_credentials_were_sent(
    registry_htpasswd: AuthRegistry,
) -> None:
    """401 with no credentials and with a wrong password say different things, name the
    keys to set, and never hold the password."""
    reg = registry_htpasswd
    async with RegistryClient.from_settings(RegistrySettings(url=reg.url), retries=1) as client:
        with pytest.raises(RegistryAuthError) as none_sent:
            await client.catalog()
    wrong = "Zq6-" + secrets.token_hex(8)
    settings = RegistrySettings(url=reg.url, username=reg.username, password=Secret(wrong))
    async with RegistryClient.from_settings(settings, retries=1) as client:
        with pytest.raises(RegistryAuthError) as refused:
            await client.catalog()
    assert f"GET {reg.url}/v2/_catalog: 401 UNAUTHORIZED" in str(none_sent.value)
    assert "none were sent" in str(none_sent.value)
    assert "refused the credentials sent: wrong user or password" in str(refused.value)
    assert wrong not in str(refused.value)


@pytest.mark.anyio
async def test_token_server_refusal_names_the_server_and_the_keys(
    registry_token: AuthRegistry,
) -> None:
    """A token registry refusing a wrong password: the token server's URL, the request
    that needed the token, and the credential keys; no password."""
    reg = registry_token
    wrong = "Zq5-" + secrets.token_hex(8)
    settings = RegistrySettings(url=reg.url, username=reg.username, password=Secret(wrong))
    async with RegistryClient.from_settings(settings, retries=1) as client:
        with pytest.raises(RegistryAuthError) as info:
            await client.tags("team/web")
    message = str(info.value)
    assert message.startswith(f"GET {reg.url}/v2/team/web/tags/list: token server http")
    assert "wrong user or password" in message and wrong not in message


# -- plan / prune of what cannot be planned -------------------------------------------------


def test_plan_of_a_repository_that_cannot_be_planned_exits_2_naming_each(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """plan and prune of a name that is not a repository name, one no policy governs, and
    one the registry does not have: exit 2, each named with why; nothing is planned."""
    with ImageBuilder.connect(registry.url) as builder:
        builder.image("team/present", "keep-1")
    config = cli.write_config(tmp_path / "regsweep.yaml", registry.url, [POLICY])
    for command in ("plan", "prune"):
        result = cli.run(
            command, "Team/Web", "other/x", "team/absent", "team/present", config=config
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.splitlines() == [
            "regsweep: Team/Web: not a repository name (repository names are lowercase); "
            "did you mean team/web?",
            "regsweep: other/x: no policy's repositories match it; nothing to plan",
            f"regsweep: team/absent: no such repository in the registry at {registry.url}",
        ]
        assert result.stdout == ""
    assert cli.run("plan", "team/present", config=config).returncode == 0


# -- storage_path: the registry's root, or the one near it ------------------------------------


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("data/docker/registry/v2", "data"),
        ("data/docker/registry", "data"),
        ("data/docker", "data"),
        ("data/docker/registry/v2/repositories", "data"),
        (".", "data"),
        ("..", "host/data"),
    ],
)
def test_a_storage_path_near_the_root_names_the_root(tmp_path: Path, given: str, root: str) -> None:
    """A path inside the storage root or one or two levels above it is refused, naming the
    root to set (a registry's root holds docker/registry/v2)."""
    base = tmp_path / "host"
    (base / "data/docker/registry/v2/repositories").mkdir(parents=True)
    (base / "data/docker/registry/v2/blobs").mkdir()
    path = (base / given).resolve() if given != ".." else base.parent
    expected = (base / root) if root != "host/data" else tmp_path / "host/data"
    problem = layout_problem(str(path))
    assert (
        problem
        == f"is not the registry's storage root; {expected} is: set registry.storage_path to it"
    )
    assert layout_problem(str(base / "data")) is None


def test_an_empty_storage_root_is_a_registry_that_stored_nothing_yet(tmp_path: Path) -> None:
    """An empty directory (or one with just lost+found) is accepted: a registry writes its
    tree on the first push. One holding something else is refused saying what a root holds."""
    (tmp_path / "lost+found").mkdir()
    assert layout_problem(str(tmp_path)) is None
    (tmp_path / "notes.txt").write_text("not a registry")
    problem = layout_problem(str(tmp_path))
    assert problem is not None and problem.startswith("holds no docker/registry/v2")
