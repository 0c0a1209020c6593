"""Fidelity and capacity of load generators against a server with a set TTFT and ITL.

One synthetic streaming server (ssm-server's synthetic engine, else loadgen's own) sends token
k of every request at arrival + TTFT + k·ITL.  Each tool — ctxload's loadgen, ``vllm bench
serve`` (from the vLLM venv) and GuideLLM (from its own venv) — streams closed-loop at growing
concurrency; from each tool's own per-request output we take the error of its TTFT and ITL
against the set values (p50 and p99 of the absolute error) and the event rate it received.
"Max events/s within 1 ms" is the largest event rate at which the tool's p99 ITL error stayed
within 1 ms.  GuideLLM reports only a per-request mean ITL, so its ITL column is of means.

    .venv/bin/python benchmarks/bench_loadgen_fidelity.py [--levels 1,50,200] [--tools ctxload,vllm,guidellm]

``--tools`` also takes ``ctxload-user``: ctxload with ``CTXLOAD_KERNEL_STAMPS=0`` (user-space
stamps after each read instead of the kernel's receive times), for comparison.

The "vs set" columns include the server's own lateness (it shares the CPU), the same for every
tool.  The "vs sent" columns take it out: loadgen's synthetic server logs when it really wrote
each event (``--send-log``; ``perf_counter_ns``, CLOCK_MONOTONIC) and names each stream in its
first token's text, so each tool's request is matched to the server's: the client's own error is
its TTFT minus the server's (first write − request arrival) and each gap minus the server's gap
between the same two writes.  ``--server ssm-server`` has no send log: those columns stay empty.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servers.process import ManagedServer, free_port  # noqa: E402

VLLM_PY = Path(os.environ.get("CTXLOAD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
GUIDELLM = Path(os.environ.get("GUIDELLM", "/tmp/guidellm-venv/bin/guidellm"))
PROMPT_TOKENS = 128


def server_cmd(port: int, ttft_ms: float, itl_ms: float, which: str, send_log: Path | None = None) -> list[str]:
    if which == "ssm-server":
        return [sys.executable, "-m", "servers.ssm_server", "--engine", "synthetic", "--ttft-ms", str(ttft_ms),
                "--itl-ms", str(itl_ms), "--port", str(port), "--max-num-seqs", "2048", "--max-queue", "4096",
                "--served-model-name", "synthetic"]
    return [sys.executable, "-m", "loadgen.synthetic_server", "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
            "--port", str(port), "--served-model-name", "synthetic"] + (["--send-log", str(send_log)] if send_log else [])


# ---- the server's own stamps ------------------------------------------------------------------

def read_sends(a) -> dict[str, dict]:
    """The server's send log: response id → {"ttft_s", "itl_s"} as it really wrote them."""
    if not a.send_log or not a.send_log.exists():
        return {}
    out = {}
    for line in a.send_log.read_text().splitlines():
        e = json.loads(line)
        s = e["send_ns"]
        out[e["id"]] = {"ttft_s": (s[0] - e["recv_ns"]) * 1e-9 if s else None,
                        "itl_s": [(y - x) * 1e-9 for x, y in zip(s, s[1:])]}
    return out


def own_error(pairs: list[tuple[float | None, list[float], dict | None]], mean_itl: bool = False) -> dict:
    """p50/p99 of |client − server| for TTFT and per gap (or per-request mean gap) over the
    requests matched to the server's log; ``matched`` counts them."""
    te, ie, matched = [], [], 0
    for ttft, itls, srv in pairs:
        if srv is None:
            continue
        matched += 1
        if ttft is not None and srv["ttft_s"] is not None:
            te.append(abs(ttft - srv["ttft_s"]) * 1e3)
        if mean_itl:
            if itls and srv["itl_s"]:
                ie.append(abs(itls[0] - sum(srv["itl_s"]) / len(srv["itl_s"])) * 1e3)
        elif len(itls) == len(srv["itl_s"]):
            ie += [abs(c - v) * 1e3 for c, v in zip(itls, srv["itl_s"])]
    return {"matched": matched, "own_ttft_p50": q(te, .5), "own_ttft_p99": q(te, .99),
            "own_itl_p50": q(ie, .5), "own_itl_p99": q(ie, .99)}


def id_in_text(text: str | None) -> str | None:
    """The response id the server put in the first token's text."""
    if not text:
        return None
    first = text.split()[0] if text.split() else ""
    return first if first.startswith("cmpl-") else None


def requests(n: int, a) -> int:
    return max(n * a.rounds, 20)


def q(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def summarize(ttfts_s, itls_s, events: int, duration_s: float, a) -> dict:
    te = [abs(t * 1e3 - a.ttft_ms) for t in ttfts_s]
    ie = [abs(g * 1e3 - a.itl_ms) for g in itls_s]
    return {"requests": len(ttfts_s), "ttft_p50": q(te, .5), "ttft_p99": q(te, .99), "itl_p50": q(ie, .5),
            "itl_p99": q(ie, .99), "events_per_s": events / duration_s if duration_s > 0 else 0.0}


# ---- the tools ------------------------------------------------------------------------------

def run_ctxload(url: str, levels: list[int], a, work: Path, kernel_stamps: bool = True) -> dict[int, dict]:
    import yaml

    scen = {"name": "fidelity", "targets": [{"name": "syn", "url": url, "model": "synthetic", "engine": "synthetic",
                                             "family": "ssm", "tokenizer": str(a.tokenizer)}],
            "output": {"max_tokens": a.output_tokens},
            "load": {"kind": "concurrency_sweep", "prompt_tokens": PROMPT_TOKENS, "users": levels,
                     "requests": 1},
            "metrics": {"scrape_interval_s": 5}, "request_timeout_s": 300}
    out = {}
    for n in levels:  # one stage per run, so each level's requests are exact
        scen["load"]["users"], scen["load"]["requests"] = [n], requests(n, a)
        path = work / f"ctxload-{n}.yaml"
        path.write_text(yaml.safe_dump(scen))
        run_id = f"c{n}-{'k' if kernel_stamps else 'u'}"
        subprocess.run([sys.executable, "-m", "ctxload", "run", str(path), "--runs-dir", str(work / "runs"),
                        "--run-id", run_id], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       env={**os.environ, "CTXLOAD_KERNEL_STAMPS": "1" if kernel_stamps else "0"})
        recs = [json.loads(l) for l in (work / "runs" / run_id / "requests.jsonl").read_text().splitlines()]
        ok = [r for r in recs if r["status"] == "ok"]
        span = max(r["start_time"] + r["e2e_s"] for r in ok) - min(r["start_time"] for r in ok)
        out[n] = summarize([r["ttft_s"] for r in ok], [g for r in ok for g in r["itl_s"]],
                           sum(len(r["itl_s"]) + 1 for r in ok), span, a)
        out[n]["errors"] = len(recs) - len(ok)
        clocks: dict[str, int] = {}
        for r in ok:
            clocks[str(r.get("stamp_clock"))] = clocks.get(str(r.get("stamp_clock")), 0) + 1
        out[n]["stamp_clock"] = clocks  # which clock stamped the records' token events
        sends = read_sends(a)
        out[n].update(own_error([(r["ttft_s"], r["itl_s"], sends.get(r.get("response_id"))) for r in ok]))
    return out


def run_vllm(url: str, levels: list[int], a, work: Path) -> dict[int, dict]:
    wrapper = work / "vllm_bench_serve.py"
    wrapper.write_text("from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
                       "from vllm.benchmarks.serve import add_cli_args, main\n"
                       "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args())\n")
    out = {}
    for n in levels:
        name = f"vllm-{n}.json"
        cmd = [str(VLLM_PY), str(wrapper), "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
               "--model", "synthetic", "--tokenizer", str(a.tokenizer), "--dataset-name", "random",
               "--random-input-len", str(PROMPT_TOKENS), "--random-output-len", str(a.output_tokens),
               "--ignore-eos", "--num-prompts", str(requests(n, a)), "--max-concurrency", str(n),
               "--request-rate", "inf", "--save-result", "--save-detailed", "--result-dir", str(work),
               "--result-filename", name, "--disable-tqdm", "--num-warmups", "0"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        if p.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed:\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
        r = json.loads((work / name).read_text())
        itls = [g for lst in r["itls"] for g in lst]
        out[n] = summarize([t for t in r["ttfts"] if t], itls, sum(r["output_lens"]), r["duration"], a)
        out[n]["errors"] = r.get("failed", 0)
        sends = read_sends(a)  # matched through the id the server wrote as the first token
        out[n].update(own_error([(t, lst, sends.get(id_in_text(txt)))
                                 for t, lst, txt in zip(r["ttfts"], r["itls"], r.get("generated_texts") or [])]))
    return out


def run_guidellm(url: str, levels: list[int], a, work: Path) -> dict[int, dict]:
    out = {}
    for n in levels:
        path = work / f"guidellm-{n}.json"
        cmd = [str(GUIDELLM), "run", "--backend",
               f"kind=openai_http,target={url},model=synthetic,request_format=/v1/completions",
               "--profile", f"kind=concurrent,streams={n}",
               "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={a.output_tokens}",
               "--tokenizer", f"kind=hf_auto,model={a.tokenizer}",
               "--constraint", f"kind=max_requests,count={requests(n, a)}",
               "--output", f"kind=json,path={path}", "--disable-console-interactive"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "ERROR"})
        if p.returncode != 0 or not path.exists():
            raise RuntimeError(f"guidellm failed:\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
        out[n] = guidellm_stats(json.loads(path.read_text()), a)
    return out


def guidellm_stats(report: dict, a) -> dict:
    bench = report["benchmarks"][0]
    reqs = bench["requests"]["successful"]
    ttfts, itls, events, t0, t1 = [], [], 0, float("inf"), 0.0
    for r in reqs:
        ttft_ms = r.get("time_to_first_token_ms")
        itl_ms = r.get("inter_token_latency_ms")
        if ttft_ms is not None:
            ttfts.append(ttft_ms / 1e3)
        if itl_ms is not None:
            itls.append(itl_ms / 1e3)
        events += int(r.get("output_tokens") or 0)
        start, end = r.get("request_start_time"), r.get("request_end_time")
        if start and end:
            t0, t1 = min(t0, start), max(t1, end)
    duration = (t1 - t0) if t1 > t0 else bench.get("duration", 0)
    out = summarize(ttfts, itls, events, duration, a)
    out["errors"] = len(bench["requests"].get("errored", []))
    sends = read_sends(a)
    pairs = []
    for r in reqs:
        rid = r.get("response_id") if r.get("response_id") in sends else id_in_text(r.get("output"))
        ttft_ms, itl_ms = r.get("time_to_first_token_ms"), r.get("inter_token_latency_ms")
        pairs.append((None if ttft_ms is None else ttft_ms / 1e3, [] if itl_ms is None else [itl_ms / 1e3],
                      sends.get(rid)))
    out.update(own_error(pairs, mean_itl=True))
    return out


def run_ctxload_user(url: str, levels: list[int], a, work: Path) -> dict[int, dict]:
    """ctxload with ``CTXLOAD_KERNEL_STAMPS=0``: user-space stamps, for comparison."""
    return run_ctxload(url, levels, a, work, kernel_stamps=False)


TOOLS = {"ctxload": run_ctxload, "ctxload-user": run_ctxload_user, "vllm": run_vllm, "guidellm": run_guidellm}
LABELS = {"ctxload": "ctxload loadgen (Locust, 1 process)",
          "ctxload-user": "ctxload loadgen, CTXLOAD_KERNEL_STAMPS=0", "vllm": "vllm bench serve",
          "guidellm": "GuideLLM (ITL = per-request mean)"}


def table(results: dict[str, dict[int, dict]], a) -> str:
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| tool | streams | requests | events/s | TTFT err p50 | TTFT err p99 | ITL err p50 | ITL err p99 "
             "| matched | own TTFT err p50 | own TTFT err p99 | own ITL err p50 | own ITL err p99 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    best, best_own = {}, {}
    for tool, levels in results.items():
        if isinstance(levels, str):
            lines.append(f"| {LABELS[tool]} | — | — | — | {levels} | | | | | | | | |")
            continue
        for n, s in levels.items():
            lines.append(f"| {LABELS[tool]} | {n} | {s['requests']} | {s['events_per_s']:.0f} | {f(s['ttft_p50'])} | "
                         f"{f(s['ttft_p99'])} | {f(s['itl_p50'])} | {f(s['itl_p99'])} | {s.get('matched', 0)} | "
                         f"{f(s.get('own_ttft_p50'))} | {f(s.get('own_ttft_p99'))} | {f(s.get('own_itl_p50'))} | "
                         f"{f(s.get('own_itl_p99'))} |")
        within = [s["events_per_s"] for s in levels.values() if s["itl_p99"] is not None and s["itl_p99"] <= 1.0]
        best[tool] = max(within) if within else None
        own = [s["events_per_s"] for s in levels.values()
               if s.get("own_itl_p99") is not None and s["own_itl_p99"] <= 1.0]
        best_own[tool] = max(own) if own else None
    w = lambda v: "none of the levels" if v is None else f"{v:.0f}"  # noqa: E731
    lines += ["", "| tool | max events/s, p99 ITL error ≤ 1 ms vs set | … vs sent (own error) |",
              "| --- | ---: | ---: |"]
    lines += [f"| {LABELS[t]} | {w(v)} | {w(best_own.get(t))} |" for t, v in best.items()]
    clocks = [f"{LABELS[t]}: " + "; ".join(f"{n} streams " + ", ".join(f"{k} {c}" for k, c in s["stamp_clock"].items())
                                           for n, s in levels.items())
              for t, levels in results.items() if not isinstance(levels, str) and t.startswith("ctxload")]
    if clocks:
        lines += ["", "Records' `stamp_clock` (requests): " + " | ".join(clocks)]
    head = (f"Set TTFT {a.ttft_ms:g} ms, ITL {a.itl_ms:g} ms, {a.output_tokens} output tokens, "
            f"{PROMPT_TOKENS}-token prompts, {a.rounds} requests per stream; errors in ms (absolute). "
            "\"vs set\": against the set values; \"own\": against the server's logged send times of the same "
            "request (matched: requests matched by response id).")
    return head + "\n\n" + "\n".join(lines)


GUIDELLM_HELP = """GuideLLM is not installed at {path}: its column is skipped.
To include it (docs/loadgen.md, "Installing GuideLLM"):
    python3 -m venv /tmp/guidellm-venv
    /tmp/guidellm-venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/guidellm-venv/bin/pip install 'guidellm==0.8.1'
or point GUIDELLM=/path/to/bin/guidellm at an existing one."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--itl-ms", type=float, default=20.0)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream at each level")
    ap.add_argument("--levels", default="1,25,50,100,200")
    ap.add_argument("--tools", default="ctxload,vllm,guidellm")
    ap.add_argument("--tokenizer", type=Path, default=None, help="a model directory (default: the tiny Llama)")
    ap.add_argument("--server", choices=["own", "ssm-server"], default="own",
                    help="loadgen's synthetic server (one event per token, as vLLM) or ssm-server's synthetic "
                         "engine (which adds a finish-only event that tools counting events take as a token)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.tokenizer is None:
        from servers import modeldir

        a.tokenizer = modeldir.build("tiny-llama", REPO / ".cache" / "test-models" / "tiny-llama", log=None)
    levels = [int(x) for x in a.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ctxload-fidelity-"))
    port = free_port()
    results: dict = {}
    a.send_log = work / "sends.jsonl" if a.server == "own" else None
    with ManagedServer("synthetic", server_cmd(port, a.ttft_ms, a.itl_ms, a.server, a.send_log), port,
                       log_path=work / "server.log", startup_timeout_s=60) as srv:
        for tool in a.tools.split(","):
            t0 = time.monotonic()
            if tool == "guidellm" and not GUIDELLM.exists():
                print(GUIDELLM_HELP.format(path=GUIDELLM), file=sys.stderr)
                continue
            if tool == "vllm" and not VLLM_PY.exists():
                print(f"vllm bench serve: no vLLM venv at {VLLM_PY} (CTXLOAD_VLLM_PYTHON): its column is skipped",
                      file=sys.stderr)
                continue
            try:
                results[tool] = TOOLS[tool](srv.url, levels, a, work)
            except Exception as e:  # noqa: BLE001 - one tool failing still reports the others
                results[tool] = f"failed: {str(e).strip().splitlines()[-1][:120]}"
            print(f"# {tool}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(f"ctxload loadgen fidelity, {dt.date.today()}, host {os.uname().nodename}, {os.cpu_count()} CPUs")
    print(table(results, a))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
