"""``vopd plan``: will this config fit these GPUs? One training step traced at the config's real shapes on fake
tensors (no weights, no GPU: ``vopd.memplan``), sampling and the rest by arithmetic, a verdict and, when it does not
fit, what would (``vopd.memfit``; docs/scaling.md, "Will it fit?").

What it knows: the command line and how to print a verdict. What it does not know: the arithmetic (``vopd.memfit``)
or the trace (``vopd.memplan``).
"""

from __future__ import annotations

import argparse
import json
import os

from vopd.errors import UserError


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML/TOML training config (model.* may name directories "
                        "holding only a config.json, e.g. docs/configs/qwen3-8b)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="ranks (GPUs) the run will use (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.add_argument("--before", action="store_true", help="emulate the code before the memory work "
                        "(bf16 masters, whole teachers, full student copies: docs/scaling.md's comparison)")
    parser.add_argument("--no-advice", action="store_true", help="do not re-plan changes when it does not fit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. micro_batch_size=2")


def cli_main(args: argparse.Namespace) -> int:
    from vopd.config import load_config
    from vopd.memfit import plan, render, to_json

    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: the number of GPUs must be >= 1")
    if not args.gpu_memory_gib > 0:
        raise UserError(f"--gpu-memory-gib {args.gpu_memory_gib}: a GPU's memory in GiB must be > 0 (e.g. 80)")
    cfg = load_config(args.config, args.overrides, require_paths=False)
    if cfg.batch_size % args.world_size:
        raise UserError(f"batch_size {cfg.batch_size} does not split over --world-size {args.world_size}: use a "
                        "world size that divides it")
    verdict = plan(cfg, world_size=args.world_size, gpu_memory_gib=args.gpu_memory_gib, before=args.before,
                   advise=not args.no_advice)
    if args.json:
        print(json.dumps(to_json(verdict), indent=2))
    else:
        print("\n".join(render(verdict)))
    return 0 if verdict.fits else 1
