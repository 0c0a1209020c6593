"""``ctxload run SCENARIO``: run a scenario headless and write its run directory."""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("scenario", nargs="?", help="a scenario YAML file (or the name of one in scenarios/)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="go on with a run directory (after a crash, Ctrl-C or a time limit): targets it "
                             "completed are skipped, stages run in full are not run again")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    parser.add_argument("--run-id", default=None, help="name of the run directory (default: time-name)")
    parser.add_argument("--target-url", action="append", default=[], metavar="NAME=URL",
                        help="measure target NAME at URL instead of what the scenario says (repeatable)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run the users in N Locust worker processes (default: 1, in this process)")
    parser.add_argument("--master-bind-host", default="127.0.0.1", metavar="HOST",
                        help="address the Locust master binds for its workers, and the web UI (default: 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=None, metavar="PORT",
                        help="port the Locust master binds for its workers (default: a free one)")
    parser.add_argument("--external-workers", type=int, default=0, metavar="N",
                        help="wait for N workers started elsewhere (`python -m loadgen.worker --master-host "
                             "HOST --master-port PORT`) instead of spawning local ones")
    parser.add_argument("--web-ui", action="store_true",
                        help="serve Locust's web UI (live TTFT/ITL/TPOT/E2E statistics) on --master-bind-host")
    parser.add_argument("--web-port", type=int, default=8089, metavar="PORT", help="web UI port (default: 8089)")
    parser.add_argument("--check", action="store_true", help="only validate the scenario and print it resolved")


def main(args) -> int:
    from loadgen import scenario as sc

    try:
        if args.resume:
            if args.scenario or args.run_id:
                raise sc.ScenarioError("--resume: give the run directory alone (it holds its scenario)")
            if not (Path(args.resume) / "scenario.yaml").exists():
                raise sc.ScenarioError(f"--resume: {args.resume} is not a run directory (no scenario.yaml)")
            scenario = sc.load(Path(args.resume) / "scenario.yaml")
        elif not args.scenario:
            raise sc.ScenarioError("give a scenario (a YAML file, or the name of one in scenarios/), or --resume RUN_DIR")
        else:
            scenario = sc.load(args.scenario)
        urls = {}
        for item in args.target_url:
            name, sep, url = item.partition("=")
            if not sep or not name or not url:
                raise sc.ScenarioError(f"--target-url: expected NAME=URL, got {item!r}")
            urls[name] = url
        if args.processes < 1:
            raise sc.ScenarioError("--processes: must be at least 1")
        if args.external_workers < 0:
            raise sc.ScenarioError("--external-workers: must be 0 or more")
        if args.external_workers and args.processes > 1:
            raise sc.ScenarioError("--external-workers and --processes: give one (external workers are the processes)")
    except sc.ScenarioError as e:
        print(f"ctxload run: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(scenario.resolved_yaml(), end="")
        return 0
    from loadgen import runner  # imports Locust (gevent patching) only when load is to run

    try:
        runner.run(scenario, runs_dir=args.runs_dir, run_id=args.run_id, processes=args.processes,
                   target_urls=urls, master_bind_host=args.master_bind_host, master_port=args.master_port,
                   external_workers=args.external_workers,
                   web_port=args.web_port if args.web_ui else None, resume=args.resume)
    except (sc.ScenarioError, FileExistsError, RuntimeError, OSError) as e:
        print(f"ctxload run: {e}", file=sys.stderr)
        return 2
    return 0
