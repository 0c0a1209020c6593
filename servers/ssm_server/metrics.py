"""Prometheus metrics of ssm-server, on an explicit registry (names: docs/contracts.md §5).

Gauges that describe the engine's state (slots, memory, running/waiting) are read at scrape
time from a callable, so they are never stale.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, ProcessCollector, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Seconds: sub-millisecond steps up to 30 minutes (a 1M-token TTFT is not 10 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
                   1200.0, 1800.0)
ITL_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02,
               0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
               60.0, 120.0)

GAUGES = {
    "ssm:num_requests_running": "Requests in prefill or decode",
    "ssm:num_requests_waiting": "Requests queued for a state slot",
    "ssm:state_slots_used": "State slots holding a sequence",
    "ssm:state_slots_total": "State slots allocated up front",
    "ssm:state_bytes_per_sequence": "Bytes of recurrent (conv + SSM) state per sequence",
    "ssm:kv_cache_bytes_used": "Bytes of attention KV cache in use (hybrids and Transformers)",
    "ssm:kv_cache_usage_perc": "KV cache in use over its budget, 0..1",
    "ssm:cache_bytes_peak": "Most KV cache + recurrent state bytes its sequences held at once since start",
    "ssm:weight_bytes": "Bytes of the model's parameters and buffers",
    "ssm:device_memory_allocated_bytes": "Device memory held by tensors",
    "ssm:device_memory_reserved_bytes": "Device memory reserved by the allocator",
    "ssm:device_memory_peak_allocated_bytes": "Highest device memory held by tensors since start",
}


class _StateCollector:
    def __init__(self, model_name: str, read: Callable[[], dict[str, float]]):
        self.model_name = model_name
        self.read = read

    def collect(self):
        values = self.read()
        for name, doc in GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(values.get(name, 0.0)))
            yield g


class ServerMetrics:
    def __init__(self, model_name: str, read_state: Callable[[], dict[str, float]]):
        self.model_name = model_name
        self.registry = r = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes & co.: the server's own memory where there is no
        # device (CPU runs), read at scrape time from /proc
        ProcessCollector(registry=r)
        L = ["model_name"]
        self.ttft = Histogram("ssm:time_to_first_token_seconds", "Time to first token",
                              L, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ssm:inter_token_latency_seconds", "Gap between output tokens",
                             L, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("ssm:e2e_request_latency_seconds", "Arrival to last token",
                             L, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("ssm:request_queue_time_seconds", "Arrival to slot granted",
                               L, buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("ssm:request_prefill_time_seconds", "Slot granted to first token",
                                 L, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ssm:prompt_tokens", "Prompt tokens prefilled", L, registry=r)
        self.generation_tokens = Counter("ssm:generation_tokens", "Tokens generated", L, registry=r)
        # where the engine's time goes: steps, the device thread's busy time (launching,
        # prefilling, sampling, and waiting for the device), and of it the wait for a pipelined
        # decode step's tokens (the device still running it); the rest of the wall time is the
        # event loop's (emitting tokens, HTTP)
        self.engine_steps = Counter("ssm:engine_steps", "Engine steps (a decode step, a prefill, or both)",
                                    L, registry=r)
        self.engine_busy = Counter("ssm:engine_busy_seconds",
                                   "Time the engine's device and prefill threads spent in steps and prefills",
                                   L, registry=r)
        self.engine_collect_wait = Counter("ssm:engine_collect_wait_seconds",
                                           "Time the device thread waited for a launched decode step's tokens",
                                           L, registry=r)
        self.success = Counter("ssm:request_success", "Finished requests",
                               L + ["finished_reason"], registry=r)
        self.failure = Counter("ssm:request_failure", "Failed, rejected or cancelled requests",
                               L + ["reason"], registry=r)
        r.register(_StateCollector(model_name, read_state))
        for reason in ("stop", "length"):
            self.success.labels(model_name, reason)
        for reason in ("cancelled", "rejected", "oom", "error"):
            self.failure.labels(model_name, reason)

    def set_engine_info(self, backend: str, device: str, dtype: str, cuda_graphs: bool) -> None:
        """``ssm:engine_info{model_name, backend, device, dtype, cuda_graphs} 1``: which backend
        serves (``mamba_ssm`` native, ``hf`` transformers, ``synthetic``), so a report can tell
        a serving engine from the eager research path."""
        g = Gauge("ssm:engine_info", "The backend serving this model (always 1)",
                  ["model_name", "backend", "device", "dtype", "cuda_graphs"], registry=self.registry)
        g.labels(self.model_name, backend, device, dtype, "true" if cuda_graphs else "false").set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
