"""The registry of model presets.

A preset names one model architecture at one size: its family (Transformer, SSM or hybrid),
the transformers config that instantiates it with random weights, the hub id of the real
checkpoint, and the engine that serves it by default.  The paper's models are here at their
real sizes; the ``tiny-*`` presets are the same architectures shrunk to run on a laptop CPU.

Performance does not depend on trained weights, so every preset can be built offline
(``ctxload models build PRESET --out DIR``) into a model directory that both ssm-server and
vLLM load without a hub.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Family = Literal["transformer", "ssm", "hybrid"]
Engine = Literal["vllm", "ssm-server"]

FAMILIES: tuple[Family, ...] = ("transformer", "ssm", "hybrid")

#: Vocabulary of the locally built tokenizer of the tiny presets (their models use it whole).
TINY_VOCAB = 2048


@dataclass(frozen=True)
class Preset:
    name: str
    """Short name used on the command line and in scenarios, e.g. ``mamba2-780m``."""
    family: Family
    """Architecture family: what the analysis groups and colours by."""
    model_type: str
    """The transformers ``model_type`` (``llama``, ``mamba2``, ``falcon_h1``, …)."""
    config: Mapping[str, Any]
    """Keyword arguments of the transformers config class at this preset's size."""
    engine: Engine
    """The engine that serves this preset by default."""
    hub_id: str | None = None
    """Hub id of the real checkpoint, used only when real weights are asked for."""
    tiny: bool = False
    """A CPU-sized stand-in (random weights, seconds to build)."""
    description: str = ""
    in_paper: bool = False
    """One of the models measured in PAPER.md."""
    dtype: str = "bfloat16"
    """Default weight dtype when built (tiny presets use float32, the CPU's)."""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def hf_config(self):
        """The transformers config object for this preset."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **dict(self.config))

    def parameters(self) -> int:
        """Parameter count, from the model built on the meta device (no memory, ~0.1 s)."""
        return _parameters(self.name)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    def weight_bytes(self) -> int:
        """Bytes of the weights in the preset's dtype."""
        return self.parameters() * self.dtype_bytes

    def kv_bytes_per_token(self) -> int | None:
        """KV cache bytes of one token in the preset's dtype (None without attention)."""
        from servers import sizes

        return sizes.kv_bytes_per_token(dict(self.config), self.model_type, self.dtype_bytes)

    def state_bytes_per_sequence(self, conv_window: int = 0) -> int | None:
        """Recurrent state bytes of one sequence (None without Mamba layers); ``conv_window``
        as in :func:`servers.sizes.state_bytes_per_sequence` (vLLM keeps kernel − 1: −1)."""
        from servers import sizes

        return sizes.state_bytes_per_sequence(dict(self.config), self.model_type, self.dtype_bytes, conv_window)


#: Bytes of one value in a preset's dtype.
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "float8": 1}


@functools.cache
def _parameters(name: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(PRESETS[name].hf_config())
    return sum(p.numel() for p in model.parameters())


def _p(*args, **kw) -> Preset:
    return Preset(*args, **kw)


_LONG = 1 << 20  # position limit of real-size attention presets: the server's budget decides

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # ---- Transformers, real size -------------------------------------------------------
        _p("qwen2.5-0.5b", "transformer", "qwen2",
           dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=_LONG,
                rope_theta=1e6, tie_word_embeddings=True),
           engine="vllm", hub_id="Qwen/Qwen2.5-0.5B-Instruct", in_paper=True,
           description="Qwen2.5-0.5B-Instruct, 24 layers, GQA 14/2"),
        _p("qwen2.5-1.5b", "transformer", "qwen2",
           dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=_LONG,
                rope_theta=1e6, tie_word_embeddings=True),
           engine="vllm", hub_id="Qwen/Qwen2.5-1.5B-Instruct", in_paper=True,
           description="Qwen2.5-1.5B-Instruct, 28 layers, GQA 12/2"),
        _p("llama-3.2-1b", "transformer", "llama",
           dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=_LONG,
                rope_theta=5e5, tie_word_embeddings=True),
           engine="vllm", hub_id="meta-llama/Llama-3.2-1B-Instruct", in_paper=True,
           description="Llama-3.2-1B-Instruct, 16 layers, GQA 32/8"),
        # ---- SSMs, real size ---------------------------------------------------------------
        _p("mamba-790m", "ssm", "mamba",
           dict(vocab_size=50280, hidden_size=1536, num_hidden_layers=48, state_size=16, expand=2,
                conv_kernel=4),
           engine="ssm-server", hub_id="state-spaces/mamba-790m-hf", in_paper=True,
           description="Mamba (selective scan), 48 layers, d_state 16"),
        _p("mamba2-130m", "ssm", "mamba2",
           dict(vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128, expand=2,
                head_dim=64, num_heads=24, n_groups=1, chunk_size=256),
           engine="ssm-server", hub_id="state-spaces/mamba2-130m", in_paper=True,
           description="Mamba2 (SSD), 24 layers, d_state 128"),
        _p("mamba2-780m", "ssm", "mamba2",
           dict(vocab_size=50288, hidden_size=1536, num_hidden_layers=48, state_size=128, expand=2,
                head_dim=64, num_heads=48, n_groups=1, chunk_size=256),
           engine="ssm-server", hub_id="state-spaces/mamba2-780m", in_paper=True,
           description="Mamba2 (SSD), 48 layers, d_state 128"),
        # ---- Hybrids, real size ------------------------------------------------------------
        _p("falcon-h1-0.5b", "hybrid", "falcon_h1",
           dict(vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_hidden_layers=36,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536,
                mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
                max_position_embeddings=_LONG),
           engine="vllm", hub_id="tiiuae/Falcon-H1-0.5B-Instruct", in_paper=True,
           description="Falcon-H1-0.5B: attention and Mamba2 heads in parallel in every layer"),
        _p("zamba2-1.2b", "hybrid", "zamba2",
           dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=38, mamba_d_state=64,
                mamba_headdim=64, mamba_ngroups=1, n_mamba_heads=64, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=8192, max_position_embeddings=_LONG,
                num_mem_blocks=1,
                # one shared attention block, applied every sixth layer (6, 12, …, 36)
                layers_block_type=["hybrid" if i and i % 6 == 0 else "linear_attention"
                                   for i in range(38)]),
           engine="vllm", hub_id="Zyphra/Zamba2-1.2B-instruct", in_paper=True,
           description="Zamba2-1.2B: Mamba2 backbone with shared attention blocks"),
        # ---- Tiny, for CPU (random weights, built in seconds) ------------------------------
        _p("tiny-llama", "transformer", "llama",
           dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                tie_word_embeddings=True),
           engine="vllm", tiny=True, dtype="float32",
           description="Llama architecture, 2 layers, hidden 128"),
        _p("tiny-mamba2", "ssm", "mamba2",
           dict(vocab_size=TINY_VOCAB, hidden_size=128, num_hidden_layers=2, state_size=16,
                expand=2, head_dim=32, num_heads=8, n_groups=1, chunk_size=64,
                tie_word_embeddings=True),
           engine="ssm-server", tiny=True, dtype="float32",
           description="Mamba2 architecture, 2 layers, hidden 128"),
        _p("tiny-mamba", "ssm", "mamba",
           dict(vocab_size=TINY_VOCAB, hidden_size=128, num_hidden_layers=2, state_size=16,
                expand=2, conv_kernel=4, tie_word_embeddings=True),
           engine="ssm-server", tiny=True, dtype="float32",
           description="Mamba (v1) architecture, 2 layers, hidden 128"),
        _p("tiny-falcon-h1", "hybrid", "falcon_h1",
           dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_d_ssm=256,
                mamba_n_heads=8, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
                mamba_chunk_size=64, max_position_embeddings=65536, tie_word_embeddings=True),
           engine="vllm", tiny=True, dtype="float32",
           description="Falcon-H1 architecture (parallel attention + Mamba2), 2 layers, hidden 128"),
    ]
}

#: The tiny preset that stands for each family in ``ctxload demo`` and the tests.
TINY_BY_FAMILY: dict[Family, str] = {
    "transformer": "tiny-llama",
    "ssm": "tiny-mamba2",
    "hybrid": "tiny-falcon-h1",
}


class UnknownPreset(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return self.args[0]


def get(name: str) -> Preset:
    """The preset called ``name``; a clear error listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPreset(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
