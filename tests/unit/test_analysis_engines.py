"""Which engine served each target, from ssm-server's ``ssm:engine_info`` gauge or the launch
arguments, and the tables and legends that name it."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis import engines as eng
from analysis import plots, tables
from analysis.analyze import analyze
from analysis.records import RunData, Scrape


def run_of(targets: list[dict], gpus=True, scrapes=()) -> RunData:
    env = {"targets": targets, "gpus": [{"name": "NVIDIA H200"}] if gpus else []}
    return RunData(run_dir=Path("."), env=env, scrapes=list(scrapes))


VLLM = ["-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--gpu-memory-utilization", "0.170"]
SSM = ["-m", "servers.ssm_server", "--model", "m", "--device", "cuda:0"]


@pytest.mark.parametrize("target, gpus, label, klass", [
    (dict(engine="vllm", launch_args=VLLM), True, "vLLM", eng.SERVING),
    (dict(engine="vllm", launch_args=VLLM + ["--enforce-eager"]), True, "vLLM (enforce-eager)", eng.EAGER),
    (dict(engine="vllm", launch_args=VLLM + ["--enforce-eager"]), False, "vLLM (CPU)", eng.CPU),
    (dict(engine="ssm-server", launch_args=SSM + ["--backend", "hf"], preset="mamba2-780m"), True,
     "ssm-server (transformers, eager)", eng.EAGER),
    (dict(engine="ssm-server", launch_args=SSM + ["--backend=mamba_ssm"]), True, "ssm-server (native)", eng.SERVING),
    (dict(engine="ssm-server", launch_args=SSM, preset="mamba2-780m"), True,
     "ssm-server (backend unknown)", eng.UNKNOWN),
    (dict(engine="ssm-server", launch_args=SSM, preset="qwen2.5-0.5b"), True,
     "ssm-server (transformers, eager)", eng.EAGER),
    (dict(engine="ssm-server", launch_args=["-m", "servers.ssm_server", "--model", "m"]), False,
     "ssm-server (transformers, CPU)", eng.CPU),
    (dict(engine="synthetic", launch_args=None), True, "synthetic", eng.SYNTHETIC),
])
def test_engine_from_launch_args(target, gpus, label, klass):
    e = eng.identify(run_of([dict(name="t", family="ssm", **target)], gpus))["t"]
    assert (e.label, e.klass) == (label, klass)


def test_engine_info_gauge_wins_over_launch_args():
    info = lambda backend, t: Scrape(time=t, target="m", source="server", stage=None, ok=True,  # noqa: E731
                                     samples=[("ssm:engine_info", {"model_name": "m", "backend": backend,
                                               "device": "cuda:0", "dtype": "bfloat16", "cuda_graphs": "true"}, 1.0)])
    run = run_of([dict(name="m", family="ssm", engine="ssm-server", launch_args=SSM, preset="mamba2-780m")],
                 scrapes=[info("hf", 2.0), info("mamba_ssm", 1.0)])
    e = eng.identify(run)["m"]
    assert (e.label, e.klass, e.source) == ("ssm-server (transformers, eager)", eng.EAGER, "ssm:engine_info")
    assert eng.tag("m", {"m": e}) == "m · ssm-server (transformers, eager) ⚠"


def test_comparable_says_why():
    e = {"a": eng.Engine("vllm", "vLLM", eng.SERVING, ""),
         "b": eng.Engine("ssm-server", "ssm-server (transformers, eager)", eng.EAGER, ""),
         "c": eng.Engine("ssm-server", "ssm-server (native)", eng.SERVING, "")}
    assert eng.comparable("a", "c", e) == (True, "yes — both serving engine")
    assert eng.comparable("b", "a", e) == (False, "no — eager research path vs serving engine")


def test_ssm_server_exports_engine_info(tmp_path):
    from loadgen.scrape import parse
    from servers.ssm_server.cli import build_server
    from servers.ssm_server.config import ServerConfig
    from tests.conftest import build_tiny

    for cfg, backend in ((ServerConfig(engine="synthetic", served_model_name="syn"), "synthetic"),
                         (ServerConfig(model=str(build_tiny("tiny-mamba2")), served_model_name="tm",
                                       max_num_seqs=2), "hf")):
        server = build_server(cfg)
        samples = [s for s in parse(server.metrics.render().decode()) if s["name"] == "ssm:engine_info"]
        assert len(samples) == 1 and samples[0]["value"] == 1
        labels = samples[0]["labels"]
        assert labels["backend"] == backend and labels["model_name"] == cfg.served_model_name
        assert labels["device"] == "cpu" and labels["cuda_graphs"] == "false"
    assert labels["dtype"] == "float32"


def test_tables_and_legend_name_the_engine(tmp_path):
    from analysis import synthetic
    from analysis.records import load_run

    a = analyze(load_run(synthetic.write(tmp_path / "syn")))
    lat = tables.latency(a)
    assert all(" · synthetic" in row[0] for row in lat.rows)
    cross = tables.crossovers(a)
    assert cross.headers[-1] == "comparable" and all(r[-1] == "yes — both synthetic (no model)" for r in cross.rows)
    fig = plots.latency_vs_prompt(a, "ttft")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels and all(" · synthetic (" in x for x in labels)
