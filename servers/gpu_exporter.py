"""A Prometheus exporter of NVML GPU readings under DCGM exporter's metric names.

For machines without NVIDIA's DCGM exporter: the same names and labels
(``DCGM_FI_DEV_FB_USED{gpu, UUID, device, modelName, Hostname, pci_bus_id}`` …), so every
dashboard works with either.  Readings are taken at scrape time by a custom collector
(nothing polls in between) into an explicit registry.

| metric | unit | NVML source |
| --- | --- | --- |
| ``DCGM_FI_DEV_FB_USED``, ``_FB_FREE``, ``_FB_TOTAL``, ``_FB_RESERVED`` | MiB | memory info (v2) |
| ``DCGM_FI_DEV_GPU_UTIL`` | % | utilization rates |
| ``DCGM_FI_DEV_POWER_USAGE`` | W | power usage |
| ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` | mJ, monotonic | energy since driver load |
| ``DCGM_FI_DEV_GPU_TEMP`` | °C | temperature |
| ``DCGM_FI_DEV_SM_CLOCK`` | MHz | SM clock |
| ``ctxload:gpu_process_memory_used_bytes{pid, process}`` | bytes | compute processes |
| ``ctxload:gpu_exporter_up`` / ``ctxload:gpu_exporter_gpus`` | 1/0, count | NVML state |

With no GPU (or no NVML library) the endpoint still serves: ``ctxload:gpu_exporter_up 0``,
``ctxload:gpu_exporter_gpus 0`` and no ``DCGM_*`` samples, so a Prometheus target stays up.
A reading a GPU does not support (power on some cards) is left out, not reported as zero.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry

DEFAULT_PORT = 9400  # DCGM exporter's port, so a scrape config fits either
MIB = 1 << 20

# name → (type, help); units as DCGM exporter reports them.
DCGM_FIELDS = {
    "DCGM_FI_DEV_FB_USED": ("gauge", "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_FB_TOTAL": ("gauge", "Framebuffer memory total (in MiB)."),
    "DCGM_FI_DEV_FB_RESERVED": ("gauge", "Framebuffer memory reserved by the driver (in MiB)."),
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %)."),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
    # DCGM types this a counter; prometheus_client would then print its TYPE line as
    # ``…_total``, which no longer names the sample.  A gauge keeps DCGM's exact sample name,
    # and rate() reads it the same.
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (
        "gauge", "Total energy consumption since boot (in mJ); monotonic, read with rate()."),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)."),
    "DCGM_FI_DEV_SM_CLOCK": ("gauge", "SM clock frequency (in MHz)."),
}
PROCESS_MEMORY = "ctxload:gpu_process_memory_used_bytes"
UP = "ctxload:gpu_exporter_up"
GPUS = "ctxload:gpu_exporter_gpus"


def _load_nvml():
    """pynvml (from nvidia-ml-py), initialised; ``(None, reason)`` where it cannot be."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, …
        return None, f"NVML unavailable: {e}"
    return pynvml, None


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or str(pid)
    except OSError:
        return "unknown"  # another PID namespace (run the container with pid: host)


class NvmlCollector:
    """Reads every GPU through NVML at each scrape; ``nvml`` is pynvml or a stand-in of it."""

    def __init__(self, nvml=None, *, hostname: str | None = None, error: str | None = None):
        self.nvml = nvml
        self.error = error
        self.hostname = hostname or socket.gethostname()
        self._lock = threading.Lock()  # NVML handles are shared across scrape threads

    @classmethod
    def from_system(cls, hostname: str | None = None) -> "NvmlCollector":
        nvml, error = _load_nvml()
        return cls(nvml, hostname=hostname, error=error)

    def describe(self):
        return []  # readings appear only at scrape time; nothing to register ahead

    def _try(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            if self.nvml is not None and isinstance(e, self.nvml.NVMLError):
                return None  # not supported on this GPU / transient: leave the reading out
            raise

    def _readings(self, handle) -> dict[str, float]:
        n = self.nvml
        out: dict[str, float] = {}
        mem = None
        if hasattr(n, "nvmlMemory_v2"):
            mem = self._try(lambda: n.nvmlDeviceGetMemoryInfo(handle, version=n.nvmlMemory_v2))
        if mem is None:
            mem = self._try(n.nvmlDeviceGetMemoryInfo, handle)
        if mem is not None:
            out["DCGM_FI_DEV_FB_USED"] = mem.used / MIB
            out["DCGM_FI_DEV_FB_FREE"] = mem.free / MIB
            out["DCGM_FI_DEV_FB_TOTAL"] = mem.total / MIB
            reserved = getattr(mem, "reserved", None)
            if reserved is not None:
                out["DCGM_FI_DEV_FB_RESERVED"] = reserved / MIB
        util = self._try(n.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            out["DCGM_FI_DEV_GPU_UTIL"] = float(util.gpu)
        power_mw = self._try(n.nvmlDeviceGetPowerUsage, handle)
        if power_mw is not None:
            out["DCGM_FI_DEV_POWER_USAGE"] = power_mw / 1000.0
        energy_mj = self._try(n.nvmlDeviceGetTotalEnergyConsumption, handle)
        if energy_mj is not None:
            out["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] = float(energy_mj)
        temp = self._try(n.nvmlDeviceGetTemperature, handle, getattr(n, "NVML_TEMPERATURE_GPU", 0))
        if temp is not None:
            out["DCGM_FI_DEV_GPU_TEMP"] = float(temp)
        clock = self._try(n.nvmlDeviceGetClockInfo, handle, getattr(n, "NVML_CLOCK_SM", 1))
        if clock is not None:
            out["DCGM_FI_DEV_SM_CLOCK"] = float(clock)
        return out

    def collect(self) -> Iterator[Metric]:
        up = Metric(UP, "1 when NVML answered this scrape, 0 without a GPU or NVML", "gauge")
        gpus = Metric(GPUS, "GPUs NVML reports", "gauge")
        families = {name: Metric(name, help_, type_) for name, (type_, help_) in DCGM_FIELDS.items()}
        procs = Metric(PROCESS_MEMORY, "GPU memory used by each compute process (bytes)", "gauge")
        count = 0
        if self.nvml is not None:
            with self._lock:
                try:
                    count = self._collect_gpus(families, procs)
                    self.error = None
                except Exception as e:  # the endpoint must keep answering
                    self.error = f"NVML read failed: {e}"
                    count = 0
        up.add_sample(UP, {}, 1.0 if self.nvml is not None and self.error is None else 0.0)
        gpus.add_sample(GPUS, {}, float(count))
        yield up
        yield gpus
        for fam in families.values():
            if fam.samples:
                yield fam
        if procs.samples:
            yield procs

    def _collect_gpus(self, families: dict[str, Metric], procs: Metric) -> int:
        n = self.nvml
        count = n.nvmlDeviceGetCount()
        for i in range(count):
            h = n.nvmlDeviceGetHandleByIndex(i)
            pci = self._try(n.nvmlDeviceGetPciInfo, h)
            labels = {"gpu": str(i), "UUID": _text(n.nvmlDeviceGetUUID(h)),
                      "device": f"nvidia{i}", "modelName": _text(n.nvmlDeviceGetName(h)),
                      "Hostname": self.hostname,
                      "pci_bus_id": _text(getattr(pci, "busId", "")) if pci else ""}
            for name, value in self._readings(h).items():
                families[name].add_sample(name, labels, value)
            for p in self._try(n.nvmlDeviceGetComputeRunningProcesses, h) or []:
                used = getattr(p, "usedGpuMemory", None)
                if used is None:  # NVML_VALUE_NOT_AVAILABLE under some drivers/containers
                    continue
                procs.add_sample(PROCESS_MEMORY, {"gpu": str(i), "UUID": labels["UUID"],
                                                  "Hostname": self.hostname, "pid": str(p.pid),
                                                  "process": _process_name(p.pid)}, float(used))
        return count


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def make_registry(collector: NvmlCollector | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or NvmlCollector.from_system())
    return registry


def serve(port: int = DEFAULT_PORT, host: str = "127.0.0.1", *, hostname: str | None = None,
          registry: CollectorRegistry | None = None):
    """Serve ``/metrics`` from a background thread; returns ``(server, thread)``.

    Always the classic text format (0.0.4), whatever the scraper's Accept header asks:
    prometheus_client's OpenMetrics output rewrites the colons of ``ctxload:gpu_*`` names to
    underscores for a Prometheus 2 scraper (and DCGM exporter speaks the text format too).
    """
    from servers.metrics_http import serve_registry

    registry = registry or make_registry(NvmlCollector.from_system(hostname))
    return serve_registry(registry, host, port, name="gpu-exporter")


# ---- ctxload serve gpu-exporter ------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve NVML GPU readings on /metrics under DCGM exporter's names "
                     "(any path answers; no GPU: an endpoint reporting none).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--hostname", default=None,
                   help="the Hostname label (default: this machine's name)")


def main(args: argparse.Namespace) -> int:
    collector = NvmlCollector.from_system(args.hostname)
    try:
        server, _ = serve(args.port, args.host, registry=make_registry(collector))
    except OSError as e:
        print(f"ctxload serve gpu-exporter: cannot listen on {args.host}:{args.port}: {e}",
              file=sys.stderr)
        return 1
    state = collector.error or f"{collector.nvml.nvmlDeviceGetCount()} GPU(s)"
    print(f"gpu-exporter on http://{args.host}:{args.port}/metrics ({state})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
        return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m servers.gpu_exporter")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
