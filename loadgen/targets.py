"""Targets at run time: start the ones a scenario asks to serve, describe them all for env.json.

A ``serve:`` target is started on a free loopback port through servers.process.ManagedServer
(ssm-server, or vLLM through its launch profiles when servers.vllm_launch exists) and stopped
when the run ends, also on an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadgen import scenario as sc


@dataclass
class LiveTarget:
    spec: sc.Target
    url: str
    model_dir: Path | None = None
    launch_args: list[str] | None = None
    preset: str | None = None
    server: object | None = None
    max_model_len: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def alive(self) -> bool:
        return self.server is None or self.server.alive()

    def tokenizer(self) -> dict:
        path = self.spec.tokenizer or (str(self.model_dir) if self.model_dir else None)
        if path:
            return {"kind": "local", "path": path}
        return {"kind": "remote", "url": self.url, "model": self.spec.model}

    def describe(self) -> dict:
        return {"name": self.name, "url": self.url, "model": self.spec.model, "family": self.spec.family,
                "engine": self.spec.engine, "preset": self.preset, "launch_args": self.launch_args,
                "max_model_len": self.max_model_len}


def models_cache() -> Path:
    return Path(os.environ.get("CTXLOAD_MODELS", Path.home() / ".cache" / "ctxload" / "models"))


def _model_dir(serve: sc.Serve, log) -> tuple[Path | str, str | None]:
    if serve.model_dir:
        return serve.model_dir, None
    from servers import modeldir, presets

    p = presets.get(serve.preset)
    out = modeldir.build(p.name, models_cache() / p.name, weights=p.tiny, log=log)
    return out, p.name


def command(target: sc.Target, model: Path | str, port: int) -> list[str]:
    serve = target.serve
    if serve.engine == "ssm-server":
        cmd = [sys.executable, "-m", "servers.ssm_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", target.model]
        if serve.preset and not _is_tiny(serve.preset):
            cmd.append("--random-weights")
        return cmd + list(serve.args)
    if importlib.util.find_spec("servers.vllm_launch") is not None:
        from servers import vllm_launch

        cmd = list(vllm_launch.command(serve.preset or str(model), port, python=_vllm_python()))
        if "--served-model-name" not in cmd:
            cmd += ["--served-model-name", target.model]
        return cmd + list(serve.args)
    python = _vllm_python() or sys.executable
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", target.model, "--host", "127.0.0.1", "--port", str(port)]
    if serve.preset and _is_tiny(serve.preset):
        cmd += ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(128 << 20), "--enforce-eager"]
    elif serve.preset:
        cmd += ["--load-format", "dummy"]
    return cmd + list(serve.args)


def _vllm_python() -> str | None:
    """The interpreter that has vLLM: ``$CTXLOAD_VLLM_PYTHON``, else the repository's .venv-vllm."""
    if os.environ.get("CTXLOAD_VLLM_PYTHON"):
        return os.environ["CTXLOAD_VLLM_PYTHON"]
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / ".venv-vllm" / "bin" / "python").exists():
            return str(root / ".venv-vllm" / "bin" / "python")
    return None


def _is_tiny(preset: str) -> bool:
    from servers import presets

    return presets.get(preset).tiny


def max_model_len(url: str, model: str) -> int | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=10) as r:
            data = json.loads(r.read())
        for m in data.get("data", []):
            if m.get("id") == model and m.get("max_model_len"):
                return int(m["max_model_len"])
    except Exception:
        return None
    return None


def start_all(scenario: sc.Scenario, stack: contextlib.ExitStack, run_dir: Path, log) -> list[LiveTarget]:
    """Start what must be served (entered on ``stack``) and return every target, live."""
    from servers.process import ManagedServer, free_port

    live = []
    for t in scenario.targets:
        if t.serve is None:
            live.append(LiveTarget(t, t.url.rstrip("/")))
            continue
        model, preset = _model_dir(t.serve, log)
        if t.family is None:
            from servers import modeldir

            t.family = modeldir.info(model).family
        port = free_port()
        cmd = command(t, model, port)
        log(f"starting {t.name}: {t.serve.engine} on 127.0.0.1:{port}")
        srv = ManagedServer(t.name, cmd, port, log_path=run_dir / "servers" / f"{t.name}.log",
                            startup_timeout_s=t.serve.startup_timeout_s)
        stack.enter_context(srv)
        lt = LiveTarget(t, srv.url, model_dir=Path(model) if Path(model).exists() else None,
                        launch_args=cmd[1:], preset=preset, server=srv)
        live.append(lt)
    for lt in live:
        lt.max_model_len = max_model_len(lt.url, lt.spec.model)
    return live
