"""SLOs and percentiles, defined once: the live stage summary (loadgen) and the report
(analysis) count the same requests as good.

One percentile rule everywhere: linear interpolation between closest ranks (numpy's default,
and vLLM's benchmark's). A request's ITL against ``itl_s`` is the p99 of its own gaps by that
rule.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveFloat, ValidationError


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float] | None:
    """The ``qs``-th percentiles (0–100) by linear interpolation; None for no values."""
    v = np.asarray(list(values), dtype=float)
    return [float(x) for x in np.percentile(v, qs, method="linear")] if v.size else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) by linear interpolation; None for no values."""
    p = percentiles(values, (q,))
    return p[0] if p else None


class Slos(BaseModel):
    """A request meets the SLOs when each one given holds (goodput counts those)."""

    model_config = ConfigDict(extra="forbid")

    ttft_s: PositiveFloat | None = None
    itl_s: PositiveFloat | None = None
    """Bound on the p99 of the request's inter-token gaps."""
    tpot_s: PositiveFloat | None = None
    e2e_s: PositiveFloat | None = None
    """Bound on the request's whole time, sent to last token."""

    def given(self) -> dict[str, float]:
        """The bounds set, by field name (``{"ttft_s": 1.0}``)."""
        return self.model_dump(exclude_none=True)

    def meets(self, *, ttft_s: float | None, tpot_s: float | None, itl_s: Sequence[float],
              e2e_s: float | None) -> bool:
        """Whether a successful request's figures meet every bound given (a figure the request
        does not have, e.g. TPOT of a one-token answer, is not held against it)."""
        have = {"ttft_s": ttft_s, "tpot_s": tpot_s, "e2e_s": e2e_s,
                "itl_s": percentile(itl_s, 99) if self.itl_s is not None else None}
        return all(have[k] is None or have[k] <= bound for k, bound in self.given().items())

    @classmethod
    def of_scenario(cls, scenario: dict[str, Any]) -> "Slos":
        """The ``slos`` of a run's scenario.yaml; a block that does not fit the schema is read
        for the fields that do (a reader is lenient: the run is already done)."""
        block = scenario.get("slos") if isinstance(scenario, dict) else None
        if not isinstance(block, dict):
            return cls()
        try:
            return cls.model_validate(block)
        except ValidationError:
            keep = {k: v for k, v in block.items() if k in cls.model_fields}
            try:
                return cls.model_validate(keep)
            except ValidationError:
                return cls()
