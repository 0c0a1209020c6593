"""Server settings, validated once at the edge, and memory sizes such as ``24GiB``."""

from __future__ import annotations

from dataclasses import dataclass

from servers.sizes import parse_bytes  # noqa: F401 - re-exported: the CLI and tests use it here


@dataclass
class ServerConfig:
    model: str | None = None
    """A model directory or a preset name; None only for the synthetic engine."""
    api_key: str | None = None
    max_request_bytes: int = 128 << 20
    served_model_name: str | None = None
    engine: str = "model"
    random_weights: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_model_len: int | None = None
    prefill_chunk_size: int = 2048
    prefill_chunk_size_decoding: int | None = None
    """Prompt tokens per prefill step while other streams decode (None: ``prefill_chunk_size``):
    smaller keeps their gaps short while a long prompt arrives, at some cost to its TTFT."""
    prefill_overlap: bool = False
    """Prefill chunks on a thread (and CUDA stream) of their own, beside the decode steps
    (engine.py): shorter gaps for the streams decoding, longer waits for the prompts. False runs
    each chunk inside a decode step, a stall of the other streams."""
    gpu_memory_budget: int | None = None
    max_queue: int = 256
    cuda_graphs: bool = True
    backend: str = "auto"
    """auto, hf (transformers) or mamba_ssm (native Mamba2 on CUDA)."""
    profile_dir: str | None = None
    """With a directory, POST /start_profile and /stop_profile run torch.profiler on the device
    thread and write Chrome traces there (absolute; made at start-up). None: the routes are 404."""
    # synthetic engine
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    schedule_from: str = "admission"
    """synthetic engine: token deadlines from a request's admission (a slot) or its arrival"""
    synthetic_vocab: int = 50000

    def validate(self) -> None:
        """Raise ValueError naming the field for settings that cannot work."""
        if self.engine not in ("model", "synthetic"):
            raise ValueError(f"--engine must be 'model' or 'synthetic', not {self.engine!r}")
        if self.engine == "model" and not self.model:
            raise ValueError("--model is required unless --engine synthetic")
        for name in ("max_num_seqs", "prefill_chunk_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.prefill_chunk_size_decoding is not None and self.prefill_chunk_size_decoding < 1:
            raise ValueError("--prefill-chunk-size-decoding must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("--max-model-len must be at least 1")
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError("--ttft-ms and --itl-ms must not be negative")
        if self.device not in ("cpu", "cuda") and not (self.device.startswith("cuda:")
                                                       and self.device[5:].isdigit()):
            raise ValueError(f"--device must be cpu or cuda, not {self.device!r}")
        if self.backend not in ("auto", "hf", "mamba_ssm"):
            raise ValueError(f"--backend must be auto, hf or mamba_ssm, not {self.backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
