"""vLLM launch profiles: the arguments each preset is served with, and ``ctxload serve vllm``.

vLLM is not ours; ctxload only decides how to start it.  A :class:`Profile` holds what differs
per preset (the longest context, memory use, chunked prefill, whether prefix caching may be
on); :func:`vllm_args` turns a profile and a model into vLLM's command-line arguments and
:func:`command` into a whole command line.  The same function serves ``ctxload serve vllm``,
the load generator (scenario targets that ask to be served), the tests and the Docker stack,
whose vLLM containers run ``python3 -m servers.vllm_launch PRESET --exec`` inside the official
image, so that there is one source of these arguments.

Rules that hold for every profile:

- the served model name is the preset's name (what scenarios and dashboards call it);
- hybrids and SSMs run with prefix caching off, unless a scenario reuses prefixes (shared
  documents, a trace, conversations: :func:`prefix_caching`), when vLLM keeps their recurrent
  state at chunk ends in its ``align`` Mamba cache mode;
- a model directory without weights (``ctxload models build PRESET --no-weights``) is served
  with ``--load-format dummy``: random weights at the real size, nothing downloaded;
- the CPU profile (tiny presets, or ``--cpu``) adds ``--enforce-eager`` and sizes the KV cache
  in bytes (``--kv-cache-memory-bytes``), since a CPU has no memory fraction to speak of.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from servers import presets
from servers.sizes import parse_bytes  # noqa: F401 - re-exported for `ctxload serve vllm`
from servers import settings
from servers.process import arg_value


#: Default port of an OpenAI-compatible server (vLLM's).
DEFAULT_PORT = 8000
#: Where a preset's model directory is built when a preset name (not a directory) is given.

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


@dataclass(frozen=True)
class Profile:
    """How one preset is served by vLLM."""

    max_model_len: int | str
    """Longest prompt + output accepted; vLLM refuses to start if the KV cache cannot hold one.
    ``auto``: the longest the KV cache holds under the memory share (vLLM fits it after
    profiling, up to the model's position limit)."""
    gpu_memory_utilization: float = 0.90
    """Fraction of the GPU's memory vLLM may take (weights, activations, KV cache)."""
    enable_chunked_prefill: bool = True
    """Split long prompts into chunks of ``max_num_batched_tokens`` interleaved with decodes."""
    max_num_batched_tokens: int = 8192
    """Tokens per engine step (the prefill chunk size)."""
    max_num_seqs: int = 64
    """Sequences decoded together at most."""
    enable_prefix_caching: bool = True
    """Off for hybrids and SSMs unless asked (:func:`prefix_caching`)."""
    mamba_cache_mode: str | None = None
    """With prefix caching on for an SSM or hybrid: vLLM's ``--mamba-cache-mode``."""
    cpu: bool = False
    """The CPU profile: eager mode, KV cache sized in bytes."""
    kv_cache_memory_bytes: int = 128 << 20
    """KV cache size of the CPU profile."""
    tensor_parallel_size: int = 1
    """GPUs the model is split across (``--tensor-parallel-size``)."""
    data_parallel_size: int = 1
    """Replicas of the model, one per GPU (``--data-parallel-size``)."""


# On a GPU, a model with attention is served as long a context as its KV cache holds
# (vLLM's ``auto``); an SSM's state does not grow with the context, so it gets a fixed
# 1M tokens + 1K of output, past what its config declares (VLLM_ALLOW_LONG_MAX_MODEL_LEN).
_GPU_LEN = "auto"
_SSM_GPU_LEN = (1 << 20) + 1024


def profile_for(preset_name: str, *, cpu: bool | None = None) -> Profile:
    """The launch profile of a preset; ``cpu=None`` means CPU for tiny presets, GPU otherwise."""
    preset = presets.get(preset_name)
    return _profile(preset.family, preset.tiny, cpu)


def _profile(family: str, tiny: bool, cpu: bool | None) -> Profile:
    cpu = tiny if cpu is None else cpu
    recurrent = family in ("ssm", "hybrid")
    if cpu:
        return Profile(max_model_len=2048, max_num_batched_tokens=2048, max_num_seqs=16,
                       enable_prefix_caching=not recurrent, cpu=True)
    return Profile(max_model_len=_SSM_GPU_LEN if family == "ssm" else _GPU_LEN, enable_prefix_caching=not recurrent)


def environment(preset_or_model_dir: str | os.PathLike, *, cpu: bool | None = None) -> dict[str, str]:
    """Environment variables vLLM needs for this model's profile: an SSM on a GPU is served
    past the length its config declares (it has none), which vLLM allows only when asked."""
    family, tiny = _family_and_tiny(preset_or_model_dir)
    gpu = not (tiny if cpu is None else cpu)
    return {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"} if gpu and family == "ssm" else {}


def _family_and_tiny(preset_or_model_dir) -> tuple[str, bool]:
    path = Path(preset_or_model_dir)
    if (path / "config.json").exists():
        from servers import modeldir

        info = modeldir.info(path)
        p = presets.PRESETS.get(info.preset or "")
        return info.family, bool(p and p.tiny)
    p = presets.get(str(preset_or_model_dir))
    return p.family, p.tiny


@dataclass(frozen=True)
class Model:
    """What vLLM is pointed at: a directory or hub id, its name, and whether it has weights."""

    source: str
    served_name: str
    family: str
    tiny: bool
    has_weights: bool
    preset: str | None = None


def resolve(preset_or_model_dir: str | os.PathLike, *, weights: str = "auto",
            cache_dir: str | os.PathLike | None = None) -> Model:
    """Turn a preset name or a model directory into a :class:`Model`.

    A preset name is built into ``cache_dir`` (config and tokenizer; random weights too for
    tiny presets, which take seconds) unless ``weights="hub"``, which serves the preset's real
    checkpoint by its hub id.
    """
    from servers import modeldir

    path = Path(preset_or_model_dir)
    if (path / "config.json").exists():
        info = modeldir.info(path)
        preset = presets.PRESETS.get(info.preset or "")
        has = any(next(path.glob(g), None) is not None for g in _WEIGHT_FILES)
        return Model(str(path), info.name, info.family, bool(preset and preset.tiny), has,
                     info.preset)
    preset = presets.get(str(preset_or_model_dir))
    if weights == "hub":
        if not preset.hub_id:
            raise ValueError(f"preset {preset.name!r} has no hub checkpoint; use random weights")
        return Model(preset.hub_id, preset.name, preset.family, preset.tiny, True, preset.name)
    out = Path(cache_dir or settings.models_dir()) / preset.name
    modeldir.build(preset.name, out, weights=preset.tiny, log=None)
    return Model(str(out), preset.name, preset.family, preset.tiny, preset.tiny, preset.name)


def prefix_caching() -> dict:
    """Profile overrides for a scenario that reuses prefixes: prefix caching on for every
    family. vLLM 0.26 caches a Mamba layer's state in one of two modes (``--mamba-cache-mode``,
    experimental): ``all`` keeps a state at every block boundary of every sequence (for
    Mamba2-780m 39 MB each, every block_size tokens), ``align`` only at the end of a scheduler
    step that falls on a block boundary — with chunked prefill, at each chunk's end. ctxload
    takes ``align``: a few states per long prompt, where ``all`` would keep thousands."""
    return {"enable_prefix_caching": True, "mamba_cache_mode": "align"}


def vllm_args(model: Model, profile: Profile, *, port: int = DEFAULT_PORT,
              host: str = "127.0.0.1") -> list[str]:
    """vLLM's OpenAI-server arguments for ``model`` under ``profile``."""
    args = ["--model", model.source, "--served-model-name", model.served_name, "--host", host,
            "--port", str(port), "--max-model-len", str(profile.max_model_len),
            "--max-num-seqs", str(profile.max_num_seqs),
            "--max-num-batched-tokens", str(profile.max_num_batched_tokens)]
    args.append("--enable-chunked-prefill" if profile.enable_chunked_prefill
                else "--no-enable-chunked-prefill")
    args.append("--enable-prefix-caching" if profile.enable_prefix_caching
                else "--no-enable-prefix-caching")
    if profile.enable_prefix_caching and profile.mamba_cache_mode and model.family in ("ssm", "hybrid"):
        args += ["--mamba-cache-mode", profile.mamba_cache_mode]
    args.append("--enable-prompt-tokens-details")  # usage says how many prompt tokens were cached
    if profile.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(profile.tensor_parallel_size)]
    if profile.data_parallel_size > 1:
        args += ["--data-parallel-size", str(profile.data_parallel_size)]
    if profile.cpu:
        args += ["--enforce-eager", "--kv-cache-memory-bytes", str(profile.kv_cache_memory_bytes)]
    else:
        args += ["--gpu-memory-utilization", f"{profile.gpu_memory_utilization:.3f}"]
    if not model.has_weights:
        args += ["--load-format", "dummy"]
    return args


def command(preset_or_model_dir: str | os.PathLike, port: int, host: str = "127.0.0.1",
            python: str | None = None, extra: Sequence[str] = (), *, cpu: bool | None = None,
            weights: str = "auto", cache_dir: str | os.PathLike | None = None,
            served_name: str | None = None, memory_budget_bytes: int | None = None,
            card_bytes: int | None = None, gpus: Sequence[int] | None = None, parallel: str = "tensor",
            **overrides) -> list[str]:
    """The whole command line that serves a preset (or model directory) with vLLM.

    ``python`` is the interpreter that has vLLM (default: ``$CTXLOAD_VLLM_PYTHON``, else this
    one); ``extra`` is appended as is (later vLLM arguments win); ``served_name`` is the model
    name clients send (default: the preset's); ``memory_budget_bytes`` sizes the profile to a
    budget (:func:`fit_budget`, the budget of each GPU) on a card of ``card_bytes`` (default:
    the first of ``gpus``, else the first visible GPU, read through NVML); ``gpus`` (more than
    one) spread the model by ``parallel`` — ``tensor`` or ``data`` parallelism (the process
    sees only them: :func:`visible_devices`); ``overrides`` replace :class:`Profile` fields
    (``max_model_len=4096``).
    """
    model = resolve(preset_or_model_dir, weights=weights, cache_dir=cache_dir)
    if served_name:
        model = replace(model, served_name=served_name)
    profile = _profile(model.family, model.tiny, cpu)
    if gpus and len(gpus) > 1:
        if parallel not in ("tensor", "data"):
            raise ValueError(f"parallel must be tensor or data, not {parallel!r}")
        key = "tensor_parallel_size" if parallel == "tensor" else "data_parallel_size"
        profile = replace(profile, **{key: len(gpus)})
    if memory_budget_bytes:
        if not profile.cpu and card_bytes is None:
            card_bytes = gpu_total_bytes(gpus[0] if gpus else None)
        profile = fit_budget(profile, model, memory_budget_bytes, card_bytes)
    profile = replace(profile, **overrides)
    python = python or settings.vllm_python() or sys.executable
    # The module, not `vllm serve`: the CLI entry needs vLLM's package metadata, which a
    # source or copied install (the CPU venv) may lack; both take the same arguments.
    return [str(python), "-m", "vllm.entrypoints.openai.api_server",
            *vllm_args(model, profile, port=port, host=host), *map(str, extra)]


def profiler_args(trace_dir: str | os.PathLike, max_steps: int | None = None) -> list[str]:
    """vLLM's torch profiler, ready for ``POST /start_profile`` and ``/stop_profile`` (0.13 and
    later; idle until started): worker traces only (the front end's CPU trace is not the
    model's), no Python stacks and no summary table at stop, which only slow the flush.
    ``max_steps``: the worker stops its profiler by itself after that many engine steps
    (``max_iterations``), however late ``/stop_profile`` comes — on an H200 it came 113 s late
    behind a 128K-token decode, and the 7,765-step trace took minutes to write."""
    config = {"profiler": "torch", "torch_profiler_dir": str(Path(trace_dir).resolve()),
              "torch_profiler_with_stack": False, "ignore_frontend": True,
              "torch_profiler_dump_cuda_time_total": False}
    if max_steps:
        config["max_iterations"] = int(max_steps)
    return ["--profiler-config", json.dumps(config, separators=(",", ":"))]


# ---- memory budgets ------------------------------------------------------------------------

#: What vLLM holds on a GPU besides the weights and its cache: the CUDA context, the
#: activations of one step of ``max_num_batched_tokens`` and the CUDA graphs.
GPU_RUNTIME_BYTES = 3 << 30
#: The share of the cache that sequence states may fill when ``max_num_seqs`` is sized.
STATE_HEADROOM = 0.8


def fit_budget(profile: Profile, model: Model, budget_bytes: int, card_bytes: int | None) -> Profile:
    """Size ``profile`` to ``budget_bytes`` of device memory (of a card of ``card_bytes``).

    On a GPU the budget becomes vLLM's share of the card (``--gpu-memory-utilization``), and
    for SSMs and hybrids ``max_num_seqs`` is capped so that every sequence's recurrent state
    fits in the cache left after the weights (vLLM refuses to start otherwise: "max_num_seqs
    exceeds available Mamba cache blocks"). On a CPU the budget less the weights sizes the
    KV cache in bytes.
    """
    weights = _weight_bytes(model)
    tp = profile.tensor_parallel_size  # each GPU holds 1/tp of the weights and of a state
    weights = weights // tp if weights is not None else None
    if weights is not None and budget_bytes <= weights:
        raise ValueError(f"memory budget {budget_bytes / 2**30:.2f} GiB does not hold the weights "
                         f"({weights / 2**30:.2f} GiB)")
    if profile.cpu:
        kv = budget_bytes - (weights or 0)
        return replace(profile, kv_cache_memory_bytes=max(16 << 20, min(kv, profile.kv_cache_memory_bytes)))
    out = replace(profile, gpu_memory_utilization=budget_fraction(budget_bytes, card_bytes))
    per_seq = vllm_state_bytes(model)
    per_seq = per_seq // tp if per_seq else per_seq
    if per_seq:
        # vLLM gives each sequence one block of every Mamba layer and, with CUDA graphs,
        # refuses max_num_seqs above the blocks it has (one of which it keeps in reserve)
        cache = budget_bytes - (weights or 0) - GPU_RUNTIME_BYTES
        seqs = int(max(cache, 0) * STATE_HEADROOM // per_seq) - 1
        if seqs < 1:
            raise ValueError(f"memory budget {budget_bytes / 2**30:.2f} GiB leaves no room for one "
                             f"sequence's state ({per_seq / 2**20:.0f} MiB) after the weights")
        out = replace(out, max_num_seqs=min(profile.max_num_seqs, seqs))
    return out


def _preset_of(model: Model):
    return presets.PRESETS.get(model.preset or "")


def _weight_bytes(model: Model) -> int | None:
    p = _preset_of(model)
    return p.weight_bytes() if p is not None else None


def vllm_state_bytes(model: Model) -> int | None:
    """Bytes of recurrent state vLLM keeps per sequence: every Mamba layer's SSM state and its
    conv window of kernel − 1 inputs (vLLM 0.26, mamba_utils.py), None for a Transformer."""
    p = _preset_of(model)
    if p is None or p.family == "transformer":
        return None
    return p.state_bytes_per_sequence(conv_window=-1)


def budget_fraction(budget_bytes: int, total_bytes: int) -> float:
    """The ``--gpu-memory-utilization`` that caps vLLM at ``budget_bytes`` of a card."""
    if budget_bytes <= 0 or total_bytes <= 0:
        raise ValueError("memory sizes must be positive")
    return round(min(budget_bytes / total_bytes, 0.95), 3)


def spread(args: Sequence[str]) -> tuple[str, int] | None:
    """How a vLLM command line spreads the model over GPUs: (``tensor`` or ``data``, N) for
    N > 1 (its ``--tensor-parallel-size`` / ``--data-parallel-size``), else None."""
    for kind in ("tensor", "data"):
        n = int(arg_value(args, f"--{kind}-parallel-size") or 1)
        if n > 1:
            return kind, n
    return None


def visible_devices(gpus: Sequence[int] | None) -> dict[str, str]:
    """The environment that shows a server only its ``gpus`` (none: no change)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {}


def gpu_total_bytes(index: int | None = None) -> int:
    """Memory of GPU ``index`` (NVML's numbering; default: the first visible one), through NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if index is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            index = int(visible) if visible.isdigit() else 0
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
    except Exception as e:  # noqa: BLE001 - no NVML, no driver, no GPU: say so plainly
        raise ValueError(f"a memory budget needs the GPU's size, and NVML could not tell it ({e}); "
                         "give --gpu-memory-utilization instead") from None


# ---- ctxload serve vllm --------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Serve a preset (or model directory) with vLLM under its launch profile."
    p.add_argument("model", help="preset name (see `ctxload models`) or model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", dest="cpu", action="store_true", default=None,
                     help="CPU profile (default for tiny presets)")
    dev.add_argument("--gpu", dest="cpu", action="store_false", help="GPU profile")
    p.add_argument("--weights", choices=["auto", "hub"], default="auto",
                   help="auto: random weights at the real size (tiny: built locally); "
                        "hub: the preset's real checkpoint by hub id")
    p.add_argument("--max-model-len", type=int, help="override the profile's longest context")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--gpu-memory-utilization", type=float,
                     help="fraction of the GPU vLLM may take (profile default 0.90)")
    mem.add_argument("--gpu-memory-budget",
                     help="cap vLLM at this much GPU memory (e.g. 24GiB), to stand in for a smaller card")
    p.add_argument("--model-cache", default=None,
                   help="where preset model directories are built (default $CTXLOAD_MODELS or "
                        "~/.cache/ctxload/models)")
    p.add_argument("--python", default=None,
                   help="interpreter with vLLM (default $CTXLOAD_VLLM_PYTHON or this one)")
    p.add_argument("--print", dest="dry_run", action="store_true",
                   help="print the command line and exit")
    p.add_argument("--exec", dest="exec_", action="store_true",
                   help="replace this process with vLLM (what the Docker image does)")
    p.add_argument("--vllm-args", default="", metavar="'ARGS'",
                   help="extra vLLM arguments, one shell-quoted string, appended last "
                        "(e.g. --vllm-args '--seed 3 --dtype float16')")


def main(args: argparse.Namespace) -> int:
    extra = shlex.split(args.vllm_args or "")
    overrides: dict = {}
    if args.max_model_len:
        overrides["max_model_len"] = args.max_model_len
    try:
        if args.gpu_memory_budget:
            budget = parse_bytes(args.gpu_memory_budget)
            overrides["memory_budget_bytes"] = budget
        elif args.gpu_memory_utilization is not None:
            if not 0 < args.gpu_memory_utilization <= 1:
                raise ValueError("--gpu-memory-utilization must be in (0, 1]")
            overrides["gpu_memory_utilization"] = args.gpu_memory_utilization
        cmd = command(args.model, args.port, args.host, args.python, extra, cpu=args.cpu,
                      weights=args.weights, cache_dir=args.model_cache, **overrides)
    except (presets.UnknownPreset, ValueError, FileNotFoundError) as e:
        print(f"ctxload serve vllm: {e}", file=sys.stderr)
        return 2
    env = environment(args.model, cpu=args.cpu)
    if args.dry_run:
        print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
        return 0
    os.environ.update(env)
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    if args.exec_:
        os.execv(cmd[0], cmd)
    import subprocess

    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def run_from_argv(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.vllm_launch")
    add_arguments(parser)
    return main(parser.parse_args(list(argv)))


if __name__ == "__main__":
    sys.exit(run_from_argv(sys.argv[1:]))
