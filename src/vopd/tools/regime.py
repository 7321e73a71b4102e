"""`vopd regime`: does the baseline matter less as the batch grows? A regime study on the tiny world.

What it knows: the study's grid (rollouts per step x methods x seeds at one learning rate and an equal total number
of rollouts, so steps = budget / batch), how to train each run with ``vopd reproduce``'s one training budget
(``vopd.tools.reproduce.config_for`` with the grid's default settings: only the method, seed, batch and steps vary;
a run whose batch and steps are the grid's own is the grid's run, reused from the same output directory), what to keep of each run (final greedy accuracy and held-out KL, the
gradient-norm statistics, the trainer's gradient-noise estimate ``grad_var``, completion tokens per step), and how to
summarise them (mean and sd over seeds per method and batch, the gap of each method to ``opd-full`` and to ``opd``),
a JSON file and a plot. What it does not know: the trainer's or the estimators' internals, and what the numbers
will say: docs/results.md reports them as they come out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from vopd.errors import UserError
from vopd.loss.methods import METHODS
from vopd.tools import reproduce
from vopd.world.build import World


def run_study(world: World, out: Path, args: argparse.Namespace,
              grid: argparse.Namespace | None = None) -> list[dict[str, Any]]:
    """Train every (batch, method, seed) of the study; one record per run (``docs/results/regime.json``'s ``runs``).
    Every setting but batch and steps is ``grid``'s (default: ``vopd reproduce``'s own), so the evaluation is the
    grid's too."""
    grid = grid or reproduce.default_arguments()
    records = []
    for batch in args.batch_sizes:
        sub = copy.copy(grid)
        sub.batch_size, sub.steps = batch, args.budget // batch
        # the grid's own batch and steps are the grid's runs (same name, reused); the others are named by batch
        tag = "" if (batch, sub.steps) == (grid.batch_size, grid.steps) else f"-b{batch}"
        print(f"batch {batch}: {sub.steps} steps x {batch} rollouts", flush=True)
        for method in args.methods:
            for seed in args.seeds:
                rows = reproduce.train_one(world, out, sub, method, args.lr, seed, grid.top_k, tag=tag)
                records.append(_record(rows, method, batch, sub.steps, seed, args.lr))
    return records


def _record(rows: list[dict[str, Any]], method: str, batch: int, steps: int, seed: int, lr: float) -> dict[str, Any]:
    final = rows[-1]
    if final["step"] != steps:
        raise UserError(f"run {method} batch {batch} seed {seed} has {final['step']} steps, not {steps}: delete its "
                        "directory under the output dir and run the study again")
    norms = [x["grad_norm"] for x in rows]
    noise = [x["grad_var"] for x in rows if "grad_var" in x]
    return {"method": method, "batch_size": batch, "steps": steps, "seed": seed, "lr": lr,
            "accuracy": final.get("eval_avg_at_n"), "heldout_kl": final.get("eval_kl"),
            "grad_norm_mean": statistics.fmean(norms), "grad_norm_sd_over_steps": statistics.pstdev(norms),
            "grad_var_mean": statistics.fmean(noise) if noise else None,
            "tokens_per_step": statistics.fmean(x["tokens"] for x in rows)}


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per batch size, per method: mean and sd over seeds of each number, and the accuracy and held-out KL gaps to
    ``opd-full`` and to ``opd`` (method minus reference, mean over seeds; paired by seed where both ran)."""
    table: dict[str, dict[str, Any]] = {}
    for batch in sorted({r["batch_size"] for r in records}):
        at = [r for r in records if r["batch_size"] == batch]
        rows: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in at):
            mine = [r for r in at if r["method"] == method]
            rows[method] = {key: reproduce.mean_sd([r[key] for r in mine])
                            for key in ("accuracy", "heldout_kl", "grad_norm_mean", "grad_norm_sd_over_steps",
                                        "grad_var_mean", "tokens_per_step")}
            for ref in ("opd-full", "opd"):
                theirs = {r["seed"]: r for r in at if r["method"] == ref}
                for key in ("accuracy", "heldout_kl"):
                    gaps = [r[key] - theirs[r["seed"]][key] for r in mine
                            if r["seed"] in theirs and r[key] is not None and theirs[r["seed"]][key] is not None]
                    rows[method][f"{key}_minus_{ref}"] = reproduce.mean_sd(gaps)
        table[str(batch)] = {"steps": at[0]["steps"], "methods": rows}
    return table


def plot(table: dict[str, dict[str, Any]], path: Path) -> Path:
    """Accuracy, held-out KL and the gradient-noise estimate against rollouts per step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(table, key=int)
    methods = list(dict.fromkeys(m for b in batches for m in table[b]["methods"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, ax, title in (("accuracy", axes[0], "final greedy accuracy"),
                           ("heldout_kl", axes[1], "held-out KL(student || teacher)"),
                           ("grad_var_mean", axes[2], "gradient noise tr Cov (mean over steps)")):
        for i, m in enumerate(methods):
            xs = [int(b) for b in batches if m in table[b]["methods"]]
            cells = [table[str(b)]["methods"][m][key] for b in xs]
            ax.errorbar(xs, [c["mean"] for c in cells], yerr=[c["sd"] for c in cells], marker="o", capsize=3,
                        color=f"C{i}", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(b) for b in batches], [f"{b}\n({table[b]['steps']} st.)" for b in batches])
        ax.set_xlabel("rollouts per step (steps), equal total rollouts")
        ax.set_title(title + " (mean ± sd, seeds)")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 128], help="rollouts per step")
    parser.add_argument("--budget", type=int, default=2560,
                        help="rollouts per run, equal for every batch size (steps = budget / batch); the default "
                        "is the `vopd reproduce` grid's 80 steps x 32, so its batch-32 runs are reused")
    parser.add_argument("--methods", nargs="+", default=["opd", "vopd", "opd-full", "vopd-opt", "rb-topk"],
                        choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="the one learning rate (docs/results.md, \"Regime study\", says why this one)")
    parser.add_argument("--output-dir", default="runs/reproduce",
                        help="the `vopd reproduce` output directory, whose grid runs are reused")


def cli_main(args: argparse.Namespace) -> int:
    from vopd.world.build import build_world

    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UserError(f"--batch-sizes {args.batch_sizes}: give at least one size, each >= 1")
    if any(args.budget % b for b in args.batch_sizes) or args.budget < 1:
        raise UserError(f"--budget {args.budget} is not a positive multiple of every batch size {args.batch_sizes}: "
                        "the budget must be equal for all (choose a common multiple)")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr:g}: must be > 0")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return main(build_world(), out, args)


def main(world: World, out: Path, args: argparse.Namespace) -> int:
    """The study on ``world``, written to ``out``: regime.json, regime.png and a markdown table printed."""
    t0 = time.perf_counter()
    print(f"regime study: batch {args.batch_sizes} x {args.methods} x seeds {args.seeds}, lr {args.lr:g}, "
          f"{args.budget} rollouts per run", flush=True)
    records = run_study(world, out, args)
    table = summarise(records)
    png = plot(table, out / "regime.png")
    result = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "world": str(world.root),
              "budget_rollouts": args.budget, "lr": args.lr, "runs": records, "table": table,
              "seconds": time.perf_counter() - t0}
    (out / "regime.json").write_text(json.dumps(result, indent=1, default=str))
    print("| rollouts/step | steps | method | accuracy | held-out KL | acc - opd-full | KL - opd-full | grad var |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, at in table.items():
        for m, row in at["methods"].items():
            print(f"| {batch} | {at['steps']} | {m} | {row['accuracy']['mean']:.3f} ± {row['accuracy']['sd']:.3f} | "
                  f"{row['heldout_kl']['mean']:.4f} ± {row['heldout_kl']['sd']:.4f} | "
                  f"{row['accuracy_minus_opd-full']['mean']:+.3f} | {row['heldout_kl_minus_opd-full']['mean']:+.4f} | "
                  f"{row['grad_var_mean']['mean']:.3e} |")
    print(f"\nplot: {png}\njson: {out / 'regime.json'}\ntotal {result['seconds']:.0f}s")
    return 0
