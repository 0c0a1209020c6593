"""``ctxload demo``: the whole pipeline on a laptop, with no GPU, no Docker and no hub.

It runs the built-in ``demo`` scenario (``loadgen/scenarios/demo.yaml``): tiny random-weight
models of the three families (a Llama-style Transformer, a Mamba2 SSM and a Falcon-H1 hybrid)
are built with a local tokenizer, each is
served by ssm-server on a free loopback port, Locust sweeps the prompt length with streamed
completions, and the analysis writes the report.  Every server it starts is stopped on the way
out, on Ctrl-C and on errors too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loadgen.scenario import BUILTIN

DEFAULT_SCENARIO = BUILTIN / "demo.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO,
                   help="scenario file (default: the built-in demo, loadgen/scenarios/demo.yaml)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"),
                   help="where the run directory is written (default: ./runs)")
    p.add_argument("--run-id", default=None, help="name of the run directory (default: time-stamped)")
    p.add_argument("--prompt-tokens", default=None, metavar="N,N,…",
                   help="override the sweep's prompt lengths, e.g. 64,128")
    p.add_argument("--requests", type=int, default=None, metavar="N",
                   help="override the requests per stage")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="override the output tokens per request")


def _overrides(args: argparse.Namespace) -> dict:
    """The scenario fields the command line overrides, as a nested dict."""
    load: dict = {}
    if args.prompt_tokens:
        try:
            load["prompt_tokens"] = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"ctxload demo: --prompt-tokens: expected numbers like 64,128, "
                             f"got {args.prompt_tokens!r}") from None
    if args.requests is not None:
        load["requests"] = args.requests
    out: dict = {}
    if load:
        out["load"] = load
    if args.max_tokens is not None:
        out["output"] = {"max_tokens": args.max_tokens}
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return merged


def main(args: argparse.Namespace) -> int:
    from loadgen import runner
    from loadgen.scenario import ScenarioError, coerce, load

    t0 = time.monotonic()
    try:
        scenario = load(args.scenario)
        over = _overrides(args)
        if over:  # validated again, so a bad override is named like a bad field
            scenario = coerce(_merge(scenario.model_dump(mode="json"), over))
    except ScenarioError as e:
        print(f"ctxload demo: {e}", file=sys.stderr)
        return 2
    print(f"ctxload demo: scenario {scenario.name!r} — {len(scenario.targets)} targets "
          f"({', '.join(t.name for t in scenario.targets)})", flush=True)
    run_dir = runner.run(scenario, runs_dir=args.runs_dir, run_id=args.run_id, progress=print)

    from analysis.report import write_report

    print("ctxload demo: writing the report …", flush=True)
    report = write_report(run_dir)
    print(f"ctxload demo: done in {time.monotonic() - t0:.0f} s")
    print(f"  run directory: {run_dir}")
    print(f"  report:        {report}")
    md = report.with_name("report.md")
    if md.exists():
        print(f"  summary:       {md}")
    return 0
