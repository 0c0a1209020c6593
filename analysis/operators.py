"""Where the time goes: kernel and op names sorted into operator classes.

The paper measured with ``torch.profiler`` in three classes: **GEMM** (matrix multiplies,
attention included), **SSM scan** (selective scan, chunked scan, causal conv1d) and
**non-GEMM** (norms, activations, elementwise, memory copies, embedding, logits and sampling).
:func:`classify` places one kernel (GPU trace) or op (CPU trace) name in a finer class of
:data:`FINE`, and :data:`PAPER` maps each fine class to the paper's:

============  ========  ===========================================================
fine          paper     what
============  ========  ===========================================================
gemm          GEMM      matmuls: cuBLAS/cuBLASLt/CUTLASS/oneDNN kernels, ``aten::mm``…
attention     GEMM      attention proper: flash / paged / unified attention, SDPA
ssm           SSM scan  Mamba scan and state update: chunk scan/state, selective scan
conv1d        SSM scan  the Mamba block's causal conv1d (any convolution: the models
                        have no other)
norm          non-GEMM  RMSNorm / LayerNorm, fused or in pieces (pow, mean, rsqrt)
elementwise   non-GEMM  activations, arithmetic, comparisons, reductions, rotary
memory        non-GEMM  copies, casts, allocation, fills, concatenation, views, KV-cache
                        writes, memcpy/memset
sampling      non-GEMM  logits to tokens: softmax, argmax, top-k/top-p, sort, RNG
other         non-GEMM  known but none of these: embedding/index lookups, host syncs,
                        scheduling metadata
============  ========  ===========================================================

A name :func:`classify` cannot place gets ``None``; :func:`breakdown` lists such names in
``unclassified`` (with their time) and counts them in no class: callers must report them.

The rules are an ordered list of ``(class, regex)`` (:data:`RULES`), searched in the whole
name, first match wins. Order matters: a fused norm kernel's name also says ``mul``, a GEMM's
epilogue says ``relu``, ``_bmm_chunk_fwd_kernel`` is the SSD scan's, vLLM's
``rotary_embedding_kernel`` is no embedding lookup, ``direct_copy_kernel_cuda`` runs inside
an ``elementwise_kernel``. TorchInductor's fused kernels (``triton_poi_fused_mul_silu_0``,
``triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1``) are placed by the op words in their
names through the same rules, and a pointwise/reduction one with no telling word falls back
to elementwise.

Limits:

* CPU op names carry no module context. On a CPU trace the Mamba scan of a model run through
  transformers' torch fallback is a stream of ``aten::mul``/``exp``/``cumsum``/``einsum``…,
  which land in elementwise and gemm, by name. (vLLM's CPU build has its own scan ops,
  ``_C::mamba_chunk_scan_fwd_cpu`` and ``_C::selective_state_update_cpu``; on a GPU the scan
  is its own Triton/CUDA kernels.) Likewise an RMSNorm in pieces gives norm only its
  ``pow``/``mean``/``rsqrt``; its ``mul``\\ s and ``to``\\ s count as elementwise and memory.
* ``softmax`` counts as sampling: the served models' attention is fused (SDPA, flash,
  unified attention), so a separate softmax is the sampler's. A model run with eager
  attention would have its attention softmax counted as sampling too.
* The LM head (logits) is a GEMM like any other and counts as gemm; the paper's "logits" in
  non-GEMM is the processing after it (softmax, penalties, sampling).
* On CPU traces, wrapper ops (``aten::linear``, ``vllm::unified_attention_with_output``,
  ``vllm::mamba_mixer2``) count their self time (dispatch overhead, Python inside a custom
  op) in the class of what they wrap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

FINE = ("gemm", "attention", "ssm", "conv1d", "norm", "elementwise", "memory", "sampling", "other")

PAPER_CLASSES = ("GEMM", "SSM scan", "non-GEMM")

PAPER: dict[str, str] = {
    "gemm": "GEMM",
    "attention": "GEMM",
    "ssm": "SSM scan",
    "conv1d": "SSM scan",
    "norm": "non-GEMM",
    "elementwise": "non-GEMM",
    "memory": "non-GEMM",
    "sampling": "non-GEMM",
    "other": "non-GEMM",
}


def paper_class(fine: str) -> str:
    """The paper's class (``GEMM``, ``SSM scan``, ``non-GEMM``) of a fine class."""
    return PAPER[fine]


def _ops(*names: str) -> str:
    """A regex for CPU ops named exactly ``<namespace>::<name>`` (aten::mm, _C::onednn_mm…)."""
    return r"^[\w.]+::(?:" + "|".join(re.escape(n) for n in names) + r")$"


def _words(*words: str) -> str:
    """A regex for TorchInductor kernels (``triton_{poi,red,per,tem}_fused_…``) that fuse one of
    ``words`` (op names joined by ``_``, e.g. ``triton_red_fused_add_mean_mul_pow_rsqrt_0``)."""
    return r"^triton_\w+?_fused_(?:\w*?_)?(?:" + "|".join(words) + r")(?:_|$)"


#: ``(fine class, regex, why)``, searched in order in the whole name; the first match wins.
RULES: list[tuple[str, str, str]] = [
    # ---- the SSM scan first: its kernels' names also say bmm, cumsum, norm or update ------
    ("ssm", r"chunk_scan|chunk_state|state_passing|chunk_cumsum|bmm_chunk|ssd_",
     "Mamba2 SSD Triton kernels (mamba_ssm, vLLM): _chunk_scan_fwd_kernel, _bmm_chunk_fwd_kernel…"),
    ("ssm", r"selective_scan|selective_state_update|mamba_chunk_scan|mamba_split_conv1d_scan",
     "Mamba v1 selective scan (CUDA), state update (Triton, vLLM CPU _C:: ops)"),
    ("ssm", r"^ssu$|^ssu_step", "ssm-server's own Triton decode-step state update"),
    ("ssm", _ops("mamba_mixer", "mamba_mixer2"),
     "vLLM's Mamba mixer custom op: its self time is the Python inside the mixer"),
    # ---- causal conv1d --------------------------------------------------------------------
    ("conv1d", r"causal_conv1d|conv1d|convolution|^conv_step$|^conv_chunk$|conv_depthwise|slow_conv|"
               r"thnn_conv|_fprop_",
     "causal_conv1d kernels (vLLM, causal-conv1d), ssm-server's conv_step and conv_chunk, aten::conv1d and its "
     "chain (_convolution, mkldnn_convolution…), cuDNN forward-propagation (fprop) kernels"),
    # ---- specific vLLM kernels whose names say 'gemm', 'embedding' or 'attn' --------------
    ("elementwise", r"act_and_mul|silu_and_mul|gelu_and_mul|silu_mul|swiglu|activation_kernel",
     "gated activations (vLLM's act_and_mul_kernel, silu_mul_fp8_quant_deep_gemm_kernel, "
     "mamba_ssm's _swiglu_fwd_kernel) before gemm: some also say 'gemm'"),
    ("elementwise", r"rotary|rope", "rotary embedding: elementwise, no embedding lookup"),
    ("norm", r"rms_?norm|layer_?norm|group_?norm|batch_?norm",
     "norms whole, fused or quantising (vLLM rms_norm_kernel, fused_add_rms_norm_kernel, "
     "mamba_ssm _layer_norm_fwd_1pass_kernel, aten::layer_norm, inductor *_native_layer_norm_*)"),
    ("memory", r"reshape_and_cache|kv_cache_update|concat_and_cache|cache_kernel_flash",
     "KV-cache writes (vLLM reshape_and_cache_flash_kernel, cpu_attn_reshape_and_cache, "
     "unified_kv_cache_update): copies, before attention (their names say attn)"),
    ("sampling", r"flashinfer::sampling", "FlashInfer's sampling kernels, before attention (flash)"),
    # ---- attention ------------------------------------------------------------------------
    ("attention", r"flash|fmha|attention|attn|^_fwd_kernel|^_fwd_grouped_kernel|^reduce_segments$|"
                  r"scheduler_metadata",
     "flash attention (flash_fwd_*, cutlass::device_kernel<flash::FlashAttnFwdSm90…>), "
     "PyTorch SDPA, vLLM paged/unified/Triton attention (kernel_unified_attention, the "
     "prefill _fwd_kernel, reduce_segments), merge_attn_states, attention scheduler metadata"),
    # ---- GEMM -----------------------------------------------------------------------------
    ("gemm", _ops("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum", "mv", "addmv",
                  "dot", "onednn_mm", "onednn_scaled_mm", "_addmm_activation"),
     "ATen and vLLM-CPU (oneDNN) matmul ops; linear/matmul/einsum are wrappers of mm/bmm"),
    ("gemm", _words("mm", "addmm", "bmm", "baddbmm"), "inductor template GEMMs (triton_tem_fused_mm_0)"),
    ("gemm", r"gemm|gemv|xmma|nvjet|splitKreduce|cutlass|cublas|wgmma|tensorop|s16816|s1688|"
             r"sgemm|hgemm|marlin|dot_kernel",
     "cuBLAS/cuBLASLt (sm90_xmma_gemm_*, nvjet_tst_*, ampere_bf16_s16816gemm_*, gemv2T_kernel, "
     "splitKreduce_kernel), CUTLASS (cutlass::Kernel2<cutlass_80_tensorop_*gemm*>), Marlin"),
    ("elementwise", r"quant", "quantising casts (vLLM scaled_fp8_quant_kernel…), after the GEMMs "
                              "and norms whose names also say quant"),
    # ---- norms in pieces ------------------------------------------------------------------
    ("norm", _ops("rsqrt", "pow", "mean", "rms_norm", "_fused_rms_norm", "layer_norm",
                  "native_layer_norm", "group_norm", "native_group_norm"),
     "RMSNorm's pieces as CPU ops: x.pow(2).mean(-1), rsqrt (these models use them nowhere else)"),
    ("norm", _words("rsqrt", "mean", "var_mean", "native_layer_norm"),
     "inductor kernels fusing a norm: they also say mul/add/copy, so before those"),
    ("norm", r"rsqrt|MeanOps|pow_tensor_scalar", "ATen CUDA kernels of a norm's pieces"),
    # ---- sampling -------------------------------------------------------------------------
    ("sampling", r"softmax|argmax|argmin|ArgMaxOps|multinomial|topk|top_k|top_p|topp|gumbel|"
                 r"sampl|radixsort|bitonicsort|sortkv|segmentedsort|penalt|exponential|"
                 r"distribution_|philox|random|randint|uniform|bernoulli",
     "logits to tokens: softmax, argmax, top-k/top-p, sorting, penalties, RNG "
     "(cunn_SoftMaxForward, gatherTopK, _topk_topp_kernel, _C::fused_gumbel_argmax…)"),
    ("sampling", _ops("sort", "argsort", "normal_"), "sorting and RNG ops"),
    # ---- memory ---------------------------------------------------------------------------
    ("memory", r"^Memcpy|^Memset|memcpy|memset|direct_copy|CatArray|copy_kernel|FillFunctor|"
               r"fill_kernel|transpose_kernel",
     "device copies (Memcpy HtoD (Pageable -> Device)…), memsets, casts and copies run as "
     "elementwise kernels (direct_copy_kernel_cuda), torch.cat, fills"),
    ("memory", _ops("copy_", "_to_copy", "to", "clone", "contiguous", "cat", "stack", "empty",
                    "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros",
                    "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros",
                    "new_full", "fill_", "zero_", "resize_", "pad", "constant_pad_nd",
                    "repeat", "repeat_interleave", "expand", "expand_as", "view", "view_as",
                    "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "as_strided_",
                    "slice", "select", "narrow", "transpose", "t", "mT", "permute", "squeeze",
                    "unsqueeze", "flatten", "unflatten", "split", "split_with_sizes", "chunk",
                    "unbind", "unfold", "detach", "detach_", "alias", "lift_fresh",
                    "resolve_conj", "resolve_neg", "set_", "_copy_from", "_copy_from_and_resize"),
     "copies, casts, allocation, fills, concatenation, padding and views (CPU ops)"),
    ("memory", r"^detach_$", "the bare 'detach_' event torch records (no namespace)"),
    ("elementwise", _words("add", "sub", "rsub", "mul", "div", "neg", "exp", "log", "sqrt", "silu",
                           "gelu", "relu", "sigmoid", "tanh", "softplus", "clamp", "where",
                           "sum", "cos", "sin", "maximum", "minimum", "sign", "abs", "cumsum"),
     "inductor kernels with arithmetic, before the data-movement ones: their names list the op "
     "words sorted, so triton_poi_fused__to_copy_add_mul_silu_0 says copy too"),
    ("memory", _words("cat", "clone", "copy", "_to_copy", "constant_pad_nd", "zeros", "fill",
                      "full", "empty", "repeat", "stack", "view", "permute"),
     "inductor kernels that only move data"),
    # ---- other: known, none of the above --------------------------------------------------
    ("memory", r"^_zero_kv_blocks_kernel$", "vLLM 0.26 (GPU runner): zeroing freed KV blocks"),
    ("other", r"^_(compute_slot_mappings?|prepare_pos_seq_lens|prepare_prefill_inputs|post_update|"
              r"apply_write|gather_block_tables)_kernel$",
     "vLLM 0.26's GPU model runner: its Triton kernels preparing a step's inputs (slot mappings, "
     "positions, block tables) and writing its outputs back (H200 trace, 2026-12-02)"),
    ("other", r"embedding|indexSelect|index_select|index_elementwise|index_put|indexFunc|"
              r"gather|scatter",
     "lookups and scatters: embedding (index_select), advanced indexing, gather/scatter"),
    ("other", _ops("index", "_index_put_impl_", "masked_select", "nonzero", "arange", "range",
                   "linspace", "item", "_local_scalar_dense", "is_nonzero", "scalar_tensor",
                   "result_type", "_assert_async", "compute_slot_mapping_kernel_impl"),
     "index ops, ranges, host syncs (item), bookkeeping ops and vLLM's slot mapping"),
    # ---- elementwise ----------------------------------------------------------------------
    ("elementwise", _ops("add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_",
                         "neg", "exp", "exp_", "log", "log_", "sqrt", "abs", "silu", "silu_",
                         "gelu", "relu", "relu_", "sigmoid", "tanh", "softplus", "clamp",
                         "clamp_", "clamp_min", "clamp_max", "where", "masked_fill",
                         "masked_fill_", "cos", "sin", "sum", "prod", "max", "min", "maximum",
                         "minimum", "amax", "amin", "aminmax", "cumsum", "cumsum_", "cumprod",
                         "diff", "all", "any", "eq", "ne", "lt", "le", "gt", "ge", "isin",
                         "logical_and", "logical_or", "logical_not", "bitwise_and",
                         "bitwise_and_", "bitwise_or", "bitwise_or_", "bitwise_not",
                         "bitwise_xor", "__and__", "__or__", "__ior__", "__iand__", "__xor__",
                         "floor_divide", "remainder", "fmod", "tril", "triu", "reciprocal",
                         "square", "erf", "lerp", "addcmul", "addcdiv", "sign", "floor", "ceil",
                         "round", "dropout"),
     "arithmetic, activations, comparisons and reductions (CPU ops); cumsum/exp/mul of a "
     "torch-fallback Mamba scan land here too (see the module's limits)"),
    ("elementwise", r"elementwise|reduce_kernel|CUDAFunctor|triu_tril|scan_innermost_dim|"
                    r"scan_outer_dim|triton_poi_|triton_red_|triton_per_",
     "ATen CUDA elementwise/reduction kernels not placed above (cumsum's scan kernels, tril "
     "included); inductor pointwise (poi), reduction (red) and persistent-reduction (per) "
     "kernels with no telling word"),
]

_COMPILED = [(cls, re.compile(rx, re.IGNORECASE)) for cls, rx, _ in RULES]
assert all(cls in FINE for cls, _ in _COMPILED)


def classify(name: str) -> str | None:
    """The fine class (one of :data:`FINE`) of a kernel or op name, or None when no rule
    places it (the caller reports such names: they are never counted as "other")."""
    n = name.strip()
    for cls, rx in _COMPILED:
        if rx.search(n):
            return cls
    return None


def rule_for(name: str) -> tuple[str, str, str] | None:
    """The rule of :data:`RULES` that places ``name`` (for explaining a class)."""
    n = name.strip()
    for rule, (_, rx) in zip(RULES, _COMPILED):
        if rx.search(n):
            return rule
    return None


@dataclass
class Breakdown:
    """Time by operator class of one kernel table (:func:`servers.traces.kernel_table`)."""

    total_s: float
    """All kernels' time, the unclassified included: the denominator of every share."""
    by_fine: dict[str, float]
    """Seconds by fine class (every class of :data:`FINE`, zeros included)."""
    by_paper: dict[str, float]
    """Seconds by the paper's class (``GEMM``, ``SSM scan``, ``non-GEMM``)."""
    unclassified: list[tuple[str, float]] = field(default_factory=list)
    """``(name, seconds)`` of the kernels no rule placed, largest first."""
    top: list[tuple[str, str | None, float, float]] = field(default_factory=list)
    """The 10 largest kernels: ``(name, fine class or None, seconds, share of total)``."""

    @property
    def ssm_share(self) -> float:
        """SSM-scan class time (scan + conv1d) over the total."""
        return self.by_paper["SSM scan"] / self.total_s if self.total_s > 0 else 0.0

    @property
    def unclassified_s(self) -> float:
        return sum(t for _, t in self.unclassified)

    def share(self, cls: str) -> float:
        """A fine or paper class's time over the total."""
        t = self.by_fine[cls] if cls in self.by_fine else self.by_paper[cls]
        return t / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s,
            "by_fine": dict(self.by_fine),
            "by_paper": dict(self.by_paper),
            "ssm_share": self.ssm_share,
            "unclassified_s": self.unclassified_s,
            "unclassified": [[n, t] for n, t in self.unclassified],
            "top": [{"name": n, "class": c, "time_s": t, "share": s} for n, c, t, s in self.top],
        }


def breakdown(kernels: Iterable[Mapping[str, Any]], top_n: int = 10) -> Breakdown:
    """Time by class of ``kernels`` (``{"name", "time_s", …}``; the same name may repeat)."""
    by_name: dict[str, float] = {}
    for k in kernels:
        by_name[k["name"]] = by_name.get(k["name"], 0.0) + float(k["time_s"])
    fine = dict.fromkeys(FINE, 0.0)
    paper = dict.fromkeys(PAPER_CLASSES, 0.0)
    unclassified: list[tuple[str, float]] = []
    rows: list[tuple[str, str | None, float]] = []
    for name, t in by_name.items():
        cls = classify(name)
        rows.append((name, cls, t))
        if cls is None:
            unclassified.append((name, t))
        else:
            fine[cls] += t
            paper[PAPER[cls]] += t
    total = sum(by_name.values())
    rows.sort(key=lambda r: (-r[2], r[0]))
    unclassified.sort(key=lambda r: (-r[1], r[0]))
    top = [(n, c, t, t / total if total > 0 else 0.0) for n, c, t in rows[:top_n]]
    return Breakdown(total_s=total, by_fine=fine, by_paper=paper, unclassified=unclassified, top=top)


# ---- a run's profile pass ----------------------------------------------------------------------


@dataclass
class OperatorRow:
    """One target × length × phase of a run's profile pass (operators.jsonl), classified."""

    target: str
    prompt_tokens: int
    phase: str
    device: str | None
    breakdown: Breakdown | None
    """None where nothing was traced (``error`` says why)."""
    steps: int | None = None
    steps_source: str | None = None
    ttft_s: float | None = None
    error: str | None = None

    @property
    def per_step_s(self) -> float | None:
        """Device time per decode step (decode rows with a step count)."""
        if self.phase != "decode" or not self.steps or self.breakdown is None:
            return None
        return self.breakdown.total_s / self.steps


def rows(run) -> list[OperatorRow]:
    """The run's profile pass (``RunData.operators``), classified, in the order it ran."""
    out = []
    for line in run.operators:
        b = breakdown(line.kernels) if line.kernels else None
        out.append(OperatorRow(line.target, line.prompt_tokens, line.phase, line.device, b, line.steps,
                               line.steps_source, line.ttft_s, line.error))
    return out
