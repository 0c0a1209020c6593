"""The profile pass's pieces that need no server: the scenario section, the servers' command
lines, the decode request's size, and one line of operators.jsonl from a real trace. (The pass
itself runs against real servers: tests/integration/test_profile_run.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loadgen import profiling
from loadgen import scenario as sc
from loadgen import targets
from servers import traces

TRACE = Path(__file__).resolve().parents[1] / "fixtures" / "traces" / "tiny-mamba2-cpu.pt.trace.json.gz"

BASE = """name: p
targets:
  - {name: a, serve: {engine: ssm-server, preset: tiny-mamba2}}
  - {name: b, serve: {engine: vllm, preset: tiny-llama}}
  - {name: c, url: "http://127.0.0.1:9"}
load: {kind: context_sweep, prompt_tokens: [64]}
"""


def test_the_profile_section_and_which_targets_it_takes():
    s = sc.parse(BASE + "profile: {prompt_tokens: [128, 4096], decode_steps: 8}\n")
    assert s.profile.keep_traces is False
    assert [s.profile_of(t) is not None for t in s.targets] == [True, True, False]  # a url: target is out of reach
    s = sc.parse(BASE + "profile: {targets: [b]}\n")
    assert [s.profile_of(t) is not None for t in s.targets] == [False, True, False] and s.profile.prompt_tokens == [4096]
    assert not any(sc.parse(BASE).profile_of(t) for t in sc.parse(BASE).targets)


@pytest.mark.parametrize("section, says", [
    ("profile: {targets: [zz]}", "profile.targets: no target named zz"),
    ("profile: {targets: [c]}", "profile.targets: c not served by ctxload"),
    ("profile: {decode_steps: 0}", "profile.decode_steps: Input should be greater than 0"),
    ("profile: {prompt_tokens: []}", "profile.prompt_tokens"),
    ("profile: {keep: true}", "profile.keep: unknown field"),
])
def test_a_bad_profile_section_is_one_line_naming_the_field(section, says):
    with pytest.raises(sc.ScenarioError) as e:
        sc.parse(BASE + section + "\n", "s.yaml")
    assert says in str(e.value) and str(e.value).startswith("s.yaml:")


def test_a_profiled_server_starts_with_its_profiler_ready(tmp_path):
    s = sc.parse(BASE)
    ssm = targets.command(s.targets[0], "/models/m", 8000, tmp_path / "tr")
    assert ssm[ssm.index("--profile-dir") + 1] == str((tmp_path / "tr").resolve())
    assert "--profile-dir" not in targets.command(s.targets[0], "/models/m", 8000)
    vllm = targets.command(s.targets[1], "tiny-llama", 8000, tmp_path / "tr")
    config = json.loads(vllm[vllm.index("--profiler-config") + 1])
    assert config == {"profiler": "torch", "torch_profiler_dir": str((tmp_path / "tr").resolve()),
                      "torch_profiler_with_stack": False, "ignore_frontend": True,
                      "torch_profiler_dump_cuda_time_total": False}
    assert "--profiler-config" not in targets.command(s.targets[1], "tiny-llama", 8000)
    assert targets.trace_dir(tmp_path, "b") == tmp_path / "profiles" / "b"


def test_vllm_profiler_records_a_bounded_number_of_steps(tmp_path):
    # the profile pass bounds each start (vLLM's max_iterations): the longest prompt's prefill
    # in chunks of the server's step (tiny-llama on CPU: 2048 tokens), or twice the decode steps
    s = sc.parse(BASE + "profile: {prompt_tokens: [1000, 20000], decode_steps: 4}\n")
    b = s.targets[1]

    def config(target):
        cmd = targets.command(target, "tiny-llama", 8000, tmp_path / "tr", s.profile_of(target))
        return json.loads(cmd[cmd.index("--profiler-config") + 1]), cmd

    cfg, cmd = config(b)
    assert cfg["max_iterations"] == 10 + 8  # ⌈20000 / 2048⌉ = 10 chunks > 2 × 4 decode steps
    assert profiling.trace_steps(4096, 16, 8192) == 32 + 8
    # a target's own --max-num-batched-tokens (later, so it wins) sets the chunk; its own
    # --profiler-config still comes after ctxload's
    own = b.model_copy(update={"serve": b.serve.model_copy(update={"args": ["--max-num-batched-tokens=512"]})})
    cfg, cmd = config(own)
    assert cfg["max_iterations"] == 40 + 8 and cmd[-1] == "--max-num-batched-tokens=512"
    assert cmd.index("--profiler-config") < len(cmd) - 1


def test_the_decode_request_asks_for_room_to_spare():
    assert profiling.decode_tokens(16) == 320  # no room known: the least
    assert profiling.decode_tokens(16, room=1535) == 1535
    assert profiling.decode_tokens(16, room=10**6) == profiling.DECODE_ASK
    assert profiling.decode_tokens(16, room=100) == 320  # the runner refuses such a length first


def test_a_line_of_operators_jsonl_from_a_real_trace(tmp_path):
    # vLLM on CPU, tiny Mamba2: a 400-token prefill and 7 decode steps, each step annotated
    table = traces.kernel_table(TRACE)
    assert table["steps"] == 8  # 1 prefill + 7 decode steps; the empty step does not count
    f = tmp_path / TRACE.name
    shutil.copy(TRACE, f)
    (tmp_path / "rank0.profiler_out.txt").write_text("a summary table, not a trace")
    w = profiling.Window(ttft_s=0.05, steps=5, steps_source="stream", completion_tokens=9)
    line = profiling.line("t", "vllm", 400, "decode", window=w, files=[f, tmp_path / "rank0.profiler_out.txt"])
    assert (line["steps"], line["steps_source"]) == (8, "trace")  # the engine's marks beat the stream
    assert line["device"] == "cpu" and line["kernels"] == table["kernels"]
    assert line["total_s"] == pytest.approx(table["total_s"])
    w = profiling.Window(steps=3, steps_source="server")
    assert profiling.line("t", "ssm-server", 400, "decode", window=w, files=[f])["steps"] == 3
    kept = profiling.keep_or_delete([f], keep=True, into=tmp_path / "kept")
    assert kept == [str(tmp_path / "kept" / f.name)] and not f.exists()
    empty = profiling.line("t", "vllm", 9999, "prefill", error="not profiled: too long")
    assert empty["kernels"] == [] and empty["device"] is None and empty["error"] == "not profiled: too long"



def test_a_decode_window_that_missed_its_stream_is_tried_again(tmp_path):
    """The retry's rule alone (the race it covers needs a busy machine): a request that ended
    before the profiler started is tried again, up to three times in all, then reported."""
    calls = []

    class Flaky(profiling.Profiler):
        def _decode_once(self, prompt, steps, prefix, room):
            calls.append(prefix)
            if len(calls) < self.fails + 1:
                raise profiling.EndedEarly("the stream ended before the profiler had started")
            return profiling.Window(steps=steps), []

    p = Flaky("http://127.0.0.1:9", "m", tmp_path)
    p.fails = 2
    assert p.decode("x", 4, "t").__getitem__(0).steps == 4 and len(calls) == 3
    calls.clear()
    p.fails = 3
    with pytest.raises(profiling.EndedEarly):
        p.decode("x", 4, "t")
    assert len(calls) == 3
