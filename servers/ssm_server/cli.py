"""Command line of ssm-server: ``python -m servers.ssm_server`` and ``ctxload serve ssm``."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys

from servers.ssm_server.config import ServerConfig, parse_bytes

log = logging.getLogger("ssm_server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model directory or preset (same as --model)")
    p.add_argument("--model", help="model directory, or a preset name (served with random weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="instantiate the model's config with random weights, ignoring any checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model name clients send (default: the preset or directory name)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (cuda where a GPU is, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--max-num-seqs", type=int, default=64, help="state slots (concurrent sequences)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens")
    p.add_argument("--prefill-chunk-size", type=int, default=2048, help="prompt tokens per prefill step")
    p.add_argument("--prefill-chunk-size-decoding", type=int,
                   help="while other streams decode, a prompt longer than --prefill-chunk-size is "
                        "prefilled in chunks of this many tokens (default: 4096, at most "
                        "--prefill-chunk-size; a shorter prompt still goes whole): smaller keeps their "
                        "token gaps short while a long prompt arrives, at some cost to its time to first token")
    p.add_argument("--prefill-overlap", action="store_true",
                   help="run prefill chunks beside the decode steps, on a thread and CUDA stream of their "
                        "own, instead of inside them: the decoding streams' gaps stay short while prompts "
                        "arrive, and the prompts wait longer for their first token (docs/ssm-server.md)")
    p.add_argument("--gpu-memory-budget", help="cap on the process's device memory, e.g. 24GiB")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--backend", default="auto",
                   help="auto (native mamba_ssm for Mamba2 on CUDA when importable, else transformers), "
                        "hf or mamba_ssm")
    p.add_argument("--engine", default="model", help="model (default) or synthetic")
    p.add_argument("--ttft-ms", type=float, default=50.0, help="synthetic engine: time to first token")
    p.add_argument("--itl-ms", type=float, default=10.0, help="synthetic engine: gap between tokens")
    p.add_argument("--schedule-from", choices=("admission", "arrival"), default="admission",
                   help="synthetic engine: count a request's token deadlines from when it gets a slot "
                        "(default) or from its arrival (a queued request then sends what it owes at once)")
    p.add_argument("--api-key", default=os.environ.get("SSM_SERVER_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default $SSM_SERVER_API_KEY); "
                        "/health and /metrics stay open, as in vLLM")
    p.add_argument("--max-request-bytes", default="128MiB",
                   help="largest request body, after decompression (default 128MiB: a 4M-token text prompt)")
    p.add_argument("--profile-dir", metavar="DIR",
                   help="turn on POST /start_profile and /stop_profile (as vLLM's): torch.profiler on the "
                        "device thread, a Chrome trace (.pt.trace.json.gz) per session written to DIR")
    p.add_argument("--log-level", default="info")
    p.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                   help="the HTTP side's event loop: uvloop where importable (auto), or asyncio's own")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    model = args.model or args.model_pos
    if args.model and args.model_pos and args.model != args.model_pos:
        raise ValueError("give the model once (positional MODEL or --model)")
    cfg = ServerConfig(
        model=model, served_model_name=args.served_model_name, engine=args.engine,
        random_weights=args.random_weights, dtype=args.dtype, device=args.device,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        prefill_chunk_size=args.prefill_chunk_size, prefill_chunk_size_decoding=args.prefill_chunk_size_decoding,
        prefill_overlap=args.prefill_overlap,
        gpu_memory_budget=parse_bytes(args.gpu_memory_budget) if args.gpu_memory_budget else None,
        max_queue=args.max_queue, cuda_graphs=not args.no_cuda_graphs, backend=args.backend,
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, schedule_from=args.schedule_from, api_key=args.api_key or None,
        max_request_bytes=parse_bytes(args.max_request_bytes),
        profile_dir=os.path.abspath(args.profile_dir) if getattr(args, "profile_dir", None) else None)
    if cfg.device == "auto":
        cfg.device = "cpu"
        if cfg.engine != "synthetic":
            import torch

            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.validate()
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, not {args.port}")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if cfg.device == "cuda":  # memory-fraction and set_device calls need an index
            cfg.device = "cuda:0"
        elif int(cfg.device.split(":", 1)[1] or -1) >= torch.cuda.device_count():
            raise ValueError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if cfg.model and not os.path.isdir(cfg.model):
        from servers import presets

        if cfg.model not in presets.PRESETS:
            raise ValueError(f"--model {cfg.model!r} is neither a model directory nor a preset "
                             f"(presets: {', '.join(sorted(presets.PRESETS))})")
    if cfg.profile_dir:
        try:
            os.makedirs(cfg.profile_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--profile-dir {cfg.profile_dir}: cannot make it ({e.strerror or e})") from None
        if not os.access(cfg.profile_dir, os.W_OK | os.X_OK):
            raise ValueError(f"--profile-dir {cfg.profile_dir}: not writable")
    return cfg


def engine_backend_name(backend) -> str:
    """``mamba_ssm`` (the native backend) or ``hf`` (transformers): ``--backend``'s names."""
    return "mamba_ssm" if type(backend).__name__ == "MambaBackend" else "hf"


def build_server(cfg: ServerConfig):
    """The ``Server`` (routes) over the engine the config asks for."""
    from pathlib import Path

    from servers.ssm_server.api import Server
    from servers.ssm_server.metrics import ServerMetrics

    name = cfg.served_model_name or (Path(cfg.model).name if cfg.model else "synthetic")
    holder = {}
    metrics = ServerMetrics(name, lambda: holder["engine"].state() if "engine" in holder else {})
    if cfg.engine == "synthetic":
        from servers.ssm_server.synthetic import SyntheticEngine
        from servers.ssm_server.textio import HFText, WordText

        text = WordText()
        if cfg.model:
            from servers.ssm_server.backend_hf import resolve_model_dir

            text = HFText(str(resolve_model_dir(cfg.model)[0]))
        max_len = cfg.max_model_len or (1 << 30)
        engine = SyntheticEngine(text, metrics, ttft_s=cfg.ttft_ms / 1e3, itl_s=cfg.itl_ms / 1e3,
                                 max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_queue,
                                 max_model_len=max_len, model_name=name,
                                 from_arrival=cfg.schedule_from == "arrival")
        metrics.set_engine_info("synthetic", "cpu", "none", False)
        vocab = None  # the synthetic engine reads no embedding table
    else:
        from servers.ssm_server.backend_mamba import select_backend
        from servers.ssm_server.engine import Engine
        from servers.ssm_server.textio import HFText

        backend = select_backend(cfg)
        text = HFText(str(backend.path))
        engine = Engine(backend, text, metrics, max_queue=cfg.max_queue,
                        prefill_chunk_size=cfg.prefill_chunk_size, model_name=name,
                        prefill_chunk_size_decoding=cfg.prefill_chunk_size_decoding,
                        prefill_overlap=cfg.prefill_overlap)
        max_len = backend.max_model_len
        vocab = backend.vocab_size
        metrics.set_engine_info(engine_backend_name(backend), str(backend.device),
                                str(backend.dtype).removeprefix("torch."), backend.graphs is not None)
        log.info("backend %s", type(backend).__name__)
        log.info("model %s (%s) on %s: %d state slots, %d B state per sequence, %d B KV per token, "
                 "graphs=%s", name, backend.model_type, backend.device, backend.num_slots,
                 backend.state_bytes, backend.kv_bytes_per_token, backend.graphs is not None)
    holder["engine"] = engine
    return Server(engine, text, metrics, model_name=name, max_model_len=max_len, vocab_size=vocab,
                  api_key=cfg.api_key, max_request_bytes=cfg.max_request_bytes, profile_dir=cfg.profile_dir)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack into the log (a stall's where)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"ssm-server: error: {e}", file=sys.stderr)
        return 2
    try:
        server = build_server(cfg)
    except Exception as e:  # a model that cannot load: say why, no traceback
        from servers.ssm_server.backend_hf import ModelLoadError

        print(f"ssm-server: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ModelLoadError, FileNotFoundError, OSError, ValueError)) else 1
    from aiohttp import web

    loop = None  # asyncio's own
    if args.event_loop != "asyncio":
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            if args.event_loop == "uvloop":
                print("ssm-server: error: --event-loop uvloop: uvloop is not installed (pip install uvloop)",
                      file=sys.stderr)
                return 2
    log.info("event loop: %s", "uvloop" if loop is not None else "asyncio")
    from servers.ssm_server import http_errors

    http_errors.install()  # malformed HTTP gets an OpenAI error body too
    server.listen = (args.host, args.port)  # where its warm-up sends its own requests
    try:
        web.run_app(server.app(), host=args.host, port=args.port, print=None,
                    handler_cancellation=True, access_log=None, loop=loop)
    except OSError as e:
        print(f"ssm-server: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    # the engine is stopped and every connection closed (run_app's cleanup): skip the
    # interpreter's teardown of torch and transformers, which took most of a second of a SIGTERM
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_from_argv(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.ssm_server",
                                     description="ssm-server: OpenAI-compatible serving of SSMs and hybrids")
    add_arguments(parser)
    return main(parser.parse_args(argv))
