"""``ctxload run SCENARIO``: run a scenario headless and write its run directory."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("scenario", help="a scenario YAML file (or the name of one in scenarios/)")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    parser.add_argument("--run-id", default=None, help="name of the run directory (default: time-name)")
    parser.add_argument("--target-url", action="append", default=[], metavar="NAME=URL",
                        help="measure target NAME at URL instead of what the scenario says (repeatable)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run the users in N Locust worker processes (default: 1, in this process)")
    parser.add_argument("--check", action="store_true", help="only validate the scenario and print it resolved")


def main(args) -> int:
    from loadgen import scenario as sc

    try:
        scenario = sc.load(args.scenario)
        urls = {}
        for item in args.target_url:
            name, sep, url = item.partition("=")
            if not sep or not name or not url:
                raise sc.ScenarioError(f"--target-url: expected NAME=URL, got {item!r}")
            urls[name] = url
        if args.processes < 1:
            raise sc.ScenarioError("--processes: must be at least 1")
    except sc.ScenarioError as e:
        print(f"ctxload run: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(scenario.resolved_yaml(), end="")
        return 0
    from loadgen import runner  # imports Locust (gevent patching) only when load is to run

    try:
        runner.run(scenario, runs_dir=args.runs_dir, run_id=args.run_id, processes=args.processes,
                   target_urls=urls)
    except (sc.ScenarioError, FileExistsError) as e:
        print(f"ctxload run: {e}", file=sys.stderr)
        return 2
    return 0
