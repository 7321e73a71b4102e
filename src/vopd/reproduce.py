"""`vopd reproduce`: the paper's claims checked on the tiny world, every number measured in the run.

What it knows: the experiment grid (methods x seeds, same budget), what to collect from each run (final accuracy and
held-out KL, gradient-norm curves, per-phase wall clock), the top-k baseline's error against the exact KL for a range
of k, and how to summarise all of it (mean and spread over seeds, ratios to `opd`, plots, a JSON file and a markdown
table). What it does not know: the trainer's or the estimators' internals, and what the numbers will say —
docs/results.md reports them as they come out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vopd.config import load_config
from vopd.estimators import METHODS

PAPER_METHODS = ("opd", "vopd", "vopd-topk", "opd-full", "opd-topk")


def _mean_sd(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def run_grid(world: Any, out: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Train every method for every seed; returns the metrics.jsonl rows of each run."""
    from vopd.metrics import read_metrics
    from vopd.train import train

    runs: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}-seed{seed}"
            run_dir = out / "runs" / name
            metrics_file = run_dir / "metrics.jsonl"
            if not (run_dir / "final").is_dir():  # finished runs are reused: an interrupted grid resumes cheaply
                cfg = load_config(None, [
                    f"model.student={world.student}", f"model.teacher={world.teacher}",
                    f"data.train={world.train_data}", f"data.eval={world.test_data}", f"loss.method={method}",
                    f"loss.top_k={args.top_k}", f"output_dir={run_dir}", f"steps={args.steps}",
                    f"batch_size={args.batch_size}", f"micro_batch_size={args.batch_size}",
                    f"rollout.max_new_tokens={world.config.eval_max_new_tokens}",
                    f"rollout.batch_size={args.batch_size}", f"optim.lr={args.lr}", "optim.schedule=constant",
                    f"seed={seed}", f"eval.every={args.eval_every}", "eval.greedy=true",
                    f"eval.limit={args.eval_problems}", "progress=false",
                ])
                t = time.perf_counter()
                train(cfg, overwrite=True, log=lambda m: None)
                print(f"  {name}: {time.perf_counter() - t:.0f}s", flush=True)
            runs[name] = read_metrics(metrics_file)
    return runs


def summarise_grid(runs: dict[str, list[dict[str, Any]]], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for method in methods:
        rows = [runs[f"{method}-seed{s}"] for s in seeds]
        finals = [r[-1] for r in rows]
        phases = {p: _mean_sd([statistics.fmean(x[f"time_{p}"] for x in r) for r in rows])
                  for p in ("generate", "teacher", "student", "optimizer", "step")}
        gn = [[x["grad_norm"] for x in r] for r in rows]
        table[method] = {
            "accuracy": _mean_sd([f.get("eval_avg_at_n") for f in finals]),
            "heldout_kl": _mean_sd([f.get("eval_kl") for f in finals]),
            "grad_norm_mean": _mean_sd([statistics.fmean(g) for g in gn]),
            "grad_norm_sd_over_steps": _mean_sd([statistics.pstdev(g) for g in gn]),
            "time": phases,
        }
    if "opd" in table:
        base = table["opd"]["time"]
        for row in table.values():
            row["time_ratio_to_opd"] = {p: row["time"][p]["mean"] / base[p]["mean"] for p in base if base[p]["mean"]}
    return table


@torch.no_grad()
def topk_baseline_error(world: Any, ks: list[int], *, prompts: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Mean squared error of the top-k KL (the `vopd-topk` baseline) against the exact KL_t, per k, on the
    student's own samples."""
    from vopd.data import encode_prompt, format_prompt, load_problems
    from vopd.estimators import distillation_loss
    from vopd.models import load_model, load_tokenizer
    from vopd.rollout import hf_sampler, pack

    cpu = torch.device("cpu")
    tok = load_tokenizer(str(world.student))
    student = load_model(str(world.student), role="student", dtype=torch.float32, device=cpu)
    teacher = load_model(str(world.teacher), role="teacher", dtype=torch.float32, device=cpu)
    ids = [encode_prompt(tok, format_prompt(p.problem)) for p in load_problems(world.test_data, limit=prompts)]
    torch.manual_seed(seed)
    sampler = hf_sampler(student, tok, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                         batch_size=len(ids))
    r = pack(ids, sampler(ids), tok.pad_token_id)
    zs = student(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1]
    zt = teacher(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1]
    vocab = zs.shape[-1]
    m = r.completion_mask
    exact = distillation_loss(zs, zt, r.targets, m, method="vopd").kl
    out: dict[str, Any] = {"vocab": vocab, "tokens": int(m.sum()), "exact_kl_mean": float(exact[m].mean()), "k": {}}
    for k in sorted({min(k, vocab) for k in ks}):
        res = distillation_loss(zs, zt, r.targets, m, method="vopd-topk", top_k=k)
        err = (res.kl_topk - exact)[m]
        out["k"][str(k)] = {"mse": float((err**2).mean()), "bias": float(err.mean()),
                            "topk_mass": float(res.topk_mass[m].mean())}
    return out


def plot(runs: dict[str, list[dict[str, Any]]], table: dict[str, Any], topk: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 3.6))
    labelled: set[str] = set()
    for name, rows in runs.items():
        method = name.rsplit("-seed", 1)[0]
        color = f"C{list(table).index(method)}"
        label = None if method in labelled else method  # one legend entry per method, not per seed
        labelled.add(method)
        ax[0].plot([x["step"] for x in rows], [x["grad_norm"] for x in rows], color=color, alpha=0.6, label=label)
        pts = [(x["step"], x["eval_kl"]) for x in rows if x.get("eval_kl") is not None]
        if pts:
            ax[1].plot(*zip(*pts), color=color, alpha=0.6, marker="o", ms=2)
    ax[0].set_title("gradient norm per step")
    ax[0].legend(fontsize=8)
    ax[1].set_title("held-out KL(student || teacher)")
    methods = list(table)
    ax[2].bar(methods, [table[m]["accuracy"]["mean"] for m in methods],
              yerr=[table[m]["accuracy"]["sd"] for m in methods], color=[f"C{i}" for i in range(len(methods))])
    ax[2].set_title("final greedy accuracy (mean ± sd over seeds)")
    ax[2].tick_params(axis="x", rotation=45)
    ks = list(topk["k"])
    ax[3].loglog([int(k) for k in ks], [max(topk["k"][k]["mse"], 1e-12) for k in ks], marker="o")
    ax[3].set_title("top-k baseline MSE vs exact KL")
    ax[3].set_xlabel("k")
    for a in ax[:2]:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few minutes: 2 seeds, 8 steps, small eval")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-k", type=int, default=20, help="k of the top-k methods in the training grid")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 20, 50, 100, 10**9],
                        help="k values for the baseline-error sweep (values >= V mean k = V)")
    parser.add_argument("--output-dir", default="runs/reproduce")


def cli_main(args: argparse.Namespace) -> int:
    from vopd.world import build_world

    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_problems = args.seeds[:2], 8, 4, 64
    world = build_world()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"grid: {args.methods} x seeds {args.seeds}, {args.steps} steps x {args.batch_size} rollouts")
    runs = run_grid(world, out, args)
    table = summarise_grid(runs, args.methods, args.seeds)
    topk = topk_baseline_error(world, args.ks, prompts=64, max_new_tokens=world.config.eval_max_new_tokens, seed=0)
    png = plot(runs, table, topk, out / "reproduce.png")
    result = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "world": str(world.root),
              "table": table, "topk_baseline": topk, "seconds": time.perf_counter() - t0}
    (out / "reproduce.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n| method | accuracy | held-out KL | grad norm (mean) | grad norm sd over steps | step time / opd |")
    print("|---|---|---|---|---|---|")
    for m, row in table.items():
        ratio = row.get("time_ratio_to_opd", {}).get("step", float("nan"))
        print(f"| {m} | {row['accuracy']['mean']:.3f} ± {row['accuracy']['sd']:.3f} | "
              f"{row['heldout_kl']['mean']:.4f} ± {row['heldout_kl']['sd']:.4f} | {row['grad_norm_mean']['mean']:.3f} "
              f"| {row['grad_norm_sd_over_steps']['mean']:.3f} | {ratio:.2f} |")
    print("\ntop-k baseline vs exact KL (student's own samples):")
    for k, v in topk["k"].items():
        print(f"  k={k:>4}: MSE {v['mse']:.3e}  mean error {v['bias']:+.3e}  top-k mass {v['topk_mass']:.3f}")
    print(f"\nplot: {png}\njson: {out / 'reproduce.json'}\ntotal {result['seconds']:.0f}s")
    return 0
