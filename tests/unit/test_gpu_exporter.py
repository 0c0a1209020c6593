"""The GPU exporter: its endpoint without a GPU (real process), and the NVML → DCGM mapping.

There is no GPU here, so the mapping is driven by a stand-in of pynvml's functions with the
values an 80 GB card reports; benchmarks/gpu/gpu_exporter_check.py checks real readings
against nvidia-smi on a GPU host.
"""

from __future__ import annotations

import sys
import urllib.request
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from servers import gpu_exporter as gx
from servers.process import ManagedServer, free_port


def test_endpoint_serves_and_reports_no_gpu_without_one(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "ctxload.cli", "serve", "gpu-exporter", "--port", str(port)]
    with ManagedServer("gpu-exporter", cmd, port, log_path=tmp_path / "x.log",
                       health_path="/metrics", startup_timeout_s=60) as srv:
        # what Prometheus 2 sends: OpenMetrics first; the answer must still keep the colons
        req = urllib.request.Request(srv.url + "/metrics", headers={
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        import socket

        with socket.create_connection(("127.0.0.1", port)) as s:
            assert s.getpeername()[0] == "127.0.0.1"
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams[gx.UP].samples[0].value == 0.0
    assert fams[gx.GPUS].samples[0].value == 0.0
    assert not [n for n in fams if n.startswith("DCGM_")]


class FakeNvml:
    """pynvml's surface, as one H100 answers it (power not supported, to check omissions)."""

    class NVMLError(Exception):
        pass

    nvmlMemory_v2 = 2
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return "GPU-1234"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=b"00000000:19:00.0")

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        assert version == 2
        return SimpleNamespace(total=85520809984, free=85520809984 - (5 << 30) - (512 << 20),
                               used=5 << 30, reserved=512 << 20)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetPowerUsage(self, h):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return 123456789

    def nvmlDeviceGetTemperature(self, h, kind):
        return 41

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=1, usedGpuMemory=3 << 30), SimpleNamespace(pid=2, usedGpuMemory=None)]


def test_nvml_readings_map_to_dcgm_names_units_and_labels():
    reg = gx.make_registry(gx.NvmlCollector(FakeNvml(), hostname="host-a"))
    text = generate_latest(reg).decode()
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION gauge" in text  # TYPE names the sample
    assert "\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{" in text  # DCGM's name, no _total suffix
    samples = {(s.name, s.labels.get("pid")): s for f in text_string_to_metric_families(text) for s in f.samples}
    used = samples[("DCGM_FI_DEV_FB_USED", None)]
    assert used.value == 5 * 1024  # MiB
    assert used.labels == {"gpu": "0", "UUID": "GPU-1234", "device": "nvidia0",
                           "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "host-a",
                           "pci_bus_id": "00000000:19:00.0"}
    assert samples[("DCGM_FI_DEV_FB_TOTAL", None)].value == 85520809984 / (1 << 20)
    assert samples[("DCGM_FI_DEV_FB_RESERVED", None)].value == 512
    assert samples[("DCGM_FI_DEV_GPU_UTIL", None)].value == 37
    assert samples[("DCGM_FI_DEV_GPU_TEMP", None)].value == 41
    assert not any(name == "DCGM_FI_DEV_POWER_USAGE" for name, _ in samples)  # unsupported: left out
    assert samples[(gx.PROCESS_MEMORY, "1")].value == 3 << 30
    assert (gx.PROCESS_MEMORY, "2") not in samples  # memory not available: no made-up zero
    assert samples[(gx.UP, None)].value == 1 and samples[(gx.GPUS, None)].value == 1


def test_a_failing_nvml_keeps_the_endpoint_answering():
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self):
            raise RuntimeError("GPU fell off the bus")

    reg = gx.make_registry(gx.NvmlCollector(Broken(), hostname="h"))
    text = generate_latest(reg).decode()
    assert "ctxload:gpu_exporter_up 0.0" in text and "DCGM_" not in text
