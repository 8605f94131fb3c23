"""Fixtures for tests against the real Docker engine and the compose CLI.

Every test in this folder is marked ``integration``. Where the engine or the compose CLI
is missing the tests skip with the reason on a developer machine and fail in CI
(``CI=true``): CI must never pass by skipping them.

Whatever a test creates carries the label ``RUN_LABEL_KEY=<uuid of the test>`` (take
``cleanup.labels``) and is removed, forced, when the test ends. The engine is shared by
everyone on the machine, so teardown removes only this test's objects, never "all test
objects".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from docker.models.images import Image
from docker.models.networks import Network
from docker.models.resource import Model
from docker.models.volumes import Volume

from supervisor.core.nodesetup import gpu_labels
from tests.integration.fleet_harness import IMAGE as EMITTER_IMAGE
from tests.integration.fleet_harness import Fleet
from tests.integration.swarm import GPUS, Swarm, single_node_swarm

# The reaper image cannot be pulled here; tests that use testcontainers clean up themselves.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
BUILD_TEST_IMAGES = REPO_ROOT / "scripts" / "build-test-images.sh"

TEST_LABEL_KEY = "org.fleetd.test"  # on every test image and object: "1"
RUN_LABEL_KEY = "org.fleetd.test.run"  # per test: a fresh uuid, what teardown removes by
BUSYBOX_IMAGE = "fleetd-test/busybox:1"

ModelT = TypeVar("ModelT", bound=Model)


def _unavailable(reason: str) -> NoReturn:
    """Fail in CI, where integration tests must run; skip with the reason elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: integration tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not just this folder's.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


def _connect_docker() -> docker.DockerClient | str:
    """A client that reached the engine, or why none could."""
    try:
        # Negotiate: the engine here speaks API 1.41, older than docker-py's own default.
        client = docker.from_env(version="auto")
        client.ping()
    except docker.errors.DockerException as e:
        return f"Docker engine unreachable ({e}); run scripts/ensure-docker.sh"
    return client


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = _connect_docker()
    if isinstance(client, str):
        _unavailable(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """The tag of the tiny busybox test image, built locally if this engine lacks it."""
    try:
        docker_client.images.get(BUSYBOX_IMAGE)
    except docker.errors.ImageNotFound:
        built = subprocess.run(
            ["bash", str(BUILD_TEST_IMAGES), "busybox"],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            _unavailable(f"cannot build {BUSYBOX_IMAGE}: {built.stderr.strip()}")
    return BUSYBOX_IMAGE


# --- the compose CLIs (tests/integration/test_compose_cli.py) -----------------------------

# Every generated project is checked with both: v2 (`docker compose`, the CLI plugin most
# users run) and v1 (`docker-compose` 1.29, what Debian bookworm ships).
COMPOSE_ARGV = {"v1": ("docker-compose",), "v2": ("docker", "compose")}
COMPOSE_HINT = "run scripts/ensure-compose.sh"


@dataclass(frozen=True)
class ComposeCli:
    """One compose CLI: ``version`` is "v1" or "v2", ``argv`` what runs it."""

    version: str
    argv: tuple[str, ...]
    reported: str  # what `version --short` printed, e.g. "2.26.1-4"

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]


def find_compose(version: str) -> ComposeCli | str:
    """Compose `version` ("v1" or "v2") as found on PATH, or why it is not here."""
    name, *sub = COMPOSE_ARGV[version]
    path = shutil.which(name)
    if path is None:
        return f"Compose {version}: {name} not found on PATH; {COMPOSE_HINT}"
    argv = (path, *sub)
    try:
        done = subprocess.run(
            [*argv, "version", "--short"], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return f"Compose {version}: `{' '.join(argv)} version` did not answer within 60 s"
    reported = done.stdout.strip().removeprefix("v")
    # A `docker-compose` may be v2 (trixie's package links it to the plugin): not v1.
    if done.returncode != 0 or not reported.startswith(f"{version[1:]}."):
        said = reported or done.stderr.strip()
        return (
            f"Compose {version} not found: `{' '.join(argv)} version` says {said!r}; {COMPOSE_HINT}"
        )
    return ComposeCli(version, argv, reported)


@pytest.fixture(scope="session", params=sorted(COMPOSE_ARGV), ids=lambda v: f"compose-{v}")
def compose_cli(request: pytest.FixtureRequest) -> ComposeCli:
    """Each compose CLI in turn (test ids carry `compose-v1` / `compose-v2`)."""
    found = find_compose(request.param)
    if isinstance(found, str):
        _unavailable(found)
    return found


@pytest.fixture(scope="module")
def compose_v2() -> ComposeCli:
    """Compose v2, what the end-to-end tests run projects with (most users run it)."""
    found = find_compose("v2")
    if isinstance(found, str):
        _unavailable(found)
    return found


# Teardown order: containers hold networks and volumes, images may back containers.
_REMOVAL_ORDER = (Container, Network, Volume, Image)


@dataclass
class Cleanup:
    """Labels for what a test creates, and the teardown that removes it all."""

    client: docker.DockerClient
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra: list[Model] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        """Put these on every container, network, volume and image the test creates."""
        return {TEST_LABEL_KEY: "1", RUN_LABEL_KEY: self.run_id}

    def add(self, obj: ModelT) -> ModelT:
        """Also remove this object (e.g. a network compose made) that cannot carry the labels."""
        self.extra.append(obj)
        return obj

    def created(self) -> list[Model]:
        """Everything this test created, in the order it can be removed."""
        selector = {"label": f"{RUN_LABEL_KEY}={self.run_id}"}
        objects: list[Model] = [
            *self.client.containers.list(all=True, filters=selector),
            *self.client.networks.list(filters=selector),
            *self.client.volumes.list(filters=selector),
            *self.client.images.list(filters=selector),
            *self.extra,
        ]
        return sorted(objects, key=_kind_rank)

    def remove_all(self) -> list[str]:
        """Remove everything this test created; return what could not be removed."""
        failures = (self._remove(obj) for obj in self.created())
        return [failure for failure in failures if failure]

    def _remove(self, obj: Model) -> str | None:
        try:
            if isinstance(obj, Container):
                obj.remove(force=True, v=True)
            elif isinstance(obj, Volume):
                obj.remove(force=True)
            elif isinstance(obj, Image):
                self.client.images.remove(obj.id, force=True)
            else:
                obj.remove()
        except docker.errors.NotFound:
            return None  # already gone: removed with its container, or by the test itself
        except docker.errors.APIError as e:
            return f"{type(obj).__name__} {obj.short_id}: {e}"
        return None


def _kind_rank(obj: Model) -> int:
    ranks = (i for i, kind in enumerate(_REMOVAL_ORDER) if isinstance(obj, kind))
    return next(ranks, len(_REMOVAL_ORDER))


@pytest.fixture
def cleanup(docker_client: docker.DockerClient) -> Iterator[Cleanup]:
    """Per-test label values; at teardown, force-remove everything carrying them."""
    tracker = Cleanup(docker_client)
    yield tracker
    leftovers = tracker.remove_all()
    assert not leftovers, f"teardown could not remove: {leftovers}"


# --- fleetd against real containers (tests/integration/fleet_harness.py) -----------------


@pytest.fixture(scope="module")
def emitter_image(docker_client: docker.DockerClient) -> str:
    """`fleetd-test/oom-emitter:1`, built unless an image of the same sources is there.

    The build script runs every time: its reuse check (a hash of the build context and the
    busybox base) is instant when the image is current, and rebuilds one made from an
    older emitter.sh, which a check for the tag alone would keep using.
    """
    return build_test_image(docker_client, "oom-emitter", EMITTER_IMAGE)


def build_test_image(client: docker.DockerClient, name: str, tag: str) -> str:
    """Run scripts/build-test-images.sh for one image (instant when it is current, as its
    reuse check hashes the sources) and return its tag; no image is a failure in CI."""
    built = subprocess.run(
        ["bash", str(BUILD_TEST_IMAGES), name], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        _unavailable(f"cannot build {tag}: {built.stderr.strip()}")
    client.images.get(tag)
    return tag


@pytest.fixture
def fleet(
    tmp_path: Path, docker_client: docker.DockerClient, cleanup: Cleanup, emitter_image: str
) -> Iterator[Fleet]:
    """A config, a state dir and a `fleetd run` process for one test; killed at the end."""
    f = Fleet(tmp_path, docker_client, cleanup.labels)
    yield f
    if f.process is not None:
        f.process.kill()
        f.process.wait()


# --- fleetd under a real systemd (tests/integration/test_systemd_e2e.py) ------------------

SYSTEMD_IMAGE = "fleetd-test/systemd:1"


@pytest.fixture(scope="session")
def systemd_image(docker_client: docker.DockerClient) -> str:
    """`fleetd-test/systemd:1` (Debian, systemd, /opt/fleetd with fleetd's dependencies).

    The build script's reuse check is instant when the image is current; a first build on
    a machine takes about a minute (debootstrap), and needs root and debootstrap.
    """
    return build_test_image(docker_client, "systemd", SYSTEMD_IMAGE)


@pytest.fixture(scope="session")
def fleetd_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout's fleetd, without its dependencies, built once a session.

    Built from a copy of what the package is made of (pyproject.toml, the readme and the
    package-dir folders), so setuptools' build/ and egg-info land in a temp dir and not in
    a checkout where someone else may be building at the same time.
    """
    import sys
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    src = tmp_path_factory.mktemp("fleetd-src")
    for name in ("pyproject.toml", pyproject["project"]["readme"]):
        shutil.copy2(REPO_ROOT / name, src / name)
    for top in sorted({Path(d).parts[0] for d in package_dirs}):
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO_ROOT / top, src / top, ignore=ignore)
    out = tmp_path_factory.mktemp("fleetd-wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, f"pip wheel of the checkout failed:\n{built.stderr}"
    [wheel] = out.glob("fleetd-*.whl")
    return wheel


@pytest.fixture(scope="session")
def docker_socket() -> Path:
    """The engine's unix socket on this machine ($DOCKER_HOST or the default)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    path = Path(host.removeprefix("unix://"))
    if not host.startswith("unix://") or not path.is_socket():
        _unavailable(f"the Docker engine is not on a local unix socket (DOCKER_HOST={host})")
    return path


# --- runtime API stand-ins (tests/integration/test_runtime_api_standin.py, test_lifecycle.py)

RUNTIME_API_IMAGE = "fleetd-test/runtime-api:1"


@pytest.fixture(scope="module")
def runtime_api_image(docker_client: docker.DockerClient) -> str:
    """`fleetd-test/runtime-api:1`: Ollama's, vLLM's and llama.cpp's APIs, faults included.

    The first build on a machine also makes fleetd-test/python:1 (debootstrap, ~50 s, root).
    """
    return build_test_image(docker_client, "runtime-api", RUNTIME_API_IMAGE)


# --- a real single-node swarm (tests/integration/swarm.py) ---------------------------------


@pytest.fixture(scope="module")
def swarm(docker_client: docker.DockerClient) -> Iterator[Swarm]:
    """This engine as a one-node swarm manager for the module's tests, left as found: held
    under a lock, so two test runs on one engine never init or leave under each other."""
    try:
        with single_node_swarm(docker_client) as found:
            yield found
    except docker.errors.APIError as e:
        _unavailable(f"cannot run a single-node swarm on this engine: {e}")


@pytest.fixture
def gpu_node_labels(docker_client: docker.DockerClient, swarm: Swarm) -> Iterator[dict[str, str]]:
    """This node labelled with the stand-in GPUs as `node init` would; labels restored after."""
    node = docker_client.nodes.get(swarm.node_id)
    before = dict(node.attrs["Spec"].get("Labels") or {})
    labels = dict(label.split("=", 1) for label in gpu_labels(GPUS))
    node.update({**node.attrs["Spec"], "Labels": {**before, **labels}})
    try:
        yield labels
    finally:
        node.reload()
        node.update({**node.attrs["Spec"], "Labels": before})
