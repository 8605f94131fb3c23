"""The registry of runtimes (supervisor.core.runtimes): every runtime has what its entry claims,
the registry is pure, and a runtime's name is spelled only in its own files."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import supervisor.core.runtimes
from supervisor.analyzer import analyze
from supervisor.analyzer.compose import build_project
from supervisor.core.config import load_config
from supervisor.core.endpoints import endpoint_of, host_ports
from supervisor.core.errors import ConfigError, RenderError
from supervisor.core.gpus import Discovery, simulated_gpus
from supervisor.core.rules import BUILTIN_RULES, KNOWN_RUNTIMES
from supervisor.core.runtimes import (
    REGISTRY,
    Runtime,
    RuntimeSpec,
    markdown_tables,
    own_rule_ids,
    spec_of,
)
from supervisor.edges import runtime_api
from supervisor.edges.runtime_api import RuntimeApi, api_for

REPO = Path(__file__).resolve().parent.parent
SPECS = list(REGISTRY.values())
IDS = [s.name.value for s in SPECS]
IO_LIBRARIES = ("docker", "requests", "pynvml", "gguf", "numpy", "jinja2", "socket", "fcntl")


def test_every_runtime_has_its_module_and_nothing_else_is_one() -> None:
    package = Path(supervisor.core.runtimes.__file__).parent
    modules = {m.name for m in pkgutil.iter_modules([str(package)])} - {"spec"}
    assert modules == {r.value for r in Runtime}
    assert set(REGISTRY) == set(Runtime)


def test_the_rules_know_exactly_the_registrys_runtimes() -> None:
    assert {r.value for r in Runtime} == KNOWN_RUNTIMES
    named = {r for rule in BUILTIN_RULES for r in rule.runtimes or ()}
    assert named <= KNOWN_RUNTIMES


def test_the_registry_and_the_rules_import_no_io_library() -> None:
    code = (
        "import sys, supervisor.core.runtimes, supervisor.core.rules;"
        f"print([m for m in {IO_LIBRARIES!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_name_outside_the_registry_is_refused_with_every_accepted_name() -> None:
    with pytest.raises(ValueError, match="'olama' is not a runtime fleetd knows") as raised:
        spec_of("olama")
    for runtime in Runtime:
        assert repr(runtime.value) in str(raised.value)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_a_generated_runtime_has_its_template_image_or_image_rule_and_port(
    spec: RuntimeSpec,
) -> None:
    if not spec.generated:
        assert spec.image is None and spec.port is None and spec.start_script is None
        assert spec.env is RuntimeSpec.env and spec.args is RuntimeSpec.args
        return
    assert spec.template == f"{spec.name.value}.yml.j2"
    template = (REPO / "templates" / spec.template).read_text()
    assert '{% include "_common.yml.j2" %}' in template
    if spec.start_script is not None:
        assert "svc.start_script" in template and "/run/fleetd/model" in spec.start_script
    assert spec.port is not None or spec.api is None  # an API is reached on its port


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_an_api_client_has_every_capability_its_entry_claims(spec: RuntimeSpec) -> None:
    if spec.api is None:
        assert spec.health_path is None and spec.warmup_path is None
        assert not (spec.can_pull or spec.can_unload or spec.reports_measured_vram)
        assert api_for(spec.name, "http://127.0.0.1:1") is None
        return
    client = getattr(runtime_api, spec.api)
    assert issubclass(client, RuntimeApi) and client.runtime is spec.name
    assert isinstance(api_for(spec.name, "http://127.0.0.1:1"), client)
    assert spec.health_path is not None and spec.health_path.startswith("/")

    def has_own(method: str) -> bool:
        return getattr(client, method) is not getattr(RuntimeApi, method)

    assert has_own("warm") == (spec.warmup_path is not None)
    assert has_own("pull") == has_own("present") == spec.can_pull
    assert has_own("unload") == has_own("loaded") == spec.can_unload
    assert has_own("size_vram") == spec.reports_measured_vram


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_capabilities_hang_together(spec: RuntimeSpec) -> None:
    if spec.swaps_models:  # an ensemble's members are unloaded in turn
        assert spec.can_unload and spec.api is not None
    assert spec.overhead_mib > 0 and spec.default_context > 0
    assert spec.title and spec.summary and spec.model_handoff and spec.options_handoff
    if not spec.generated:
        assert "no generated compose service" in spec.not_done


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_own_rules_are_the_rules_in_its_wording(spec: RuntimeSpec) -> None:
    own = own_rule_ids(spec.name)
    assert all(
        spec.name.value in next(r for r in BUILTIN_RULES if r.id == i).runtimes or () for i in own
    )


# --- the config, the planner and generate, for every runtime ---------------------------


def fleet(tmp_path: Path, spec: RuntimeSpec, **extra: Any) -> Path:
    service: dict[str, Any] = {
        "runtime": spec.name.value,
        "containers": ["svc-1"],
        "port": 18000,
        "ladder": [{"model": "org/model", "vram": "2GiB"}],
        **extra,
    }
    if "ensemble" in extra:
        del service["ladder"]
    if spec.needs_image:
        service["image"] = "registry.example.com/app:1"
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"services": {"svc": service}}))
    return path


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_runtime_is_accepted_in_a_config_and_planned(
    tmp_path: Path, spec: RuntimeSpec
) -> None:
    config = load_config(fleet(tmp_path, spec))
    assert config.services["svc"].runtime is spec.name
    plan = analyze(config, Discovery(gpus=simulated_gpus(["24GiB"])))
    assert plan.services["svc"].rung == 0
    endpoint = endpoint_of(config, "svc")
    assert endpoint == ("http://127.0.0.1:18000" if spec.api else None)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_generate_writes_what_it_can_and_refuses_the_rest(
    tmp_path: Path, spec: RuntimeSpec
) -> None:
    config = load_config(fleet(tmp_path, spec))
    plan = analyze(config, Discovery(gpus=simulated_gpus(["24GiB"])))
    if not spec.generated:
        with pytest.raises(RenderError, match=f"does not generate {re.escape(spec.title)}"):
            build_project(plan, tmp_path / "state")
        return
    project = build_project(plan, tmp_path / "state")
    service = yaml.safe_load(project.compose_yaml)["services"]["svc"]
    assert service["labels"]["org.fleetd.runtime"] == spec.name.value
    assert service["image"] == (spec.image or "registry.example.com/app:1")


def test_ports_are_allocated_only_for_generated_runtimes(tmp_path: Path) -> None:
    services = {
        r.value: {
            "runtime": r.value,
            "containers": [f"{r.value}-1"],
            "ladder": [{"model": "m", "vram": "1GiB"}],
            **({"image": "app:1"} if spec_of(r).needs_image else {}),
        }
        for r in Runtime
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"services": services}))
    ports = host_ports(load_config(path))
    assert set(ports) == {s.name.value for s in SPECS if s.generated and s.port}


def test_an_ensemble_needs_a_runtime_that_swaps_models(tmp_path: Path) -> None:
    swappers = [s for s in SPECS if s.swaps_models]
    others = [s for s in SPECS if not s.swaps_models]
    assert swappers and others
    ensemble = [{"model": "a", "vram": "1GiB"}, {"model": "b", "vram": "1GiB"}]
    for spec in others:
        path = fleet(tmp_path, spec, ensemble=ensemble)
        with pytest.raises(ConfigError, match=f"needs runtime .* \\(got {spec.name.value}\\)"):
            load_config(path)


# --- adding a runtime is one module --------------------------------------------------


def own_files(runtime: Runtime) -> set[str]:
    """Where a runtime's name may be spelled: its module, the enum, its template, its API
    client, the detector rules in its wording (rules.py) and the parser of the report of
    what it allocated (footprint.py)."""
    spec = spec_of(runtime)
    files = {f"supervisor/core/runtimes/{runtime.value}.py", "supervisor/core/runtimes/spec.py"}
    files |= {f"templates/{spec.template}"} if spec.template else set()
    files |= {"supervisor/edges/runtime_api.py"} if spec.api else set()
    files |= {"supervisor/core/rules.py"} if own_rule_ids(runtime) else set()
    files |= {"supervisor/core/footprint.py"} if spec.footprint_in_log else set()
    return files


@pytest.mark.parametrize("runtime", list(Runtime), ids=[r.value for r in Runtime])
def test_a_runtime_is_named_only_in_its_own_files(runtime: Runtime) -> None:
    """No decision elsewhere by a runtime's name (`Runtime.X` or the quoted name): other
    modules read the registry's fields and flags."""
    spelled = re.compile(rf"Runtime\.{runtime.name}\b|[\"']{runtime.value}[\"']")
    sources = [*(REPO / "supervisor").rglob("*.py"), *(REPO / "templates").glob("*.j2")]
    naming = {
        str(p.relative_to(REPO)) for p in sources if spelled.search(p.read_text(encoding="utf-8"))
    }
    assert naming <= own_files(runtime), sorted(naming - own_files(runtime))


def test_docs_runtimes_md_has_the_registrys_tables() -> None:
    docs = (REPO / "docs" / "runtimes.md").read_text()
    assert markdown_tables() in docs, (
        "regenerate the tables: supervisor.core.runtimes.markdown_tables()"
    )
    for runtime in Runtime:
        assert f"`{runtime.value}`" in docs.split("## The runtimes")[0]
