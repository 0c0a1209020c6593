"""Model directories: a preset written to disk with random weights and a local tokenizer.

A model directory is what ``save_pretrained`` writes (``config.json``, ``*.safetensors``,
tokenizer files) plus ``ctxload.json``, which records the preset and family.  Both
ssm-server and vLLM load it offline.  ``--no-weights`` writes only config and tokenizer:
enough for vLLM's ``--load-format dummy`` and ssm-server's ``--random-weights``, which
instantiate a real-size model without a multi-GB file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from servers import presets
from servers.tokenizer import save_tokenizer

META_FILE = "ctxload.json"
#: 2: config.json names its ``architectures`` (vLLM resolves a config without them as an
#: embedding model); a directory built under 1 is rebuilt.
SCHEMA_VERSION = 2

# The token ids every preset's tokenizer gives its specials (see servers.tokenizer).
_SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


@dataclass(frozen=True)
class ModelInfo:
    """What ``ctxload.json`` says about a model directory."""

    path: Path
    preset: str | None
    family: str
    model_type: str

    @property
    def name(self) -> str:
        return self.preset or self.path.name


def build(preset_name: str, out_dir: str | Path, *, weights: bool = True, seed: int = 0,
          dtype: str | None = None, log=print) -> Path:
    """Write the model directory of ``preset_name`` to ``out_dir`` and return its path.

    Rebuilding into a directory that already holds the same preset is a no-op, so callers
    (the demo, tests) can build into a cache directory freely.
    """
    import torch
    from transformers import AutoModelForCausalLM

    preset = presets.get(preset_name)
    out = Path(out_dir)
    dtype = dtype or preset.dtype
    want = {"preset": preset.name, "weights": weights, "seed": seed, "dtype": dtype,
            "schema_version": SCHEMA_VERSION}
    meta_path = out / META_FILE
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return out
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    max_len = int(preset.config.get("max_position_embeddings", 1 << 20))
    n_tok = save_tokenizer(out, preset.vocab_size, max_len)
    cfg = preset.hf_config()
    for k, v in _SPECIAL_IDS.items():
        setattr(cfg, k, v)
    cfg.dtype = dtype  # what loaders read when told dtype "auto"
    cfg.architectures = [causal_lm_class(preset.model_type)]
    if weights:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        model.save_pretrained(out, safe_serialization=True)
        n_params = sum(p.numel() for p in model.parameters())
        del model
    else:
        cfg.save_pretrained(out)
        n_params = None
    meta = dict(want, family=preset.family, model_type=preset.model_type,
                hub_id=preset.hub_id, tokenizer_vocab=n_tok, parameters=n_params,
                built_s=round(time.perf_counter() - t0, 2))
    meta_path.write_text(json.dumps(meta, indent=2))
    if log:
        log(f"built {preset.name} ({preset.family}) into {out} in {meta['built_s']} s")
    return out


def causal_lm_class(model_type: str) -> str:
    """The class that generates text for ``model_type`` (``Mamba2ForCausalLM``…): what vLLM
    reads from config.json's ``architectures`` to serve ``/v1/completions``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    except KeyError:
        raise ValueError(f"no causal-LM class for model_type {model_type!r}") from None


def info(path: str | Path) -> ModelInfo:
    """Describe a model directory: from ``ctxload.json`` when we built it, else from config."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{p} is not a model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    meta_path = p / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model_type = cfg.get("model_type", "unknown")
    return ModelInfo(path=p, preset=meta.get("preset"),
                     family=meta.get("family") or family_of_model_type(model_type),
                     model_type=model_type)


_SSM_TYPES = {"mamba", "mamba2"}
_HYBRID_TYPES = {"falcon_h1", "zamba", "zamba2", "jamba", "bamba", "nemotron_h", "granitemoehybrid",
                 "hymba", "plamo2"}


def family_of_model_type(model_type: str) -> str:
    if model_type in _SSM_TYPES:
        return "ssm"
    if model_type in _HYBRID_TYPES:
        return "hybrid"
    return "transformer"
