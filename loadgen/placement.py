"""Which targets of a scenario may run at the same time: waves of targets on GPUs of their own.

Under the scenario's ``placement: by_gpu`` the targets are grouped into waves, keeping the
scenario's order: a target joins the wave being formed when its GPUs (``serve.gpus``) share
none with any target already in it, else it opens the next wave. A target that names no GPUs
(it may use any) or is given by URL (nothing says where it runs) shares everything: it is a
wave of its own. The targets of a wave run at once, each through all of its stages; the waves
run one after another. Under ``placement: serial`` (the default) every target is a wave of its
own (DESIGN.md, "Measuring fairly": one target at a time on a shared device).
"""

from __future__ import annotations

from typing import Iterable, Optional

GpuSet = Optional[frozenset]
"""A target's GPUs, or None: it shares everything."""


def waves(gpus: Iterable[GpuSet]) -> list[list[int]]:
    """The waves of targets whose GPU sets are ``gpus`` (in scenario order): lists of their
    positions, in order. Targets of one wave have pairwise disjoint GPU sets."""
    out: list[list[int]] = []
    taken: set = set()  # the GPUs of the wave being formed
    for i, g in enumerate(gpus):
        if out and g and taken and not (g & taken):
            out[-1].append(i)
            taken |= g
        else:
            out.append([i])
            taken = set(g) if g else set()
    return out


def gpu_set(target) -> GpuSet:
    """A scenario target's GPUs (``serve.gpus``), or None when it names none or is a URL."""
    serve = getattr(target, "serve", None)
    return frozenset(serve.gpus) if serve is not None and serve.gpus else None


def group(targets: list) -> list[list]:
    """Scenario targets in their waves (:func:`waves` of their :func:`gpu_set`)."""
    return [[targets[i] for i in w] for w in waves(gpu_set(t) for t in targets)]
