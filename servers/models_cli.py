"""``ctxload models``: list the presets; ``ctxload models build PRESET --out DIR``."""

from __future__ import annotations

import argparse
import sys

from servers import presets


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_cmd", metavar="ACTION")
    b = sub.add_parser("build", help="write a model directory (config, tokenizer, random weights)")
    b.add_argument("preset", help="preset name (see `ctxload models`)")
    b.add_argument("--out", required=True, help="directory to write")
    b.add_argument("--no-weights", action="store_true",
                   help="config and tokenizer only (for vLLM --load-format dummy or ssm-server --random-weights)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype (default: the preset's; float32 for tiny presets)")
    p.add_argument("--json", action="store_true", help="list as JSON")


def main(args: argparse.Namespace) -> int:
    if args.models_cmd == "build":
        from servers import modeldir

        try:
            presets.get(args.preset)
        except presets.UnknownPreset as e:
            print(f"ctxload models build: {e}", file=sys.stderr)
            return 2
        modeldir.build(args.preset, args.out, weights=not args.no_weights, seed=args.seed,
                       dtype=args.dtype)
        return 0
    rows = sorted(presets.PRESETS.values(), key=lambda p: (p.tiny, p.family, p.name))
    if getattr(args, "json", False):
        import json

        print(json.dumps([{"name": p.name, "family": p.family, "model_type": p.model_type,
                           "engine": p.engine, "hub_id": p.hub_id, "tiny": p.tiny,
                           "in_paper": p.in_paper, "description": p.description} for p in rows],
                         indent=2))
        return 0
    print(f"{'preset':<16} {'family':<12} {'engine':<11} {'hub id':<34} description")
    for p in rows:
        print(f"{p.name:<16} {p.family:<12} {p.engine:<11} {(p.hub_id or '-'):<34} {p.description}")
    return 0
