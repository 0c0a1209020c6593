"""The model backend: a transformers causal LM, its state slots, chunked prefill and decode.

SSM models (Mamba2, Mamba): every sequence's state is fixed-size (a conv window and an SSM
state per layer). A pool of ``num_slots`` such states is allocated up front; a prefill chunk
runs on a view of one slot (the model updates it in place, so the state carries from chunk
to chunk and memory stays flat), and a decode step gathers the running slots into one batch,
steps them together and scatters the states back. On CUDA that gather-step-scatter is
captured as a CUDA graph per batch-size bucket and replayed.

Models with attention layers (hybrids such as Falcon-H1, and Transformers as the baseline)
keep one transformers ``DynamicCache`` per slot (its KV cache grows with the sequence, within
the budget the slot count was sized for) and decode each sequence on its own.

The kernels are whatever transformers picks: mamba-ssm / causal-conv1d when importable, its
PyTorch reference otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from servers.ssm_server.config import ServerConfig
from servers.ssm_server.cuda_graphs import GraphDecoder
from servers import settings

log = logging.getLogger("ssm_server")

_MAMBA_CACHE_KW = {"mamba", "mamba2"}  # these models name their cache argument cache_params
_INEXACT_CHUNKING = {"mamba"}  # transformers' Mamba (v1) prefill ignores a carried SSM state


class ModelLoadError(RuntimeError):
    pass


def resolve_model_dir(model: str) -> tuple[Path, bool]:
    """(model directory, must use random weights). A preset name is built in ctxload's model
    cache (``servers.settings.models_dir``) as every caller builds it: random weights saved for
    a tiny preset, config and tokenizer only for a full-size one."""
    p = Path(model)
    if p.is_dir():
        return p, not any(p.glob("*.safetensors")) and not any(p.glob("*.bin"))
    from servers import modeldir, presets

    try:
        presets.get(model)
    except KeyError as e:
        raise ModelLoadError(f"--model {model!r} is neither a model directory nor a preset: {e}") from None
    out = settings.models_dir() / model
    modeldir.build(model, out, weights=presets.get(model).tiny, log=None)
    return out, True


class HFBackend:
    def __init__(self, cfg: ServerConfig):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" → "cuda:N"
            self.device = torch.device("cuda", torch.cuda.current_device())
        path, random_only = resolve_model_dir(cfg.model)
        self.path = path
        hf_cfg = AutoConfig.from_pretrained(path)
        self.model_type = hf_cfg.model_type
        if self.model_type == "mamba" and self.device.type == "cuda":
            from servers.ssm_server.mamba_kernels import scan_stubbed

            if scan_stubbed():
                raise ModelLoadError("this process loaded mamba_ssm without its CUDA scan (for the native "
                                     "Mamba2 backend); serve Mamba (v1) through transformers in a process of its own")
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = str(getattr(hf_cfg, "dtype", None) or "float32").replace("torch.", "")
            if self.device.type == "cpu" and dtype in ("bfloat16", "float16"):
                dtype = "float32"
        self.dtype = getattr(torch, dtype)
        if cfg.random_weights or random_only:
            with torch.device(self.device):
                self.model = AutoModelForCausalLM.from_config(hf_cfg, dtype=self.dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device)
        self.model.eval()
        self.config = hf_cfg
        self.vocab_size = int(hf_cfg.vocab_size)
        self.cache_kw = "cache_params" if self.model_type in _MAMBA_CACHE_KW else "past_key_values"
        self.exact_chunking = self.model_type not in _INEXACT_CHUNKING
        self.max_model_len = cfg.max_model_len or int(getattr(hf_cfg, "max_position_embeddings", 0) or 0) \
            or (1 << 30)
        self._probe_state()
        self._size_pool(cfg)
        if self.device.type == "cuda" and self.exact_chunking:
            self._check_chunking_on_cuda()
        self.graphs = None
        if self.pooled and self.device.type == "cuda" and cfg.cuda_graphs:
            self.graphs = GraphDecoder(self, cfg.max_num_seqs)

    # ---- layout -------------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, ids: torch.Tensor, cache, positions: torch.Tensor | None = None):
        kw = {self.cache_kw: cache, "use_cache": True, "logits_to_keep": 1}
        if positions is not None and self.cache_kw == "past_key_values":
            kw["cache_position"] = positions
        return self.model(input_ids=ids, **kw).logits[:, -1]

    @torch.inference_mode()
    def _probe_state(self) -> None:
        """Run two tokens once to learn each layer's state shapes and the KV bytes per token."""
        cache = self.new_cache()
        self.forward(torch.zeros((1, 2), dtype=torch.long, device=self.device), cache,
                     torch.arange(2, device=self.device))
        self.linear_layers: list[int] = []
        self.state_shapes: list[tuple[tuple, tuple | None, torch.dtype]] = []
        kv_bytes_2 = 0
        for i, layer in enumerate(cache.layers):
            conv = getattr(layer, "conv_states", {}).get(0) if hasattr(layer, "conv_states") else None
            rec = getattr(layer, "recurrent_states", {}).get(0) if hasattr(layer, "recurrent_states") else None
            if conv is not None:
                self.linear_layers.append(i)
                self.state_shapes.append((tuple(conv.shape[1:]),
                                          tuple(rec.shape[1:]) if rec is not None else None, conv.dtype))
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 4:
                    kv_bytes_2 += t.numel() * t.element_size()
        self.kv_bytes_per_token = kv_bytes_2 // 2
        self.pooled = self.kv_bytes_per_token == 0 and len(self.linear_layers) == len(cache.layers)
        el = torch.tensor([], dtype=self.state_shapes[0][2]).element_size() if self.state_shapes else 0
        self.state_bytes = sum(
            (_numel(c) + (_numel(r) if r else 0)) * el for c, r, _ in self.state_shapes)

    @torch.inference_mode()
    def _check_chunking_on_cuda(self) -> None:
        """On CUDA, transformers' SSM layers may take their fused-kernel prefill path, which
        ignores a carried state (wrong logits after the first chunk). Prefill a short random
        prompt in one chunk and in three into slot 0 and compare; if they differ, every prompt
        is prefilled in one chunk (correct; peak memory then grows with the prompt)."""
        n = 96
        ids = torch.randint(1, self.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        try:
            one = self.prefill_chunk(0, ids, 0).float()
            for s in range(0, n, 40):
                three = self.prefill_chunk(0, ids[s:s + 40], s).float()
            diff = (one - three).abs().max().item() / max(one.abs().max().item(), 1e-6)
        except Exception as e:  # a model that cannot run the probe: be safe
            diff, why = float("inf"), f"{type(e).__name__}: {e}"
        else:
            why = f"max |logit diff| {diff:.3g} of the logit scale"
        finally:
            self.free(0)
        tol = 1e-3 if self.dtype == torch.float32 else 0.03
        if not diff <= tol:
            self.exact_chunking = False
            log.warning("transformers backend on CUDA: chunked prefill does not carry the state for %s "
                        "(%s); prompts are prefilled in ONE chunk (correct logits, but peak memory grows "
                        "with the prompt, and a long prompt stalls running streams for its whole prefill)",
                        self.model_type, why)
        else:
            log.info("transformers backend on CUDA: chunked prefill carries the state (%s)", why)

    def _size_pool(self, cfg: ServerConfig) -> None:
        per_seq = self.state_bytes
        if not self.pooled:
            per_seq += self.kv_bytes_per_token * min(self.max_model_len, 1 << 20)
        slots = cfg.max_num_seqs
        if cfg.gpu_memory_budget:
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            free = cfg.gpu_memory_budget - weights
            # Keep half of what is left for prefill activations (chunk-sized, so bounded).
            room = free * 0.5
            if not self.pooled and cfg.max_model_len is None:
                # models with a KV cache: keep --max-num-seqs and bound the context instead, so
                # that every slot can hold a full-length sequence within the budget; a longer
                # prompt is a 400 (context_length_exceeded) at the API
                per_tok = self.kv_bytes_per_token * slots
                fit = int((room - self.state_bytes * slots) // max(per_tok, 1))
                if fit < 2:
                    raise ModelLoadError(
                        f"--gpu-memory-budget leaves no room for {slots} sequences: weights {weights} B, "
                        f"{self.kv_bytes_per_token} B KV per token; lower --max-num-seqs")
                if fit < self.max_model_len:
                    log.info("--gpu-memory-budget: max model length %d tokens (KV %d B/token x %d slots "
                             "in half the budget left after weights)", fit, self.kv_bytes_per_token, slots)
                    self.max_model_len = fit
                per_seq = self.state_bytes + self.kv_bytes_per_token * self.max_model_len
            by_budget = int(room // max(per_seq, 1))
            if by_budget < 1:
                raise ModelLoadError(
                    f"--gpu-memory-budget leaves no room for one sequence: weights {weights} B, "
                    f"{per_seq} B per sequence")
            slots = min(slots, by_budget)
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_budget / total), self.device)
        self.num_slots = slots
        # one row past the slots: the scratch row a graph's padding rows read and write
        self.scratch_slot = slots
        self.conv_pool: list[torch.Tensor] = []
        self.rec_pool: list[torch.Tensor | None] = []
        self.caches: list = [None] * slots
        if self.pooled:
            for conv_shape, rec_shape, dt in self.state_shapes:
                self.conv_pool.append(torch.zeros((slots + 1, *conv_shape), dtype=dt, device=self.device))
                self.rec_pool.append(torch.zeros((slots + 1, *rec_shape), dtype=dt, device=self.device)
                                     if rec_shape else None)

    # ---- slots ----------------------------------------------------------------------------
    def bind(self, cache, conv: list[torch.Tensor], rec: list[torch.Tensor | None], fresh: bool):
        """Point ``cache``'s SSM layers at the given state tensors (updated in place)."""
        for k, i in enumerate(self.linear_layers):
            layer = cache.layers[i]
            layer.conv_states[0] = conv[k]
            layer.conv_kernel_size[0] = conv[k].shape[-1]
            layer.is_conv_states_initialized[0] = True
            if rec[k] is not None:
                layer.recurrent_states[0] = rec[k]
                layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = not fresh
            layer.device, layer.dtype = conv[k].device, conv[k].dtype
        return cache

    def slot_cache(self, slot: int, fresh: bool):
        if not self.pooled:
            if fresh:
                self.caches[slot] = self.new_cache()
            return self.caches[slot]
        if fresh:
            for t in self.conv_pool + [r for r in self.rec_pool if r is not None]:
                t[slot].zero_()
        conv = [t[slot:slot + 1] for t in self.conv_pool]
        rec = [t[slot:slot + 1] if t is not None else None for t in self.rec_pool]
        return self.bind(self.new_cache(), conv, rec, fresh)

    def free(self, slot: int) -> None:
        self.caches[slot] = None

    def kv_bytes_used(self, lengths: list[int]) -> int:
        return self.kv_bytes_per_token * sum(lengths)

    # ---- compute ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_chunk(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Run prompt tokens ``ids`` (positions ``start``…) of the sequence in ``slot``;
        returns the logits after the last one ([V])."""
        cache = self.slot_cache(slot, fresh=start == 0)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)
        return self.forward(x, cache, pos)[0]

    def prefill_packed(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Several whole fresh prompts, one forward each (transformers' models here take no
        packed batch): the engine still gives all their first tokens in one step."""
        return torch.stack([self.prefill_chunk(s, p, 0) for s, p in zip(slots, prompts)])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step of every listed sequence; returns logits [B, V]."""
        if not self.pooled:
            rows = []
            for s, t, p in zip(slots, tokens, positions):
                x = torch.tensor([[t]], dtype=torch.long, device=self.device)
                rows.append(self.forward(x, self.caches[s], torch.tensor([p], device=self.device))[0])
            return torch.stack(rows)
        if self.graphs is not None:
            out = self.graphs.step(slots, tokens)
            if out is not None:
                return out
        return self.decode_eager(slots, tokens)

    def decode_eager(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        conv = [t.index_select(0, idx) for t in self.conv_pool]
        rec = [t.index_select(0, idx) if t is not None else None for t in self.rec_pool]
        cache = self.bind(self.new_cache(), conv, rec, fresh=False)
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        logits = self.forward(x, cache)
        self.scatter_states(idx, conv, rec)
        return logits

    def scatter_states(self, idx: torch.Tensor, conv: list, rec: list) -> None:
        """Write the stepped states of the rows ``idx`` back into the slot pools."""
        for k in range(len(conv)):
            self.conv_pool[k].index_copy_(0, idx, conv[k])
            if rec[k] is not None:
                self.rec_pool[k].index_copy_(0, idx, rec[k])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
