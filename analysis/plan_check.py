"""The plan (``ctxload plan``) beside what a run measured, per target: held memory, KV cache
capacity and the longest context. A measured figure further than 10% from the plan is flagged:
either the plan's model of that engine or the run is off, and the report says which figure."""

from __future__ import annotations

from dataclasses import dataclass

from analysis import memory
from analysis.records import RunData
from analysis.scaling import ContextLimit, kv_cache_tokens
from servers import vllm_launch
from servers.process import arg_value


@dataclass
class Check:
    target: str
    figure: str
    planned: float | None
    measured: float | None
    unit: str  # "bytes" or "tokens"
    source: str

    @property
    def miss(self) -> float | None:
        if not self.planned or self.measured is None:
            return None
        return self.measured / self.planned - 1

    @property
    def flagged(self) -> bool:
        from servers.plan import MISS

        return self.miss is not None and abs(self.miss) > MISS


def checks(run: RunData, limits: list[ContextLimit]) -> list[Check]:
    from servers import plan as planner

    out: list[Check] = []
    by_limit = {c.target: c for c in limits}
    held: dict[str, float] = {}
    for r in memory.readings(run):
        if r.source == "gpu process":
            held[r.target] = max(held.get(r.target, 0.0), r.bytes)
    for t in run.targets():
        info = run.target_info(t)
        budget, preset, engine = info.get("memory_budget_bytes"), info.get("preset"), info.get("engine")
        if not (budget and preset and engine in ("vllm", "ssm-server")) or not info.get("started_at"):
            continue
        args = info.get("launch_args") or []
        kind, gpus = vllm_launch.spread(args) or ("tensor", 1)
        if kind == "data":
            continue  # replicas, each on its GPU: not planned yet
        chunk = arg_value(args, "--prefill-chunk-size")
        try:
            p = planner.plan(preset, int(budget), engine=engine,
                             prefill_chunk=int(chunk) if chunk else None, tensor_parallel=gpus)
        except planner.PlanError:
            continue
        if t in held and gpus == 1:  # (over several GPUs the plan is one GPU's)
            planned = p.budget_bytes if engine == "vllm" else p.weights_bytes + p.runtime_bytes + p.slots_bytes
            out.append(Check(t, "memory held (per process)", planned, held[t], "bytes",
                             "GPU exporter, the server's processes"))
        cap = kv_cache_tokens(run, t)
        if cap is not None and p.kv_cache_tokens:
            out.append(Check(t, "KV cache capacity", p.kv_cache_tokens, cap, "tokens",
                             "vllm:cache_config_info kv_cache_size_tokens"))
        c = by_limit.get(t)
        if c is not None and c.reached and c.max_ok and p.max_context_tokens:
            out_tokens = int((run.scenario.get("output") or {}).get("max_tokens") or 0)
            out.append(Check(t, "longest context", p.max_context_tokens - out_tokens, c.max_ok, "tokens",
                             f"requests.jsonl (first failure: {c.cause})"))
        elif c is not None and p.limit == "none":
            out.append(Check(t, "longest context", None, c.max_ok, "tokens",
                             "the plan sets no limit (constant state); the run's longest success"))
    return out
