"""The Docker stack's monitoring, proven outside Docker: every dashboard query returns data.

On loopback, without Docker: a real vLLM CPU server started by servers.vllm_launch (the tiny
Falcon-H1 hybrid, the compose file's hybrid family), two ssm-servers (tiny Mamba2 and tiny
Falcon-H1), the GPU exporter (no GPU here: its endpoint serves and reports none), and Debian's
Prometheus running the repository's deploy/prometheus/prometheus.yml with its targets rewritten
to those ports and a 1 s scrape interval.  `ctxload run` then drives a short context sweep
through all three servers, serving its client metrics for Prometheus to scrape; the last
stage's prompt is longer than the vLLM server's 2048-token limit, so errors are counted too.

Then EVERY PromQL expression of EVERY panel of every dashboard in deploy/grafana/dashboards is
run as Grafana runs it (a range query over the test's window) and must return data; a query
written for both engines (``{__name__=~"(vllm|ssm):…"}``) must return data for each of the
three served models, so an engine missing one of the shared names fails too.

The one exception, stated here so that it is a rule and not a loophole: an expression whose
only metrics are the GPU readings (``DCGM_FI_DEV_*``, ``ctxload:gpu_process_memory_used_bytes``)
cannot have data on a machine without a GPU.  Those are listed as GPU-only, must be accepted by
Prometheus's parser (a query that does not parse fails), and must name only metrics that
servers.gpu_exporter declares; on a GPU host, benchmarks/gpu/gpu_exporter_check.py checks the
readings themselves.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from servers import gpu_exporter, vllm_launch
from servers.process import ManagedServer, free_port
from tests.conftest import REPO, build_tiny, need_binary, need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.prometheus, pytest.mark.slow]

DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
PROM_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
GPU_METRICS = tuple(gpu_exporter.DCGM_FIELDS) + (gpu_exporter.PROCESS_MEMORY,)
_GPU_NAME = re.compile(r"\b(DCGM_FI_DEV_\w+|ctxload:gpu_process_memory_used_bytes)\b")
_OTHER_NAME = re.compile(r"(vllm|ssm)[:|)]|ctxload:client_|ctxload:gpu_exporter_|\bup\{")
#: the model names the three servers of the fixture serve: vLLM's, and the two ssm-servers'
SERVED_MODELS = {"tiny-falcon-h1", "tiny-mamba2", "tiny-falcon-h1-ssm"}
RATE_WINDOW = "20s"  # what $__rate_interval is at a 1 s scrape interval, with margin


def dashboard_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, panel, refId, expr) of every query of every panel."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for p in dash["panels"]:
            for t in p.get("targets", []):
                out.append((path.stem, p["title"], t["refId"], t["expr"]))
    return out


def gpu_only(expr: str) -> bool:
    return bool(_GPU_NAME.search(expr)) and not _OTHER_NAME.search(expr)


def rewrite_config(text: str, where: dict[str, list[str]]) -> str:
    """The repository's scrape config with each compose target replaced by loopback ones.

    ``where`` maps a compose ``host:port`` to its loopback addresses ([] drops it).  A target
    the map does not know fails: a new service in the config must be added to this test.
    """
    cfg = yaml.safe_load(text)
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    for job in cfg["scrape_configs"]:
        job.pop("dns_sd_configs", None)  # Docker's DNS (worker replicas): nothing to find here
        for group in job.get("static_configs", []):
            new = []
            for t in group["targets"]:
                assert t in where, f"test_stack does not know the scrape target {t} of job {job['job_name']}"
                new += where[t]
            group["targets"] = new
        job["static_configs"] = [g for g in job.get("static_configs", []) if g["targets"]]
        assert job["static_configs"], f"job {job['job_name']} has no live target in the test"
    return yaml.safe_dump(cfg)


class Prom:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 bad_data: a query that does not parse
            return json.loads(e.read())

    def range(self, expr: str, start: float, end: float) -> dict:
        return self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="2")

    def series_with_data(self, expr: str, start: float, end: float) -> list[dict]:
        """The label sets of the result series that hold at least one number."""
        r = self.range(expr, start, end)
        assert r["status"] == "success", f"{expr}: {r.get('error')}"
        return [s["metric"] for s in r["data"]["result"]
                if any(v[1] not in ("NaN", "+Inf", "-Inf") for v in s["values"])]

    def has_data(self, expr: str, start: float, end: float) -> bool:
        return bool(self.series_with_data(expr, start, end))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    vllm_python = need_vllm()
    prometheus = need_binary("prometheus")
    tmp = tmp_path_factory.mktemp("stack")
    py = sys.executable
    ports = {k: free_port() for k in ("vllm", "ssm", "ssm_hybrid", "gpu", "client", "prom")}
    hybrid, ssm = build_tiny("tiny-falcon-h1"), build_tiny("tiny-mamba2")
    servers = [
        ManagedServer("exporter", [py, "-m", "servers.gpu_exporter", "--port", str(ports["gpu"])],
                      ports["gpu"], log_path=tmp / "exporter.log", health_path="/metrics",
                      startup_timeout_s=60),
        ManagedServer("ssm-mamba2", [py, "-m", "servers.ssm_server", "--model", str(ssm),
                                     "--port", str(ports["ssm"])], ports["ssm"],
                      log_path=tmp / "ssm.log", startup_timeout_s=180),
        ManagedServer("ssm-falcon", [py, "-m", "servers.ssm_server", "--model", str(hybrid),
                                     "--served-model-name", "tiny-falcon-h1-ssm",
                                     "--port", str(ports["ssm_hybrid"])], ports["ssm_hybrid"],
                      log_path=tmp / "ssm-hybrid.log", startup_timeout_s=180),
        # the launch profile under test: what `ctxload serve vllm` and the compose stack run
        ManagedServer("vllm", vllm_launch.command(hybrid, ports["vllm"], python=str(vllm_python)),
                      ports["vllm"], log_path=tmp / "vllm.log", startup_timeout_s=400),
    ]
    loop = lambda k: [f"127.0.0.1:{ports[k]}"]  # noqa: E731
    config = rewrite_config(PROM_CONFIG.read_text(), {
        "vllm-transformer:8000": [], "vllm-hybrid:8000": loop("vllm"),
        "ssm-server:8000": loop("ssm") + loop("ssm_hybrid"),
        "gpu-exporter:9400": loop("gpu"), "dcgm-exporter:9400": [],
        "locust-master:9646": loop("client"), "loadgen:9646": []})
    (tmp / "prometheus.yml").write_text(config)
    check = subprocess.run([need_binary("promtool"), "check", "config", str(tmp / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    servers.append(ManagedServer(
        "prometheus", [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                       f"--storage.tsdb.path={tmp / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{ports['prom']}"],
        ports["prom"], log_path=tmp / "prometheus.log", health_path="/-/ready", startup_timeout_s=60))
    started = []
    try:
        for s in servers:  # one at a time: two shared cores
            started.append(s.__enter__())
        yield {"ports": ports, "tmp": tmp, "prom": Prom(f"http://127.0.0.1:{ports['prom']}")}
    finally:
        for s in reversed(started):
            s.stop()


@pytest.fixture(scope="module")
def loaded(stack):
    """A short context sweep through every server with `ctxload run`; the query window."""
    p, tmp = stack["ports"], stack["tmp"]
    scenario = {
        "name": "stack-test",
        "targets": [
            {"name": "vllm-hybrid", "url": f"http://127.0.0.1:{p['vllm']}", "model": "tiny-falcon-h1",
             "family": "hybrid", "engine": "vllm"},
            {"name": "ssm-mamba2", "url": f"http://127.0.0.1:{p['ssm']}", "model": "tiny-mamba2",
             "family": "ssm", "engine": "ssm-server"},
            {"name": "ssm-falcon", "url": f"http://127.0.0.1:{p['ssm_hybrid']}",
             "model": "tiny-falcon-h1-ssm", "family": "hybrid", "engine": "ssm-server"},
        ],
        "prompt": {"kind": "synthetic"},
        "output": {"max_tokens": 8, "ignore_eos": True},
        # 3000 > vLLM's --max-model-len 2048: rejected, so client error counters exist.  Stages
        # last seconds, not a few requests: a client series is born at its stage's first
        # request, and rate() needs it to grow across later scrapes.
        "load": {"kind": "context_sweep", "prompt_tokens": [64, 512, 3000], "users": 2, "duration_s": 4},
        "stop": {"max_duration_s": 200},
        "metrics": {"scrape_interval_s": 1, "exporter_port": p["client"],
                    "extra_urls": {"gpu": f"http://127.0.0.1:{p['gpu']}/metrics"}},
        "request_timeout_s": 60,
    }
    (tmp / "stack-test.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "ctxload.cli", "run", str(tmp / "stack-test.yaml"),
                        "--runs-dir", str(tmp / "runs"), "--run-id", "stack"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode in (0, 1), r.stdout[-2000:] + r.stderr[-3000:]
    records = [json.loads(x) for x in (tmp / "runs" / "stack" / "requests.jsonl").read_text().splitlines()]
    assert {rec["target"] for rec in records if rec["status"] == "ok"} == {"vllm-hybrid", "ssm-mamba2", "ssm-falcon"}
    time.sleep(3)  # a last scrape of the servers after the final request
    return start - 5, time.time()


def test_repo_scrape_config_is_valid():
    promtool = need_binary("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_target_is_scraped(stack, loaded):
    r = stack["prom"].get("/api/v1/targets")
    health = {t["scrapeUrl"]: t["health"] for t in r["data"]["activeTargets"]}
    # the client exporter lives only while `ctxload run` does; the servers must still be up
    servers = {u: h for u, h in health.items() if f":{stack['ports']['client']}/" not in u}
    assert len(servers) == 4 and set(servers.values()) == {"up"}, health
    assert stack["prom"].has_data('up{job="loadgen"} == 1', *loaded), "client metrics never scraped"


def test_every_dashboard_query_returns_data(stack, loaded):
    prom, (start, end) = stack["prom"], loaded
    queries = dashboard_queries()
    assert len(queries) >= 30
    empty, gpu_listed = [], []
    for dash, title, ref, expr in queries:
        q = expr.replace("$__rate_interval", RATE_WINDOW)
        assert "$" not in q, f"{dash} / {title} / {ref}: unsubstituted variable in {expr}"
        if gpu_only(expr):
            r = prom.range(q, start, end)
            assert r["status"] == "success", f"{dash} / {title} / {ref} does not parse: {r.get('error')}"
            names = set(_GPU_NAME.findall(expr))
            assert names <= set(GPU_METRICS), f"{dash} / {title}: {names - set(GPU_METRICS)} not exported"
            gpu_listed.append(f"{dash} / {title} / {ref}")
            continue
        series = prom.series_with_data(q, start, end)
        if not series:
            empty.append(f"{dash} / {title} / {ref}: {expr}")
        elif "(vllm|ssm)" in expr:  # one query for both engines: each served model must answer
            missing = SERVED_MODELS - {m.get("model_name") for m in series}
            if missing:
                empty.append(f"{dash} / {title} / {ref}: no data for {sorted(missing)}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    print(f"\n{len(queries) - len(gpu_listed)} queries returned data; GPU-only (parsed, no GPU here):\n  "
          + "\n  ".join(gpu_listed))
    assert len(gpu_listed) < len(queries) / 3


def test_the_check_can_fail(stack, loaded):
    """A dashboard naming a metric nobody exports would fail the test above."""
    prom, window = stack["prom"], loaded
    assert not prom.has_data('{__name__=~"(vllm|ssm):no_such_metric_seconds_bucket"}', *window)
    assert not gpu_only('sum(ssm:state_slots_used) + max(DCGM_FI_DEV_FB_USED)')
    assert prom.range("sum(rate(x[", *window)["status"] == "error"  # a broken query is caught
