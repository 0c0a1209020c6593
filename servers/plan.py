"""``ctxload plan``: what fits on a card, before a single request.

For a model (a preset or a model directory), an engine, a memory budget and a concurrency, the
plan splits the budget into the weights, the engine's working memory, and the cache that is
left; then the longest context each of ``concurrency`` sequences can hold in that cache, from
the bytes an attention layer keeps per token and a Mamba layer keeps per sequence:

- **vLLM** (0.26's rules): the budget becomes its memory share; it keeps its CUDA context, the
  activations of one step of ``max_num_batched_tokens`` and its CUDA graphs (``runtime``), and
  the rest is its paged cache. A hybrid's attention block is raised until one attention page
  holds a Mamba layer's state (padded up to it), so every sequence takes one page per Mamba
  group plus one per attention group every block of tokens. The context is also capped by the
  model's position limit (vLLM's ``max_model_len``).
- **ssm-server**: weights, the working memory of one prefill chunk and of a decode step, a state
  pool of one slot per sequence; a Mamba model's memory does not grow with the context, so the
  budget bounds only how many sequences fit, never their length.

With ``--tensor-parallel-size N`` (vLLM) the model is spread over N GPUs of ``--budget`` each:
each holds 1/N of the weights and of every Mamba state, and its share of the KV heads — all of
them split N ways, or each kept whole on the GPUs that share it when there are fewer KV heads
than GPUs (as vLLM replicates them) — so the figures are one GPU's.

The figures are estimates from the config: `ctxload report` sets them beside what a run
measured and flags a miss of more than 10%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from servers import presets, sizes

DTYPES = {"bf16": ("bfloat16", 2), "bfloat16": ("bfloat16", 2), "fp16": ("float16", 2),
          "float16": ("float16", 2), "fp32": ("float32", 4), "float32": ("float32", 4)}
#: vLLM's CUDA context and the memory PyTorch does not allocate (0.22 GiB on an H200, 0.26).
VLLM_BASE_BYTES = 512 << 20
#: Tokens in one engine step (vLLM's default ``max_num_batched_tokens`` in ctxload's profile).
VLLM_STEP_TOKENS = 8192
#: FlashAttention's block-size multiple, to which vLLM aligns a hybrid's attention block.
VLLM_BLOCK_ALIGN = 16
#: ssm-server's prefill chunk (its ``--prefill-chunk-size`` default) and slot count.
SSM_CHUNK, SSM_SLOTS = 2048, 64
MISS = 0.10
"""A measured figure further than this from the plan is flagged in the report."""


class PlanError(ValueError):
    """A plan that cannot be made; the message says what to change."""


@dataclass
class Plan:
    model: str
    family: str
    engine: str
    concurrency: int
    dtype: str
    budget_bytes: int
    weights_bytes: int
    runtime_bytes: int
    """The engine's working memory: activations, CUDA context and graphs."""
    cache_bytes: int
    """What is left for the KV cache and the recurrent states."""
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    max_context_tokens: int | None
    """The longest context each sequence can hold at this concurrency; None: memory does not
    bound it (an SSM's state is constant)."""
    limit: str
    """What sets ``max_context_tokens``: ``kv cache``, ``position limit``, ``none`` (SSM) or
    ``does not fit``."""
    kv_cache_tokens: int | None
    """Tokens the whole cache holds (vLLM's "GPU KV cache size")."""
    page_rule: str | None = None
    """vLLM's page rule for a hybrid: attention block, page bytes, Mamba padding."""
    position_limit: int | None = None
    slots_bytes: int = 0
    """ssm-server: the state pool it allocates up front (one slot per sequence it admits,
    ``--max-num-seqs`` at most)."""
    tensor_parallel: int = 1
    """GPUs the model is spread over (vLLM's ``--tensor-parallel-size``); the byte figures and
    the budget are each GPU's."""

    def to_row(self) -> dict:
        return asdict(self)


def _config(model: str):
    """(name, preset) of a preset name or of a model directory built from one."""
    path = Path(model)
    if (path / "config.json").exists():
        from servers import modeldir

        info = modeldir.info(path)
        if not info.preset or info.preset not in presets.PRESETS:
            raise PlanError(f"{model}: a model directory not built from a preset (its config is not "
                            "one ctxload can size yet)")
        return info.name, presets.PRESETS[info.preset]
    try:
        return model, presets.get(model)
    except presets.UnknownPreset as e:
        raise PlanError(str(e)) from None


def plan(model: str, budget_bytes: int, *, engine: str | None = None, concurrency: int = 1,
         dtype: str | None = None, prefill_chunk: int | None = None, tensor_parallel: int = 1) -> Plan:
    name, p = _config(model)
    engine = engine or p.engine
    if engine not in ("vllm", "ssm-server"):
        raise PlanError(f"--engine: vllm or ssm-server, not {engine!r}")
    if concurrency < 1:
        raise PlanError("--concurrency: at least 1")
    if tensor_parallel < 1:
        raise PlanError("--tensor-parallel-size: at least 1")
    if tensor_parallel > 1 and engine != "vllm":
        raise PlanError("--tensor-parallel-size: ssm-server serves a model on one GPU; spread it with vLLM")
    dname, b = DTYPES[(dtype or p.dtype).lower()] if (dtype or p.dtype).lower() in DTYPES else (None, None)
    if dname is None:
        raise PlanError(f"--dtype: one of {', '.join(sorted(DTYPES))}, not {dtype!r}")
    cfg = dict(p.config)
    tp = tensor_parallel
    weights = p.parameters() * b // tp
    kv = _kv_per_gpu(sizes.kv_bytes_per_token(cfg, p.model_type, b) or 0, cfg, tp)
    conv = -1 if engine == "vllm" else 0  # vLLM keeps kernel − 1 conv inputs, ssm-server kernel
    state = (sizes.state_bytes_per_sequence(cfg, p.model_type, b, conv_window=conv) or 0) // tp
    pos = int(cfg["max_position_embeddings"]) if "max_position_embeddings" in cfg else None
    chunk = prefill_chunk or SSM_CHUNK
    runtime = _vllm_runtime(cfg) if engine == "vllm" else _ssm_runtime(p, cfg, b, SSM_SLOTS, chunk)
    cache = budget_bytes - weights - runtime
    out = Plan(name, p.family, engine, concurrency, dname, budget_bytes, weights, runtime, cache, kv, state,
               None, "does not fit", None, position_limit=pos, tensor_parallel=tp)
    if weights >= budget_bytes:
        share = f"{name}'s weights" if tp == 1 else f"a GPU's share of {name}'s weights over {tp} GPUs"
        raise PlanError(f"--budget {budget_bytes / 2**30:.2f} GiB is smaller than {share} "
                        f"({weights / 2**30:.2f} GiB in {dname})")
    if cache <= 0:
        return out
    if engine == "ssm-server" and p.family == "ssm":
        if cache < concurrency * state:
            return out
        out.slots_bytes = min(SSM_SLOTS, cache // state) * state
        out.max_context_tokens, out.limit = None, "none"
        return out
    if engine == "vllm" and p.family == "hybrid":
        return _vllm_hybrid(out, cfg, p.model_type, b, tp)
    if engine == "vllm" and p.family == "ssm":
        out.max_context_tokens, out.limit = (None, "none") if cache // state > concurrency else (None, "does not fit")
        return out
    room = cache - concurrency * state
    tokens = room // (concurrency * kv) if kv and room > 0 else 0
    out.kv_cache_tokens = (cache - state) // kv if kv else None
    return _cap(out, tokens)


def _kv_per_gpu(kv: int, cfg: dict, tp: int) -> int:
    """One GPU's KV bytes per token over ``tp`` GPUs: its share of the KV heads, each head whole
    (fewer heads than GPUs: every GPU keeps one, as vLLM replicates them)."""
    heads = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 0)
    if tp == 1 or not kv or not heads:
        return kv
    return kv // heads * math.ceil(heads / tp)


def _cap(out: Plan, tokens: int) -> Plan:
    if tokens <= 0:
        out.max_context_tokens, out.limit = None, "does not fit"
    elif out.position_limit is not None and tokens >= out.position_limit:
        out.max_context_tokens, out.limit = out.position_limit, "position limit"
    else:
        out.max_context_tokens, out.limit = int(tokens), "kv cache"
    return out


def _vllm_runtime(cfg: dict) -> int:
    """vLLM's working memory beside weights and cache: its CUDA context and the activations of
    one step of 8,192 tokens (MLP and attention projections, in bf16, ×2 for what a layer keeps
    while the next is computed)."""
    h = int(cfg.get("hidden_size", 0))
    inter = int(cfg.get("intermediate_size", 0) or 4 * h)
    mamba = int(cfg.get("mamba_d_ssm", 0) or cfg.get("n_mamba_heads", 0) * cfg.get("mamba_headdim", 0)
                or (cfg.get("num_heads", 0) * cfg.get("head_dim", 0)))
    return VLLM_BASE_BYTES + VLLM_STEP_TOKENS * (inter + 2 * h + 2 * mamba) * 2 * 2


def _ssm_runtime(p, cfg: dict, b: int, slots: int, chunk: int) -> int:
    """ssm-server's working memory: a prefill chunk and a decode step of its slots (as it
    reserves them)."""
    if p.model_type == "mamba2":
        nh, hd, n = int(cfg["num_heads"]), int(cfg.get("head_dim", 64)), int(cfg.get("state_size", 128))
        d_ssm = nh * hd
        conv_dim = d_ssm + 2 * int(cfg.get("n_groups", 1)) * n
        prefill = sizes.mamba2_prefill_reserve_bytes(int(cfg["hidden_size"]), d_ssm, conv_dim, nh, hd, n, chunk)
    else:  # the transformers path: a chunk's activations through the widest layer
        h = int(cfg.get("hidden_size", 0))
        prefill = chunk * (int(cfg.get("intermediate_size", 0) or 4 * h) + 4 * h) * b * 4 + (256 << 20)
    return prefill + sizes.decode_reserve_bytes(p.vocab_size, slots)


def _vllm_hybrid(out: Plan, cfg: dict, model_type: str, b: int, tp: int = 1) -> Plan:
    """vLLM 0.26's hybrid page rule: one attention page holds a Mamba layer's state (both one
    GPU's share over ``tp``)."""
    n_attn, n_mamba = sizes.layer_counts(cfg, model_type)
    attn_tok = _kv_per_gpu(2 * sizes.attention_kv_heads_dim(cfg, model_type) * b, cfg, tp)  # one layer, one token
    mamba_layer = out.state_bytes_per_sequence // n_mamba
    block = VLLM_BLOCK_ALIGN * math.ceil(mamba_layer / (VLLM_BLOCK_ALIGN * attn_tok))
    page = block * attn_tok
    group = min(n_attn, n_mamba)
    m_groups, a_groups = math.ceil(n_mamba / group), math.ceil(n_attn / group)
    blocks = out.cache_bytes // page // group
    out.page_rule = (f"attention block {block} tokens; page {page:,} B (a Mamba layer's state "
                     f"{mamba_layer:,} B padded {100 * (page / mamba_layer - 1):.1f}%); "
                     f"{m_groups} Mamba + {a_groups} attention group(s) of {group} layers")
    out.kv_cache_tokens = blocks * block // a_groups
    per_seq_blocks = blocks // out.concurrency - m_groups
    return _cap(out, per_seq_blocks // a_groups * block)


# ---- the command ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("What fits on a card before any request: for each model, engine and concurrency, "
                     "the longest context under a memory budget, split into weights, the engine's "
                     "working memory and the cache, with the bytes per token and per sequence behind it.")
    p.add_argument("models", nargs="+", metavar="PRESET_OR_MODEL_DIR")
    p.add_argument("--budget", required=True, help="device memory for each target, e.g. 24GiB")
    p.add_argument("--engine", choices=["vllm", "ssm-server"], default=None,
                   help="default: each preset's own engine")
    p.add_argument("--concurrency", default="1", help="sequences served together, a list: 1,8,64")
    p.add_argument("--dtype", default=None, help="bf16 (default for real-size presets), fp16, fp32")
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help=f"ssm-server's prefill chunk (default {SSM_CHUNK})")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM: spread each model over this many GPUs, --budget each (default 1)")
    p.add_argument("--json", action="store_true", help="the same table as JSON")


def main(args: argparse.Namespace) -> int:
    try:
        budget = sizes.parse_bytes(args.budget)
    except ValueError as e:
        print(f"ctxload plan: --budget: {e}", file=sys.stderr)
        return 2
    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        print(f"ctxload plan: --concurrency: positive whole numbers, comma-separated, not {args.concurrency!r}",
              file=sys.stderr)
        return 2
    try:
        rows = [plan(m, budget, engine=args.engine, concurrency=c, dtype=args.dtype,
                     prefill_chunk=args.prefill_chunk_size, tensor_parallel=args.tensor_parallel_size)
                for m in args.models for c in levels]
    except PlanError as e:
        print(f"ctxload plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_row() for r in rows], indent=2))
        return 0
    print(render(rows))
    return 0


def _gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def render(rows: list[Plan]) -> str:
    head = ("| model | engine | users | weights | runtime | cache | KV / token | state / seq | "
            "longest context | set by |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ctx = "unbounded" if r.limit == "none" else "—" if r.max_context_tokens is None else f"{r.max_context_tokens:,}"
        lines.append(f"| {r.model} | {r.engine} | {r.concurrency} | {_gib(r.weights_bytes)} | "
                     f"{_gib(r.runtime_bytes)} | {_gib(r.cache_bytes)} | {r.kv_bytes_per_token:,} B | "
                     f"{r.state_bytes_per_sequence:,} B | {ctx} | {r.limit} |")
    notes = [f"- {r.model}: {r.page_rule}" for r in rows if r.page_rule and r.concurrency == rows[0].concurrency]
    budget = rows[0].budget_bytes if rows else 0
    tp = rows[0].tensor_parallel if rows else 1
    each = "each" if tp == 1 else f"on each of {tp} GPUs (tensor parallel): the figures are one GPU's"
    out = "\n".join(lines) + f"\n\nBudget {_gib(budget)} {each} ({rows[0].dtype if rows else ''})."
    if notes:
        out += "\nvLLM's hybrid page rule:\n" + "\n".join(notes)
    return out
