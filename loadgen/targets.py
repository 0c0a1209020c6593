"""Targets at run time: start the ones a scenario asks to serve, describe them all for env.json.

A ``serve:`` target is started on a free loopback port through servers.process.ManagedServer
(ssm-server, or vLLM through its launch profiles, servers.vllm_launch) and stopped when its
stages are done — or, with ``keep_targets_resident``, when the run ends — also on an error or
Ctrl-C. A target started alone has the device to itself: its memory, power and energy are its
own (DESIGN.md, "Measuring fairly").
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadgen import scenario as sc
from loadgen.scrape import group_pids
from servers import settings


@dataclass
class LiveTarget:
    spec: sc.Target
    url: str | None
    model_dir: Path | None = None
    model_source: str | None = None
    """What its server is pointed at: a model directory, or a hub id vLLM can load."""
    launch_args: list[str] | None = None
    preset: str | None = None
    server: object | None = None
    max_model_len: int | None = None
    started_at: float | None = None
    stopped_at: float | None = None
    startup_s: float | None = None
    error: str | None = None
    """Why its server could not be started (the run goes on with the next target)."""
    completed: bool = False
    """Every load ran on it to the end (a resumed run skips it)."""
    before: dict | None = None
    """What env.json said of it in the session that completed it (a resumed run)."""
    wave: int | None = None
    """Under ``placement: by_gpu``: its wave (loadgen.placement); targets of one wave run at once."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def served(self) -> bool:
        return self.spec.serve is not None

    @property
    def running(self) -> bool:
        """Up now: a URL target always counts as running (nothing tells us otherwise)."""
        return not self.served or (self.server is not None and self.server.alive())

    def alive(self) -> bool:
        return self.server is None or self.server.alive()

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group (its engine's children)."""
        proc = getattr(self.server, "proc", None)
        return proc.pid if proc is not None else None

    def tokenizer(self) -> dict:
        path = self.spec.tokenizer or (str(self.model_dir) if self.model_dir else None)
        if path:
            return {"kind": "local", "path": path}
        return {"kind": "remote", "url": self.url, "model": self.spec.model}

    def describe(self) -> dict:
        if self.before is not None:
            return self.before
        serve = self.spec.serve
        return {"name": self.name, "url": self.url, "model": self.spec.model, "family": self.spec.family,
                "engine": self.spec.engine, "preset": self.preset, "launch_args": self.launch_args,
                "max_model_len": self.max_model_len,
                "memory_budget_bytes": serve.memory_budget_bytes() if serve else None,
                "gpus": serve.gpus if serve else None,
                "started_at": self.started_at, "stopped_at": self.stopped_at, "startup_s": self.startup_s,
                "error": self.error, "completed": self.completed,
                **({"wave": self.wave} if self.wave is not None else {})}


def _model_dir(serve: sc.Serve, log) -> tuple[Path | str, str | None]:
    if serve.model_dir:
        return serve.model_dir, None
    from servers import modeldir, presets

    p = presets.get(serve.preset)
    out = modeldir.build(p.name, settings.models_dir() / p.name, weights=p.tiny, log=log)
    return out, p.name


def command(target: sc.Target, model: Path | str, port: int, trace_dir: Path | None = None,
            profile: sc.Profile | None = None, reuse: bool = False) -> list[str]:
    """The server's command line; the model name it serves is the one the target sends. With
    ``trace_dir``, its profiler is ready to write there (the scenario's ``profile`` pass, which
    on vLLM also bounds the steps each start records: :func:`loadgen.profiling.trace_steps`).
    ``reuse``: the scenario shares prefixes, so vLLM caches them whatever the family
    (:func:`servers.vllm_launch.prefix_caching`)."""
    serve = target.serve
    budget = serve.memory_budget_bytes()
    if serve.engine == "ssm-server":
        cmd = [sys.executable, "-m", "servers.ssm_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", target.model]
        if serve.preset and not _is_tiny(serve.preset):
            cmd.append("--random-weights")
        if budget and "--gpu-memory-budget" not in serve.args:
            cmd += ["--gpu-memory-budget", str(budget)]
        if trace_dir is not None:
            cmd += ["--profile-dir", str(trace_dir.resolve())]
        return cmd + list(serve.args)
    from servers import process, vllm_launch

    cmd = vllm_launch.command(model, port, python=_vllm_python(), extra=serve.args,
                              served_name=target.model, memory_budget_bytes=budget,
                              gpus=serve.gpus, parallel=serve.parallel,
                              **(vllm_launch.prefix_caching() if reuse else {}))
    if trace_dir is not None:
        from loadgen import profiling

        max_steps = None
        step_tokens = process.arg_value(cmd, "--max-num-batched-tokens")
        if profile is not None and step_tokens:
            max_steps = profiling.trace_steps(max(profile.prompt_tokens), profile.decode_steps, int(step_tokens))
        at = len(cmd) - len(serve.args)  # before the target's own arguments, which win
        cmd[at:at] = vllm_launch.profiler_args(trace_dir, max_steps)
    return cmd


def trace_dir(run_dir: Path, target: str) -> Path:
    """Where a profiled target's server writes its traces: ``profiles/<target>/`` of the run."""
    return run_dir / "profiles" / target


def environment(target: sc.Target, model: Path | str) -> dict[str, str]:
    """Environment variables the server needs beyond ours: the GPUs it may see (its ``gpus``)
    and vLLM's launch profile's."""
    from servers import vllm_launch

    env = vllm_launch.visible_devices(target.serve.gpus)
    if target.serve.engine == "vllm":
        env.update(vllm_launch.environment(model))
    return env


def _vllm_python() -> str | None:
    """The interpreter that has vLLM: ``$CTXLOAD_VLLM_PYTHON``, else the repository's .venv-vllm."""
    if settings.vllm_python():
        return settings.vllm_python()
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


def prepare(scenario: sc.Scenario, log) -> list[LiveTarget]:
    """Every target, not yet started: model directories are built (they are the slow, safe
    part), and URL targets are live as given."""
    live = []
    for t in scenario.targets:
        if t.serve is None:
            live.append(LiveTarget(t, t.url.rstrip("/")))
            continue
        model, preset = _model_dir(t.serve, log)
        if t.family is None:
            from servers import modeldir

            t.family = modeldir.info(model).family
        live.append(LiveTarget(t, None, model_dir=Path(model) if Path(model).exists() else None,
                               model_source=str(model), preset=preset))
    return live


def start(lt: LiveTarget, stack: contextlib.ExitStack, run_dir: Path, log,
          profile: sc.Profile | None = None, reuse: bool = False) -> None:
    """Start ``lt``'s server (a no-op for a URL target) and wait until it is healthy; its
    stop is entered on ``stack`` (and may be called earlier through :func:`stop`). With the
    scenario's ``profile`` (for a target it profiles), the server starts with its profiler
    ready (:func:`trace_dir`)."""
    if lt.served and lt.server is None:
        from servers.process import ManagedServer, free_port

        port = free_port()
        model = lt.model_source
        traces = None
        if profile is not None:
            traces = trace_dir(run_dir, lt.name)
            traces.mkdir(parents=True, exist_ok=True)
        cmd = command(lt.spec, model, port, traces, profile, reuse)
        gpus = lt.spec.serve.gpus
        log(f"starting {lt.name}: {lt.spec.serve.engine} on 127.0.0.1:{port}"
            + (f" (GPU{'s' if len(gpus) > 1 else ''} {','.join(map(str, gpus))})" if gpus else ""))
        srv = ManagedServer(lt.name, cmd, port, log_path=run_dir / "servers" / f"{lt.name}.log",
                            startup_timeout_s=lt.spec.serve.startup_timeout_s, env=environment(lt.spec, model))
        t0 = time.time()
        lt.launch_args, lt.server, lt.started_at = cmd[1:], srv, t0
        srv.start()
        stack.callback(stop, lt, log)
        last = [0.0]

        def waiting(elapsed: float) -> None:
            if elapsed - last[0] >= 30:
                last[0] = elapsed
                log(f"  {lt.name}: starting, {elapsed:.0f} s")

        srv.wait_healthy(on_wait=waiting)
        lt.url, lt.startup_s = srv.url, round(time.time() - t0, 1)
        log(f"{lt.name} ready after {lt.startup_s:.0f} s")
    if lt.max_model_len is None:
        lt.max_model_len = max_model_len(lt.url, lt.spec.model)


def stop(lt: LiveTarget, log=None) -> None:
    """Stop ``lt``'s server and wait until every process of its group is gone, so that the
    device memory it held is free before the next target starts."""
    srv = lt.server
    if srv is None or getattr(srv, "proc", None) is None:
        return
    pgid = srv.proc.pid
    srv.stop()
    lt.stopped_at = time.time()
    deadline = time.monotonic() + 30
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if log:
        log(f"stopped {lt.name}")
