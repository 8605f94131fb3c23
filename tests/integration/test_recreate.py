"""The env model hand-off: a container recreated with one variable changed keeps the rest.

Against the real engine: a busybox container with volumes, a bind mount, a published
port, two user-defined networks (aliases, static addresses), restart policy, healthcheck
and log config is recreated with MODEL changed, and everything else is compared with the
old container's inspect. Failures (create, connect, start) must leave the old container
running under its name; ``network_mode: container:X`` is refused. The payload builder is
also tested on a hand-written inspect dict, without Docker.
"""

from __future__ import annotations

import copy
import random
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import pytest
from docker.types import DeviceRequest, IPAMConfig, IPAMPool, LogConfig, Mount

from supervisor.core.errors import ConfigError
from supervisor.edges.recreate import (
    NEW_SUFFIX,
    OLD_SUFFIX,
    ContainerError,
    build_create_args,
    plan_networks,
    recreate_with_env,
    replace_env,
)

if TYPE_CHECKING:
    from .conftest import Cleanup

WAIT_S = 20
# SIGTERM ends it at once (a shell as PID 1 ignores signals it has no trap for).
SCRIPT = 'trap "exit 0" TERM; echo MODEL=$MODEL; httpd -p 8080 -h /data; sleep 3600 & wait $!'
IDLE = 'trap "exit 0" TERM; echo MODEL=$MODEL; sleep 3600 & wait $!'

# Config fields that must come back unchanged (Env is checked on its own).
PRESERVED_CONFIG = (
    "Image",
    "Cmd",
    "Entrypoint",
    "Labels",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Healthcheck",
    "StopSignal",
    "StopTimeout",
    "Tty",
    "OpenStdin",
    "Hostname",
    "Domainname",
    "Volumes",
)


# --- helpers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def logs_of(client: docker.DockerClient, container: str) -> str:
    raw: bytes = client.api.logs(container)
    return raw.decode()


def inspect(client: docker.DockerClient, container: str) -> dict[str, Any]:
    found: dict[str, Any] = client.api.inspect_container(container)
    return found


def exec_out(client: docker.DockerClient, container: str, *cmd: str) -> str:
    result = client.containers.get(container).exec_run(list(cmd))
    assert result.exit_code == 0, result.output
    out: bytes = result.output
    return out.decode()


def names_present(client: docker.DockerClient, cleanup: Cleanup) -> set[str]:
    listed = client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={cleanup.run_id}"})
    return {c.name for c in listed}


RUN_LABEL = "org.fleetd.test.run"


def make_network(client: docker.DockerClient, cleanup: Cleanup, name: str) -> tuple[str, str]:
    """A user-defined bridge network with its own /24 pool; returns (name, prefix)."""
    last: docker.errors.APIError | None = None
    for _ in range(8):  # the engine is shared: pick another subnet if this one is taken
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=f"{prefix}.0/24")])
        try:
            client.networks.create(name, driver="bridge", ipam=ipam, labels=cleanup.labels)
        except docker.errors.APIError as e:
            last = e
            continue
        return name, prefix
    raise AssertionError(f"could not create network {name}: {last}")


def simple_container(
    client: docker.DockerClient,
    image: str,
    cleanup: Cleanup,
    name: str,
    *,
    start: bool = True,
    **host_config: Any,
) -> str:
    """A busybox container that prints MODEL and idles; returns its ID."""
    api = client.api
    created = api.create_container(
        image,
        ["sh", "-c", IDLE],
        name=name,
        environment=["MODEL=big"],
        labels=cleanup.labels,
        host_config=api.create_host_config(**host_config),
    )
    container_id: str = created["Id"]
    if start:
        api.start(container_id)
    return container_id


# --- the payload builder, without Docker -------------------------------------------------

OLD_ID = "0123456789ab" + "cd" * 26


def hand_written_inspect() -> dict[str, Any]:
    """A trimmed `docker inspect` of a vLLM-like container on two networks."""
    device_requests = [
        {
            "Driver": "nvidia",
            "Count": 0,
            "DeviceIDs": ["0"],
            "Capabilities": [["gpu"]],
            "Options": {},
        }
    ]
    return {
        "Id": OLD_ID,
        "Name": "/llm",
        "State": {"Running": True, "StartedAt": "2026-01-01T00:00:00Z"},
        "Config": {
            "Hostname": OLD_ID[:12],
            "Domainname": "",
            "User": "1000:1000",
            "AttachStdin": False,
            "AttachStdout": False,
            "AttachStderr": False,
            "ExposedPorts": {"8000/tcp": {}},
            "Tty": False,
            "OpenStdin": False,
            "StdinOnce": False,
            "Env": ["PATH=/usr/bin", "MODEL=meta-llama/Llama-3.1-8B", "HF_HOME=/cache"],
            "Cmd": ["--model", "$MODEL"],
            "Healthcheck": {"Test": ["CMD-SHELL", "curl -f localhost:8000/health"]},
            "Image": "vllm/vllm-openai:v0.6.3",
            "Volumes": {"/scratch": {}},
            "WorkingDir": "/app",
            "Entrypoint": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
            "OnBuild": None,
            "Labels": {"app": "chat", "com.docker.compose.service": "llm"},
            "StopSignal": "SIGINT",
            "StopTimeout": 30,
        },
        "HostConfig": {
            "Binds": ["hf-cache:/cache:rw"],
            "NetworkMode": "front",
            "PortBindings": {"8000/tcp": [{"HostIp": "", "HostPort": "8000"}]},
            "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}},
            "DeviceRequests": device_requests,
            "ShmSize": 8 * 2**30,
            "Memory": 0,
            "CapAdd": ["SYS_NICE"],
            "AutoRemove": False,
        },
        "NetworkSettings": {
            "Networks": {
                "back": {
                    "IPAMConfig": {"IPv4Address": "10.9.0.20"},
                    "Links": None,
                    "Aliases": ["vllm", OLD_ID[:12]],
                    "NetworkID": "b" * 64,
                    "IPAddress": "10.9.0.20",
                    "DriverOpts": None,
                },
                "front": {
                    "IPAMConfig": None,
                    "Links": None,
                    "Aliases": ["llm", "chat-backend", OLD_ID[:12]],
                    "NetworkID": "f" * 64,
                    "IPAddress": "10.8.0.7",
                    "DriverOpts": None,
                },
            }
        },
    }


def test_build_create_args_on_hand_written_inspect() -> None:
    old = hand_written_inspect()
    pristine = copy.deepcopy(old)
    args = build_create_args(old, "MODEL", "Qwen/Qwen2.5-3B")
    assert old == pristine, "the inspect dict must not be modified"

    assert args["image"] == "vllm/vllm-openai:v0.6.3"
    assert args["environment"] == ["PATH=/usr/bin", "MODEL=Qwen/Qwen2.5-3B", "HF_HOME=/cache"]
    assert args["command"] == ["--model", "$MODEL"]
    assert args["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert args["labels"] == {"app": "chat", "com.docker.compose.service": "llm"}
    assert args["working_dir"] == "/app"
    assert args["user"] == "1000:1000"
    assert args["ports"] == {"8000/tcp": {}}
    assert args["volumes"] == {"/scratch": {}}
    assert args["healthcheck"] == {"Test": ["CMD-SHELL", "curl -f localhost:8000/health"]}
    assert args["stop_signal"] == "SIGINT"
    assert args["stop_timeout"] == 30
    assert args["detach"] is True
    assert (args["tty"], args["stdin_open"]) == (False, False)
    assert args["use_config_proxy"] is False
    assert args["hostname"] is None, "Docker's default hostname (the old short ID) is not copied"
    assert "name" not in args

    # HostConfig goes through whole, as a copy, GPUs included.
    assert args["host_config"] == pristine["HostConfig"]
    assert args["host_config"] is not old["HostConfig"]
    assert args["host_config"]["DeviceRequests"][0]["Capabilities"] == [["gpu"]]

    # The NetworkMode network goes in the create call, without the old short-ID alias.
    assert args["networking_config"] == {
        "EndpointsConfig": {"front": {"Aliases": ["llm", "chat-backend"]}}
    }
    plan = plan_networks(old)
    assert plan.network_mode == "front"
    assert [a.network for a in plan.extras] == ["back"]
    assert plan.extras[0].connect_kwargs() == {
        "ipv4_address": "10.9.0.20",
        "ipv6_address": None,
        "aliases": ["vllm"],
        "links": None,
        "link_local_ips": None,
        "driver_opt": None,
    }


def test_build_create_args_variants() -> None:
    # A variable the container did not have is appended; duplicates collapse.
    assert replace_env(["A=1", "M=x", "M=y"], "M", "z") == ["A=1", "M=z"]
    assert replace_env(["A=1"], "M", "z=1") == ["A=1", "M=z=1"]

    explicit = hand_written_inspect()
    explicit["Config"]["Hostname"] = "llm-box"
    assert build_create_args(explicit, "MODEL", "m")["hostname"] == "llm-box"

    host = hand_written_inspect()
    host["HostConfig"]["NetworkMode"] = "host"
    host["Config"]["Hostname"] = "the-hosts-name"
    host["NetworkSettings"]["Networks"] = {"host": {"Aliases": None, "NetworkID": "h" * 64}}
    args = build_create_args(host, "MODEL", "m")
    assert args["hostname"] is None and args["networking_config"] is None
    assert plan_networks(host).extras == ()

    # Left its NetworkMode network: created on one it is still on, the other connected.
    left = hand_written_inspect()
    left["HostConfig"]["NetworkMode"] = "gone"
    args = build_create_args(left, "MODEL", "m")
    assert args["host_config"]["NetworkMode"] == "back"
    assert args["networking_config"]["EndpointsConfig"]["back"]["IPAMConfig"] == {
        "IPv4Address": "10.9.0.20"
    }
    assert [a.network for a in plan_networks(left).extras] == ["front"]

    shared = hand_written_inspect()
    shared["HostConfig"]["NetworkMode"] = "container:" + "e" * 64
    with pytest.raises(ContainerError, match="network_mode"):
        build_create_args(shared, "MODEL", "m")

    rm = hand_written_inspect()
    rm["HostConfig"]["AutoRemove"] = True
    with pytest.raises(ContainerError, match="--rm"):
        build_create_args(rm, "MODEL", "m")

    for bad in ("", "A=B"):
        with pytest.raises(ConfigError):
            build_create_args(hand_written_inspect(), bad, "m")


# --- against the engine ------------------------------------------------------------------


def test_build_create_args_keeps_device_requests(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup
) -> None:
    """A GPU request cannot start here (no nvidia runtime), but it can be created: the
    payload built from its inspect, and a container created from that, keep it."""
    api = docker_client.api
    gpu = DeviceRequest(driver="nvidia", device_ids=["0"], capabilities=[["gpu"]])
    name = f"fleetd-rc-gpu-{cleanup.run_id[:8]}"
    created = api.create_container(
        busybox_image,
        ["sh", "-c", IDLE],
        name=name,
        environment=["MODEL=big"],
        labels=cleanup.labels,
        host_config=api.create_host_config(device_requests=[gpu]),
    )
    old = inspect(docker_client, created["Id"])
    assert old["HostConfig"]["DeviceRequests"][0]["Driver"] == "nvidia"

    args = build_create_args(old, "MODEL", "small")
    assert args["host_config"]["DeviceRequests"] == old["HostConfig"]["DeviceRequests"]
    assert args["host_config"]["DeviceRequests"] == [
        {
            "Driver": "nvidia",
            "Count": 0,
            "DeviceIDs": ["0"],
            "Capabilities": [["gpu"]],
            "Options": {},
        }
    ]
    # The engine accepts that payload and stores the same request.
    copy_id = api.create_container(name=name + "-copy", **args)["Id"]
    assert (
        inspect(docker_client, copy_id)["HostConfig"]["DeviceRequests"]
        == (old["HostConfig"]["DeviceRequests"])
    )
    assert "MODEL=small" in inspect(docker_client, copy_id)["Config"]["Env"]


def test_a_move_off_a_cordoned_gpu_names_the_new_gpus_to_the_engine(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup
) -> None:
    """The payload of a move (fleetd recreates a service off a cordoned GPU) asks the
    engine for the GPU it moves to, and says so in FLEETD_GPUS; every other request kept."""
    api = docker_client.api
    gpu = DeviceRequest(driver="nvidia", device_ids=["0"], capabilities=[["gpu"]])
    name = f"fleetd-rc-move-{cleanup.run_id[:8]}"
    created = api.create_container(
        busybox_image, ["sh", "-c", IDLE], name=name, labels=cleanup.labels,
        environment=["MODEL=big", "NVIDIA_VISIBLE_DEVICES=0"],
        host_config=api.create_host_config(device_requests=[gpu]),
    )  # fmt: skip
    old = inspect(docker_client, created["Id"])

    args = build_create_args(old, "FLEETD_GPUS", "1", device_ids=["1"])
    copy_id = api.create_container(name=name + "-copy", **args)["Id"]
    new = inspect(docker_client, copy_id)
    [request] = new["HostConfig"]["DeviceRequests"]
    assert (request["DeviceIDs"], request["Driver"], request["Capabilities"]) == (
        ["1"],
        "nvidia",
        [["gpu"]],
    )
    env = new["Config"]["Env"]
    assert {"MODEL=big", "FLEETD_GPUS=1", "NVIDIA_VISIBLE_DEVICES=1"} <= set(env)


def test_a_container_that_names_no_gpu_is_not_moved(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup
) -> None:
    api = docker_client.api
    name = f"fleetd-rc-nogpu-{cleanup.run_id[:8]}"
    created = api.create_container(
        busybox_image, ["sh", "-c", IDLE], name=name, labels=cleanup.labels
    )
    with pytest.raises(ContainerError, match="it names no GPU"):
        build_create_args(inspect(docker_client, created["Id"]), "FLEETD_GPUS", "1", None, ["1"])


@pytest.fixture
def rich_container(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup, tmp_path: Path
) -> dict[str, Any]:
    """A running container with most of what a real service has; returns what was set."""
    api = docker_client.api
    run = cleanup.run_id[:8]
    name = f"fleetd-rc-{run}"
    net_a, prefix_a = make_network(docker_client, cleanup, f"fleetd-rc-{run}-a")
    net_b, prefix_b = make_network(docker_client, cleanup, f"fleetd-rc-{run}-b")
    volume = docker_client.volumes.create(f"fleetd-rc-{run}-data", labels=cleanup.labels).name
    bind_dir = tmp_path / "config"
    bind_dir.mkdir()
    (bind_dir / "settings").write_text("from-the-host\n")
    port = free_port()

    host_config = api.create_host_config(
        mounts=[Mount("/data", volume, type="volume")],
        binds={str(bind_dir): {"bind": "/config", "mode": "ro"}},
        port_bindings={"8080/tcp": ("127.0.0.1", port)},
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
        log_config=LogConfig(type="json-file", config={"max-size": "1m"}),
        network_mode=net_a,
        mem_limit="64m",
        cap_add=["NET_ADMIN"],
    )
    ip_a, ip_b = f"{prefix_a}.10", f"{prefix_b}.20"
    networking = api.create_networking_config(
        {net_a: api.create_endpoint_config(aliases=["model-a", "chat"], ipv4_address=ip_a)}
    )
    created = api.create_container(
        busybox_image,
        ["sh", "-c", SCRIPT],
        name=name,
        hostname="model-host",
        user="0:0",
        working_dir="/data",
        environment=["MODEL=big", "OTHER=keep"],
        labels={**cleanup.labels, "org.example.app": "chat"},
        ports=[8080],
        healthcheck={"test": ["CMD-SHELL", "true"], "interval": 500_000_000, "retries": 3},
        stop_signal="SIGTERM",
        stop_timeout=5,
        host_config=host_config,
        networking_config=networking,
    )
    container_id = created["Id"]
    api.connect_container_to_network(container_id, net_b, aliases=["model-b"], ipv4_address=ip_b)
    api.start(container_id)
    wait_for("MODEL=big", lambda: "MODEL=big" in logs_of(docker_client, container_id))
    exec_out(docker_client, container_id, "sh", "-c", "echo payload > /data/file.txt")
    return {
        "name": name,
        "id": container_id,
        "port": port,
        "net_a": net_a,
        "net_b": net_b,
        "networks": {net_a: ip_a, net_b: ip_b},
        "aliases": {net_a: ["model-a", "chat"], net_b: ["model-b"]},
    }


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def test_recreate_preserves_everything_but_the_variable(
    docker_client: docker.DockerClient, cleanup: Cleanup, rich_container: dict[str, Any]
) -> None:
    name = rich_container["name"]
    old = inspect(docker_client, name)
    wait_for("the port to answer", lambda: _answers(rich_container["port"]))

    started = time.monotonic()
    result = recreate_with_env(docker_client, name, "MODEL", "small")
    took_s = time.monotonic() - started

    assert result.old_id == old["Id"]
    assert result.new_id != old["Id"]
    assert result.name == name
    new = inspect(docker_client, name)
    assert new["Id"] == result.new_id
    assert new["State"]["Running"]
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(old["Id"])
    assert names_present(docker_client, cleanup) == {name}, "no -fleetd-new/-old left"

    # The variable changed, and only it.
    wait_for("MODEL=small", lambda: "MODEL=small" in logs_of(docker_client, name))
    assert "MODEL=big" not in logs_of(docker_client, name)
    assert new["Config"]["Env"] == replace_env(old["Config"]["Env"], "MODEL", "small")
    assert "OTHER=keep" in new["Config"]["Env"]
    for key in PRESERVED_CONFIG:
        assert new["Config"].get(key) == old["Config"].get(key), key
    assert new["Config"]["Hostname"] == "model-host"
    assert new["Config"]["Labels"]["org.example.app"] == "chat"

    # HostConfig, whole: mounts, ports, restart policy, log config, limits, caps ...
    assert new["HostConfig"] == old["HostConfig"]
    assert new["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert new["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m"}}
    # The engine lists mounts in no fixed order.
    by_target = lambda mounts: sorted(mounts, key=lambda m: m["Destination"])  # noqa: E731
    assert by_target(new["Mounts"]) == by_target(old["Mounts"])

    # Both networks: aliases (each container has its own short-ID alias) and static IPs.
    new_networks = new["NetworkSettings"]["Networks"]
    old_networks = old["NetworkSettings"]["Networks"]
    assert set(new_networks) == set(old_networks) == set(rich_container["networks"])
    for net, ip in rich_container["networks"].items():
        assert new_networks[net]["IPAddress"] == ip
        assert new_networks[net]["IPAMConfig"] == old_networks[net]["IPAMConfig"]
        # Docker adds the short ID and the hostname itself, after the given aliases.
        expected = [*rich_container["aliases"][net], result.new_id[:12], "model-host"]
        assert new_networks[net]["Aliases"] == expected
        assert old_networks[net]["Aliases"] == [
            *rich_container["aliases"][net],
            old["Id"][:12],
            "model-host",
        ]
    # The embedded DNS resolves the aliases to the static addresses.
    for alias, net in (("model-a", rich_container["net_a"]), ("model-b", rich_container["net_b"])):
        resolved = exec_out(docker_client, name, "nslookup", alias)
        assert rich_container["networks"][net] in resolved, resolved

    # The named volume kept its file, the bind mount is there, the port is published.
    assert exec_out(docker_client, name, "cat", "/data/file.txt") == "payload\n"
    assert exec_out(docker_client, name, "cat", "/config/settings") == "from-the-host\n"
    port = rich_container["port"]
    assert new["NetworkSettings"]["Ports"]["8080/tcp"] == [
        {"HostIp": "127.0.0.1", "HostPort": str(port)}
    ]
    wait_for("the port to answer", lambda: _answers(port))
    assert http_get(port, "/file.txt") == "payload\n"
    wait_for(
        "healthy",
        lambda: inspect(docker_client, name)["State"].get("Health", {}).get("Status") == "healthy",
    )
    print(f"recreate took {took_s:.2f}s")


def _answers(port: int) -> bool:
    try:
        return http_get(port, "/file.txt") == "payload\n"
    except OSError:
        return False


def _assert_untouched(
    client: docker.DockerClient, cleanup: Cleanup, name: str, old_id: str, model: str = "big"
) -> None:
    current = inspect(client, name)
    assert current["Id"] == old_id
    assert current["State"]["Running"]
    assert f"MODEL={model}" in current["Config"]["Env"]
    assert names_present(client, cleanup) >= {name}
    assert not any(n.endswith((NEW_SUFFIX, OLD_SUFFIX)) for n in names_present(client, cleanup))


def test_create_failure_missing_image_leaves_old_running(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup
) -> None:
    """The image tag is gone (pruned, or never pulled on this host): create fails."""
    tag = f"fleetd-test/busybox-gone:{cleanup.run_id[:12]}"
    docker_client.images.get(busybox_image).tag(tag)
    name = f"fleetd-rc-img-{cleanup.run_id[:8]}"
    try:
        old_id = simple_container(docker_client, tag, cleanup, name)
    finally:
        docker_client.images.remove(tag)  # untags; busybox_image keeps the image
    with pytest.raises(ContainerError, match="cannot create") as raised:
        recreate_with_env(docker_client, name, "MODEL", "small")
    assert isinstance(raised.value.__cause__, docker.errors.ImageNotFound)
    _assert_untouched(docker_client, cleanup, name, old_id)


@pytest.mark.parametrize("method", ["create_container", "connect_container_to_network"])
def test_failure_before_the_stop_leaves_old_running(
    docker_client: docker.DockerClient,
    busybox_image: str,
    cleanup: Cleanup,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    api = docker_client.api
    name = f"fleetd-rc-pre-{cleanup.run_id[:8]}"
    net, _ = make_network(docker_client, cleanup, f"{name}-net")
    old_id = simple_container(docker_client, busybox_image, cleanup, name, start=False)
    api.connect_container_to_network(old_id, net, aliases=["extra"])
    api.start(old_id)
    real = getattr(api, method)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if method == "connect_container_to_network":
            real(*args, **kwargs)  # really connected, then reported as failed
        raise docker.errors.APIError(f"injected failure of {method}")

    monkeypatch.setattr(api, method, failing)
    with pytest.raises(ContainerError) as raised:
        recreate_with_env(docker_client, name, "MODEL", "small")
    assert isinstance(raised.value.__cause__, docker.errors.APIError)
    _assert_untouched(docker_client, cleanup, name, old_id)
    assert names_present(docker_client, cleanup) == {name}


def test_start_failure_restores_the_old_container(
    docker_client: docker.DockerClient,
    cleanup: Cleanup,
    rich_container: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = docker_client.api
    name, old_id = rich_container["name"], rich_container["id"]
    real_start = api.start
    refused: list[str] = []

    def start(container: str, *args: Any, **kwargs: Any) -> Any:
        if container != old_id and not refused:
            refused.append(container)
            raise docker.errors.APIError("injected start failure")
        return real_start(container, *args, **kwargs)

    monkeypatch.setattr(api, "start", start)
    with pytest.raises(ContainerError, match="restored") as raised:
        recreate_with_env(docker_client, name, "MODEL", "small", stop_timeout_s=5)
    assert isinstance(raised.value.__cause__, docker.errors.APIError)
    assert refused, "the new container's start was attempted"
    with pytest.raises(docker.errors.NotFound):
        api.inspect_container(refused[0])
    _assert_untouched(docker_client, cleanup, name, old_id)
    assert names_present(docker_client, cleanup) == {name}
    # Back on its networks with its static addresses, serving on its port.
    networks = inspect(docker_client, name)["NetworkSettings"]["Networks"]
    for net, ip in rich_container["networks"].items():
        assert networks[net]["IPAddress"] == ip
    wait_for("the old container to serve again", lambda: _answers(rich_container["port"]))


def test_network_mode_container_is_refused(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup
) -> None:
    base = f"fleetd-rc-ns-{cleanup.run_id[:8]}"
    host_id = simple_container(docker_client, busybox_image, cleanup, base)
    guest_id = simple_container(
        docker_client, busybox_image, cleanup, base + "-guest", network_mode=f"container:{base}"
    )
    # The guest names the host by an ID that a recreate of the host would change.
    with pytest.raises(ContainerError, match="network_mode"):
        recreate_with_env(docker_client, base + "-guest", "MODEL", "small")
    # And the host cannot be recreated while the guest shares its network namespace.
    with pytest.raises(ContainerError, match=base + "-guest"):
        recreate_with_env(docker_client, base, "MODEL", "small")
    _assert_untouched(docker_client, cleanup, base, host_id)
    _assert_untouched(docker_client, cleanup, base + "-guest", guest_id)
    assert names_present(docker_client, cleanup) == {base, base + "-guest"}


def test_leftovers_of_an_interrupted_run(
    docker_client: docker.DockerClient, busybox_image: str, cleanup: Cleanup
) -> None:
    api = docker_client.api
    name = f"fleetd-rc-left-{cleanup.run_id[:8]}"
    first_id = simple_container(docker_client, busybox_image, cleanup, name)

    # 1. A stale -new (interrupted after create): removed, then a normal recreate.
    simple_container(docker_client, busybox_image, cleanup, name + NEW_SUFFIX, start=False)
    result = recreate_with_env(docker_client, name, "MODEL", "one")
    assert result.old_id == first_id
    new = inspect(docker_client, name)
    assert "MODEL=one" in new["Config"]["Env"]
    assert new["Config"]["Hostname"] == result.new_id[:12], "default hostname not copied"
    assert names_present(docker_client, cleanup) == {name}

    # 2. Interrupted between the renames: only -old exists (stopped). It is renamed back
    #    and recreated from.
    api.stop(result.new_id, timeout=5)
    api.rename(result.new_id, name + OLD_SUFFIX)
    second = recreate_with_env(docker_client, name, "MODEL", "two")
    assert second.old_id == result.new_id
    assert inspect(docker_client, name)["State"]["Running"]
    assert names_present(docker_client, cleanup) == {name}

    # 3. Interrupted before the start: <name> never started, -old stopped. The swap is
    #    undone and redone.
    api.stop(second.new_id, timeout=5)
    api.rename(second.new_id, name + OLD_SUFFIX)
    never_started = api.create_container(
        name=name, **build_create_args(inspect(docker_client, second.new_id), "MODEL", "x")
    )["Id"]
    third = recreate_with_env(docker_client, name, "MODEL", "three")
    assert third.old_id == second.new_id
    with pytest.raises(docker.errors.NotFound):
        api.inspect_container(never_started)
    assert names_present(docker_client, cleanup) == {name}

    # 4. Interrupted before removing the old one: <name> runs, -old is stale: removed.
    stale_old = simple_container(docker_client, busybox_image, cleanup, name + OLD_SUFFIX)
    fourth = recreate_with_env(docker_client, name, "MODEL", "four")
    assert fourth.old_id == third.new_id
    with pytest.raises(docker.errors.NotFound):
        api.inspect_container(stale_old)
    current = inspect(docker_client, name)
    assert current["Id"] == fourth.new_id and current["State"]["Running"]
    wait_for("MODEL=four", lambda: "MODEL=four" in logs_of(docker_client, name))
    assert names_present(docker_client, cleanup) == {name}

    with pytest.raises(ContainerError, match="no container named"):
        recreate_with_env(docker_client, name + "-missing", "MODEL", "x")
