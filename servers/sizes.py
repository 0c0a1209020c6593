"""Memory sizes: as people write them (``24GiB``, ``500MB``, ``1e9``), one parser for every
command, scenario and server of ctxload; and what a model keeps per token (attention's KV
cache) and per sequence (the SSM layers' state), from its config."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``24GiB`` → 25769803776; ``500MB``, ``1e9`` and plain integers work too."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 24GiB, 500MB or 1000000)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size must be positive: {text!r}")
    return int(value)


# ---- per-token and per-sequence sizes from a model config -----------------------------

def kv_bytes_per_token(cfg: dict[str, Any], model_type: str, dtype_bytes: int) -> int | None:
    """2 × attention layers × KV heads × head dim × dtype bytes; None without attention."""
    if model_type in ("mamba", "mamba2"):
        return None
    layers = int(cfg.get("num_hidden_layers", 0))
    if model_type == "zamba2":
        lt = cfg.get("layers_block_type") or []
        layers = sum(1 for x in lt if x == "hybrid") or layers
    return 2 * layers * attention_kv_heads_dim(cfg, model_type) * dtype_bytes if layers else None


def attention_kv_heads_dim(cfg: dict[str, Any], model_type: str) -> int:
    """KV heads × head dim of one attention layer (0 without attention). Zamba2's shared
    attention runs on the hidden state concatenated with the embeddings: its head dim is
    2 × hidden / heads."""
    heads = int(cfg.get("num_attention_heads", 0))
    if not heads:
        return 0
    kv = int(cfg.get("num_key_value_heads", heads) or heads)
    if model_type == "zamba2":
        hd = 2 * int(cfg.get("hidden_size", 0)) // heads
    else:
        hd = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)
    return kv * hd


def layer_counts(cfg: dict[str, Any], model_type: str) -> tuple[int, int]:
    """(attention layers, Mamba layers) of a model."""
    n = int(cfg.get("num_hidden_layers", 0))
    if model_type in ("mamba", "mamba2"):
        return 0, n
    if model_type == "falcon_h1":
        return n, n  # attention and Mamba2 heads side by side in every layer
    if model_type == "zamba2":
        lt = cfg.get("layers_block_type") or []
        return sum(1 for x in lt if x == "hybrid"), n
    return n, 0


def state_bytes_per_sequence(cfg: dict[str, Any], model_type: str, dtype_bytes: int,
                             conv_window: int = 0) -> int | None:
    """Conv state + SSM state of every Mamba layer, per sequence (constant in length).

    The conv state holds ``kernel + conv_window`` inputs: transformers and ssm-server keep the
    whole kernel (0), vLLM keeps kernel − 1 (−1)."""
    layers = int(cfg.get("num_hidden_layers", 0))
    h = int(cfg.get("hidden_size", 0))
    if model_type == "mamba":
        inner = int(cfg.get("expand", 2)) * h
        return layers * inner * (int(cfg.get("state_size", 16)) + int(cfg.get("conv_kernel", 4)) + conv_window) * dtype_bytes
    if model_type == "mamba2":
        nh, hd, n = int(cfg.get("num_heads", 0)), int(cfg.get("head_dim", 64)), int(cfg.get("state_size", 128))
        inner = nh * hd
        conv_dim = inner + 2 * int(cfg.get("n_groups", 1)) * n
        return layers * (nh * hd * n + conv_dim * (int(cfg.get("conv_kernel", 4)) + conv_window)) * dtype_bytes
    if model_type in ("falcon_h1", "zamba2"):
        if model_type == "falcon_h1":
            nh, hd = int(cfg.get("mamba_n_heads", 0)), int(cfg.get("mamba_d_head", 64))
            n, g = int(cfg.get("mamba_d_state", 128)), int(cfg.get("mamba_n_groups", 1))
        else:
            nh, hd = int(cfg.get("n_mamba_heads", 0)), int(cfg.get("mamba_headdim", 64))
            n, g = int(cfg.get("mamba_d_state", 64)), int(cfg.get("mamba_ngroups", 1))
        conv_dim = nh * hd + 2 * g * n
        return layers * (nh * hd * n + conv_dim * (int(cfg.get("mamba_d_conv", 4)) + conv_window)) * dtype_bytes
    return None


# ---- ssm-server's native Mamba2 backend: working memory it reserves ------------------------

def mamba2_prefill_reserve_bytes(d_model: int, d_ssm: int, conv_dim: int, nheads: int, headdim: int,
                                 d_state: int, chunk: int) -> int:
    """Working memory of one prefill chunk of ``chunk`` tokens (activations live for one layer
    at a time): what ssm-server keeps free beside its state pool."""
    d_proj = d_ssm + conv_dim + nheads
    per_tok = (d_proj * 2 + conv_dim * 2 * 4 + d_ssm * 2 * 4 + d_model * (4 * 2 + 2 * 3) + nheads * 4 * 4)
    chunk_states = (chunk // 256 + 2) * nheads * headdim * d_state * 4 * 3
    return int(per_tok * chunk * 1.5) + chunk_states + (256 << 20)


def decode_reserve_bytes(vocab_size: int, batch: int) -> int:
    """Working memory of a decode step of ``batch`` sequences (float32 logits and sampling)."""
    return batch * vocab_size * 4 * 6 + (128 << 20)
