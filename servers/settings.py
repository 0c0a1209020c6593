"""ctxload's environment variables, each read here and nowhere else (README.md, "Environment").

Read when asked, not at import, so a test or a caller that sets one sees it at once.
"""

from __future__ import annotations

import os
from pathlib import Path


def models_dir() -> Path:
    """Where ctxload builds model directories from presets (one cache for every caller):
    ``$CTXLOAD_MODELS``, else ``~/.cache/ctxload/models``."""
    return Path(os.environ.get("CTXLOAD_MODELS") or Path.home() / ".cache" / "ctxload" / "models")


def vllm_python() -> str | None:
    """The interpreter that has vLLM (``$CTXLOAD_VLLM_PYTHON``), when set."""
    return os.environ.get("CTXLOAD_VLLM_PYTHON") or None


def exporter_host() -> str:
    """Where the load generator's own metrics bind (``$CTXLOAD_EXPORTER_HOST``, default loopback)."""
    return os.environ.get("CTXLOAD_EXPORTER_HOST") or "127.0.0.1"


def exporter_port() -> int | None:
    """``$CTXLOAD_EXPORTER_PORT``: overrides a scenario's ``metrics.exporter_port``."""
    v = os.environ.get("CTXLOAD_EXPORTER_PORT")
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"CTXLOAD_EXPORTER_PORT: expected a port number, got {v!r}") from None


def kernel_stamps() -> bool:
    """Kernel receive stamps on (Linux) unless ``CTXLOAD_KERNEL_STAMPS=0``."""
    return os.environ.get("CTXLOAD_KERNEL_STAMPS", "1") != "0"


def own_state_update() -> bool:
    """ssm-server's native decode uses its own state-update kernel unless ``CTXLOAD_SSU=mamba``."""
    return os.environ.get("CTXLOAD_SSU", "own") != "mamba"


def fused_projections() -> bool:
    """ssm-server's native decode of small batches fuses each norm into the projection after it
    (``mamba_gemv``) unless ``CTXLOAD_GEMV=cublas``."""
    return os.environ.get("CTXLOAD_GEMV", "fused") != "cublas"


def debug() -> bool:
    """``CTXLOAD_DEBUG=1``: the CLI shows tracebacks instead of one line."""
    return bool(os.environ.get("CTXLOAD_DEBUG"))
