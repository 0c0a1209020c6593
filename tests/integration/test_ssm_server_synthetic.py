"""The synthetic engine keeps its schedule: TTFT and ITL as set, across concurrent streams."""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import time

import openai

from servers.process import ManagedServer, free_port


def test_synthetic_schedule(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "servers.ssm_server", "--engine", "synthetic", "--ttft-ms", "80",
           "--itl-ms", "20", "--port", str(port), "--max-model-len", "4096"]
    with ManagedServer("ssm-synth", cmd, port, log_path=tmp_path / "log") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

        def one(_):
            t0 = time.perf_counter()
            stamps = [time.perf_counter() for ev in c.completions.create(
                model="synthetic", prompt="a b c d", max_tokens=20, stream=True) if ev.choices and ev.choices[0].text]
            return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            res = list(ex.map(one, range(8)))
        for ttft, gaps, n in res:
            assert n == 20
            assert 0.075 < ttft < 0.25
            assert abs(statistics.median(gaps) - 0.020) < 0.006
        import json
        import urllib.request
        req = urllib.request.Request(srv.url + "/tokenize", json.dumps({"prompt": "one two three"}).encode(),
                                     {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req).read())["count"] == 3
