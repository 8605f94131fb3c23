"""Handing a service its new model: the hand-off files, then its containers restarted.

The one place a change of model reaches the outside world; fleetd's main loop and an
offline `fleetctl downgrade` both go through here, so they cannot drift apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from supervisor.analyzer.compose import ENV_FILE_LOCK, env_file_text
from supervisor.core.config import FleetConfig
from supervisor.core.errors import FleetdError
from supervisor.core.rungs import SWARM_MODEL_VARIABLE, RungSetup
from supervisor.core.state import StateError
from supervisor.edges import engine
from supervisor.edges.engine import NoSuchContainer
from supervisor.edges.store import StateStore

if TYPE_CHECKING:
    import docker

    from supervisor.daemon.lifecycle import Settled

# Extra seconds after a stop's own timeout during which a container's exit is ours.
STOP_GRACE_S = 5


def write_handoff(store: StateStore, config: FleetConfig, setup: RungSetup) -> str | None:
    """Write the rung's hand-off files: model, args, env, and the compose `.env` when
    `compose_dir` is set, all or none (StateError naming the file otherwise); returns a
    warning for a person when there is no `.env` to keep in step."""
    if config.compose_dir is None:
        store.write_handoff(setup)
        return None
    env_file = config.resolve(config.compose_dir) / ".env"  # so `docker compose up` agrees
    with ENV_FILE_LOCK:
        try:
            text = env_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            store.write_handoff(setup)
            return f"{env_file} does not exist; compose_dir is not updated"
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read {env_file}: {e}") from None
        store.write_handoff(setup, {env_file: env_file_text(text, setup.service, setup.model)})
    return None


def restart_service(
    client: docker.DockerClient,
    config: FleetConfig,
    service: str,
    setup: RungSetup,
    expect_stop: Callable[[str, float], None] = lambda name, seconds: None,
) -> None:
    """Restart (file strategy) or recreate with the new variables (env strategy: the
    model and the rung's options) each of the service's containers. `expect_stop(name,
    seconds)` is told first, so the exit that follows is not taken for a crash. A stopped
    container is started."""
    svc = config.services[service]
    timeout = int(config.policy.stop_timeout)
    if config.mode == "swarm":
        _update_services(client, config, service, setup, expect_stop)
        return
    for name in svc.restarted:
        expect_stop(name, timeout + STOP_GRACE_S)
        try:
            if svc.model_env or setup.gpus is not None:
                _recreate(client, name, svc.model_env, setup, timeout)
            else:
                engine.restart(client, name, timeout)
        except NoSuchContainer as e:
            raise NoSuchContainer(f"container {name} does not exist (is the fleet up?)") from e


# `mode: swarm`: how long a service update may take to run a task of the new rung, past
# the old task's stop timeout (pulling an image is not fleetd's to wait for: `docker stack
# deploy` pulled it on every node that may run it).
SWARM_ROLL_S = 120


def swarm_variables(config: FleetConfig, service: str, setup: RungSetup) -> dict[str, str | None]:
    """The variables a service update sets for `setup` (None: removed): the model under
    `model_env` (FLEETD_MODEL by default), the rung's options and arguments."""
    return setup.variables(config.services[service].model_env or SWARM_MODEL_VARIABLE)


def _update_services(
    client: docker.DockerClient,
    config: FleetConfig,
    service: str,
    setup: RungSetup,
    expect_stop: Callable[[str, float], None],
) -> None:
    """Roll each of the service's Swarm services onto the rung: a service update with the
    rung's variables, then wait until a task of the new spec runs (Swarm stops the old
    task before or after, as the service's update_config.order says)."""
    from supervisor.edges import services

    if setup.gpus is not None:
        raise FleetdError(
            f"{service}: moving a Swarm service to other GPUs is not done by fleetd yet; "
            "re-plan with `fleetctl generate --swarm` and redeploy the stack"
        )
    changes = swarm_variables(config, service, setup)
    timeout = int(config.policy.stop_timeout)
    for name in config.services[service].restarted:
        swarm_name = config.swarm_service(name)
        expect_stop(name, timeout + STOP_GRACE_S + SWARM_ROLL_S)
        started_ns = time.time_ns()
        try:
            services.update_env(client, swarm_name, changes)
        except services.NoSuchService as e:
            raise NoSuchContainer(
                f"service {swarm_name} does not exist (is the stack deployed?)"
            ) from e
        services.wait_rolled(client, swarm_name, changes, timeout + SWARM_ROLL_S, started_ns)


def _recreate(
    client: docker.DockerClient, name: str, model_env: str | None, setup: RungSetup, timeout: int
) -> None:
    """Recreate a container with the rung's variables (env strategy) and, for a move off a
    cordoned GPU, on the GPUs it moves to (FLEETD_GPUS names them)."""
    from supervisor.edges.recreate import recreate_with_env

    variables: dict[str, str | None] = {}
    if model_env:
        variables = dict(setup.variables(model_env))
    devices = None if setup.gpus is None else [str(i) for i in setup.gpus]
    if devices is not None:
        variables["FLEETD_GPUS"] = ",".join(devices)
    env_name = model_env or "FLEETD_GPUS"
    value = variables.pop(env_name) or setup.model
    recreate_with_env(client, name, env_name, value, timeout, variables, devices)


def change_model(
    client: docker.DockerClient | None,
    store: StateStore,
    config: FleetConfig,
    service: str,
    old: str,
    setup: RungSetup,
    *,
    report: Callable[[str], None],
    abort: threading.Event,
    restarted: Callable[[bool], None] = lambda settles: None,
    expect_stop: Callable[[str, float], None] = lambda name, seconds: None,
    handoff: bool = True,
    new_rung: bool = True,
) -> Settled | None:
    """The change procedure, one for fleetd and for fleetctl without it: hand the new
    rung's `setup` off (its model, options and stable name), prepare it (pull the model
    if missing, unload `old`, name it for clients), restart the containers, then settle
    (wait for health, warm up, measure). `restarted(settles)` is called once the containers
    run it. Returns the settle's result, or None when there is nothing to settle (a restart
    on the same rung, or a service fleetd cannot reach). Raises FleetdError before the
    restart (the hand-off files may already name the new rung; the change is recorded)."""
    from supervisor.daemon.lifecycle import ModelChange  # the runtimes' HTTP clients

    if handoff:
        warning = write_handoff(store, config, setup)
        if warning:
            report(warning)
    if client is None:
        raise FleetdError("Docker is not reachable; the change applies when it is")
    container = config.services[service].containers[0]

    def read_log() -> list[str]:
        if config.mode == "swarm":
            from supervisor.edges import services

            task = services.current_task(client, config.swarm_service(container))
            if task is None:
                return []
            swarm_name = config.swarm_service(container)
            return services.last_lines(client, swarm_name, task.id, 20_000)
        return engine.run_log(client, container)

    change = (
        ModelChange.for_service(config, service, report, abort, read_log=read_log)
        if new_rung
        else None
    )
    if change is not None:
        change.prepare(old, setup)
    restart_service(client, config, service, setup, expect_stop)
    restarted(change is not None)
    return change.settle(setup) if change is not None else None
