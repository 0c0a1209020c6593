"""Synthetic but realistic run directories, for tests, benchmarks and trying the report.

Each family gets a TTFT law a + b·n + c·n² and a memory law weights + kv·n (constant for an
SSM), with multiplicative noise; a Transformer fails with ``oom`` beyond ``oom_at`` tokens.
Records follow docs/contracts.md §4 exactly, so the same readers serve real runs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEMA = 1


@dataclass(frozen=True)
class Law:
    family: str
    preset: str
    ttft: tuple[float, float, float]
    """a, b, c of TTFT(n) = a + b·n + c·n², seconds."""
    tpot: tuple[float, float]
    """a, b of TPOT(n) = a + b·n, seconds."""
    weights_bytes: float
    kv_bytes_per_token: float
    oom_at: int | None = None


DEFAULT_LAWS = (
    Law("transformer", "tiny-llama", (0.004, 2.0e-6, 4.0e-10), (0.002, 2.0e-8), 2.0e9, 12288, 40000),
    Law("ssm", "tiny-mamba2", (0.010, 4.0e-6, 0.0), (0.003, 0.0), 2.5e9, 0),
    Law("hybrid", "tiny-falcon-h1", (0.008, 3.0e-6, 1.5e-10), (0.003, 1.0e-8), 2.2e9, 4096),
)


@dataclass
class SyntheticRun:
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    per_stage: int = 4
    max_tokens: int = 16
    concurrency_levels: tuple[int, ...] = (1, 2, 4)
    laws: tuple[Law, ...] = DEFAULT_LAWS
    noise: float = 0.03
    seed: int = 0
    gpu: bool = True
    slos: dict = field(default_factory=lambda: {"ttft_s": 2.0, "tpot_s": 0.05})
    finished: bool = True
    profile: bool = True
    reuse: bool = True
    """A shared-prefix stage after the sweeps: groups of ``per_stage`` requests share all but
    256 tokens of their prompt; Transformers and hybrids find it cached after the first."""
    """Write operators.jsonl: a profile pass at the shortest and longest length (KERNELS)."""


#: A profile pass's kernels by family (names from an H200 trace, 2026-12-02): ``(name, s per
#: prompt token in a prefill, s per decode step)``. The SSM's scan takes 6 of its 8.5 ns a
#: token of prefill (71%); the Transformer's attention grows with the prompt (ATTN_S).
KERNELS = {
    "transformer": [("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 2.0e-9, 8.0e-4),
                    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<>>>",
                     0.0, 2.0e-4),
                    ("triton_per_fused_add_mul_rms_norm_1", 0.3e-9, 1.0e-4),
                    ("triton_poi_fused_mul_silu_slice_1", 0.3e-9, 1.0e-4)],
    "ssm": [("_chunk_scan_fwd_kernel", 3.0e-9, 0.0), ("_state_passing_fwd_kernel", 2.0e-9, 0.0),
            ("_causal_conv1d_fwd_kernel", 1.0e-9, 0.0), ("ssu", 0.0, 3.0e-4), ("conv_step", 0.0, 1.0e-4),
            ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", 2.0e-9, 8.0e-4),
            ("_layer_norm_fwd_1pass_kernel", 0.5e-9, 1.0e-4)],
    "hybrid": [("_chunk_scan_fwd_kernel", 1.5e-9, 0.0), ("ssu", 0.0, 1.5e-4),
               ("nvjet_sm90_tst_8x64_64x16_2x1_v_bz_TNN", 2.0e-9, 8.0e-4),
               ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<>>>",
                0.0, 1.0e-4),
               ("rms_norm_kernel", 0.3e-9, 1.0e-4)],
}
ATTN_S = 1.0e-14
"""A flash-attention prefill's seconds per prompt token squared."""
STEPS = 16


def operator_lines(spec: SyntheticRun) -> list[dict]:
    """operators.jsonl of a profile pass (docs/contracts.md) over ``spec``'s targets."""
    out = []
    for law in spec.laws:
        for n in sorted({spec.lengths[0], spec.lengths[-1]}):
            for phase in ("prefill", "decode"):
                kernels = []
                for name, per_token, per_step in KERNELS[law.family]:
                    t = per_token * n + (ATTN_S * n * n if "flash::" in name and phase == "prefill" else 0.0) \
                        if phase == "prefill" else per_step * STEPS
                    if t > 0:
                        kernels.append({"name": name, "count": 24 if phase == "prefill" else 24 * STEPS, "time_s": t})
                kernels.sort(key=lambda k: -k["time_s"])
                out.append(dict(schema_version=SCHEMA, time=1_700_000_000.0, target=law.preset, engine="synthetic",
                                prompt_tokens=n, phase=phase, device="cuda" if spec.gpu else "cpu",
                                total_s=sum(k["time_s"] for k in kernels), kernels=kernels,
                                steps=1 if phase == "prefill" else STEPS, steps_source="server", window_s=None,
                                ttft_s=None, e2e_s=None, completion_tokens=None, traces=[], error=None))
    return out


def rec_in_group(reqs: list[dict], target: str) -> bool:
    """Whether ``target`` already sent a request of the shared stage (its document is cached)."""
    return any(r["target"] == target and r["stage"] == "shared" for r in reqs)


def _record(rng, law, target, stage, index, n, conc, t0, max_tokens, noise, req_id, cached=None):
    a, b, c = law.ttft
    jitter = lambda: 1.0 + rng.uniform(-noise, noise)  # noqa: E731
    base = dict(schema_version=SCHEMA, request_id=req_id, target=target, model=target,
                family=law.family, engine="synthetic", stage=stage, stage_index=index,
                api="completions", prompt_tokens_requested=n, max_tokens=max_tokens,
                concurrency=conc, start_time=t0, worker="synthetic:1")
    if law.oom_at is not None and n > law.oom_at:
        base.update(prompt_tokens=None, completion_tokens=0, token_count_source="events",
                    ttft_s=None, itl_s=[], tpot_s=None, e2e_s=0.05, status="error",
                    http_status=500, error_kind="oom",
                    error_message=f"CUDA out of memory while allocating KV cache for {n} tokens")
        return base, 0.05
    slow = 1.0 + 0.3 * (conc - 1)
    m = n - (cached or 0)  # what the prefill computes
    ttft = (a + b * m + c * m * n) * jitter() * slow
    step = (law.tpot[0] + law.tpot[1] * n) * slow
    itl = [step * jitter() for _ in range(max_tokens - 1)]
    e2e = ttft + sum(itl)
    base.update(prompt_tokens=n + 1, completion_tokens=max_tokens, token_count_source="usage",
                ttft_s=ttft, itl_s=itl, tpot_s=(e2e - ttft) / (max_tokens - 1), e2e_s=e2e,
                status="ok", http_status=200, error_kind=None, error_message=None)
    if cached is not None:
        base.update(shared_tokens=n - 256, cached_tokens=cached)
    return base, e2e


def _scrape(t, target, source, stage, samples):
    return dict(schema_version=SCHEMA, time=t, target=target, source=source,
                url=f"http://127.0.0.1/{target}/metrics", stage=stage, ok=True, error=None,
                samples=[dict(name=n, labels=lab, value=v) for n, lab, v in samples])


def write(run_dir: str | Path, spec: SyntheticRun | None = None) -> Path:
    """Write a complete run directory; returns it."""
    spec = spec or SyntheticRun()
    rng = random.Random(spec.seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = 1_700_000_000.0
    energy_mj = 0.0
    targets = [law.preset for law in spec.laws]
    reqs, scrapes = [], []
    k = 0
    for law, target in zip(spec.laws, targets):
        stages = [(f"prompt={n}", n, 1) for n in spec.lengths]
        stages += [(f"users={c}", spec.lengths[0], c) for c in spec.concurrency_levels]
        if spec.reuse:
            stages.append(("shared", spec.lengths[min(2, len(spec.lengths) - 1)], 1))
        for index, (stage, n, conc) in enumerate(stages):
            mem = law.weights_bytes + law.kv_bytes_per_token * n * conc
            for _ in range(spec.per_stage // conc * conc or conc):
                batch_end = t
                for _ in range(conc):
                    k += 1
                    cached = None
                    if stage == "shared":  # the group's first computes the document; a cache serves the rest
                        cached = (n - 256) // 16 * 16 if law.family != "ssm" and rec_in_group(reqs, target) else 0
                    rec, dur = _record(rng, law, target, stage, index, n, conc, t,
                                       spec.max_tokens, spec.noise, f"r{k}", cached)
                    reqs.append(rec)
                    batch_end = max(batch_end, t + dur)
                watts = 150.0 + 100.0 * conc
                energy_mj += watts * (batch_end - t) * 1e3
                samples = [("ssm:device_memory_allocated_bytes", {"model_name": target}, mem),
                           ("ssm:num_requests_running", {"model_name": target}, conc)]
                if law.family != "transformer":
                    samples.append(("ssm:state_bytes_per_sequence", {"model_name": target}, 65536.0))
                scrapes.append(_scrape(batch_end - 1e-3, target, "server", stage, samples))
                if spec.gpu:
                    scrapes.append(_scrape(t, "gpu", "gpu", None, [
                        ("DCGM_FI_DEV_FB_USED", {"gpu": "0"}, mem / 2**20),
                        ("DCGM_FI_DEV_POWER_USAGE", {"gpu": "0"}, watts),
                        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", {"gpu": "0"}, energy_mj)]))
                t = batch_end + 0.01
        t += 1.0
    env = dict(schema_version=SCHEMA, run_id=run_dir.name, ctxload_version="synthetic",
               started_at="2023-11-14T22:13:20Z",
               finished_at="2023-11-14T23:00:00Z" if spec.finished else None,
               host=dict(hostname="synthetic", platform="Linux", cpu_count=16, memory_bytes=2**37),
               python="3.11", packages={},
               gpus=[dict(name="NVIDIA GeForce RTX 4090", memory_total_bytes=24 * 10**9,
                          driver="550")] if spec.gpu else [],
               targets=[dict(name=tg, url=f"http://127.0.0.1/{tg}", model=tg, family=law.family,
                             engine="synthetic", preset=law.preset, launch_args=None,
                             max_model_len=None) for law, tg in zip(spec.laws, targets)])
    (run_dir / "env.json").write_text(json.dumps(env, indent=1))
    scenario = dict(name="synthetic", kind="context_sweep", max_tokens=spec.max_tokens,
                    prompt_lengths=list(spec.lengths), slos=spec.slos)
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    with open(run_dir / "requests.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reqs)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in scrapes)
    if spec.profile:
        with open(run_dir / "operators.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in operator_lines(spec))
    return run_dir
