"""Memory and energy from the metric scrapes, and per-token/per-sequence state sizes.

Device memory comes from the server's gauge ``ssm:device_memory_allocated_bytes`` or, failing
that, the GPU exporter's ``DCGM_FI_DEV_FB_USED`` (MiB). A scrape is placed at a prompt length
by its ``stage`` label, else by the requests of its target in flight at its time. KV bytes per
token (attention) and state bytes per sequence (SSM) come from the server's gauges when
present, else from the model preset's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import bisect

from analysis.records import RunData, Scrape, TimeIndex
from analysis.scaling import Fit, fit_poly
from servers.sizes import kv_bytes_per_token, state_bytes_per_sequence  # noqa: F401 - re-exported: tests and callers read them here

SERVER_MEMORY = "ssm:device_memory_allocated_bytes"
SERVER_PEAK = "ssm:device_memory_peak_allocated_bytes"  # since the server started
GPU_MEMORY = "DCGM_FI_DEV_FB_USED"  # MiB
GPU_TOTAL_MEMORY_FREE = "DCGM_FI_DEV_FB_FREE"  # MiB
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # mJ, a counter
POWER = "DCGM_FI_DEV_POWER_USAGE"  # W
STATE_BYTES = "ssm:state_bytes_per_sequence"
SLOTS_TOTAL = "ssm:state_slots_total"
PROCESS_MEMORY = "ctxload:gpu_process_memory_used_bytes"  # the GPU exporter's, per pid
SERVER_RSS = "process_resident_memory_bytes"  # ssm-server's own process (CPU runs)
CACHE_PEAK = "ssm:cache_bytes_peak"  # the most KV + state its sequences held at once, since start
WEIGHT_BYTES = "ssm:weight_bytes"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"  # 0..1 of its KV blocks in use
VLLM_CACHE_INFO = "vllm:cache_config_info"  # labels: num_gpu_blocks, block_size, …
PAPER_BUDGET_BYTES = 24 * 10**9  # RTX 4090, the paper's budget


def sample_value(s: Scrape, name: str, agg=max) -> float | None:
    vals = [v for n, _, v in s.samples if n == name]
    return agg(vals) if vals else None


def per_gpu(s: Scrape, name: str, gpus: frozenset[str] | None = None) -> dict[str, float]:
    """A GPU exporter's samples named ``name``, by GPU (of ``gpus`` when given; a sample
    without a ``gpu`` label counts as GPU "" and only when no GPUs are asked for)."""
    out: dict[str, float] = {}
    for n, lab, v in s.samples:
        g = lab.get("gpu", "")
        if n == name and (gpus is None or g in gpus):
            out[g] = out.get(g, 0.0) + v
    return out


def memory_of(s: Scrape) -> tuple[float, str] | None:
    """Device memory of one scrape in bytes, and where it came from, for scrapes that hold one
    reading (a server's own gauge, or a device-wide exporter). A zero reading is no reading:
    on a CPU the server's device gauges stay at 0."""
    v = sample_value(s, SERVER_MEMORY)
    if v:
        return v, "server"
    v = sample_value(s, GPU_MEMORY, sum)
    if v:
        return v * 2**20, "gpu"
    return None


# Where a target's memory comes from, best first (DESIGN.md, "Measuring fairly"):
SOURCES = ("server", "cache", "vllm", "gpu process", "gpu", "process")
SOURCE_TEXT = {
    "server": "ssm-server's gauges: peak allocated (ssm:device_memory_peak_allocated_bytes) less the "
              "state slots of sequences not in flight",
    "vllm": "vLLM: weights + the KV cache and state of the sequences in flight (config sizes × their tokens; "
            "vllm:kv_cache_usage_perc × its KV capacity where a scrape caught one)",
    "cache": "ssm-server's own count where there is no device (a CPU run): its weights "
             "(ssm:weight_bytes) + the most KV cache and recurrent state its sequences held at once "
             "(ssm:cache_bytes_peak); activations and the runtime not included",
    "gpu process": "the GPU exporter's memory of the server's own processes",
    "gpu": "the GPU exporter's device-wide memory, while the target ran alone",
    "process": "the server process's resident memory (no device memory: a CPU run)",
}


@dataclass
class Reading:
    time: float
    target: str
    source: str
    bytes: float
    stage_index: int | None
    stage: str | None
    tagged: bool = False
    """The scrape says whose stage ran (newer runs): a reading outside its own target's stage
    is then placed at no prompt length, never guessed from the time."""


def kv_gauge_caveats(run: RunData) -> list[str]:
    """Where a vLLM KV-usage gauge counts more than KV: an SSM's or a hybrid's Mamba state lives
    in the same block pool, so ``vllm:kv_cache_usage_perc`` counts its state blocks too."""
    out = []
    for t in run.targets():
        if run.family_of(t) not in ("ssm", "hybrid") or run.target_info(t).get("engine") != "vllm":
            continue
        if any(sample_value(s, VLLM_KV_USAGE) for s in run.scrapes if s.target == t):
            out.append(f"{t}: vllm:kv_cache_usage_perc counts its Mamba state blocks with its KV blocks "
                       "(one pool): not read as KV cache; its memory is computed from config sizes × tokens")
    return out


def _vllm_bytes(run: RunData, target: str, s: Scrape) -> float | None:
    """Weights + KV cache in use of a vLLM server, from one scrape of its ``/metrics`` that
    caught a request in flight (the gauge is 0 between requests). Not for an SSM or a hybrid:
    the gauge counts their Mamba state blocks too (:func:`kv_gauge_caveats`)."""
    if run.family_of(target) in ("ssm", "hybrid"):
        return None
    usage = sample_value(s, VLLM_KV_USAGE)
    info = next((lab for n, lab, _ in s.samples if n == VLLM_CACHE_INFO), None)
    weights, per_token = _weight_bytes(run, target), kv_bytes_per_token_of(run, target)
    if not usage or not info or weights is None or not per_token:
        return None
    try:
        tokens = float(info.get("kv_cache_size_tokens") or
                       float(info["num_gpu_blocks"]) * float(info["block_size"]))
    except (KeyError, ValueError):
        return None
    return weights + usage * tokens * per_token


def _vllm_stage_bytes(run: RunData, target: str) -> list["Reading"]:
    """What each stage of a vLLM target needs, from its requests: weights + the KV cache of
    each request's tokens (prompt + output) + the recurrent state of each sequence in flight.
    vLLM's gauge reads 0 between requests, so a short stage is rarely caught by a scrape;
    where one was caught, the larger of the two counts."""
    p = preset_of(run, target)
    if p is None:
        return []
    per_token = p.kv_bytes_per_token() or 0
    state = p.state_bytes_per_sequence(conv_window=-1) or 0
    by: dict[int, list] = {}
    for r in run.requests:
        if r.target == target and r.ok and r.prompt_length is not None:
            by.setdefault(r.stage_index, []).append(r)
    out = []
    for index, rs in by.items():
        users = max(r.concurrency or 1 for r in rs)
        # a conversation's turn holds its whole history, not the new message's length
        tokens = max((r.prompt_tokens if r.turn is not None and r.prompt_tokens else r.prompt_length)
                     + (r.completion_tokens or 0) for r in rs)
        need = p.weight_bytes() + users * (tokens * per_token + state)
        out.append(Reading(max(r.start_time or 0.0 for r in rs), target, "vllm", float(need), index, rs[0].stage, True))
    return out


def _ssm_server_bytes(s: Scrape, users: int) -> float | None:
    """ssm-server's peak allocated memory less the state slots it holds for sequences that
    were not there (its pool is allocated up front for --max-num-seqs): what ``users``
    sequences needed."""
    peak = sample_value(s, SERVER_PEAK) or sample_value(s, SERVER_MEMORY)
    if not peak:
        return None
    slots, per_seq = sample_value(s, SLOTS_TOTAL) or 0.0, sample_value(s, STATE_BYTES) or 0.0
    return peak - max(0.0, slots - users) * per_seq


def readings(run: RunData) -> list[Reading]:
    """Every memory reading that belongs to one target, with the stage it was taken in.

    A server's scrape belongs to that server's target; a GPU exporter's per-process memory to
    the target whose process group holds the process; a device-wide reading only to the
    target that was alone on the device then (runs that do not record who was up: to the only
    target with requests in flight). Each goes to the stage its own target ran then (targets
    running at once: each one's own, from the scrape's ``stages``)."""
    targets = set(run.targets())
    out: list[Reading] = []
    index = None
    users: dict[tuple[str, int], int] = {}
    for r in run.requests:
        k = (r.target, r.stage_index)
        users[k] = max(users.get(k, 1), r.concurrency or 1)
    for t in targets:
        if run.target_info(t).get("engine") == "vllm":
            out += _vllm_stage_bytes(run, t)
    for s in run.scrapes:
        if not s.ok:
            continue
        tagged = s.resident is not None
        own_stage = lambda t: (s.stage_of(t) or (None, None)) + (tagged,)  # noqa: E731
        if s.target in targets and s.source != "gpu":
            # the peak since start: a sweep's lengths grow, so at a stage's end it is the most
            # that stage (or a shorter one) needed; the current reading where there is no peak
            v = _ssm_server_bytes(s, users.get((s.target, own_stage(s.target)[0]), 1))
            src = "server"
            if not v and sample_value(s, WEIGHT_BYTES):
                v, src = sample_value(s, WEIGHT_BYTES) + (sample_value(s, CACHE_PEAK) or 0.0), "cache"
            if not v:
                v, src = _vllm_bytes(run, s.target, s), "vllm"
            if not v and any(n.startswith("ssm:") for n, _, _ in s.samples):
                v, src = sample_value(s, SERVER_RSS), "process"  # ssm-server on a CPU
            if v:
                out.append(Reading(s.time, s.target, src, v, *own_stage(s.target)))
            continue
        if s.source != "gpu":
            continue
        if s.pids:
            per_pid: dict[int, float] = {}
            for n, lab, v in s.samples:
                if n == PROCESS_MEMORY and str(lab.get("pid", "")).isdigit():
                    per_pid[int(lab["pid"])] = per_pid.get(int(lab["pid"]), 0.0) + v
            for t, pids in s.pids.items():
                held = sum(per_pid.get(p, 0.0) for p in pids)
                if t in targets and held:
                    out.append(Reading(s.time, t, "gpu process", held, *own_stage(t)))
        if s.resident is not None:
            # a target's own GPUs, when every other server up then ran on others; else the
            # whole device, when it was the only server up
            for t in (x for x in s.resident if x in targets):
                others = [o for o in s.resident if o != t]
                if others and not all(run.apart(t, o) for o in others):
                    continue
                v = sum(per_gpu(s, GPU_MEMORY, run.gpus_of(t)).values())
                if v:
                    out.append(Reading(s.time, t, "gpu", v * 2**20, *own_stage(t)))
            continue
        v = sample_value(s, GPU_MEMORY, sum)
        if not v:
            continue
        index = index or TimeIndex(run.requests)
        owners = {r.target for r in index.overlapping(s.time - 0.5, s.time) if r.target in targets}
        if len(owners) == 1:
            out.append(Reading(s.time, owners.pop(), "gpu", v * 2**20, None, s.stage, False))
    return out


def _stage_lengths(run: RunData) -> dict[tuple[str, object], tuple[int, float, float]]:
    """(prompt length, first send, last end) of each target × stage of the context sweep, keyed
    by the stage's index and by its label."""
    by: dict[tuple[str, object], list] = {}
    for r in run.requests:
        if r.prompt_length is not None and run.in_sweep(r):
            by.setdefault((r.target, r.stage), []).append(r)
            by.setdefault((r.target, r.stage_index), []).append(r)
    out = {}
    for k, rs in by.items():
        starts = [r.start_time for r in rs if r.start_time is not None]
        ends = [r.end_time for r in rs if r.end_time is not None]
        out[k] = (int(np.median([r.prompt_length for r in rs])),
                  min(starts) if starts else float("-inf"), max(ends) if ends else float("inf"))
    return out


STAGE_SLACK_S = 2.0
"""Runs that do not record the stage's target: a scrape labelled with a stage counts for a
target only within this many seconds of the target's own requests of that stage."""


def _length(run: RunData, rd: Reading, stage_len, index: TimeIndex) -> int | None:
    """The prompt length a reading was taken at, or None (between stages, another target's)."""
    if rd.stage_index is not None or rd.tagged:
        st = stage_len.get((rd.target, rd.stage_index))
        return st[0] if st else None
    if rd.stage:
        st = stage_len.get((rd.target, rd.stage))
        if st and st[1] - STAGE_SLACK_S <= rd.time <= st[2] + STAGE_SLACK_S:
            return st[0]
        return None
    active = [r for r in index.overlapping(rd.time - 0.5, rd.time) if run.in_sweep(r)
              and r.target == rd.target and r.prompt_length is not None]
    return max(r.prompt_length for r in active) if active else None


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
    budget_bytes: float | None = None
    """The target's own memory budget (its ``serve.memory_budget``), when it had one."""


def memory_curves(run: RunData) -> list[MemoryCurve]:
    """Peak memory per prompt length of each target, from that target's best source."""
    stage_len = _stage_lengths(run)
    index = TimeIndex(run.requests)
    by: dict[str, dict[str, list[Reading]]] = {}
    for rd in readings(run):
        by.setdefault(rd.target, {}).setdefault(rd.source, []).append(rd)
    out = []
    for t in run.targets():
        have = by.get(t)
        if not have:
            continue
        src = next(x for x in SOURCES if x in have)
        per: dict[int, float] = {}
        for rd in have[src]:
            n = _length(run, rd, stage_len, index)
            if n is not None:
                per[n] = max(per.get(n, 0.0), rd.bytes)
        ns = sorted(per)
        out.append(MemoryCurve(t, run.family_of(t), src, ns, [per[n] for n in ns],
                               min(rd.bytes for rd in have[src]), fit_poly(ns, [per[n] for n in ns], 1),
                               budget_of(run, t)))
    return out


def budget_of(run: RunData, target: str) -> float | None:
    """A target's own memory budget in bytes: what it was served with (env.json), else its
    scenario's ``serve.memory_budget``; None when it had none."""
    v = run.target_info(target).get("memory_budget_bytes")
    if isinstance(v, (int, float)) and v > 0:
        return float(v)
    for t in run.scenario.get("targets") or []:
        if isinstance(t, dict) and t.get("name") == target and isinstance(t.get("serve"), dict):
            b = t["serve"].get("memory_budget")
            if b:
                from servers.sizes import parse_bytes

                try:
                    return float(parse_bytes(b))
                except ValueError:
                    return None
    return None


def budget_bytes(run: RunData) -> tuple[float, str]:
    """The run's memory budget: the targets' own when they share one, else the scenario's,
    else the first GPU's total, else the paper's 24 GB."""
    own = {budget_of(run, t) for t in run.targets()} - {None}
    if len(own) == 1:
        return float(own.pop()), "the targets' memory_budget"
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


def preset_of(run: RunData, target: str):
    """The model preset a target was served from (env.json's ``preset``), or None."""
    name = run.target_info(target).get("preset")
    if not name:
        return None
    try:
        from servers import presets
        return presets.get(name)
    except Exception:  # unknown or unimportable preset: sizes from gauges only
        return None


def _weight_bytes(run: RunData, target: str) -> float | None:
    p = preset_of(run, target)
    return float(p.weight_bytes()) if p is not None else None


def kv_bytes_per_token_of(run: RunData, target: str) -> int | None:
    p = preset_of(run, target)
    if p is None:
        return None
    return p.kv_bytes_per_token()


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
        p = preset_of(run, t)
        kv = st = None
        src = []
        if p is not None:
            kv, st = p.kv_bytes_per_token(), p.state_bytes_per_sequence()
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
    by_gpu: dict[str, float] | None = None
    """Joules per GPU (the exporter's ``gpu`` label) that the figure adds up: the target's own
    GPUs when it names them, else every GPU of the exporter."""


def _rise(points: list[tuple[float, dict[str, float]]]) -> dict[str, float] | None:
    """Per GPU, the energy counter's rise (mJ → J) between the first and last scrape."""
    if len(points) < 2:
        return None
    first, last = points[0][1], points[-1][1]
    out = {g: (last[g] - first[g]) / 1e3 for g in first if g in last}
    return out if out and all(v >= 0 for v in out.values()) else None


def _integral(points: list[tuple[float, dict[str, float]]]) -> dict[str, float] | None:
    """Per GPU, power (W) integrated over the scrapes' times (trapezoids), in J."""
    out = {}
    for g in {g for _, d in points for g in d}:
        p = [(x, d[g]) for x, d in points if g in d]
        if len(p) >= 2:
            xs, ys = np.array([x for x, _ in p]), np.array([v for _, v in p])
            out[g] = float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)))
    return out or None


def energy_per_request(run: RunData) -> list[Energy]:
    """GPU energy over each target × stage window, divided by its ok requests.

    The energy counter's increase over the window when exported, else power integrated over
    time (trapezoids), on the target's own GPUs when it names them (``gpus``), else on every
    GPU. A GPU shared by targets running at once cannot be split: such windows are skipped;
    targets on GPUs of their own may run at once.
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
                  and r.start_time < hi and r.end_time > lo and not run.apart(t, r.target)]
        ok = sum(r.ok for r in reqs)
        if others or not ok:
            continue
        i, j = bisect.bisect_left(gpu_times, lo - 1.0), bisect.bisect_right(gpu_times, hi + 1.0)
        win = [s for s in gpu[i:j] if s.target == t or s.target not in targets]
        mine = run.gpus_of(t)
        by_gpu, source = _rise([(s.time, e) for s in win if (e := per_gpu(s, ENERGY, mine))]), ENERGY
        if by_gpu is None:
            by_gpu, source = _integral([(s.time, p) for s in win if (p := per_gpu(s, POWER, mine))]), POWER
        if by_gpu is None:
            continue
        joules = sum(by_gpu.values())
        n = int(np.median([r.prompt_length for r in reqs if r.prompt_length is not None] or [0]))
        out.append(Energy(t, stage, n or None, ok, joules, joules / ok, source, by_gpu))
    return out
