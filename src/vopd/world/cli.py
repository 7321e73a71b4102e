"""`vopd sft`: build (or reuse) the tiny world or its tool variant, or supervised fine-tuning of a model of your own.

What it knows: the command's options and how they map onto ``WorldConfig`` (``vopd.world.build``),
``ToolWorldConfig`` (``vopd.world.tool_build``, ``--world tools``) or ``SFTConfig`` (``vopd.world.sft``); that a
built arithmetic world comes with its training config (``run.yaml``) and how to train on it. What it does not know:
how the worlds are built or trained, or what that config holds; those modules do.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vopd.errors import UserError
from vopd.prompts import ChatOptions
from vopd.world.build import WorldConfig, build_world, write_run_config

if TYPE_CHECKING:
    from vopd.world.tool_build import ToolWorldConfig
from vopd.world.sft import SFTConfig, train_sft
from vopd.world.task import read_jsonl


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `vopd sft`."""
    parser.add_argument("--world", choices=("tiny", "tools"), default="tiny",
                        help="tiny: the arithmetic world (default); tools: its variant whose problems need a "
                        "calculator (docs/tiny_world.md, \"The tool world\")")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="root of the tiny-world cache (default $VOPD_CACHE or ~/.cache/vopd)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a valid cached world exists")
    parser.add_argument("--seed", type=int, default=None, help="world seed (data, init, batches)")
    parser.add_argument("--steps", type=int, default=None, help="arithmetic steps per problem")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher SFT optimizer steps")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="most student SFT steps (it stops earlier once it reaches --student-target)")
    parser.add_argument("--student-target", type=float, default=None,
                        help="validation accuracy at which the student's SFT stops (default 0.3; 0 = never stop early)")
    parser.add_argument("--no-chat", action="store_true",
                        help="a world without a chat template: SFT on plain-text prompts (runs on it then need "
                        "data.text_as_chat=false)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for --model SFT (default 1); the tiny world always builds on one "
                        "thread, so that a seed gives the same models on any machine setting")
    custom = parser.add_argument_group("SFT of your own model (instead of building the tiny world)")
    custom.add_argument("--model", type=Path, default=None, help="local HF causal-LM directory to fine-tune")
    custom.add_argument("--data", type=Path, default=None, help="jsonl with 'problem' and 'solution' fields")
    custom.add_argument("--out", type=Path, default=None, help="directory to save the fine-tuned model to")
    custom.add_argument("--lr", type=float, default=1e-5, help="peak learning rate for --model (default 1e-5)")
    custom.add_argument("--batch-size", type=int, default=8, help="sequences per step for --model (default 8)")
    custom.add_argument("--max-steps", type=int, default=100, help="optimizer steps for --model (default 100)")
    custom.add_argument("--chat", action="store_true",
                        help="render each problem as a user turn through the model's chat template, the solution "
                        "ending with its end-of-turn token (train later with data.text_as_chat=true)")


def _sft_custom(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.data is None or args.out is None:
        raise UserError("--model needs --data train.jsonl and --out DIR as well")
    if not (args.model / "config.json").is_file():
        raise UserError(f"{args.model}: not a Hugging Face model directory (no config.json); pass --model DIR")
    rows = read_jsonl(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = SFTConfig(steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=min(10, args.max_steps // 10))
    result = train_sft(model, tokenizer, rows, config, log_every=max(1, args.max_steps // 10),
                       chat=ChatOptions(text_as_chat=args.chat))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}  (final loss {result.losses[-1]:.4f}, {result.seconds:.0f}s)")
    return 0


def _tool_world(args: argparse.Namespace) -> int:
    """`vopd sft --world tools`: build or reuse the tool world and print its numbers."""
    from vopd.world.tool_build import ToolWorldConfig, build_tool_world

    if args.no_chat or args.student_target is not None:
        raise UserError("--no-chat and --student-target are for the arithmetic world; drop them with --world tools "
                        "(its student's SFT has a fixed number of steps: --student-steps)")
    config = ToolWorldConfig()
    changes = _recipe_changes(config, args)
    if args.steps is not None:  # the product stays the last step
        changes["task"] = dataclasses.replace(config.task, n_steps=args.steps, product_step=args.steps)
    world = build_tool_world(dataclasses.replace(config, **changes), args.cache_dir, force=args.force)
    print(world.summary())
    return 0


def _recipe_changes(config: WorldConfig | ToolWorldConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields both worlds take from the command line: seed, steps of a problem, SFT steps."""
    changes: dict[str, Any] = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.steps is not None:
        changes["task"] = dataclasses.replace(config.task, n_steps=args.steps)
    if args.teacher_steps is not None:
        changes["teacher_sft"] = dataclasses.replace(config.teacher_sft, steps=args.teacher_steps)
    if args.student_steps is not None:
        changes["student_sft"] = dataclasses.replace(config.student_sft, steps=args.student_steps)
    return changes


def cli_main(args: argparse.Namespace) -> int:
    """`vopd sft`: build or reuse the tiny world (default), or fine-tune ``--model`` on ``--data``."""
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: pass a positive number of CPU threads")
    if args.model is not None:
        if args.no_chat:
            raise UserError("--no-chat is for the tiny world; with --model, --chat (or its absence) sets the rendering")
        torch.set_num_threads(args.threads)
        return _sft_custom(args)
    if args.data is not None or args.out is not None or args.chat:
        raise UserError("--data/--out/--chat are for fine-tuning your own model; add --model DIR (or drop them)")
    if args.world == "tools":
        return _tool_world(args)
    config = WorldConfig()
    changes = {**_recipe_changes(config, args), **({"chat": False} if args.no_chat else {})}
    if args.student_target is not None:
        if not 0.0 <= args.student_target <= 1.0:
            raise UserError(f"--student-target {args.student_target}: pass an accuracy in [0, 1] (0 disables it)")
        changes["student_target_accuracy"] = args.student_target or None
    world = build_world(dataclasses.replace(config, **changes), args.cache_dir, force=args.force)
    write_run_config(world)  # a run assembled by hand could miss data.text_as_chat and train on unseen prompts
    print(world.summary())  # ends with how to train on it
    return 0
