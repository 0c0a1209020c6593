"""``ctxload serve ENGINE …``: start one server in the foreground.

- ``ctxload serve ssm MODEL_DIR_OR_PRESET …`` — our ssm-server (``servers.ssm_server``);
- ``ctxload serve vllm PRESET …`` — vLLM with the preset's launch profile (``servers.vllm_launch``);
- ``ctxload serve gpu-exporter …`` — the NVML GPU exporter (``servers.gpu_exporter``).

Each engine's module has the subcommand contract (``add_arguments``/``main``); only the
chosen one is imported, and it parses the rest of the command line itself.
"""

from __future__ import annotations

import argparse
import importlib

ENGINES = {
    "ssm": ("servers.ssm_server.cli", "ssm-server: Mamba, Mamba2 and hybrids (and the synthetic engine)"),
    "vllm": ("servers.vllm_launch", "vLLM's OpenAI server with a preset's launch profile"),
    "gpu-exporter": ("servers.gpu_exporter", "Prometheus exporter of NVML GPU readings (DCGM names)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "engines: " + "; ".join(f"{k} — {h}" for k, (_, h) in ENGINES.items())
    p.add_argument("engine", choices=sorted(ENGINES), help="which server to start")
    p.add_argument("engine_args", nargs=argparse.REMAINDER,
                   help="the engine's own arguments (ctxload serve ENGINE --help)")


def main(args: argparse.Namespace) -> int:
    module_name, help_ = ENGINES[args.engine]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ctxload serve {args.engine}", description=help_)
    module.add_arguments(parser)
    return module.main(parser.parse_args(args.engine_args))
