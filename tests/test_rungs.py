"""A rung is a whole runtime configuration: its options are checked per runtime at load,
context steps expand into rungs, each is priced, and each hands its container the same
options through files and through environment variables."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from supervisor.analyzer import service_needs
from supervisor.core.config import FleetConfig, load_config
from supervisor.core.errors import ConfigError
from supervisor.core.ladder import next_rung_down
from supervisor.core.rungs import measured_key, setup_for
from supervisor.core.units import GIB
from tests.ggufmodels import GgufShape, write_gguf


def load(tmp_path: Path, text: str) -> FleetConfig:
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


LADDER = """\
services:
  chat:
    runtime: {runtime}
    containers: [chat-1]
    ladder:
      - {{model: big, vram: 10GiB, context: 32768}}
      - {{model: big, vram: 8GiB, context: 16384}}
      - {{model: big, vram: 7GiB, context: 8192}}
      - model: big
        vram: 6GiB
        context: 8192
        kv_cache: {kv}
      - model: small
        vram: 3GiB
"""


def test_context_steps_expand_in_order_before_the_next_model(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", GgufShape(context_length=65536))
    steps = f"metadata: {model}\n        context: [32768, 16384, 8192]"
    text = LADDER.replace(
        "{{model: big, vram: 10GiB, context: 32768}}", "model: big\n        " + steps
    )
    text = "\n".join(
        line for line in text.splitlines() if "vram: 8GiB" not in line and "vram: 7GiB" not in line
    )
    config = load(tmp_path, text.format(runtime="llamacpp", kv="q8_0"))
    ladder = config.services["chat"].ladder
    assert [(r.model, r.context, r.kv_cache) for r in ladder] == [
        ("big", 32768, None),
        ("big", 16384, None),
        ("big", 8192, None),
        ("big", 8192, "q8_0"),
        ("small", None, None),
    ]
    assert len(config.services["chat"].written_ladder) == 3
    assert config.services["chat"].client_name == "chat"


@pytest.mark.parametrize(
    ("runtime", "line", "wanted"),
    [
        ("ollama", "tensor_parallel: 2", "Ollama cannot set tensor_parallel per rung"),
        ("vllm", "kv_cache: q8_0", "expected one of auto, fp8"),
        ("llamacpp", "kv_cache: fp8", "expected one of f16, q8_0, q4_0"),
        ("generic", "kv_cache: q8_0", "accepts: context, parallel"),
        ("tgi", "kv_cache: fp8", "accepts: context, parallel, tensor_parallel"),
        ("llamacpp", "context: [4096, 4096]", "repeat a value"),
        ("llamacpp", "context: []", "at least 1"),
        ("llamacpp", "tensor_parallel: 0", "greater than or equal to 1"),
    ],
)
def test_a_rung_asking_what_its_runtime_cannot_do_is_refused_at_its_line(
    tmp_path: Path, runtime: str, line: str, wanted: str
) -> None:
    text = f"""\
    services:
      chat:
        runtime: {runtime}
        image: example/app:1
        containers: [chat-1]
        ladder:
          - model: big
            vram: 3GiB
            {line}
    """
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, text)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'fleet.yaml'}:9: services.chat.ladder[0].")
    assert wanted in message


def test_args_may_not_set_what_the_rung_sets(tmp_path: Path) -> None:
    text = """\
    services:
      chat:
        runtime: vllm
        containers: [chat-1]
        args: ["--enforce-eager", "--max-model-len=4096"]
        ladder: [{model: big, vram: 3GiB}]
    """
    with pytest.raises(
        ConfigError, match=r"fleet.yaml:5: services.chat.args\[1\]: .*--max-model-len"
    ):
        load(tmp_path, text)


def test_each_context_step_is_priced_and_a_step_down_skips_none_of_them(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    write_gguf(model, GgufShape(layers=8, n_embd=512, n_head=8, context_length=65536))
    config = load(
        tmp_path,
        f"""\
        services:
          chat:
            runtime: llamacpp
            containers: [chat-1]
            ladder:
              - model: {model}
                metadata: {model}
                context: [32768, 16384, 8192]
              - model: {model}
                metadata: {model}
                context: 8192
                kv_cache: q8_0
        """,
    )
    needs = [n.need_bytes for n in service_needs(config, config.services["chat"])]
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == 4
    # f16 KV: 8 layers x 512 x 2 (K, V) x 2 bytes = 16 KiB per cell; halving the context
    # frees half the cells (and a little of the attention mask in the compute buffer).
    for fewer, (a, b) in zip((16384, 8192), ((0, 1), (1, 2)), strict=True):
        assert fewer * 16 * 1024 <= needs[a] - needs[b] < fewer * 16 * 1024 * 1.1
    assert needs[3] < needs[2] - 8192 * 8 * 1024 * 0.9  # q8_0: about half of f16's KV
    assert [next_rung_down(needs, r) for r in range(4)] == [1, 2, 3, None]


def test_a_setup_carries_the_options_in_files_and_in_variables(tmp_path: Path) -> None:
    config = load(tmp_path, LADDER.format(runtime="vllm", kv="fp8"))
    big = setup_for(config, "chat", 0, 10 * GIB, 16 * GIB)
    small = setup_for(config, "chat", 3, 6 * GIB, 16 * GIB)
    assert "--max-model-len\n32768\n" in big.files()["args"]
    assert big.memory_share == 0.63 and small.memory_share == 0.38
    assert small.args == (
        "--max-model-len", "8192", "--kv-cache-dtype", "fp8",
        "--gpu-memory-utilization", "0.38", "--served-model-name", "chat",
    )  # fmt: skip
    assert small.files()["model"] == "big\n"
    variables = small.variables("MODEL")
    assert variables["MODEL"] == "big"
    assert variables["FLEETD_CONTEXT"] == "8192" and variables["FLEETD_KV_CACHE"] == "fp8"
    assert variables["FLEETD_PARALLEL"] is None, "unset options are removed on a recreate"
    assert variables["FLEETD_SERVED_NAME"] == "chat"
    assert variables["FLEETD_ARGS"] == " ".join(small.args)
    assert small.describe() == "context 8192, kv_cache fp8"


def test_llamacpp_quantized_kv_turns_flash_attention_on_and_tp_picks_gpus(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        services:
          chat:
            runtime: llamacpp
            served_name: assistant
            containers: [chat-1]
            ladder:
              - {model: /m/a.gguf, vram: 5GiB, tensor_parallel: 2, kv_cache: q4_0}
              - {model: /m/a.gguf, vram: 5GiB, kv_cache: f16}
        """,
    )
    two = setup_for(config, "chat", 0, 5 * GIB, 24 * GIB)
    assert two.args[-8:] == ("-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "--alias", "assistant")
    assert dict(two.env) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    one = setup_for(config, "chat", 1, 5 * GIB, 24 * GIB)
    assert "-fa" not in one.args and dict(one.env) == {}


def test_rungs_of_one_model_are_measured_apart(tmp_path: Path) -> None:
    ladder = load(tmp_path, LADDER.format(runtime="llamacpp", kv="q8_0")).services["chat"].ladder
    keys = [measured_key(r) for r in ladder]
    assert keys == [
        "big [context 32768]",
        "big [context 16384]",
        "big [context 8192]",
        "big [context 8192, kv_cache q8_0]",
        "small",
    ]


def test_a_runtime_naming_the_longest_context_that_fits_sends_the_step_straight_there(
    tmp_path: Path,
) -> None:
    from supervisor.core.ladder import Action, Observed, Policy, transition
    from supervisor.core.rules import IncidentClass
    from supervisor.core.state import ServiceState

    config = load(tmp_path, LADDER.format(runtime="vllm", kv="fp8"))
    service = config.services["chat"]
    needs = [10, 8, 6, 5, 3]
    line = (
        "ValueError: To serve at least one request with the models's max seq len (32768), "
        "(4.0 GiB KV cache is needed, which is larger than the available KV cache memory "
        "(1.2 GiB). Based on the available memory, the estimated maximum model length is "
        "{n}. Try increasing `gpu_memory_utilization` or decreasing `max_model_len`"
    )

    def step_from_top(n: int) -> tuple[ServiceState, str]:
        svc = ServiceState(model="big", rung=0)
        for t in range(3):
            seen = Observed(
                100.0 + t, IncidentClass.VRAM_OOM, "vllm.kv_cache_insufficient", "c", None,
                line.format(n=n),
            )  # fmt: skip
            svc, decision = transition(svc, seen, service, needs, Policy())
        assert decision.action is Action.STEP_DOWN
        assert svc.pending is not None
        return svc, decision.reason

    svc, reason = step_from_top(12288)  # 16384 does not fit either: straight to 8192
    assert svc.pending is not None and svc.pending.to_rung == 2
    assert "longest context that fits is 12288 tokens" in reason
    svc, reason = step_from_top(20000)  # 16384 fits: the next step, as usual
    assert svc.pending is not None and svc.pending.to_rung == 1
    svc, reason = step_from_top(4000)  # no step of this model that short: the next model
    assert svc.pending is not None and svc.pending.to_rung == 4
    assert "longest context that fits is 4000 tokens" in reason


def test_history_records_the_options_of_both_rungs(tmp_path: Path) -> None:
    from supervisor.core.ladder import apply_change
    from supervisor.core.state import FleetState, PendingChange, ServiceState

    service = load(tmp_path, LADDER.format(runtime="llamacpp", kv="q8_0")).services["chat"]
    svc = ServiceState(
        model="big", rung=2, pending=PendingChange(3, "big", "test", 1.0, actor="fleetctl")
    )
    _, record = apply_change(svc, "chat", 2.0, service)
    assert record.from_options == {
        "context": 8192, "parallel": None, "kv_cache": None, "tensor_parallel": 1
    }  # fmt: skip
    assert record.to_options is not None and record.to_options["kv_cache"] == "q8_0"
    back = FleetState.from_json(FleetState(history=[record]).to_json()).history[0]
    assert back == record


def test_context_steps_with_one_declared_need_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"fleet.yaml:\d+: services.chat.ladder\[0\]: .*one `vram:` for 2 context steps",
    ):
        load(
            tmp_path,
            """\
            services:
              chat:
                runtime: llamacpp
                containers: [chat-1]
                ladder:
                  - {model: big, vram: 4GiB, context: [8192, 4096]}
            """,
        )


def test_a_rung_spanning_more_gpus_than_the_host_has_says_so(tmp_path: Path) -> None:
    from supervisor.analyzer import analyze
    from supervisor.core.gpus import Discovery, simulated_gpus

    config = load(
        tmp_path,
        """\
        services:
          api:
            runtime: vllm
            containers: [api-1]
            ladder:
              - {model: org/big, vram: 10GiB, tensor_parallel: 2}
              - {model: org/small, vram: 6GiB}
        """,
    )
    plan = analyze(config, Discovery(gpus=simulated_gpus(["24GiB"])))
    api = plan.services["api"]
    assert (api.rung, api.gpus) == (1, (0,))
    assert api.rungs[0].reason == "spans 2 GPUs (tensor_parallel), and this host has 1 it may use"
