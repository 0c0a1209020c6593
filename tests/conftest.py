"""Shared fixtures: tiny model directories, and the rule for optional tools.

A tool a test needs (the vLLM venv, prometheus, chromium) that is missing skips the test on a
developer's machine but fails it under CI (``CI=true``), where `.ci/run` installs them all: a
CI run never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("CTXLOAD_TEST_MODELS", REPO / ".cache" / "test-models"))
VLLM_PYTHON = Path(os.environ.get("CTXLOAD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def need(ok: bool, what: str) -> None:
    """Skip (locally) or fail (under CI) when a required tool is missing."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide {what}; .ci/run installs it")
    pytest.skip(f"{what} is not installed here")


def need_vllm() -> Path:
    need(VLLM_PYTHON.exists(), f"the vLLM CPU venv ({VLLM_PYTHON})")
    return VLLM_PYTHON


def need_binary(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"`{name}` on PATH")
    return path  # type: ignore[return-value]


def build_tiny(preset: str) -> Path:
    from servers import modeldir

    return modeldir.build(preset, MODEL_CACHE / preset, log=None)


def tiny_ssm_server(log_dir: Path, name: str, *args: str):
    """A real ssm-server serving the tiny Mamba2 (as `tiny`) on a free loopback port, as a
    context manager that yields the running server."""
    from servers.process import ManagedServer, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "servers.ssm_server", "--port", str(port), "--model",
           str(build_tiny("tiny-mamba2")), "--served-model-name", "tiny", *args]
    return ManagedServer(name, cmd, port, log_path=Path(log_dir) / "server.log", startup_timeout_s=120)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Model directories of the tiny presets that stand for each family."""
    from servers.presets import TINY_BY_FAMILY

    return {family: build_tiny(p) for family, p in TINY_BY_FAMILY.items()}


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def vllm_tiny_llama(tmp_path_factory, tiny_models):
    """One real vLLM CPU server with the tiny Llama, shared by every test of the session."""
    from servers.process import ManagedServer, free_port

    python = need_vllm()
    port = free_port()
    model = tiny_models["transformer"]
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "2048", "--kv-cache-memory-bytes", str(128 << 20), "--enforce-eager"]
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with ManagedServer("vllm-tiny-llama", cmd, port, log_path=log, startup_timeout_s=400) as srv:
        yield srv


def vllm_run_env() -> dict:
    """The environment a `ctxload run` with vLLM targets gets in a test: the vLLM CPU venv
    (skipped locally, failed under CI, when missing), the shared tiny-model cache, no hub."""
    return {**os.environ, "CTXLOAD_MODELS": str(MODEL_CACHE), "CTXLOAD_VLLM_PYTHON": str(need_vllm()),
            "HF_HUB_OFFLINE": "1"}


def ctxload_cli(*args: str, env: dict | None = None, timeout_s: float = 900) -> str:
    """``ctxload ARGS`` in a child process from the repository root, as a user runs it; its
    stdout (the run's log lines). Fails the test, with the output's end, unless it exits 0."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "ctxload", *args], capture_output=True, text=True,
                       cwd=REPO, timeout=timeout_s, env=env)
    assert r.returncode == 0, f"ctxload {args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def run_scenario(scenario: dict, runs_dir: Path, run_id: str, timeout_s: float = 600, *,
                 env: dict | None = None, report: bool = False) -> Path:
    """Run a scenario as a user does (`ctxload run`, in a child process) and return its run dir
    (its log lines in ``run.log`` beside it); ``report``: `ctxload report` on it after.

    Not in the test process: Locust monkey-patches with gevent on import, which deadlocks a
    process that already has threads (a vLLM fixture's, say).
    """
    import yaml

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"{run_id}.scenario.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = ctxload_cli("run", str(path), "--runs-dir", str(runs_dir), "--run-id", run_id, env=env, timeout_s=timeout_s)
    (runs_dir / f"{run_id}.run.log").write_text(out)
    if report:
        ctxload_cli("report", str(runs_dir / run_id), env=env, timeout_s=300)
    return runs_dir / run_id
