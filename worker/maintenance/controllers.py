"""Switch the registry read-only / read-write and run its garbage collector.

Two controllers satisfy :class:`RegistryController`:

``DockerController``
    The registry runs in a container. A mode switch *recreates* the container
    with ``REGISTRY_STORAGE_MAINTENANCE_READONLY={"enabled":true}`` added to or
    removed from its environment, keeping everything else (image, command,
    mounts, anonymous volumes, networks and aliases, ports, labels — compose's
    included, so ``docker compose`` still owns it — restart policy, hostname,
    user, working dir). GC and ``du`` run through ``docker exec``.

``ProcessController``
    The registry runs as a local process or systemd unit: shell commands from
    the config restart it read-only or read-write and run GC.

Both are synchronous (Celery tasks are). ``set_readonly`` returns once the
switch command is done — for Docker, once the new container is running. It
does **not** wait for the registry to answer HTTP: the caller knows the
registry's URL and credentials and waits until reads work and a write is
refused (or accepted). A run whose GC command fails still returns a
:class:`GcResult` with its non-zero exit code; :class:`ControllerError` means
the controller could not do its job at all (no container, Docker unreachable,
a switch command that failed).

A GC must never outlive the read-only window. An interrupted ``run_gc`` (a
Celery time limit) kills the process controller's GC; the Docker controller's
exec'd GC dies with its container when the switch back recreates it.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Final, Protocol, runtime_checkable

import docker
import docker.errors
import yaml
from docker.models.containers import Container
from docker.utils.socket import frames_iter

from worker.errors import ControllerError, GcLockLost
from worker.maintenance.gc import GcOutputParser, GcResult, gc_flags, parse_registry_version
from worker.settings.model import (
    ControllerSettings,
    DockerControllerSettings,
    ProcessControllerSettings,
)

log = logging.getLogger(__name__)

READONLY_ENV: Final = "REGISTRY_STORAGE_MAINTENANCE_READONLY"
READONLY_VALUE: Final = '{"enabled":true}'
#: The same switch spelled as a leaf key; removed too when switching read-write.
READONLY_ENABLED_ENV: Final = f"{READONLY_ENV}_ENABLED"
ROOTDIRECTORY_ENV: Final = "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"
#: Where the registry reads its config when its command names none (2.8 and 3.x).
CONFIGURATION_PATH_ENV: Final = "REGISTRY_CONFIGURATION_PATH"
#: The upstream registry:2 image's config; registry:3 moved it to /etc/distribution/.
DEFAULT_CONFIG_PATH: Final = "/etc/docker/registry/config.yml"
DEFAULT_STORAGE_ROOT: Final = "/var/lib/registry"
DEFAULT_REGISTRY_BINARY: Final = "registry"
VERSION_LABEL: Final = "org.opencontainers.image.version"
#: The old container keeps this name suffix while its replacement starts.
BACKUP_SUFFIX: Final = "-regsweep-previous"
DEFAULT_STOP_TIMEOUT: Final = 30
DEFAULT_COMMAND_TIMEOUT: Final = 120.0
#: How long exec_inspect may keep saying "Running" after the output ended.
EXEC_EXIT_WAIT: Final = 10.0
STDERR_TAIL_LINES: Final = 20

LineCallback = Callable[[str], None]


@runtime_checkable
class RegistryController(Protocol):
    """What the GC job needs from whatever runs the registry."""

    def set_readonly(self, enabled: bool) -> None:
        """Switch maintenance read-only mode; returns once the switch command is done."""

    def is_readonly(self) -> bool:
        """Whether the registry is (or may still be) in read-only mode."""

    def run_gc(
        self,
        *,
        dry_run: bool,
        on_line: LineCallback | None = None,
        stop: threading.Event | None = None,
    ) -> GcResult:
        """Run ``registry garbage-collect`` (never with ``--delete-untagged``), passing each
        output line to ``on_line``; stopped (:class:`GcLockLost`) once ``stop`` is set."""

    def storage_bytes(self) -> int | None:
        """Bytes the registry's storage takes now; ``None`` when it cannot be measured."""

    def registry_version(self) -> str | None:
        """The registry's version, e.g. ``"2.8.2"``; ``None`` when it cannot be told."""


def make_controller(
    settings: ControllerSettings, *, docker_client: docker.DockerClient | None = None
) -> RegistryController:
    """The controller ``settings`` describe; without a client, Docker's comes from the env."""
    if isinstance(settings, ProcessControllerSettings):
        return ProcessController(settings)
    if docker_client is None:
        try:
            docker_client = docker.from_env()
        except docker.errors.DockerException as exc:
            raise ControllerError(f"cannot reach the Docker engine: {exc}") from exc
    return DockerController(settings, docker_client)


# --------------------------------------------------------------------------- process


class ProcessController:
    """A registry run as a local process or systemd unit, driven by shell commands.

    ``is_readonly`` is tracked from the last switch this object made (there is
    no command to ask the registry); it starts as ``readonly``. After a failed
    switch it answers ``True``: the registry may be half-switched and the safe
    assumption is that it still has to be switched back.
    """

    def __init__(
        self,
        settings: ProcessControllerSettings,
        *,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        readonly: bool = False,
        on_switch: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._command_timeout = command_timeout
        self._readonly = readonly
        #: Told the session id of each switch command as it starts (see worker.maintenance).
        self._on_switch = on_switch

    def set_readonly(self, enabled: bool) -> None:
        name, command = (
            ("readonly_command", self._settings.readonly_command)
            if enabled
            else ("readwrite_command", self._settings.readwrite_command)
        )
        self._readonly = True
        _run_shell(name, command, self._command_timeout, self._on_switch)
        self._readonly = enabled

    def is_readonly(self) -> bool:
        return self._readonly

    def run_gc(
        self,
        *,
        dry_run: bool,
        on_line: LineCallback | None = None,
        stop: threading.Event | None = None,
    ) -> GcResult:
        flags = gc_flags(dry_run=dry_run)
        # cobra takes flags after the config path too, so they can be appended.
        command = " ".join([self._settings.gc_command, *flags])
        parser = GcOutputParser()
        started = time.monotonic()
        proc = _spawn_shell("gc_command", command, merge_stderr=True)
        assert proc.stdout is not None  # stdout=PIPE
        try:
            _stream_lines(_chunks(proc.stdout), _gc_sink(parser, on_line, stop))
            exit_code = proc.wait()
        except BaseException:
            # Interrupted (a Celery time limit, say): a GC left sweeping after the switch
            # back to read-write would delete blobs pushed meanwhile.
            _kill_session(proc)
            raise
        return parser.result(
            exit_code=exit_code, dry_run=dry_run, duration_s=time.monotonic() - started
        )

    def storage_bytes(self) -> int | None:
        path = self._settings.storage_path
        if path is None:
            return None
        try:
            return _tree_bytes(path)
        except OSError as exc:
            raise ControllerError(f"cannot measure {path}: {exc}") from exc

    def registry_version(self) -> str | None:
        """``--version`` of the first word of ``gc_command``, if that is a distribution binary.

        ``gc_command`` may start with a wrapper (``docker exec``, ``sudo``): whose
        version answer does not name distribution is not taken for the registry's.
        """
        try:
            binary = shlex.split(self._settings.gc_command)[0]
            done = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None
        if done.returncode != 0 or "distribution" not in done.stdout:
            return None
        return parse_registry_version(done.stdout)


def _spawn_shell(name: str, command: str, *, merge_stderr: bool) -> subprocess.Popen[bytes]:
    try:
        # A session of its own, so a timeout can end the command and all its children.
        return subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise ControllerError(f"{name} could not start: {exc}") from exc


def _run_shell(
    name: str, command: str, timeout: float, on_spawn: Callable[[int], None] | None = None
) -> None:
    """Run a switch command; its text is never put in an error (it may hold credentials)."""
    proc = _spawn_shell(name, command, merge_stderr=False)
    if on_spawn is not None:
        on_spawn(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_session(proc)
        raise ControllerError(f"{name} did not finish within {timeout:g}s") from exc
    if proc.returncode != 0:
        tail = "\n".join(stderr.decode(errors="replace").splitlines()[-STDERR_TAIL_LINES:])
        raise ControllerError(f"{name} exited with {proc.returncode}: {tail}")


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    # read1 returns what is there instead of waiting for a full buffer, so lines stream.
    read = getattr(stream, "read1", stream.read)
    while chunk := read(65536):
        yield chunk


def _tree_bytes(path: str) -> int:
    """Sum of file sizes under ``path``; files that vanish during the walk count zero."""
    total = 0
    pending = [path]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    return total


# --------------------------------------------------------------------------- streaming


def _stream_lines(chunks: Iterable[bytes], sink: LineCallback) -> None:
    """Split byte chunks (UTF-8, possibly cut mid-character) into lines for ``sink``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            sink(line.rstrip("\r"))
    pending += decoder.decode(b"", final=True)
    if pending:
        sink(pending.rstrip("\r"))


def _gc_sink(
    parser: GcOutputParser, on_line: LineCallback | None, stop: threading.Event | None
) -> LineCallback:
    """Feed each line to the parser, then to the caller's listener; raise :class:`GcLockLost`
    at the first line after ``stop`` is set (the run then kills or abandons the GC)."""

    def sink(line: str) -> None:
        if stop is not None and stop.is_set():
            raise GcLockLost(
                "the GC job lost its lock (a recovery may switch the registry back); GC stopped"
            )
        parser.feed(line)
        if on_line is None:
            return
        try:
            on_line(line)
        except Exception:
            # A broken listener (say, Redis gone) must not abandon a GC still deleting.
            log.warning("GC output listener failed; output continues", exc_info=True)

    return sink


# --------------------------------------------------------------------------- docker


class DockerController:
    """A registry in a Docker container, switched by recreating the container.

    GC reads the config file the container's registry serves (:func:`served_config`)
    unless ``settings.config_path`` names one.

    ``settings.container`` is a container name, or a label selector
    ``label=key=value`` (several joined by ``,`` must all match) that has to
    match exactly one container. The switch renames the old container to
    ``<name>-regsweep-previous`` while the new one is created, and puts it
    back if that fails; a leftover from a crash in between is recovered the
    next time the container is looked up. ``is_readonly`` reads the
    container's environment (a read-only flag in the registry's config file
    is invisible to it). ``storage_bytes`` runs ``du`` in the container
    (``-sb``, else busybox's ``-sk``); ``None`` when the image has no ``du``.
    """

    def __init__(
        self,
        settings: DockerControllerSettings,
        client: docker.DockerClient,
        *,
        registry_binary: str = DEFAULT_REGISTRY_BINARY,
        stop_timeout: int = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._client = client
        self._binary = registry_binary
        self._stop_timeout = stop_timeout

    def container(self) -> Container:
        """The registry's container, as it is now."""
        selector = self._settings.container
        try:
            if selector.startswith("label="):
                return self._by_labels(selector)
            return self._by_name(selector)
        except docker.errors.DockerException as exc:
            raise ControllerError(f"cannot look up container {selector!r}: {exc}") from exc

    def set_readonly(self, enabled: bool) -> None:
        try:
            old = self.container()
            if old.status == "running" and _env_readonly(_env(old.attrs)) == enabled:
                return
            env = _env_with_readonly(_env(old.attrs), enabled)
            new = self._recreate(old, env)
        except docker.errors.DockerException as exc:
            raise ControllerError(f"cannot switch the registry container: {exc}") from exc
        log.info("registry container %s recreated (read-only: %s)", new.name, enabled)

    def is_readonly(self) -> bool:
        return _env_readonly(_env(self.container().attrs))

    def run_gc(
        self,
        *,
        dry_run: bool,
        on_line: LineCallback | None = None,
        stop: threading.Event | None = None,
    ) -> GcResult:
        container = self.container()
        config = self._settings.config_path or served_config(container.attrs)
        command = [self._binary, "garbage-collect", *gc_flags(dry_run=dry_run), config]
        parser = GcOutputParser()
        started = time.monotonic()
        exit_code = self._exec(container, command, _gc_sink(parser, on_line, stop))
        return parser.result(
            exit_code=exit_code, dry_run=dry_run, duration_s=time.monotonic() - started
        )

    def storage_bytes(self) -> int | None:
        container = self.container()
        root = _env_value(_env(container.attrs), ROOTDIRECTORY_ENV) or DEFAULT_STORAGE_ROOT
        for flags, unit in (("-sb", 1), ("-sk", 1024)):
            code, output = self._exec_output(container, ["du", flags, root])
            words = output.split()
            if code == 0 and words and words[0].isdigit():
                return int(words[0]) * unit
        return None

    def registry_version(self) -> str | None:
        """From the label ``org.opencontainers.image.version``, else ``registry --version``."""
        container = self.container()
        labels = dict(container.attrs["Config"].get("Labels") or {})
        with contextlib.suppress(docker.errors.DockerException):
            labels.update(self._client.images.get(container.attrs["Image"]).labels or {})
        if VERSION_LABEL in labels:
            return parse_registry_version(labels[VERSION_LABEL])
        code, output = self._exec_output(container, [self._binary, "--version"])
        return parse_registry_version(output) if code == 0 else None

    # ----------------------------------------------------------------- lookup

    def _by_name(self, name: str) -> Container:
        containers = self._client.containers
        try:
            return containers.get(name)
        except docker.errors.NotFound:
            pass
        try:
            backup = containers.get(name + BACKUP_SUFFIX)
        except docker.errors.NotFound:
            raise ControllerError(f"no container named {name!r}") from None
        # A switch crashed between renaming the old container and creating the new one.
        log.warning("recovering registry container %s from %s", name, backup.name)
        backup.rename(name)
        backup.reload()
        return backup

    def _by_labels(self, selector: str) -> Container:
        labels = [part.removeprefix("label=") for part in selector.split(",")]
        found = self._client.containers.list(all=True, filters={"label": labels})
        current = [c for c in found if not c.name.endswith(BACKUP_SUFFIX)] or found
        if len(current) != 1:
            names = ", ".join(sorted(c.name for c in current)) or "none"
            raise ControllerError(f"{selector!r} must match one container, matched: {names}")
        if current[0].name.endswith(BACKUP_SUFFIX):
            return self._by_name(current[0].name.removesuffix(BACKUP_SUFFIX))
        return current[0]

    # ----------------------------------------------------------------- recreate

    def _recreate(self, old: Container, env: list[str]) -> Container:
        name = old.name
        config, extra_networks = creation_spec(old.attrs, env, self._image_ref(old.attrs))
        self._remove_stale_backup(name)
        old.stop(timeout=self._stop_timeout)
        try:
            old.rename(name + BACKUP_SUFFIX)
            new = self._create_and_start(name, config, extra_networks)
        except Exception:
            self._restore(old, name)
            raise
        old.remove(v=False)
        return new

    def _create_and_start(
        self, name: str, config: dict[str, Any], networks: dict[str, dict[str, Any]]
    ) -> Container:
        api = self._client.api
        created = api.create_container_from_config(config, name=name)
        container = self._client.containers.get(created["Id"])
        try:
            for network, endpoint in networks.items():
                api.connect_container_to_network(container.id, network, **endpoint)
            container.start()
            container.reload()
        except Exception:
            container.remove(force=True, v=False)
            raise
        if container.status not in {"running", "restarting"}:
            logs = container.logs(tail=STDERR_TAIL_LINES).decode(errors="replace")
            container.remove(force=True, v=False)
            raise ControllerError(f"new registry container did not stay up: {logs}")
        return container

    def _restore(self, old: Container, name: str) -> None:
        """Put the old container back after a failed switch, so the registry keeps running."""
        try:
            old.reload()
            if old.name != name:
                old.rename(name)
            old.start()
        except docker.errors.DockerException:
            log.exception("could not restore registry container %s", name)

    def _remove_stale_backup(self, name: str) -> None:
        try:
            stale = self._client.containers.get(name + BACKUP_SUFFIX)
        except docker.errors.NotFound:
            return
        # The container named `name` exists, so this one is a finished switch's leftover.
        stale.remove(force=True, v=False)

    def _image_ref(self, attrs: dict[str, Any]) -> str:
        """The image by name while the name still means the same image, else by id.

        A tag may have moved since the container was made; recreating must not
        upgrade the registry behind the operator's back.
        """
        name = str(attrs["Config"].get("Image") or "")
        image_id = str(attrs["Image"])
        try:
            if name and self._client.images.get(name).id == image_id:
                return name
        except docker.errors.DockerException:
            pass
        return image_id

    # ----------------------------------------------------------------- exec

    def _exec(self, container: Container, command: list[str], sink: LineCallback) -> int:
        """Run ``command`` in the container, streaming stdout+stderr lines; its exit code."""
        api = self._client.api
        try:
            exec_id = api.exec_create(container.id, command, stdout=True, stderr=True)["Id"]
            sock = api.exec_start(exec_id, socket=True)
            try:
                _no_read_timeout(sock)
                _stream_lines((data for _, data in frames_iter(sock, tty=False)), sink)
            finally:
                sock.close()
            return self._exit_code(exec_id)
        except docker.errors.DockerException as exc:
            raise ControllerError(f"docker exec {command[0]} failed: {exc}") from exc

    def _exec_output(self, container: Container, command: list[str]) -> tuple[int, str]:
        lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        code = self._exec(container, command, lines.append)
        return code, "\n".join(lines)

    def _exit_code(self, exec_id: str) -> int:
        deadline = time.monotonic() + EXEC_EXIT_WAIT
        while True:
            state = self._client.api.exec_inspect(exec_id)
            if not state.get("Running") and state.get("ExitCode") is not None:
                return int(state["ExitCode"])
            if time.monotonic() > deadline:
                raise ControllerError("docker exec ended its output but never reported an exit")
            time.sleep(0.05)


def _no_read_timeout(sock: Any) -> None:
    """GC can be silent for minutes while it walks the blobs; the client's read timeout
    (60 s by default) must not cut it off. The Celery time limit bounds the run instead."""
    for candidate in (sock, getattr(sock, "_sock", None)):
        if candidate is not None and hasattr(candidate, "settimeout"):
            candidate.settimeout(None)


# --------------------------------------------------------------------------- container spec

#: Network modes that share a namespace: no endpoint settings, no hostname of our own.
_PER_INSTANCE_NETWORK_MODES: Final = ("host", "none")


def creation_spec(
    attrs: dict[str, Any], env: list[str], image: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The create body that rebuilds the container ``attrs`` describe, with ``env``.

    Returns the body for ``POST /containers/create`` and the extra networks to
    connect afterwards (the create call takes one network on older engines).
    """
    config = dict(attrs["Config"])
    config["Image"] = image
    config["Env"] = env
    host_config = dict(attrs["HostConfig"])
    host_config["Binds"], host_config["Mounts"] = _volumes_kept(attrs)
    mode = str(host_config.get("NetworkMode") or "default")
    if _hostname_is_per_instance(attrs, mode):
        config.pop("Hostname", None)
    networks = _endpoints(attrs)
    primary = "bridge" if mode == "default" else mode
    if primary in networks:
        config["NetworkingConfig"] = {"EndpointsConfig": {primary: networks.pop(primary)}}
    config["HostConfig"] = host_config
    return config, {name: _connect_kwargs(ep) for name, ep in networks.items()}


def _hostname_is_per_instance(attrs: dict[str, Any], mode: str) -> bool:
    """Docker's default hostname is the old id; with host/container networking it is not ours."""
    hostname = attrs["Config"].get("Hostname")
    shared = mode in _PER_INSTANCE_NETWORK_MODES or mode.startswith("container:")
    return shared or hostname == str(attrs["Id"])[:12]


def _volumes_kept(attrs: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """``Binds`` and ``Mounts`` with every anonymous volume named, so none restarts empty.

    Each create gives an image's ``VOLUME`` (the official registry image declares
    /var/lib/registry), a ``-v /path`` or a source-less ``--mount`` a fresh, empty
    anonymous volume unless the old one is passed on by name.
    """
    host_config = attrs["HostConfig"]
    volume_names = {
        m.get("Destination"): m.get("Name")
        for m in attrs.get("Mounts") or []
        if m.get("Type") == "volume"
    }
    mounts = [dict(m) for m in host_config.get("Mounts") or []]
    for mount in mounts:
        if mount.get("Type") == "volume" and not mount.get("Source"):
            mount["Source"] = volume_names.get(mount.get("Target"))
    binds = list(host_config.get("Binds") or [])
    covered = {bind.split(":")[1] for bind in binds if ":" in bind}
    covered |= {m.get("Target") for m in mounts}
    for mount in attrs.get("Mounts") or []:
        if mount.get("Type") == "volume" and mount.get("Destination") not in covered:
            suffix = "" if mount.get("RW", True) else ":ro"
            binds.append(f"{mount['Name']}:{mount['Destination']}{suffix}")
    return binds, mounts


def _endpoints(attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per network, the endpoint settings the operator chose (not the ones Docker assigned)."""
    short_id = str(attrs["Id"])[:12]
    out: dict[str, dict[str, Any]] = {}
    for name, endpoint in (attrs["NetworkSettings"].get("Networks") or {}).items():
        if name in _PER_INSTANCE_NETWORK_MODES:
            continue
        aliases = [a for a in endpoint.get("Aliases") or [] if a != short_id]
        out[name] = {
            "IPAMConfig": endpoint.get("IPAMConfig"),
            "Links": endpoint.get("Links"),
            "Aliases": aliases or None,
            "DriverOpts": endpoint.get("DriverOpts"),
        }
    return out


def _connect_kwargs(endpoint: dict[str, Any]) -> dict[str, Any]:
    """``connect_container_to_network`` keyword arguments for one endpoint."""
    ipam = endpoint.get("IPAMConfig") or {}
    links = [tuple(link.split(":", 1)) for link in endpoint.get("Links") or []]
    return {
        "aliases": endpoint.get("Aliases"),
        "links": links or None,
        "ipv4_address": ipam.get("IPv4Address") or None,
        "ipv6_address": ipam.get("IPv6Address") or None,
        "link_local_ips": ipam.get("LinkLocalIPs") or None,
        "driver_opt": endpoint.get("DriverOpts"),
    }


def served_config(attrs: dict[str, Any]) -> str:
    """The config file the container's registry serves, which its GC must read too (another
    file may name another storage root): the last ``.yml``/``.yaml`` argument of its
    entrypoint and command (``serve /etc/distribution/config.yml`` in registry:3,
    ``/etc/docker/registry/config.yml`` in registry:2.8), else ``REGISTRY_CONFIGURATION_PATH``,
    else registry:2's path."""
    config = attrs["Config"]
    words = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    files = [w for w in words if isinstance(w, str) and w.endswith((".yml", ".yaml"))]
    if files:
        return files[-1]
    return _env_value(_env(attrs), CONFIGURATION_PATH_ENV) or DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------- environment


def _env(attrs: dict[str, Any]) -> list[str]:
    return list(attrs["Config"].get("Env") or [])


def _env_value(env: list[str], key: str) -> str | None:
    for entry in env:
        name, _, value = entry.partition("=")
        if name == key:
            return value
    return None


def _env_readonly(env: list[str]) -> bool:
    """Whether the environment turns maintenance read-only mode on (either spelling)."""
    leaf = _env_value(env, READONLY_ENABLED_ENV)
    if leaf is not None and leaf.strip().lower() == "true":
        return True
    whole = _env_value(env, READONLY_ENV)
    if whole is None:
        return False
    try:
        # The registry reads environment overrides as YAML, so do the same.
        parsed = yaml.safe_load(whole)
    except yaml.YAMLError:
        return False
    return isinstance(parsed, dict) and parsed.get("enabled") is True


def _env_with_readonly(env: list[str], enabled: bool) -> list[str]:
    keys = {READONLY_ENV, READONLY_ENABLED_ENV}
    kept = [entry for entry in env if entry.partition("=")[0] not in keys]
    return [*kept, f"{READONLY_ENV}={READONLY_VALUE}"] if enabled else kept
