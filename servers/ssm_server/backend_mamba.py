"""The native backend: Mamba2 through mamba_ssm's modules and Triton kernels, on CUDA.

Used when the device is CUDA, the model is a Mamba2 and mamba_ssm imports (``select_backend``);
transformers' backend (``backend_hf``) serves everything else (CPU, Mamba v1, hybrids,
Transformers). Same interface as ``HFBackend``.

- Weights: ``MambaLMHeadModel`` built from the HF config of the preset / model directory; an
  HF-format directory's safetensors load with one key renamed (HF ``backbone.embeddings`` is
  mamba_ssm's ``backbone.embedding``); ``--random-weights`` only instantiates.
- State pool, allocated up front: conv windows [layers, slots, conv_dim, d_conv] and SSM states
  [layers, slots, heads, head_dim, d_state], in the model dtype (as mamba_ssm's own inference
  cache), slot count from ``--max-num-seqs`` capped by ``--gpu-memory-budget``.
- Prefill, one chunk at a time, per layer written here: in_proj → split (z, xBC, dt) → the
  causal conv over [the slot's last d_conv−1 inputs] ++ chunk → ``mamba_chunk_scan_combined``
  with ``initial_states`` = the slot's SSM state and ``return_final_states`` → gated RMSNorm →
  out_proj; the conv window and SSM state are written back. Activations are chunk-sized, so
  peak memory does not grow with the prompt; logits are computed for the last position only.
  Several short fresh prompts go in one forward (``prefill_packed``: packed end to end, the
  conv and the scan kept within each sequence).
- Decode: ``mamba_decode.NativeDecoder`` (a CUDA graph per batch-size bucket).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from servers import sizes
from servers.ssm_server.backend_hf import HFBackend, ModelLoadError, resolve_model_dir
from servers.ssm_server.config import ServerConfig
from servers.ssm_server.mamba_kernels import conv_chunk, conv_packed, import_mamba_ssm, last_windows
from servers.ssm_server.mamba_prefill import ROWS as PREFILL_ROWS
from servers.ssm_server.mamba_prefill import Pack, PrefillGraphs, graph_sizes

log = logging.getLogger("ssm_server")

PIECES = 2
"""A chunk up to this many times the largest prefill graph runs as replays of graph-sized
pieces, not one eager forward, whose ~700 kernel launches cost ~50 ms however short the chunk:
on an H200 a 16K-token text prompt's TTFT went from 142 to 135 ms (2026-12-03). Past ~24K the
eager forward is bound by its work, not its launches, and one forward is as fast."""


def native_unavailable(cfg: ServerConfig, model_type: str | None = None) -> str | None:
    """None when the native backend can serve ``cfg``; otherwise why not."""
    if not str(cfg.device).startswith("cuda"):
        return "device is not CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if model_type is None:
        path, _ = resolve_model_dir(cfg.model)
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type != "mamba2":
        return f"model_type {model_type!r} is not mamba2"
    return import_mamba_ssm()


def select_backend(cfg: ServerConfig):
    """The native mamba_ssm backend where it applies (or ``--backend mamba_ssm`` demands it),
    transformers otherwise."""
    choice = getattr(cfg, "backend", "auto")
    if choice == "hf":
        return HFBackend(cfg)
    why = native_unavailable(cfg)
    if why is None:
        return MambaBackend(cfg)
    if choice == "mamba_ssm":
        raise ModelLoadError(f"--backend mamba_ssm: {why}")
    log.info("native mamba_ssm backend not used (%s): transformers backend", why)
    return HFBackend(cfg)


def mamba_config_from_hf(hf_cfg):
    """mamba_ssm's MambaConfig equivalent to a transformers Mamba2Config."""
    from mamba_ssm.models.config_mamba import MambaConfig

    limit = tuple(getattr(hf_cfg, "time_step_limit", (0.0, float("inf"))) or (0.0, float("inf")))
    ssm = dict(layer="Mamba2", d_state=hf_cfg.state_size, d_conv=hf_cfg.conv_kernel, expand=hf_cfg.expand,
               headdim=hf_cfg.head_dim, ngroups=hf_cfg.n_groups, chunk_size=hf_cfg.chunk_size,
               bias=bool(hf_cfg.use_bias), conv_bias=bool(hf_cfg.use_conv_bias),
               use_mem_eff_path=False, dt_limit=(float(limit[0]), float(limit[1])))
    expect = hf_cfg.expand * hf_cfg.hidden_size // hf_cfg.head_dim
    if getattr(hf_cfg, "num_heads", expect) != expect:
        raise ModelLoadError(f"num_heads {hf_cfg.num_heads} != expand*hidden/head_dim {expect}: "
                             "not expressible in mamba_ssm's Mamba2")
    return MambaConfig(d_model=hf_cfg.hidden_size, d_intermediate=0, n_layer=hf_cfg.num_hidden_layers,
                       vocab_size=hf_cfg.vocab_size, ssm_cfg=ssm, rms_norm=True,
                       residual_in_fp32=bool(getattr(hf_cfg, "residual_in_fp32", True)),
                       fused_add_norm=True, pad_vocab_size_multiple=1,
                       tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)))


def hf_to_mamba_ssm_key(key: str) -> str:
    return key.replace("backbone.embeddings.", "backbone.embedding.", 1)


def load_hf_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors (the native backend reads safetensors only)")
    state = {}
    for f in files:
        state.update({hf_to_mamba_ssm_key(k): v for k, v in load_file(str(f)).items()})
    if "lm_head.weight" not in state and "backbone.embedding.weight" in state:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")


class MambaBackend:
    exact_chunking = True
    pooled = True
    kv_bytes_per_token = 0

    def __init__(self, cfg: ServerConfig):
        why = import_mamba_ssm()
        if why:
            raise ModelLoadError(why)
        from transformers import AutoConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        self.device = torch.device(cfg.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        path, random_only = resolve_model_dir(cfg.model)
        self.path = path
        hf_cfg = AutoConfig.from_pretrained(path)
        self.config = hf_cfg
        self.model_type = hf_cfg.model_type
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = str(getattr(hf_cfg, "dtype", None) or "bfloat16").replace("torch.", "")
            dtype = "bfloat16" if dtype == "float32" else dtype  # Triton kernels: bf16 / fp16 serve
        self.dtype = getattr(torch, dtype)
        mcfg = mamba_config_from_hf(hf_cfg)
        if cfg.gpu_memory_budget:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_budget / total), self.device)
        self.model = MambaLMHeadModel(mcfg, device=self.device, dtype=self.dtype).eval()
        if not (cfg.random_weights or random_only):
            load_hf_weights(self.model, path)
        self.vocab_size = int(hf_cfg.vocab_size)
        self.max_model_len = cfg.max_model_len or (1 << 30)  # no positional limit in an SSM
        bb = self.model.backbone
        self.layers = list(bb.layers)
        m0 = self.layers[0].mixer
        self.d_ssm, self.ngroups, self.d_state = m0.d_ssm, m0.ngroups, m0.d_state
        self.nheads, self.headdim, self.d_conv = m0.nheads, m0.headdim, m0.d_conv
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        if m0.in_proj.out_features != self.d_ssm + self.conv_dim + self.nheads:
            raise ModelLoadError("Mamba2 with a gated MLP part (d_ssm < d_inner) is not supported natively")
        # each layer's depthwise conv weight as the conv kernels take it: [conv_dim, d_conv], contiguous
        self.conv_weights = [layer.mixer.conv1d.weight.reshape(self.conv_dim, self.d_conv).contiguous()
                             for layer in self.layers]
        self.chunk_tokens = cfg.prefill_chunk_size
        # a padded continuation chunk leaves the state as its real tokens do only while a zero dt
        # stays zero (mamba_prefill: the padding's dt is -inf, softplus'd to 0)
        self.pads_continuation = all(layer.mixer.dt_limit[0] <= 0.0 for layer in self.layers)
        # decode steps on a high-priority stream, prefill chunks (the engine's prefill thread)
        # on a low-priority one: the device runs a decode step's kernels first when both wait
        # (a priority past the device's range is taken as its highest: -100 is the highest)
        self.decode_stream = torch.cuda.Stream(self.device, priority=-100)
        self.prefill_stream = torch.cuda.Stream(self.device, priority=0)
        self._size_pool(cfg)
        self.graphs = None
        from servers.ssm_server.mamba_decode import NativeDecoder

        self.decoder = NativeDecoder(self, self.num_slots, use_graphs=cfg.cuda_graphs)
        self.graphs = self.decoder if cfg.cuda_graphs else None
        self.prefill_graphs = None
        if self.graphs is not None:
            import time

            t = time.perf_counter()
            self.decoder.capture_all()  # Triton JIT and capture now, not in the first requests
            log.info("captured %d decode graphs in %.1f s", len(self.decoder.set), time.perf_counter() - t)
            self.prefill_graphs = PrefillGraphs(self, cfg.prefill_chunk_size)
            self.prefill_graphs.capture_all()

    # ---- state pool -------------------------------------------------------------------------
    def _size_pool(self, cfg: ServerConfig) -> None:
        el = torch.tensor([], dtype=self.dtype).element_size()
        n_layer = len(self.layers)
        conv_b = n_layer * self.conv_dim * self.d_conv * el
        ssm_b = n_layer * self.nheads * self.headdim * self.d_state * el
        self.state_bytes = conv_b + ssm_b
        slots = cfg.max_num_seqs
        if cfg.gpu_memory_budget:
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            free = cfg.gpu_memory_budget - weights - self.prefill_reserve_bytes(cfg.prefill_chunk_size) \
                - self.decode_reserve_bytes(cfg.max_num_seqs) - self.prefill_graphs_reserve_bytes(cfg)
            by_budget = int(free // self.state_bytes)
            if by_budget < 1:
                raise ModelLoadError(
                    f"--gpu-memory-budget leaves no room for one sequence: weights {weights} B, prefill "
                    f"and decode working memory, {self.state_bytes} B state per sequence")
            slots = min(slots, by_budget)
        self.num_slots = slots
        shape_c = (n_layer, slots, self.conv_dim, self.d_conv)
        shape_s = (n_layer, slots, self.nheads, self.headdim, self.d_state)
        self.conv_pool = torch.zeros(shape_c, dtype=self.dtype, device=self.device)
        self.ssm_pool = torch.zeros(shape_s, dtype=self.dtype, device=self.device)

    def prefill_reserve_bytes(self, chunk: int) -> int:
        """Working memory of one prefill chunk (activations live for one layer at a time)."""
        return sizes.mamba2_prefill_reserve_bytes(self.model.backbone.embedding.embedding_dim, self.d_ssm,
                                                  self.conv_dim, self.nheads, self.headdim, self.d_state, chunk)

    def prefill_graphs_reserve_bytes(self, cfg: ServerConfig) -> int:
        """The prefill graphs' memory pool (the largest one's activations, held) and each one's
        logits (``mamba_prefill``)."""
        sizes = graph_sizes(cfg.prefill_chunk_size) if cfg.cuda_graphs else []
        if not sizes:
            return 0
        rows = sum(PREFILL_ROWS) + 1  # each pack graph's logits, and a continuation graph's
        return self.prefill_reserve_bytes(sizes[-1]) + len(sizes) * rows * self.vocab_size * 4

    def decode_reserve_bytes(self, batch: int) -> int:
        return sizes.decode_reserve_bytes(self.vocab_size, batch)

    def free(self, slot: int) -> None:
        pass  # a slot's state is overwritten from zero by the next prefill that takes it

    def kv_bytes_used(self, lengths: list[int]) -> int:
        return 0

    # ---- the engine's threads ------------------------------------------------------------------
    def device_thread(self) -> None:
        """Initializer of the engine's device thread: decode steps on the high-priority stream."""
        torch.cuda.set_device(self.device)
        torch.cuda.set_stream(self.decode_stream)

    def prefill_thread(self) -> None:
        """Initializer of the engine's prefill thread: chunks on the low-priority stream."""
        torch.cuda.set_device(self.device)
        torch.cuda.set_stream(self.prefill_stream)

    # ---- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_chunk(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Run prompt tokens ``ids`` (positions ``start``…) of the sequence in ``slot``; returns
        the logits after the last one ([V], float32). A chunk that a prefill graph holds (a
        fresh sequence's, or a continuation's) is a replay of it; one up to ``PIECES`` times the
        largest graph is replays of pieces of it. On a stream other than the
        decode stream, the chunk first waits for the decode steps enqueued so far: one still in
        flight may write the slot for the sequence that held it before (a pipelined step runs one
        token past a sequence's end)."""
        self._after_decode()
        if self.prefill_graphs is not None:
            g = self.prefill_graphs
            out = g.run([slot], [ids]) if start == 0 else g.run_continued(slot, ids)
            if out is not None:
                return out[0]
            top = g.largest_piece()
            if 0 < top < len(ids) <= PIECES * top:  # in pieces the graphs hold: faster up to here
                first = g.run([slot], [ids[:top]]) if start == 0 else g.run_continued(slot, ids[:top])
                if first is not None:
                    return self.prefill_chunk(slot, ids[top:], start + top)
        x = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)[None]
        fresh = start == 0
        return self._forward(x, lambda m, u, i: self._mixer_chunk(m, u, i, slot, fresh),
                             slice(len(ids) - 1, len(ids)))[0]

    @torch.inference_mode()
    def prefill_packed(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Whole prompts of several fresh sequences (``prompts[j]`` into ``slots[j]``) in ONE
        forward, packed end to end: in_proj, norms and out_proj see one long chunk; the conv reads
        no other sequence's inputs (``conv_packed``) and the scan restarts at each sequence
        (mamba_ssm's ``seq_idx``, each final state from ``cu_seqlens``). Returns the logits after
        each prompt's last token ([n, V], float32); a replay of a prefill graph where one holds
        them. Same stream rule as ``prefill_chunk``. Several short prompts arriving together
        then cost one launch of the model's kernels, not one each."""
        self._after_decode()
        if self.prefill_graphs is not None:
            out = self.prefill_graphs.run(slots, prompts)
            if out is not None:
                return out
        lens = [len(p) for p in prompts]
        ends = torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), ends])
        seq_idx = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens))
        pack = Pack(slots=torch.tensor(slots), cu=cu, seq_idx=seq_idx, starts=cu[seq_idx.long()],
                    rows=(ends - 1).long())
        pack = Pack(**{k: v.to(self.device, non_blocking=True) for k, v in vars(pack).items() if v is not None})
        x = torch.tensor([t for p in prompts for t in p], dtype=torch.long).to(self.device, non_blocking=True)
        return self.packed_forward(x[None], pack)

    def packed_forward(self, ids: torch.Tensor, pack: Pack) -> torch.Tensor:
        """The packed prefill of device tensors ``ids`` [1, L] and ``pack`` (captured as is by
        ``mamba_prefill.PrefillGraphs``): logits [rows, V]."""
        return self._forward(ids, lambda m, u, i: self._mixer_packed(m, u, i, pack), pack.rows)

    def continued_forward(self, ids: torch.Tensor, slot: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The next chunk of the sequence in ``slot`` ([1] device tensor) from device tensors
        only (captured as is by ``mamba_prefill.PrefillGraphs``): its first ``n`` ([1], at least
        the conv width) of the ``ids`` [1, T] are real, the rest padding that leaves the slot as
        the real tokens do. Logits [1, V] after the n-th."""
        pad = torch.arange(ids.shape[1], device=ids.device) >= n
        # the real chunk's last d_conv inputs: the window each layer carries on (once, not per layer)
        last = n - self.d_conv + torch.arange(self.d_conv, device=ids.device)
        return self._forward(ids, lambda m, u, i: self._mixer_continued(m, u, i, slot, last, pad), n - 1)

    def _after_decode(self) -> None:
        stream = torch.cuda.current_stream(self.device)
        if stream != self.decode_stream:
            stream.wait_stream(self.decode_stream)

    def _forward(self, x: torch.Tensor, mixer, at) -> torch.Tensor:
        """Embedding of ``x`` [1, L] → each layer (fused add + RMSNorm, then
        ``mixer(layer.mixer, h, i)``) → the final norm and lm_head at positions ``at`` (a slice
        or an index tensor) only: logits [rows, V] float32."""
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

        bb = self.model.backbone
        h = bb.embedding(x)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer_norm_fn(h, layer.norm.weight, layer.norm.bias, residual=residual, prenorm=True,
                                        residual_in_fp32=bb.residual_in_fp32, eps=layer.norm.eps,
                                        is_rms_norm=True)
            h = mixer(layer.mixer, h, i)
        h = layer_norm_fn(h[:, at], bb.norm_f.weight, bb.norm_f.bias, eps=bb.norm_f.eps,
                          residual=residual[:, at], prenorm=False, residual_in_fp32=bb.residual_in_fp32,
                          is_rms_norm=True)
        return self.model.lm_head(h)[0, :, :self.vocab_size].float()

    def _mixer_chunk(self, m, u: torch.Tensor, i: int, slot: int, fresh: bool) -> torch.Tensor:
        conv_state = self.conv_pool[i, slot]  # [conv_dim, d_conv]: the last d_conv inputs
        ssm_state = self.ssm_pool[i, slot]  # [heads, head_dim, d_state]
        z, xBC, dt = self._in_proj(m, u)
        # silu(causal depthwise conv) read in place from in_proj's output, continuing the carried
        # window (one Triton kernel: no concatenation, no copy of the chunk; bench_conv1d.py)
        xBC = conv_chunk(xBC[0], conv_state, self.conv_weights[i], m.conv1d.bias, fresh)
        y, last = self._scan(m, xBC, dt, initial_states=None if fresh else ssm_state[None].float(),
                             return_final_states=True)
        ssm_state.copy_(last[0])
        return self._out(m, y, z)

    def _mixer_continued(self, m, u: torch.Tensor, i: int, slot: torch.Tensor, last: torch.Tensor,
                         pad: torch.Tensor) -> torch.Tensor:
        z, xBC, dt = self._in_proj(m, u)
        raw = xBC[0]
        window = self.conv_pool[i].index_select(0, slot)[0]  # a copy: conv_chunk's window update is moot
        xBC = conv_chunk(raw, window, self.conv_weights[i], m.conv1d.bias, False)
        self.conv_pool[i].index_copy_(0, slot, raw[last].transpose(0, 1)[None])
        dt = dt.masked_fill(pad[None, :, None], float("-inf"))  # softplus(-inf) = 0: no decay, no input
        y, final = self._scan(m, xBC, dt, initial_states=self.ssm_pool[i].index_select(0, slot).float(),
                              return_final_states=True)
        self.ssm_pool[i].index_copy_(0, slot, final.to(self.ssm_pool.dtype))
        return self._out(m, y, z)

    def _mixer_packed(self, m, u: torch.Tensor, i: int, pack: Pack) -> torch.Tensor:
        z, xBC, dt = self._in_proj(m, u)
        raw = xBC[0]
        xBC = conv_packed(raw, self.conv_weights[i], m.conv1d.bias, pack.starts, self.d_conv)
        windows = last_windows(raw, pack.cu[:-1], pack.cu[1:], self.d_conv)
        y, states = self._scan(m, xBC, dt, seq_idx=pack.seq_idx[None], cu_seqlens=pack.cu,
                               return_varlen_states=True)
        if pack.src is not None:  # a graph's spare rows: row 0's again, into row 0's slot
            windows, states = windows[pack.src], states[pack.src]
        self.conv_pool[i].index_copy_(0, pack.slots, windows)
        self.ssm_pool[i].index_copy_(0, pack.slots, states.to(self.ssm_pool.dtype))
        return self._out(m, y, z)

    def _in_proj(self, m, u: torch.Tensor):
        """(z, xBC, dt): views of in_proj's output, not copies."""
        return torch.split(m.in_proj(u), [self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _scan(self, m, xBC: torch.Tensor, dt: torch.Tensor, **kw):
        """mamba_ssm's chunked scan of the conv's output [L, conv_dim] (one batch row)."""
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        L = xBC.shape[0]
        x, B, C = torch.split(xBC[None], [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state],
                              dim=-1)
        A = -torch.exp(m.A_log.float())
        if m.dt_limit != (0.0, float("inf")):
            kw["dt_limit"] = m.dt_limit
        return mamba_chunk_scan_combined(
            x.reshape(1, L, self.nheads, self.headdim), dt, A,
            B.reshape(1, L, self.ngroups, self.d_state), C.reshape(1, L, self.ngroups, self.d_state),
            chunk_size=m.chunk_size, D=m.D, z=None, dt_bias=m.dt_bias, dt_softplus=True, **kw)

    def _out(self, m, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return m.out_proj(m.norm(y.reshape(1, y.shape[1], self.d_ssm), z))

    # ---- decode -------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step of every listed sequence; returns logits [B, V] (float32)."""
        return self.decoder.logits(slots, tokens)

    def decode_eager(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self.decoder.logits(slots, tokens, eager=True)

    @torch.inference_mode()
    def decode_sample(self, slots, tokens, params, banned, generators) -> list[int]:
        """One step and the sampled token of every listed sequence (sampling on the device)."""
        return self.decoder.step_sample(slots, tokens, params, banned, generators)

    def can_launch(self, generators, banned) -> bool:
        """Whether ``decode_launch`` serves this batch (no host-seeded rows, <= 1 banned id)."""
        return all(g is None for g in generators) and all(len(x) <= 1 for x in banned)

    @torch.inference_mode()
    def decode_launch(self, slots, tokens, params, banned):
        """Enqueue one decode step with on-device sampling and return at once (a handle for
        ``decode_collect``). ``tokens[i]`` = -1: the row's input is its slot's last sampled token,
        still on the device (so step N+1 can start before step N's tokens are read back)."""
        return self.decoder.launch(slots, tokens, params, banned)

    def decode_collect(self, handle) -> list[int]:
        """Wait for a launched step and return its sampled tokens."""
        return self.decoder.collect(handle)

    @torch.inference_mode()
    def full_forward_last(self, ids: torch.Tensor) -> torch.Tensor:
        """mamba_ssm's own one-shot forward: logits of every position [L, V] (for checks)."""
        return self.model(ids, num_last_tokens=0).logits[0, :, :self.vocab_size].float()
