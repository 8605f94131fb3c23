"""The *env* model hand-off: recreate a container with one environment variable changed.

For containers fleetd did not generate (``model_env: NAME``), the model reaches the
container through an environment variable, which Docker cannot change in place. fleetd
recreates the container the way watchtower does: it reads ``docker inspect``, creates a
new container from that with the one variable replaced, swaps the two and removes the
old one. Everything goes through docker-py's low-level API.

What is preserved (see :func:`build_create_args`):

- Config: the image *reference* (``Config.Image``: a tag that now points at another
  image gives the new container that image), Cmd, Entrypoint, Env (only ``env_name`` is
  replaced, or appended when missing), Labels, WorkingDir, User, ExposedPorts, Volumes,
  Healthcheck, StopSignal, StopTimeout, Tty, OpenStdin and the attach flags, Domainname,
  MacAddress, NetworkDisabled, and Hostname only when it was set explicitly (Docker's
  default, the old ID's first 12 characters, is not copied; nor is the host's name under
  ``network_mode: host``). Values the old container inherited from its image (Env,
  Labels, Cmd ...) are copied too, so they are pinned as they were.
- HostConfig, whole, as the raw dict ``inspect`` returns (the API's own format): Binds,
  Mounts, PortBindings, RestartPolicy, DeviceRequests (GPUs), LogConfig, NetworkMode,
  memory and CPU limits, CapAdd, Devices, ... Host ports bound as "any free port" get a
  new free port.
- Networks: every network in ``NetworkSettings.Networks`` with its aliases (without the
  two Docker adds by itself, the short ID and the hostname: it adds them again), static
  addresses (``IPAMConfig``), links and driver options. The network named by
  ``NetworkMode`` goes in the create call (API 1.41 takes one endpoint there); the others
  are connected before the new container starts.

Not preserved, or refused:

- Named volumes and bind mounts are the same ones. **Anonymous volumes come back
  empty**: the new container gets fresh ones; the old container's stay behind, dangling
  (the old container is removed without ``v``, so their data can still be recovered or
  pruned with ``docker volume prune``).
- ``network_mode: container:X`` is refused (:class:`ContainerError`): it names X by the
  ID X had when this container was created, and that ID changes whenever X is recreated.
  So is recreating a container whose network namespace other containers share (they
  would lose their network), and one created with ``--rm`` (stopping it deletes it, which
  leaves nothing to roll back to).
- Config fields that only matter to image builds (OnBuild, Shell, ArgsEscaped) and
  StdinOnce (derived from the attach flags) are not copied, nor is runtime state: IP
  and MAC addresses Docker assigned (not set statically) may differ, the logs start
  empty, and the container has a new ID (log followers must re-attach).
- A refusal happens before anything is changed (apart from clearing the leftovers of
  an interrupted run, below).
- Compose's labels are copied as they were, so compose will see the changed env as
  drift (as with any recreate done outside compose).

The order of the swap (so that a failed create never leaves nothing running):

1. inspect ``<name>``; refuse what cannot be recreated faithfully (nothing has changed);
2. create the new container as ``<name>-fleetd-new`` and connect its extra networks:
   a failure removes it and leaves the old one untouched;
3. stop the old one (``stop_timeout_s``), rename it ``<name>-fleetd-old``, rename the new
   one ``<name>``, start it. The old one must be stopped first: it holds the host ports
   and static IPs the new one needs. **There is a short gap with neither running**, from
   the stop of the old one to the start of the new one (about a second plus the old
   container's shutdown);
4. if any of step 3 fails: remove the new container, rename the old one back, start it
   again if it was running, and raise :class:`ContainerError`;
5. on success remove the old container (forced, without its volumes). If that removal
   fails the recreate still succeeded; the leftover ``-fleetd-old`` is removed next time.

The new container is always started, even if the old one was not running. A new
container that starts and then exits is not a failure here: the watcher sees that.

Leftovers of an interrupted earlier run are dealt with first:

- a ``<name>-fleetd-new`` is removed: an earlier run created it and stopped before
  renaming it, so it never ran (its volumes, fresh anonymous ones, go with it);
- ``<name>`` missing and ``<name>-fleetd-old`` present (interrupted between the two
  renames): the old one is renamed back to ``<name>`` and recreated from;
- both present: if ``<name>`` has never been started (the run stopped between the
  renames and the start), it is removed and ``-fleetd-old`` renamed back; otherwise the
  swap had finished but for the removal, and ``-fleetd-old`` is removed.

Containers are addressed by exact name: a name that only matches another container's
ID prefix is "no such container".

Docker's exceptions are translated into :class:`ContainerError` here, once, chained.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
from loguru import logger

from supervisor.core.errors import ConfigError
from supervisor.edges.engine import SDK_ERRORS, DockerError, translated

NEW_SUFFIX = "-fleetd-new"
OLD_SUFFIX = "-fleetd-old"

# Docker reports a container that was created but never started with this StartedAt.
_NEVER_STARTED = "0001-01-01T00:00:00Z"

T = TypeVar("T")


class ContainerError(DockerError):
    """A container could not be inspected, recreated, swapped or rolled back."""


@dataclass(frozen=True)
class RecreateResult:
    old_id: str
    new_id: str
    name: str


@dataclass(frozen=True)
class NetworkAttachment:
    """One network endpoint of a container, as it must be re-created."""

    network: str
    aliases: tuple[str, ...] = ()
    ipv4_address: str | None = None
    ipv6_address: str | None = None
    link_local_ips: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    driver_opts: dict[str, str] | None = None

    def endpoint_config(self) -> dict[str, Any]:
        """The API's EndpointSettings (what ``create_endpoint_config`` builds)."""
        config: dict[str, Any] = {}
        if self.aliases:
            config["Aliases"] = list(self.aliases)
        if self.links:
            config["Links"] = list(self.links)
        ipam: dict[str, Any] = {}
        if self.ipv4_address:
            ipam["IPv4Address"] = self.ipv4_address
        if self.ipv6_address:
            ipam["IPv6Address"] = self.ipv6_address
        if self.link_local_ips:
            ipam["LinkLocalIPs"] = list(self.link_local_ips)
        if ipam:
            config["IPAMConfig"] = ipam
        if self.driver_opts:
            config["DriverOpts"] = dict(self.driver_opts)
        return config

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``APIClient.connect_container_to_network``."""
        return {
            "ipv4_address": self.ipv4_address,
            "ipv6_address": self.ipv6_address,
            "aliases": list(self.aliases) or None,
            # docker-py wants (name, alias) pairs; inspect gives "name:alias".
            "links": [_link_pair(link) for link in self.links] or None,
            "link_local_ips": list(self.link_local_ips) or None,
            "driver_opt": dict(self.driver_opts) if self.driver_opts else None,
        }


def _link_pair(link: str) -> tuple[str, str | None]:
    target, _, alias = link.partition(":")
    return target, alias or None


# --- pure: from an inspect dict to what the new container is created with ---------------


def _short_id(inspect: dict[str, Any]) -> str:
    return str(inspect.get("Id", ""))[:12]


def refusal_reason(inspect: dict[str, Any]) -> str | None:
    """Why this container cannot be recreated faithfully, or None."""
    host_config = inspect.get("HostConfig") or {}
    network_mode = str(host_config.get("NetworkMode") or "")
    if network_mode.startswith("container:"):
        return (
            f"it uses network_mode {network_mode!r}: that names the other container by "
            "the ID it had when this one was created, which changes whenever that "
            "container is recreated; recreating would silently tie it to a stale ID. "
            "Use a shared user-defined network instead, or the file hand-off"
        )
    if host_config.get("AutoRemove"):
        return (
            "it was created with --rm (AutoRemove): stopping it deletes it, so a failed "
            "start of the replacement could not be rolled back"
        )
    return None


def _primary_network(inspect: dict[str, Any]) -> str | None:
    """The key of NetworkSettings.Networks that HostConfig.NetworkMode names, if any."""
    network_mode = str((inspect.get("HostConfig") or {}).get("NetworkMode") or "")
    networks: dict[str, Any] = (inspect.get("NetworkSettings") or {}).get("Networks") or {}
    if network_mode in ("", "default"):
        network_mode = "bridge"
    for key, endpoint in networks.items():
        network_id = str((endpoint or {}).get("NetworkID") or "")
        if network_mode in (key, network_id) or (
            len(network_mode) >= 12 and network_id.startswith(network_mode)
        ):
            return key
    return None


def network_attachments(inspect: dict[str, Any]) -> list[NetworkAttachment]:
    """Every network the container is on, sorted by name.

    Aliases lose the old container's short ID and its hostname: Docker adds both by
    itself (the new container gets its own short ID, and the same hostname). ``host``,
    ``none`` and ``container:`` modes have no attachments to re-create: the mode in
    HostConfig says it all.
    """
    network_mode = str((inspect.get("HostConfig") or {}).get("NetworkMode") or "")
    if network_mode in ("host", "none") or network_mode.startswith("container:"):
        return []
    networks: dict[str, Any] = (inspect.get("NetworkSettings") or {}).get("Networks") or {}
    # Docker adds these two aliases on user-defined networks by itself (and adds them
    # again for the new container: its own short ID, and the hostname, which is kept).
    automatic = {_short_id(inspect), str((inspect.get("Config") or {}).get("Hostname") or "")}
    attachments = []
    for key in sorted(networks):
        endpoint = networks[key] or {}
        ipam = endpoint.get("IPAMConfig") or {}
        attachments.append(
            NetworkAttachment(
                network=key,
                aliases=tuple(a for a in endpoint.get("Aliases") or () if a not in automatic),
                ipv4_address=ipam.get("IPv4Address") or None,
                ipv6_address=ipam.get("IPv6Address") or None,
                link_local_ips=tuple(ipam.get("LinkLocalIPs") or ()),
                links=tuple(endpoint.get("Links") or ()),
                driver_opts=endpoint.get("DriverOpts") or None,
            )
        )
    return attachments


@dataclass(frozen=True)
class NetworkPlan:
    """How the new container gets onto the old one's networks."""

    network_mode: str  # HostConfig.NetworkMode of the new container
    primary: NetworkAttachment | None  # joined through NetworkMode, in the create call
    extras: tuple[NetworkAttachment, ...]  # connected after create, before start


def plan_networks(inspect: dict[str, Any]) -> NetworkPlan:
    """The network named by NetworkMode goes in the create call, the others are connected."""
    network_mode = str((inspect.get("HostConfig") or {}).get("NetworkMode") or "")
    attachments = network_attachments(inspect)
    if not attachments:
        return NetworkPlan(network_mode, None, ())
    primary_key = _primary_network(inspect)
    if primary_key is None:
        # The container left its NetworkMode network (docker network disconnect): create
        # it on one it is still on instead of re-attaching it to the one it left.
        primary_key = attachments[0].network
        network_mode = primary_key
    primary = next(a for a in attachments if a.network == primary_key)
    extras = tuple(a for a in attachments if a is not primary)
    return NetworkPlan(network_mode, primary, extras)


def replace_env(env: list[str], env_name: str, value: str) -> list[str]:
    """``env`` with ``env_name`` set to ``value``: replaced in place, or appended."""
    entry = f"{env_name}={value}"
    out: list[str] = []
    replaced = False
    for item in env:
        if item.partition("=")[0] == env_name:
            if not replaced:
                out.append(entry)
                replaced = True
            continue  # a duplicate of the name: Docker would keep only the last one
        out.append(item)
    if not replaced:
        out.append(entry)
    return out


def set_env(env: list[str], changes: Mapping[str, str | None]) -> list[str]:
    """``env`` with each of ``changes`` set (a value) or removed (None)."""
    for env_name, value in changes.items():
        if value is None:
            env = [item for item in env if item.partition("=")[0] != env_name]
        else:
            env = replace_env(env, env_name, value)
    return env


def _check_env(env_name: str, value: str) -> None:
    if not env_name or "=" in env_name or "\0" in env_name:
        raise ConfigError(f"invalid environment variable name {env_name!r}")
    if "\0" in value:
        raise ConfigError(f"the value for {env_name} contains a NUL character")


def build_create_args(
    inspect: dict[str, Any],
    env_name: str,
    value: str,
    others: Mapping[str, str | None] | None = None,
    device_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``APIClient.create_container`` for a copy of ``inspect``.

    Everything but ``name``: the copy differs from the original only in ``env_name``.
    HostConfig is the raw dict from inspect (deep-copied). ``networking_config`` carries
    the endpoint of the NetworkMode network when it has aliases, static addresses or
    links.
    Raises ConfigError for an unusable variable name, ContainerError for a container that
    cannot be recreated faithfully (:func:`refusal_reason`).
    The other networks are connected separately (:func:`plan_networks`).
    With ``device_ids``, the copy's GPU device requests name those GPUs instead (a move
    off a cordoned GPU); a container that names no GPU that way is refused.
    """
    _check_env(env_name, value)
    reason = refusal_reason(inspect)
    if reason is not None:
        name = str(inspect.get("Name", "")).lstrip("/")
        raise ContainerError(f"will not recreate container {name!r}: {reason}")

    config: dict[str, Any] = inspect.get("Config") or {}
    host_config: dict[str, Any] = copy.deepcopy(inspect.get("HostConfig") or {})
    environment = set_env(replace_env(list(config.get("Env") or []), env_name, value), others or {})
    if device_ids is not None:
        _move_devices(inspect, host_config, device_ids)
        if any(item.startswith("NVIDIA_VISIBLE_DEVICES=") for item in environment):
            environment = replace_env(environment, "NVIDIA_VISIBLE_DEVICES", ",".join(device_ids))
    networks = plan_networks(inspect)
    if networks.network_mode != host_config.get("NetworkMode", ""):
        host_config["NetworkMode"] = networks.network_mode
    networking_config = None
    if networks.primary is not None and networks.primary.endpoint_config():
        networking_config = {
            "EndpointsConfig": {networks.primary.network: networks.primary.endpoint_config()}
        }

    hostname = config.get("Hostname") or None
    if hostname == _short_id(inspect) or networks.network_mode == "host":
        hostname = None  # Docker's default, not the user's choice

    return {
        "image": config["Image"],
        "command": config.get("Cmd"),
        "entrypoint": config.get("Entrypoint"),
        "environment": environment,
        "labels": dict(config.get("Labels") or {}),
        "working_dir": config.get("WorkingDir") or None,
        "user": config.get("User") or None,
        "hostname": hostname,
        "domainname": config.get("Domainname") or None,
        "mac_address": config.get("MacAddress") or None,
        "ports": copy.deepcopy(config.get("ExposedPorts")) or None,
        "volumes": copy.deepcopy(config.get("Volumes")) or None,
        "healthcheck": copy.deepcopy(config.get("Healthcheck")) or None,
        "stop_signal": config.get("StopSignal") or None,
        "stop_timeout": config.get("StopTimeout"),
        "tty": bool(config.get("Tty")),
        "stdin_open": bool(config.get("OpenStdin")),
        "detach": not (config.get("AttachStdout") or config.get("AttachStderr")),
        "network_disabled": bool(config.get("NetworkDisabled")),
        "host_config": host_config,
        "networking_config": networking_config,
        # Never let docker-py add the client's proxy settings to the copied env.
        "use_config_proxy": False,
    }


def _move_devices(
    inspect: dict[str, Any], host_config: dict[str, Any], device_ids: Sequence[str]
) -> None:
    """Point the container's GPU device requests at `device_ids` (in place)."""
    requests = host_config.get("DeviceRequests") or []
    gpu_requests = [
        r
        for r in requests
        if ["gpu"] in (r.get("Capabilities") or []) or r.get("Driver") == "nvidia"
    ]
    if not gpu_requests:
        name = str(inspect.get("Name", "")).lstrip("/")
        raise ContainerError(
            f"will not move container {name!r} to GPU {', '.join(device_ids)}: it names no GPU "
            "(no device request; give it deploy.resources.reservations.devices with device_ids, "
            "as `fleetctl generate` does)"
        )
    for request in gpu_requests:
        request["DeviceIDs"] = list(device_ids)
        request["Count"] = 0


# --- Docker calls ------------------------------------------------------------------------


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Docker's errors as ContainerError, chained (translated once, in engine.py)."""
    with translated(what, ContainerError, missing=ContainerError):
        yield


def _call(what: str, fn: Callable[[], T]) -> T:
    with _translated(what):
        return fn()


def _inspect_by_name(api: Any, name: str) -> dict[str, Any] | None:
    """The inspect dict of the container named exactly ``name``, or None."""
    with _translated(f"cannot inspect container {name!r}"):
        try:
            found: dict[str, Any] = api.inspect_container(name)
        except docker.errors.NotFound:
            return None
    # Docker also resolves ID prefixes: a name that only matches an ID is not this name.
    return found if str(found.get("Name", "")).lstrip("/") == name else None


def _dependents(api: Any, container_id: str) -> list[str]:
    """Names of containers that share this container's network namespace."""
    mode = f"container:{container_id}"
    listed: list[dict[str, Any]] = _call("cannot list containers", lambda: api.containers(all=True))
    return [
        ",".join(n.lstrip("/") for n in c.get("Names") or [c.get("Id", "?")])
        for c in listed
        if (c.get("HostConfig") or {}).get("NetworkMode") == mode
    ]


def _remove(api: Any, container: str, *, volumes: bool) -> None:
    """Force-remove; an already missing container is fine."""
    with suppress(docker.errors.NotFound):
        api.remove_container(container, force=True, v=volumes)


def _clear_leftovers(api: Any, name: str) -> tuple[dict[str, Any], bool]:
    """Deal with an interrupted earlier run; return ``name``'s inspect and whether it
    was recovered from ``<name>-fleetd-old`` (then it was running before that run)."""
    new_name, old_name = name + NEW_SUFFIX, name + OLD_SUFFIX
    stale_new = _inspect_by_name(api, new_name)
    if stale_new is not None:
        logger.warning(f"removing {new_name}, left over by an interrupted recreate")
        _call(f"cannot remove stale {new_name}", lambda: _remove(api, new_name, volumes=True))

    current = _inspect_by_name(api, name)
    stale_old = _inspect_by_name(api, old_name)
    if stale_old is None:
        if current is None:
            raise ContainerError(f"no container named {name!r}")
        return current, False

    if current is not None and (current.get("State") or {}).get("StartedAt") != _NEVER_STARTED:
        # The swap had finished except for removing the old container.
        logger.warning(f"removing {old_name}, left over by an earlier recreate")
        _call(f"cannot remove stale {old_name}", lambda: _remove(api, old_name, volumes=False))
        return current, False

    if current is not None:
        # Interrupted after the renames, before the start: undo the swap.
        logger.warning(f"removing never-started {name} and restoring {old_name}")
        _call(f"cannot remove never-started {name}", lambda: _remove(api, name, volumes=True))
    logger.warning(f"renaming {old_name} back to {name} (an interrupted recreate)")
    _call(f"cannot rename {old_name} back to {name}", lambda: api.rename(old_name, name))
    recovered = _inspect_by_name(api, name)
    if recovered is None:
        raise ContainerError(f"container {name!r} vanished while being restored")
    return recovered, True


def _rollback(api: Any, name: str, old_id: str, new_id: str, restart_old: bool) -> list[str]:
    """Undo a swap: remove the new container, give the old one its name back and start
    it again. Best effort: every step is tried; returns what failed."""
    failures: list[str] = []

    def attempt(what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except SDK_ERRORS as e:
            failures.append(f"{what}: {getattr(e, 'explanation', None) or e}")

    attempt(f"remove the new container {new_id[:12]}", lambda: _remove(api, new_id, volumes=True))

    def rename_back() -> None:
        current = str(api.inspect_container(old_id).get("Name", "")).lstrip("/")
        if current != name:  # the swap may have failed before the old one was renamed
            api.rename(old_id, name)

    attempt(f"rename the old container back to {name}", rename_back)
    if restart_old:
        attempt(f"start the old container {name}", lambda: api.start(old_id))
    return failures


def recreate_with_env(
    client: docker.DockerClient,
    name: str,
    env_name: str,
    value: str,
    stop_timeout_s: float = 10.0,
    others: Mapping[str, str | None] | None = None,
    device_ids: Sequence[str] | None = None,
) -> RecreateResult:
    """Recreate the container ``name`` with ``env_name=value`` and everything else kept
    (but ``others``: more variables set, or removed where None: a rung's options).

    See the module docstring for what is preserved, the order of the swap, the gap in
    service between the stop and the start, and how leftovers of an interrupted run are
    handled. Raises ContainerError when the container cannot be recreated (nothing has
    changed then, or the old container has been restored), ConfigError for an invalid
    variable name.
    """
    _check_env(env_name, value)
    for other, other_value in (others or {}).items():
        _check_env(other, other_value or "")
    api = client.api
    old, recovered = _clear_leftovers(api, name)
    old_id = str(old["Id"])
    create_args = build_create_args(old, env_name, value, others, device_ids)
    dependents = _dependents(api, old_id)
    if dependents:
        raise ContainerError(
            f"will not recreate container {name!r}: {', '.join(dependents)} share its "
            "network namespace (network_mode: container:...) by its ID, and would lose "
            "their network when it is replaced"
        )
    state = old.get("State") or {}
    restart_old = recovered or bool(state.get("Running") or state.get("Restarting"))
    new_name = name + NEW_SUFFIX

    created: dict[str, Any] = _call(
        f"cannot create a new container for {name!r} from {create_args['image']!r}",
        lambda: api.create_container(name=new_name, **create_args),
    )
    new_id = str(created["Id"])
    try:
        # Before touching the old container, so that a network that is gone fails here.
        for extra in plan_networks(old).extras:
            with _translated(f"cannot connect the new container to network {extra.network!r}"):
                api.connect_container_to_network(new_id, extra.network, **extra.connect_kwargs())
    except ContainerError:
        with _translated(f"cannot remove the new container {new_name}"):
            _remove(api, new_id, volumes=True)
        raise

    try:
        with _translated(f"cannot stop container {name!r}"):
            api.stop(old_id, timeout=max(0, math.ceil(stop_timeout_s)))
        with _translated(f"cannot rename container {name!r} to {name + OLD_SUFFIX!r}"):
            api.rename(old_id, name + OLD_SUFFIX)
        with _translated(f"cannot rename {new_name!r} to {name!r}"):
            api.rename(new_id, name)
        with _translated(f"cannot start the new container {name!r}"):
            api.start(new_id)
    except ContainerError as e:
        failures = _rollback(api, name, old_id, new_id, restart_old)
        if failures:
            raise ContainerError(
                f"{e}; rolling back also failed ({'; '.join(failures)}): "
                f"the old container may be left as {name + OLD_SUFFIX!r}"
            ) from e.__cause__
        raise ContainerError(f"{e} (the old container was restored)") from e.__cause__

    try:
        _remove(api, old_id, volumes=False)
    except SDK_ERRORS as e:
        logger.warning(
            f"recreated {name} but could not remove the old container "
            f"{name + OLD_SUFFIX}: {e}; the next recreate removes it"
        )
    logger.info(f"recreated {name} with {env_name}={value}: {old_id[:12]} -> {new_id[:12]}")
    return RecreateResult(old_id=old_id, new_id=new_id, name=name)
