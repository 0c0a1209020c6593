"""The ``ctxload`` command: a thin layer over the servers, loadgen and analysis packages.

Each subcommand lives in the package that does the work, as a module with two functions:
``add_arguments(parser)`` and ``main(args) -> int``.  This file only wires them together, so
``ctxload --help`` stays fast (modules are imported only for the subcommand that runs).

A subcommand reports a user's mistake itself (a message naming the field, exit status 2);
an unexpected exception reaches the user as one line, with the traceback only under
``CTXLOAD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from servers import settings

# (name, module, help); a module may register nested subcommands itself.
SUBCOMMANDS = [
    ("models", "servers.models_cli", "list the model presets, or build a model directory"),
    ("serve", "servers.serve_cli", "start a server: ssm-server, vLLM with a launch profile, the GPU exporter"),
    ("plan", "servers.plan", "what fits on a card under a memory budget, before any request"),
    ("run", "loadgen.cli", "run a scenario and write a run directory"),
    ("report", "analysis.cli", "write the report of a run directory"),
    ("compare", "analysis.compare_cli", "compare several runs side by side"),
    ("demo", "ctxload.demo", "the whole pipeline on tiny CPU models, in a few minutes"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxload",
        description="Load testing for long-context LLM serving (Transformers, SSMs, hybrids).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM stop a command the same way, every time: records kept, servers
    stopped, a non-zero status. Python leaves SIGINT ignored when it started ignored (a
    background job of a script, some CI runners), so it is set here explicitly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Only the chosen subcommand's module is imported (and only it adds its arguments).
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    known = {n: m for n, m, _ in SUBCOMMANDS}
    if name not in known:
        parser.error(f"unknown command {name!r} (choose from {', '.join(known)})")
    module = importlib.import_module(known[name])
    sub = parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
    module.add_arguments(sub)
    args = parser.parse_args(argv)
    _stop_on_signals()
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("ctxload: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last line of defence: one readable line, not a traceback
        if settings.debug():
            raise
        print(f"ctxload {name}: error: {type(e).__name__}: {e}", file=sys.stderr)
        print("(set CTXLOAD_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
