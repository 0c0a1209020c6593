"""``ctxload report RUN --prometheus URL``: metrics from a real Prometheus server's range API.

A loopback HTTP server exposes fixed gauges in the Prometheus text format; Debian's
``prometheus`` scrapes it every second; the report reads them back through
``/api/v1/query_range`` instead of metrics.jsonl.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from analysis import prometheus, synthetic
from analysis.cli import add_arguments, main
from servers.process import ManagedServer, free_port
from conftest import need_binary  # tests/ is on sys.path (rootdir conftest)

EXPOSITION = """# TYPE ssm:device_memory_allocated_bytes gauge
ssm:device_memory_allocated_bytes{model_name="tiny-mamba2"} 3.0e9
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0"} 250
# TYPE unrelated_metric gauge
unrelated_metric 1
"""


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = EXPOSITION.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    binary = need_binary("prometheus")
    tmp = tmp_path_factory.mktemp("prom")
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    addr = f"127.0.0.1:{exporter.server_address[1]}"
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tiny-mamba2\n    static_configs: [{{targets: ['{addr}']}}]\n")
    port = free_port()
    cmd = [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with ManagedServer("prometheus", cmd, port, log_path=tmp / "prometheus.log",
                       health_path="/-/ready", startup_timeout_s=60):
        url = f"http://127.0.0.1:{port}"
        start = time.time()
        deadline = start + 30
        while time.time() < deadline:  # wait for a few scrapes
            q = urllib.request.urlopen(f"{url}/api/v1/query?query=count_over_time(up[1m])").read()
            res = json.loads(q)["data"]["result"]
            if res and float(res[0]["value"][1]) >= 3:
                break
            time.sleep(0.5)
        yield url, start - 5, time.time() + 1
    exporter.shutdown()


@pytest.mark.prometheus
def test_fetch_regroups_series_into_scrapes(prom):
    url, start, end = prom
    scrapes = prometheus.fetch(url, start, end, ["tiny-llama", "tiny-mamba2"], step=1)
    server = [s for s in scrapes if s.target == "tiny-mamba2"]
    gpu = [s for s in scrapes if s.source == "gpu"]
    assert len(server) >= 2 and len(gpu) >= 2
    names = {n for s in scrapes for n, _l, _v in s.samples}
    assert names == {"ssm:device_memory_allocated_bytes", "DCGM_FI_DEV_POWER_USAGE"}
    assert all(v == 3.0e9 for s in server for n, _l, v in s.samples)


@pytest.mark.prometheus
def test_report_cli_with_prometheus(prom, tmp_path, capsys):
    import argparse

    url, start, end = prom
    run_dir = synthetic.write(tmp_path / "run", synthetic.SyntheticRun(gpu=False, lengths=(64, 128, 256)))
    (run_dir / "metrics.jsonl").unlink()  # Prometheus is the only source
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(run_dir), "--prometheus", url, "--start", str(start), "--end", str(end)])
    assert main(args) == 0
    html = (run_dir / "report" / "report.html").read_text()
    assert "(prometheus)" in html and "metrics.jsonl is missing" not in html
    # a bad range is the user's mistake: exit 2, naming the option
    args = p.parse_args([str(run_dir), "--prometheus", url, "--start", "yesterday"])
    assert main(args) == 2
    assert "--start/--end" in capsys.readouterr().err
    # an unreachable server is a failure: exit 1
    args = p.parse_args([str(run_dir), "--prometheus", "http://127.0.0.1:9", "--start", "1", "--end", "2"])
    assert main(args) == 1
