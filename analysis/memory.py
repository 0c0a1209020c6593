"""Memory and energy from the metric scrapes, and per-token/per-sequence state sizes.

Device memory comes from the server's gauge ``ssm:device_memory_allocated_bytes`` or, failing
that, the GPU exporter's ``DCGM_FI_DEV_FB_USED`` (MiB). A scrape is placed at a prompt length
by its ``stage`` label, else by the requests of its target in flight at its time. KV bytes per
token (attention) and state bytes per sequence (SSM) come from the server's gauges when
present, else from the model preset's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import bisect

from analysis.records import RunData, Scrape, TimeIndex
from analysis.scaling import Fit, fit_poly

SERVER_MEMORY = "ssm:device_memory_allocated_bytes"
GPU_MEMORY = "DCGM_FI_DEV_FB_USED"  # MiB
GPU_TOTAL_MEMORY_FREE = "DCGM_FI_DEV_FB_FREE"  # MiB
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # mJ, a counter
POWER = "DCGM_FI_DEV_POWER_USAGE"  # W
STATE_BYTES = "ssm:state_bytes_per_sequence"
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1,
               "float8": 1, "auto": 2}
PAPER_BUDGET_BYTES = 24 * 10**9  # RTX 4090, the paper's budget


def sample_value(s: Scrape, name: str, agg=max) -> float | None:
    vals = [v for n, _, v in s.samples if n == name]
    return agg(vals) if vals else None


def memory_of(s: Scrape) -> tuple[float, str] | None:
    """Device memory of one scrape in bytes, and where it came from. A zero reading is no
    reading: on a CPU the server's device gauges stay at 0."""
    v = sample_value(s, SERVER_MEMORY)
    if v:
        return v, "server"
    v = sample_value(s, GPU_MEMORY, sum)
    if v:
        return v * 2**20, "gpu"
    return None


def _stage_lengths(run: RunData) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(prompt length, first send, last end) of each target × stage of the context sweep."""
    by: dict[tuple[str, str], list] = {}
    for r in run.requests:
        if r.prompt_length is not None and run.in_sweep(r):
            by.setdefault((r.target, r.stage), []).append(r)
    out = {}
    for k, rs in by.items():
        starts = [r.start_time for r in rs if r.start_time is not None]
        ends = [r.end_time for r in rs if r.end_time is not None]
        out[k] = (int(np.median([r.prompt_length for r in rs])),
                  min(starts) if starts else float("-inf"), max(ends) if ends else float("inf"))
    return out


STAGE_SLACK_S = 2.0
"""A scrape labelled with a stage counts for a target only within this many seconds of the
target's own requests of that stage (the label is the run's current stage, whichever
target is running it)."""


def _attribute(run: RunData, s: Scrape, stage_len, index: TimeIndex) -> tuple[str | None, int | None]:
    """(target, prompt length) a scrape belongs to, or None where it cannot be placed."""
    targets = run.targets()
    target = s.target if s.target in targets else None
    if target and s.stage:
        st = stage_len.get((target, s.stage))  # None: not a context-sweep stage of this target
        if st and st[1] - STAGE_SLACK_S <= s.time <= st[2] + STAGE_SLACK_S:
            return target, st[0]
        return target, None
    active = [r for r in index.overlapping(s.time - 0.5, s.time) if run.in_sweep(r)
              and (target is None or r.target == target) and r.prompt_length is not None]
    if not active:
        return target, None
    owners = {r.target for r in active}
    if target is None and len(owners) != 1:
        return None, None  # a shared GPU while several targets ran: cannot split it
    return (target or owners.pop()), max(r.prompt_length for r in active)


@dataclass
class MemoryCurve:
    target: str
    family: str
    source: str
    lengths: list[int]
    peak_bytes: list[float]
    baseline_bytes: float | None
    """Smallest reading of the run (weights and runtime before context): what the
    context does not pay for."""
    fit: Fit | None


def memory_curves(run: RunData) -> list[MemoryCurve]:
    stage_len = _stage_lengths(run)
    per: dict[str, dict[int, float]] = {}
    base: dict[str, float] = {}
    src: dict[str, str] = {}
    index = TimeIndex(run.requests)
    for s in run.scrapes:
        if not s.ok:
            continue
        m = memory_of(s)
        if m is None:
            continue
        target, n = _attribute(run, s, stage_len, index)
        if target is None:
            continue
        base[target] = min(base.get(target, m[0]), m[0])
        src.setdefault(target, m[1])
        if n is not None:
            per.setdefault(target, {})
            per[target][n] = max(per[target].get(n, 0.0), m[0])
    out = []
    for t in run.targets():
        if t not in per and t not in base:
            continue
        d = per.get(t, {})
        ns = sorted(d)
        out.append(MemoryCurve(t, run.family_of(t), src.get(t, "?"), ns, [d[n] for n in ns],
                               base.get(t), fit_poly(ns, [d[n] for n in ns], 1)))
    return out


def budget_bytes(run: RunData) -> tuple[float, str]:
    """The memory budget: the scenario's, else the first GPU's total, else the paper's 24 GB."""
    sc = run.scenario
    for holder in (sc, sc.get("analysis") or {}):
        if isinstance(holder, dict):
            for key, mult in (("memory_budget_bytes", 1), ("memory_budget_gb", 1e9),
                              ("memory_budget_gib", 2**30)):
                v = holder.get(key)
                if isinstance(v, (int, float)) and v > 0:
                    return float(v) * mult, f"scenario {key}"
    gpus = run.env.get("gpus") or []
    if gpus and isinstance(gpus[0], dict) and gpus[0].get("memory_total_bytes"):
        return float(gpus[0]["memory_total_bytes"]), f"GPU {gpus[0].get('name', '?')}"
    return float(PAPER_BUDGET_BYTES), "the paper's 24 GB (no GPU in env.json)"


# ---- sizes from the model config ---------------------------------------------------------


def _preset_of(run: RunData, target: str):
    name = run.target_info(target).get("preset")
    if not name:
        return None
    try:
        from servers import presets
        return presets.get(name)
    except Exception:  # unknown or unimportable preset: sizes from gauges only
        return None


def kv_bytes_per_token(cfg: dict[str, Any], model_type: str, dtype_bytes: int) -> int | None:
    """2 × attention layers × KV heads × head dim × dtype bytes; None without attention."""
    if model_type in ("mamba", "mamba2"):
        return None
    layers = int(cfg.get("num_hidden_layers", 0))
    if model_type == "zamba2":
        lt = cfg.get("layers_block_type") or []
        layers = sum(1 for x in lt if x == "hybrid") or layers
    heads = int(cfg.get("num_attention_heads", 0))
    kv = int(cfg.get("num_key_value_heads", heads) or heads)
    hd = cfg.get("head_dim") or (int(cfg.get("hidden_size", 0)) // heads if heads else 0)
    return 2 * layers * kv * int(hd) * dtype_bytes if layers and kv and hd else None


def state_bytes_per_sequence(cfg: dict[str, Any], model_type: str, dtype_bytes: int) -> int | None:
    """Conv state + SSM state of every Mamba layer, per sequence (constant in length)."""
    layers = int(cfg.get("num_hidden_layers", 0))
    h = int(cfg.get("hidden_size", 0))
    if model_type == "mamba":
        inner = int(cfg.get("expand", 2)) * h
        return layers * inner * (int(cfg.get("state_size", 16)) + int(cfg.get("conv_kernel", 4))) * dtype_bytes
    if model_type == "mamba2":
        nh, hd, n = int(cfg.get("num_heads", 0)), int(cfg.get("head_dim", 64)), int(cfg.get("state_size", 128))
        inner = nh * hd
        conv_dim = inner + 2 * int(cfg.get("n_groups", 1)) * n
        return layers * (nh * hd * n + conv_dim * int(cfg.get("conv_kernel", 4))) * dtype_bytes
    if model_type in ("falcon_h1", "zamba2"):
        if model_type == "falcon_h1":
            nh, hd = int(cfg.get("mamba_n_heads", 0)), int(cfg.get("mamba_d_head", 64))
            n, g = int(cfg.get("mamba_d_state", 128)), int(cfg.get("mamba_n_groups", 1))
        else:
            nh, hd = int(cfg.get("n_mamba_heads", 0)), int(cfg.get("mamba_headdim", 64))
            n, g = int(cfg.get("mamba_d_state", 64)), int(cfg.get("mamba_ngroups", 1))
        conv_dim = nh * hd + 2 * g * n
        return layers * (nh * hd * n + conv_dim * int(cfg.get("mamba_d_conv", 4))) * dtype_bytes
    return None


@dataclass
class StateSizes:
    target: str
    family: str
    kv_bytes_per_token: int | None
    state_bytes_per_sequence: float | None
    source: str


def state_sizes(run: RunData) -> list[StateSizes]:
    measured: dict[str, float] = {}
    for s in run.scrapes:
        v = sample_value(s, STATE_BYTES)
        if v and s.target in run.targets():  # 0: the target has no SSM state
            measured[s.target] = v
    out = []
    for t in run.targets():
        p = _preset_of(run, t)
        kv = st = None
        src = []
        if p is not None:
            b = DTYPE_BYTES.get(p.dtype, 2)
            kv = kv_bytes_per_token(dict(p.config), p.model_type, b)
            st = state_bytes_per_sequence(dict(p.config), p.model_type, b)
            src.append(f"config of {p.name} ({p.dtype})")
        if t in measured:
            st = measured[t]
            src.append(f"{STATE_BYTES} gauge")
        if kv is None and st is None:
            continue
        out.append(StateSizes(t, run.family_of(t), kv, st, "; ".join(src)))
    return out


# ---- energy ------------------------------------------------------------------------------


@dataclass
class Energy:
    target: str
    stage: str
    prompt_tokens: int | None
    requests: int
    joules: float
    per_request_j: float
    source: str


def energy_per_request(run: RunData) -> list[Energy]:
    """GPU energy over each target × stage window, divided by its ok requests.

    The energy counter's increase over the window when exported, else power integrated over
    time (trapezoids). A GPU shared by targets running at once cannot be split: such windows
    are skipped.
    """
    gpu = sorted((s for s in run.scrapes if s.ok and s.source == "gpu"), key=lambda s: s.time)
    if not gpu:
        return []
    gpu_times = [s.time for s in gpu]
    index = TimeIndex(run.requests)
    targets = set(run.targets())
    groups: dict[tuple[str, str], list] = {}
    for r in run.requests:
        if r.start_time is not None and r.end_time is not None:
            groups.setdefault((r.target, r.stage), []).append(r)
    out = []
    for (t, stage), reqs in groups.items():
        lo, hi = min(r.start_time for r in reqs), max(r.end_time for r in reqs)
        others = [r for r in index.overlapping(lo, hi) if r.target != t
                  and r.start_time < hi and r.end_time > lo]
        ok = sum(r.ok for r in reqs)
        if others or not ok:
            continue
        i, j = bisect.bisect_left(gpu_times, lo - 1.0), bisect.bisect_right(gpu_times, hi + 1.0)
        win = [s for s in gpu[i:j] if s.target == t or s.target not in targets]
        e = [(s.time, sample_value(s, ENERGY, sum)) for s in win]
        e = [(x, v) for x, v in e if v is not None]
        joules, source = None, ""
        if len(e) >= 2 and e[-1][1] >= e[0][1]:
            joules, source = (e[-1][1] - e[0][1]) / 1e3, ENERGY
        else:
            p = [(s.time, sample_value(s, POWER, sum)) for s in win]
            p = [(x, v) for x, v in p if v is not None]
            if len(p) >= 2:
                xs, ys = np.array([x for x, _ in p]), np.array([v for _, v in p])
                joules, source = float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs))), POWER
        if joules is None:
            continue
        n = int(np.median([r.prompt_length for r in reqs if r.prompt_length is not None] or [0]))
        out.append(Energy(t, stage, n or None, ok, joules, joules / ok, source))
    return out
