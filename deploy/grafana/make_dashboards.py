"""Write the Grafana dashboards of the ctxload stack (ctxload/dashboards/*.json).

They live in the ctxload package, so that they ship in its wheel; deploy/grafana/dashboards,
which docker-compose.yml mounts into Grafana, is a link to that directory.

The JSON files are generated from the panel lists below, so that every query is written once,
in PromQL a reader can review here; ``tests/unit/test_deploy.py`` fails when the committed
JSON differs from what this script writes, and ``tests/integration/test_stack.py`` runs every
query against a real Prometheus scraping real servers.

Metric names are those of docs/contracts.md §5. One query serves vLLM and ssm-server by
selecting on ``__name__`` (``{__name__=~"(vllm|ssm):…"}``) and grouping by ``model_name``.
GPU panels read DCGM exporter's names, which ours and NVIDIA's exporter both serve.

    python deploy/grafana/make_dashboards.py        # rewrite the JSON files
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "ctxload" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
BOTH = "(vllm|ssm)"  # the engines whose server metrics share names


def _sel(metric: str) -> str:
    """Both engines' series of one vLLM-named metric (``time_to_first_token_seconds_bucket``)."""
    return f'{{__name__=~"{BOTH}:{metric}"}}'


def quantiles(metric: str, by: str = "model_name", sel: str | None = None) -> list[tuple[str, str]]:
    s = sel or _sel(f"{metric}_bucket")
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({s}[{RATE}])))",
             f"{{{{{by}}}}} p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


def panel(title: str, targets: list[tuple[str, str]], *, unit: str = "short", desc: str = "",
          kind: str = "timeseries", overrides: list | None = None) -> dict:
    return {"title": title, "type": kind, "description": desc, "datasource": DATASOURCE,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "datasource": DATASOURCE, "range": True}
                        for i, (expr, legend) in enumerate(targets)]}


def right_axis(ref_or_name: str, unit: str) -> dict:
    """Field override that draws one series on a right-hand axis in its own unit."""
    return {"matcher": {"id": "byFrameRefID", "options": ref_or_name},
            "properties": [{"id": "custom.axisPlacement", "value": "right"},
                           {"id": "unit", "value": unit}]}


def row(title: str) -> dict:
    return {"title": title, "type": "row", "collapsed": False, "panels": []}


def dashboard(uid: str, title: str, items: list[dict], desc: str) -> dict:
    panels, x, y, pid = [], 0, 0, 1
    for item in items:
        item = dict(item, id=pid)
        pid += 1
        if item["type"] == "row":
            if x:
                x, y = 0, y + 8
            item["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
        else:
            item["gridPos"] = {"h": 8, "w": 12, "x": x, "y": y}
            x = (x + 12) % 24
            y += 8 if x == 0 else 0
        panels.append(item)
    return {"uid": uid, "title": title, "description": desc, "tags": ["ctxload"],
            "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True,
            "refresh": "5s", "time": {"from": "now-30m", "to": "now"},
            "graphTooltip": 1, "panels": panels, "templating": {"list": []}, "annotations": {"list": []}}


def servers() -> dict:
    by_model = "{{model_name}}"
    return dashboard("ctxload-servers", "ctxload — servers (vLLM and ssm-server)", [
        row("Latency, per model (server side)"),
        panel("Time to first token", quantiles("time_to_first_token_seconds"), unit="s",
              desc="p50/p90/p99 of vllm:/ssm:time_to_first_token_seconds"),
        panel("Inter-token latency", quantiles("inter_token_latency_seconds"), unit="s"),
        panel("End-to-end request latency", quantiles("e2e_request_latency_seconds"), unit="s"),
        panel("Queue time", quantiles("request_queue_time_seconds"), unit="s",
              desc="time a request waited before its first scheduled step"),
        row("Throughput and load"),
        panel("Tokens per second", [
            (f'sum by (model_name) (rate({_sel("generation_tokens_total")}[{RATE}]))', f"{by_model} output"),
            (f'sum by (model_name) (rate({_sel("prompt_tokens_total")}[{RATE}]))', f"{by_model} prompt"),
        ], unit="tokens/s"),
        panel("Requests running and waiting", [
            (f'sum by (model_name) ({_sel("num_requests_running")})', f"{by_model} running"),
            (f'sum by (model_name) ({_sel("num_requests_waiting")})', f"{by_model} waiting"),
        ]),
        panel("Finished requests by reason", [
            (f'sum by (model_name, finished_reason) (rate({_sel("request_success_total")}[{RATE}]))',
             "{{model_name}} {{finished_reason}}"),
        ], unit="reqps"),
        panel("Prefill time", quantiles("request_prefill_time_seconds"), unit="s"),
        row("Cache and state"),
        panel("KV cache usage", [(f'max by (model_name) ({_sel("kv_cache_usage_perc")})', by_model)],
              unit="percentunit", desc="vLLM's paged KV cache; ssm-server's attention KV of hybrids"),
        panel("SSM state slots", [
            ("sum by (model_name) (ssm:state_slots_used)", f"{by_model} used"),
            ("sum by (model_name) (ssm:state_slots_total)", f"{by_model} total"),
        ], desc="ssm-server's fixed-size state pool: one slot per sequence in flight"),
        panel("SSM state bytes per sequence", [
            ("max by (model_name) (ssm:state_bytes_per_sequence)", by_model),
        ], unit="bytes"),
        panel("ssm-server memory", [
            ("sum by (model_name) (ssm:kv_cache_bytes_used)", f"{by_model} KV (hybrids)"),
        ], unit="bytes"),
        row("Errors"),
        panel("Server failures", [
            ('sum by (model_name, reason) (rate(ssm:request_failure_total[' + RATE + ']))',
             "{{model_name}} {{reason}}"),
            (f'sum by (model_name) (rate({{__name__="vllm:request_success_total",'
             f'finished_reason=~"abort|error"}}[{RATE}]))', "{{model_name}} aborted/error"),
        ], unit="reqps"),
        panel("Targets up", [('up{job=~"vllm|ssm-server"}', "{{job}} {{instance}}")],
              desc="1 while Prometheus reaches the server"),
    ], "Server-side view: one query per panel serves vLLM (vllm:) and ssm-server (ssm:) metrics.")


def gpu() -> dict:
    fb_bytes = "max by (gpu, modelName) (DCGM_FI_DEV_FB_USED) * 1048576"
    return dashboard("ctxload-gpu", "ctxload — GPU memory and power", [
        row("Memory against the prompt length under test"),
        panel("GPU memory used vs prompt length", [
            (fb_bytes, "GPU {{gpu}} used"),
            ("max(ctxload:client_prompt_tokens)", "prompt tokens under test"),
        ], unit="bytes", overrides=[right_axis("B", "short")],
              desc="DCGM_FI_DEV_FB_USED (GPU only) with the load generator's current prompt length"),
        panel("GPU memory used and free", [
            ("max by (gpu) (DCGM_FI_DEV_FB_USED) * 1048576", "GPU {{gpu}} used"),
            ("max by (gpu) (DCGM_FI_DEV_FB_FREE) * 1048576", "GPU {{gpu}} free"),
        ], unit="bytes", desc="GPU only"),
        panel("GPU memory per process", [
            ("max by (gpu, pid, process) (ctxload:gpu_process_memory_used_bytes)",
             "GPU {{gpu}} {{process}} ({{pid}})"),
        ], unit="bytes", desc="GPU only; ctxload's exporter (DCGM exporter has no per-process memory)"),
        panel("ssm-server device memory", [
            ("sum by (model_name) (ssm:device_memory_allocated_bytes)", "{{model_name}} allocated"),
            ("sum by (model_name) (ssm:device_memory_reserved_bytes)", "{{model_name}} reserved"),
        ], unit="bytes", desc="what ssm-server's allocator holds (zero on CPU)"),
        row("Utilisation, power, energy"),
        panel("GPU utilisation", [("max by (gpu) (DCGM_FI_DEV_GPU_UTIL)", "GPU {{gpu}}")],
              unit="percent", desc="GPU only"),
        panel("GPU power", [("max by (gpu) (DCGM_FI_DEV_POWER_USAGE)", "GPU {{gpu}}")],
              unit="watt", desc="GPU only"),
        panel("Energy per second", [
            (f"max by (gpu) (rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[{RATE}])) / 1000", "GPU {{gpu}}"),
        ], unit="watt", desc="GPU only; the energy counter's growth (mJ/s ÷ 1000 = W)"),
        panel("GPU exporter", [
            ("max(ctxload:gpu_exporter_up)", "NVML answering"),
            ("max(ctxload:gpu_exporter_gpus)", "GPUs"),
        ], desc="ctxload's exporter: 0 GPUs on a machine without one"),
    ], "GPU memory over time against the prompt length under test; DCGM exporter's names.")


def client() -> dict:
    by_target = "{{target}}"
    return dashboard("ctxload-client", "ctxload — load generator (client view)", [
        row("What the client measures"),
        panel("Client time to first token", quantiles(
            "", by="target", sel="ctxload:client_time_to_first_token_seconds_bucket"), unit="s"),
        panel("Client inter-token latency", quantiles(
            "", by="target", sel="ctxload:client_inter_token_latency_seconds_bucket"), unit="s"),
        panel("Prompt length under test", [
            ("max by (target) (ctxload:client_prompt_tokens)", by_target)]),
        panel("Concurrent users", [("sum by (target) (ctxload:client_users)", by_target)]),
        panel("Requests per second by status", [
            (f"sum by (target, status) (rate(ctxload:client_requests_total[{RATE}]))",
             "{{target}} {{status}}")], unit="reqps"),
        panel("Client errors by kind", [
            ("sum by (target, kind) (increase(ctxload:client_errors_total[" + RATE + "]))",
             "{{target}} {{kind}}")], desc="rejected, oom, timeout, connection, server_error"),
    ], "The load generator's own view (ctxload:client_* metrics), per target and stage.")


DASHBOARDS = {"ctxload-servers.json": servers, "ctxload-gpu.json": gpu, "ctxload-client.json": client}


def render() -> dict[str, str]:
    return {name: json.dumps(make(), indent=2, ensure_ascii=False) + "\n"
            for name, make in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
