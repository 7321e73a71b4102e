"""The `vopd` command line: a thin dispatcher.

Each sub-command lives in the module that owns its concern and exposes two functions:
``add_cli_arguments(parser)`` and ``cli_main(args) -> int``. This file only knows the command names and which
module serves each; it imports a module only when its command (or ``--help``) needs it, so ``vopd eval`` does not
pay for the trainer's imports. Errors that are the user's (bad path, bad option, bad data) are raised as
``vopd.errors.UserError`` anywhere below and printed here as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# command -> (module, one-line help). Order is the order shown in `vopd --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vopd.tools.demo", "distil the tiny teacher into the tiny student with vopd and opd; print and plot"),
    "train": ("vopd.train", "on-policy distillation of a student from a teacher (any HF causal LM)"),
    "sft": ("vopd.world.cli", "build the tiny world: tokenizer, SFT teacher and student"),
    "eval": ("vopd.eval_cli", "sample n answers per problem and grade them (Avg@n, Pass@n, Maj@n)"),
    "check": ("vopd.check", "pre-flight checks of a student/teacher pair without training"),
    "plan": ("vopd.tools.plan", "will a config fit these GPUs? one step traced at real shapes, without weights"),
    "bench": ("vopd.tools.bench.cli", "benchmarks: `vopd bench estimators|training|generation|trl`"),
    "serve-teacher": ("vopd.teacher.server", "serve a frozen teacher over HTTP for remote scoring"),
    "reproduce": ("vopd.tools.reproduce", "the paper's claims on the tiny world: methods x seeds, same budget"),
    "regime": ("vopd.tools.regime", "when the baseline matters: rollouts per step x methods x seeds, equal budget"),
    "variance": ("vopd.tools.variance", "variance and bias of each method's parameter gradient over many rollouts"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="vopd", description="On-policy distillation with the vOPD baseline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_cli_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vopd.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    # key=value overrides may sit anywhere, also after options (`vopd train --resume steps=10`): argparse stops
    # collecting a positional list at the first option, so the leftovers are gathered here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    _quiet_transformers()
    try:
        return int(module.cli_main(args) or 0)
    except UserError as exc:
        print(f"vopd {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vopd {command}: interrupted", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    """transformers' per-shard progress bars and advisory warnings drown vopd's own output on the command line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
