"""Scenario validation: every shipped file loads; a mistake is reported by field path and line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loadgen import scenario as sc

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "scenarios").glob("*.yaml"))

GOOD = """\
name: t
targets:
  - name: a
    url: http://127.0.0.1:1
load:
  kind: context_sweep
  prompt_tokens: {start: 64, stop: 512}
"""


def test_all_required_scenarios_ship():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "context-sweep", "concurrency-sweep", "poisson", "max-context", "paper-4090", "paper-h200"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenarios_load_and_round_trip(path):
    s = sc.load(path)
    again = sc.parse(s.resolved_yaml())
    assert again == s


def test_defaults_are_filled_and_doubling_expands():
    s = sc.parse(GOOD)
    assert s.load.users == 1 and s.load.requests == 1
    assert sc.sweep_values(s.load.prompt_tokens) == [64, 128, 256, 512]
    assert s.targets[0].model == "a"
    assert s.prompt.kind == "synthetic" and s.prompt.unique_prefix


def test_demo_serves_one_tiny_model_per_family():
    from servers.presets import TINY_BY_FAMILY

    s = sc.load(REPO / "scenarios" / "demo.yaml")
    assert {t.serve.preset for t in s.targets} == set(TINY_BY_FAMILY.values())
    assert {t.family for t in s.targets} == set(TINY_BY_FAMILY)


def _error(text: str) -> str:
    with pytest.raises(sc.ScenarioError) as e:
        sc.parse(textwrap.dedent(text), "x.yaml")
    return str(e.value)


def test_unknown_field_names_path_and_line():
    msg = _error(GOOD.replace("    url:", "    colour: red\n    url:"))
    assert "x.yaml:4: targets.0.colour: unknown field" in msg


def test_bad_value_deep_in_a_variant_names_its_line():
    msg = _error(GOOD + "  users: 0\n")
    assert "x.yaml:8: load.users" in msg and "greater than 0" in msg


def test_unknown_kind_is_named():
    msg = _error(GOOD.replace("context_sweep", "context_sweeep"))
    assert "x.yaml:6: load" in msg and "context_sweep" in msg


def test_url_and_serve_are_exclusive():
    msg = _error(GOOD.replace("    url: http://127.0.0.1:1\n",
                              "    url: http://127.0.0.1:1\n    serve: {engine: vllm, preset: tiny-llama}\n"))
    assert "x.yaml:3: targets.0" in msg and "exactly one of `url` or `serve`" in msg


def test_unknown_preset_lists_known_ones():
    msg = _error(GOOD.replace("url: http://127.0.0.1:1", "serve: {engine: ssm-server, preset: nope}"))
    assert "targets.0.serve" in msg and "tiny-mamba2" in msg


def test_stop_below_start_and_duplicate_names():
    assert "`stop` must be >= `start`" in _error(GOOD.replace("stop: 512", "stop: 32"))
    dup = GOOD.replace("load:", "  - name: a\n    url: http://127.0.0.1:2\nload:")
    assert "repeated: a" in _error(dup)


def test_yaml_syntax_error_has_line():
    assert _error("name: t\ntargets: [\n") .startswith("x.yaml:3: not valid YAML")


def test_cli_reports_field_and_line_with_exit_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("  prompt_tokens:", "  max_tokenz: 3\n  prompt_tokens:"))
    p = subprocess.run([sys.executable, "-m", "ctxload", "run", str(bad)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"{bad}:7: load.max_tokenz: unknown field" in p.stderr
    assert "Traceback" not in p.stderr


def test_memory_budget_is_a_size_named_when_wrong_and_inherited_by_served_targets():
    msg = _error(GOOD.replace("name: t\n", "name: t\nmemory_budget: lots\n"))
    assert "x.yaml:2: memory_budget" in msg and "not a memory size" in msg
    s = sc.parse(GOOD.replace("name: t\n", "name: t\nmemory_budget: 24GiB\n").replace(
        "    url: http://127.0.0.1:1\n", "    serve: {engine: vllm, preset: tiny-llama}\n"
        "  - name: b\n    serve: {engine: ssm-server, preset: tiny-mamba2, memory_budget: 2GB}\n"))
    assert [t.serve.memory_budget_bytes() for t in s.targets] == [24 << 30, 2_000_000_000]
    assert not s.keep_targets_resident  # one target at a time unless asked


def test_a_served_target_names_its_gpus():
    def serve(spec: str) -> str:
        return GOOD.replace("    url: http://127.0.0.1:1\n", f"    serve: {spec}\n")

    s = sc.parse(serve("{engine: vllm, preset: qwen2.5-0.5b, gpus: [0, 1], parallel: data}"))
    assert s.targets[0].serve.gpus == [0, 1] and s.targets[0].serve.parallel == "data"
    assert sc.parse(serve("{engine: vllm, preset: qwen2.5-0.5b}")).targets[0].serve.gpus is None
    msg = _error(serve("{engine: ssm-server, preset: mamba2-780m, gpus: [0, 1]}"))
    assert "x.yaml:4: targets.0.serve: ssm-server runs on one GPU; `gpus` lists 2: give one index" in msg
    assert "lists GPU 1 twice" in _error(serve("{engine: vllm, preset: qwen2.5-0.5b, gpus: [1, 1]}"))
    assert "lists no GPU" in _error(serve("{engine: vllm, preset: qwen2.5-0.5b, gpus: []}"))
    assert "targets.0.serve.gpus.0" in _error(serve("{engine: vllm, preset: qwen2.5-0.5b, gpus: [-1]}"))
    assert "targets.0.serve.parallel" in _error(serve("{engine: vllm, preset: qwen2.5-0.5b, parallel: pipe}"))


def test_more_loads_after_the_first_and_a_targets_own_lengths():
    s = sc.parse(GOOD.replace("    url: http://127.0.0.1:1\n", "    url: http://127.0.0.1:1\n"
                              "    prompt_tokens: [64, 128]\n    max_prompt_tokens: 100000\n")
                 + "then:\n  - {kind: max_context, max_tokens: 4096}\n")
    assert [type(x).__name__ for x in s.loads()] == ["ContextSweep", "MaxContext"]
    assert s.targets[0].prompt_tokens == [64, 128] and s.targets[0].max_prompt_tokens == 100000
    msg = _error(GOOD + "then:\n  - {kind: max_context, max_tokenz: 4096}\n")
    assert "x.yaml:9: then.0.max_tokenz: unknown field" in msg


def test_every_load_kind_owns_its_stages():
    """Stages, warm-up and the requests a finished stage holds come from the load kind itself:
    a resumed run asks each load of the scenario, and a label not its own is None."""
    s = sc.parse("""name: k
targets: [{name: a, url: "http://127.0.0.1:1"}]
load: {kind: context_sweep, prompt_tokens: [64, 128], requests: 2, warmup_requests: 1}
then:
  - {kind: concurrency_sweep, prompt_tokens: 64, users: [1, 2], duration_s: 5}
  - {kind: poisson, rate: [1], mix: [{prompt_tokens: 96}], requests: 4}
  - {kind: conversation, conversations: 2, turns: 3, first_tokens: 200}
  - {kind: max_context, min_tokens: 64, max_tokens: 256, requests_per_probe: 2}
""")
    sweep, conc, pois, conv, maxc = s.loads()
    assert [x.label for x in sweep.stages()] == ["prompt=64", "prompt=128"]
    assert [x.label for x in conc.stages()] == ["users=1", "users=2"]
    assert [x.label for x in pois.stages()] == ["rate=1"] and next(iter(maxc.stages())).label == "probe=64"
    assert sweep.warmup().requests == 1 and sweep.warmup().prompt_tokens == 64
    assert conc.warmup() is None and maxc.warmup() is None  # no warm-up asked; a search has none
    assert [sweep.planned_requests("prompt=128"), conc.planned_requests("users=2"), pois.planned_requests("rate=1"),
            conv.planned_requests("conversation"), maxc.planned_requests("probe=512")] == [2, 1, 4, 6, 2]
    for load in s.loads():  # each answers for its own labels only
        others = {"prompt=64", "users=1", "rate=1", "conversation", "probe=64"} - {next(iter(load.stages())).label}
        assert all(load.planned_requests(label) is None for label in others), type(load).__name__
    t = sc.parse("""name: k
targets: [{name: a, url: "http://127.0.0.1:1", prompt_tokens: [32]}]
load: {kind: context_sweep, prompt_tokens: [64, 128]}
""")
    assert [x.label for x in t.load.for_target(t.targets[0]).stages()] == ["prompt=32"]
