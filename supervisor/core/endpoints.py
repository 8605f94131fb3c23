"""Where fleetd reaches each service: its host port and its runtime API's address. Pure.

From the config alone (placed or not), so `fleetctl generate` and fleetd's runtime
endpoints agree.
"""

from __future__ import annotations

from supervisor.core.config import FleetConfig
from supervisor.core.errors import RenderError
from supervisor.core.runtimes import spec_of


def host_ports(config: FleetConfig) -> dict[str, int]:
    """Host ports of the config's services: the configured ones, then 11434, 11435, ...
    per runtime in name order, never twice. From the config alone (placed or not), so
    `fleetctl generate` and fleetd's runtime endpoints agree."""
    taken: dict[int, str] = {}
    for name, service in config.services.items():
        port = service.port
        if port is not None:
            if port in taken:
                raise RenderError(f"services {taken[port]!r} and {name!r} both ask for port {port}")
            taken[port] = name
    ports = {n: s.port for n, s in config.services.items() if s.port is not None}
    for name in sorted(config.services):
        spec = spec_of(config.services[name].runtime)
        first = spec.port if spec.generated else None
        if name in ports or first is None:
            continue
        port = next(p for p in range(first, 65536) if p not in taken)
        taken[port], ports[name] = name, port
    return ports


def endpoint_of(config: FleetConfig, name: str) -> str | None:
    """A service's runtime API: `endpoint:`; else 127.0.0.1 and its `port:`, or, with
    `compose_dir:` (the fleet runs the generated compose file), the host port that file
    publishes; else None: fleetd never guesses, no endpoint means no API calls."""
    service = config.services[name]
    if spec_of(service.runtime).api is None:
        return None
    if service.endpoint is not None:
        return service.endpoint
    if service.port is None and config.compose_dir is None:
        return None
    port = service.port or host_ports(config).get(name)
    return f"http://127.0.0.1:{port}" if port is not None else None
