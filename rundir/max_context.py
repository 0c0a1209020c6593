"""One line of ``max_context.jsonl``, defined once: what a ``max_context`` search found for one
target (docs/contracts.md), written by loadgen's runner as the search ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class MaxContextRecord:
    target: str
    max_ok_tokens: int | None
    """The longest prompt served."""
    min_fail_tokens: int | None
    """The shortest prompt that failed (None: none did)."""
    failure_kind: str | None
    """How ``min_fail_tokens`` failed: ``rejected``, ``oom``, ``timeout``, ``connection``, …"""
    crashed: bool = False
    """The server's connection was lost: it was not hit again."""
    converged: bool = False
    """(fail − ok) / ok came within ``tolerance``."""
    tolerance: float | None = None
    max_tried_tokens: int | None = None
    server_max_model_len: int | None = None
    """The limit the server declared (``/v1/models``), probed first."""
    known_ok_tokens: int | None = None
    """The longest prompt an earlier load of the run had served: the doubling started above it."""
    probes: list[dict] = field(default_factory=list)
    """``{"prompt_tokens", "ok", "failure_kind"}`` of each probe, in order."""
    stopped: str | None = None
    """Why the search ended early, if it did."""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "MaxContextRecord":
        """Lenient: unknown fields are ignored; a line without its target raises KeyError."""
        known = set(cls.__dataclass_fields__)
        return cls(**{"max_ok_tokens": None, "min_fail_tokens": None, "failure_kind": None,
                      **{k: v for k, v in obj.items() if k in known}, "target": str(obj["target"])})
