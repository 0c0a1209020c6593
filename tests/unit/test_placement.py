"""Which targets run at the same time (`placement: by_gpu`): waves of targets on GPUs of their
own, formed in scenario order; and how a scrape names the stages running when several do."""

from __future__ import annotations


import pytest

from loadgen import placement
from loadgen import scenario as sc
from loadgen.scrape import stage_fields

G = frozenset


@pytest.mark.parametrize("gpus, waves", [
    ([G({0}), G({1})], [[0, 1]]),                                # the two targets: at once
    ([G({0}), G({0})], [[0], [1]]),                              # one GPU shared: in turn
    ([G({0, 1}), G({2}), G({1}), G({3})], [[0, 1], [2, 3]]),     # GPU 1 taken: a new wave
    ([G({0}), None, G({1})], [[0], [1], [2]]),                   # no GPUs named: shares everything
    ([None, G({0}), G({1})], [[0], [1, 2]]),
    ([G({0}), G({1}), G({0})], [[0, 1], [2]]),                   # scenario order kept, not packed
    ([], []),
])
def test_waves_keep_order_and_put_only_disjoint_gpus_together(gpus, waves):
    assert placement.waves(gpus) == waves


SCEN = """\
name: t
{placement}targets:
  - {{name: a, serve: {{engine: ssm-server, preset: tiny-llama, gpus: [0]}}}}
  - {{name: b, serve: {{engine: ssm-server, preset: tiny-mamba2, gpus: [{b}]}}}}
  - {{name: c, url: "http://127.0.0.1:1", family: ssm}}
load: {{kind: context_sweep, prompt_tokens: [64]}}
"""


def _names(s: sc.Scenario) -> list[list[str]]:
    return [[t.name for t in w] for w in s.waves()]


def test_by_gpu_runs_disjoint_targets_together_and_serial_stays_the_default():
    s = sc.parse(SCEN.format(placement="", b=1))
    assert s.placement == "serial" and _names(s) == [["a"], ["b"], ["c"]]
    assert "placement: serial" in s.resolved_yaml()
    s = sc.parse(SCEN.format(placement="placement: by_gpu\n", b=1))
    assert _names(s) == [["a", "b"], ["c"]]  # a URL target shares everything: alone


def test_by_gpu_that_cannot_help_is_refused_naming_the_field():
    with pytest.raises(sc.ScenarioError) as e:
        sc.parse(SCEN.format(placement="placement: by_gpu\n", b=0), "x.yaml")
    assert str(e.value) == ("x.yaml:2: placement: by_gpu runs targets on GPUs of their own at once, but no two "
                            "targets here have disjoint `serve.gpus`: give them their GPUs, or leave placement out "
                            "(serial)")
    with pytest.raises(sc.ScenarioError, match=r"x.yaml:2: placement"):
        sc.parse(SCEN.format(placement="placement: gpu\n", b=1), "x.yaml")


def test_a_scrape_names_one_running_stage_as_before_and_several_by_target():
    one = {"stage": "prompt=64", "stage_target": "a", "stage_index": 3, "resident": {}}
    assert stage_fields(one, "gpu") == {"stage": "prompt=64", "stage_target": "a", "stage_index": 3}
    assert stage_fields({"stages": {}}, "a") == {"stage": None, "stage_target": None, "stage_index": None}
    alone = {"stages": {"b": {"stage": "warmup", "stage_index": 1}}}
    assert stage_fields(alone, "gpu") == {"stage": "warmup", "stage_target": "b", "stage_index": 1}
    both = {"stages": {"a": {"stage": "prompt=64", "stage_index": 2}, "b": {"stage": "warmup", "stage_index": 1}}}
    assert stage_fields(both, "a") == {"stage": "prompt=64", "stage_target": "a", "stage_index": 2,
                                       "stages": both["stages"]}
    assert stage_fields(both, "gpu") == {"stage": None, "stage_target": None, "stage_index": None,
                                         "stages": both["stages"]}


def test_by_gpu_with_distributed_users_is_refused_before_anything_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "w.yaml"
    path.write_text(SCEN.format(placement="placement: by_gpu\n", b=1))
    p = subprocess.run([sys.executable, "-m", "ctxload", "run", str(path), "--processes", "2", "--runs-dir",
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [
        "ctxload run: placement: by_gpu runs the targets of a wave at once in this process; it cannot be "
        "combined with --processes or --external-workers (distributed users)"]
    assert not (tmp_path / "runs").exists()
