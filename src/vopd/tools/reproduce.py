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
from typing import TYPE_CHECKING, Any, Sequence

import torch

from vopd.config import TrainConfig, load_config
from vopd.errors import UserError
from vopd.world.build import World
from vopd.loss.methods import METHODS

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer
    from vopd.rollout import Rollout, Sampler

def mean_sd(values: Sequence[float | None]) -> dict[str, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _run_name(method: str, lr: float, seed: int, top_k: int | None = None) -> str:
    return f"{method}{'' if top_k is None else f'-k{top_k}'}-lr{lr:g}-seed{seed}"


def config_for(world: World, args: argparse.Namespace, method: str, lr: float, seed: int, top_k: int,
            run_dir: Path) -> TrainConfig:
    """The one training budget every method gets (only method, lr, seed and k vary)."""
    return load_config(None, [
        f"model.student={world.student}", f"model.teacher={world.teacher}",
        f"data.train={world.train_data}", f"data.eval={world.test_data}", f"loss.method={method}",
        f"loss.top_k={top_k}", f"output_dir={run_dir}", f"steps={args.steps}",
        f"batch_size={args.batch_size}", f"micro_batch_size={args.batch_size}",
        f"rollout.max_new_tokens={world.config.eval_max_new_tokens}",
        f"rollout.batch_size={args.batch_size}", f"optim.lr={lr}", "optim.schedule=constant",
        "optim.warmup_steps=5", "optim.grad_clip=1.0", f"seed={seed}", f"eval.every={args.eval_every}",
        "eval.greedy=true", f"eval.limit={args.eval_problems}", "progress=false", *world.data_overrides(),
    ])


def _world_models(world: World) -> tuple[Tokenizer, Model, Model]:
    """(tokenizer, student, teacher) of the world, fp32 on the CPU, as the grid's runs start."""
    from vopd.models import load_model, load_tokenizer

    cpu = torch.device("cpu")
    return (load_tokenizer(str(world.student)),
            load_model(str(world.student), role="student", dtype=torch.float32, device=cpu),
            load_model(str(world.teacher), role="teacher", dtype=torch.float32, device=cpu))


def _sample(student: Model, tok: Tokenizer, world: World, data: str | Path, n: int, max_new_tokens: int,
            seed: int) -> tuple[list[list[int]], Sampler, Rollout]:
    """(prompt ids, sampler, rollout): one temperature-1 completion from ``student`` for the first ``n`` problems,
    rendered as the world's SFT rendered them."""
    from vopd.data import load_problems
    from vopd.prompts import render_prompt
    from vopd.rollout import hf_sampler, pack

    ids = [render_prompt(tok, p.problem, chat=world.config.chat_options) for p in load_problems(data, limit=n)]
    sampler = hf_sampler(student, tok, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                         batch_size=len(ids))
    torch.manual_seed(seed)
    return ids, sampler, pack(ids, sampler(ids), tok.pad_token_id)


def evaluate_initial_student(world: World, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The student before training, evaluated as every run's final model is (per seed: the held-out KL's samples
    depend on the seed; greedy accuracy does not)."""
    from vopd.teacher.local import InProcessTeacher
    from vopd.eval_student import evaluate_student

    tok, student, teacher_model = _world_models(world)
    teacher = InProcessTeacher(teacher_model, len(tok))
    rows = [evaluate_student(student, teacher, tok, config_for(world, args, "opd", args.lrs[0], seed, args.top_k, out),
                             len(tok)) for seed in args.seeds]
    return {"accuracy": mean_sd([r["eval_avg_at_n"] for r in rows]),
            "heldout_kl": mean_sd([r["eval_kl"] for r in rows])}


def train_one(world: World, out: Path, args: argparse.Namespace, method: str, lr: float, seed: int,
              top_k: int, tag: str = "") -> list[dict[str, Any]]:
    """One training run (reused when its final model exists: an interrupted grid resumes cheaply); ``tag`` names
    a run whose budget is not the grid's (``vopd.tools.regime``)."""
    from vopd.metrics import read_metrics
    from vopd.train import OVERWRITE, train

    name = _run_name(method, lr, seed, None if top_k == args.top_k else top_k) + tag
    run_dir = out / "runs" / name
    if not (run_dir / "final").is_dir():
        cfg = config_for(world, args, method, lr, seed, top_k, run_dir)
        t = time.perf_counter()
        train(cfg, start=OVERWRITE, log=lambda m: None)
        print(f"  {name}: {time.perf_counter() - t:.0f}s", flush=True)
    return read_metrics(run_dir / "metrics.jsonl")


def run_grid(world: World, out: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Train every method for every learning rate and seed; returns the metrics.jsonl rows of each run."""
    return {_run_name(m, lr, s): train_one(world, out, args, m, lr, s, args.top_k)
            for lr in args.lrs for m in args.methods for s in args.seeds}


def run_k_sweep(world: World, out: Path, args: argparse.Namespace, vocab: int) -> dict[int, list[dict[str, Any]]]:
    """`vopd-topk` trained at every k of ``args.ks`` (first seed, ``args.sweep_lr``): accuracy vs k."""
    ks = sorted({min(k, vocab) for k in args.ks})
    return {k: train_one(world, out, args, "vopd-topk", args.sweep_lr, args.seeds[0], k) for k in ks}


def summarise_grid(runs: dict[str, list[dict[str, Any]]], methods: list[str], seeds: list[int],
                   lr: float) -> dict[str, Any]:
    """Per method at one learning rate: final accuracy and held-out KL, gradient statistics and phase times (mean and
    sd over seeds), and the phase times' ratios to `opd`."""
    table: dict[str, Any] = {}
    for method in methods:
        rows = [runs[_run_name(method, lr, s)] for s in seeds]
        finals = [r[-1] for r in rows]
        phases = {p: mean_sd([statistics.fmean(x[f"time_{p}"] for x in r) for r in rows])
                  for p in ("generate", "teacher", "student", "optimizer", "step")}
        gn = [[x["grad_norm"] for x in r] for r in rows]
        table[method] = {
            "accuracy": mean_sd([f.get("eval_avg_at_n") for f in finals]),
            "heldout_kl": mean_sd([f.get("eval_kl") for f in finals]),
            "grad_norm_mean": mean_sd([statistics.fmean(g) for g in gn]),
            "grad_norm_sd_over_steps": mean_sd([statistics.pstdev(g) for g in gn]),
            # the online proxy (docs/metrics.md): tr Cov of the step's gradient, averaged over steps
            "grad_var_mean": mean_sd([statistics.fmean(x["grad_var"] for x in r if "grad_var" in x) for r in rows
                                       if any("grad_var" in x for x in r)]),
            "time": phases,
        }
    if "opd" in table:  # per-run wall clock: comparable only on a quiet machine (see interleaved_step_times)
        base = table["opd"]["time"]
        for row in table.values():
            row["time_ratio_to_opd"] = {p: row["time"][p]["mean"] / base[p]["mean"] for p in base if base[p]["mean"]}
    return table


@torch.no_grad()
def topk_baseline_error(world: World, ks: list[int], *, prompts: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Mean squared error of the top-k KL (the `vopd-topk` baseline) against the exact KL_t, per k, on the
    student's own samples."""
    from vopd.loss.estimators import distillation_loss

    tok, student, teacher = _world_models(world)
    _, _, r = _sample(student, tok, world, world.test_data, prompts, max_new_tokens, seed)
    zs = student(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1]
    zt = teacher(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1]
    vocab = zs.shape[-1]
    m = r.loss_mask
    exact = distillation_loss(zs, zt, r.targets, m, method="vopd").kl
    assert exact is not None  # vopd reports the exact KL_t
    out: dict[str, Any] = {"vocab": vocab, "tokens": int(m.sum()), "exact_kl_mean": float(exact[m].mean()), "k": {}}
    for k in sorted({min(k, vocab) for k in ks}):
        res = distillation_loss(zs, zt, r.targets, m, method="vopd-topk", top_k=k)
        assert res.kl_topk is not None and res.topk_mass is not None  # vopd-topk reports both
        err = (res.kl_topk - exact)[m]
        out["k"][str(k)] = {"mse": float((err**2).mean()), "bias": float(err.mean()),
                            "topk_mass": float(res.topk_mass[m].mean())}
    return out


def interleaved_step_times(world: World, methods: list[str], *, batch_size: int, top_k: int, repeats: int,
                           seed: int = 0) -> dict[str, Any]:
    """Per-phase step time of every method on one fixed batch, through the trainer's own micro-batch code.

    The grid's per-run phase times are only comparable on a quiet machine; here every repeat runs every method
    (in a shuffled order) and the generation of the batch, so load from other processes hits all of them alike.
    Medians over ``repeats`` after one warm-up round. The optimizer has lr 0, so every repeat sees the same model."""
    import random

    from vopd import distributed as dist
    from vopd.metrics import PhaseTimer
    from vopd.models import logit_transform
    from vopd.step import loss_plan, micro_batch_loss
    from vopd.teacher.local import InProcessTeacher
    from vopd.teacher.routing import Teachers
    from vopd.teacher_config import TEACHER

    cpu = torch.device("cpu")
    tok, student, teacher_model = _world_models(world)
    wrapped = dist.wrap(student, len(tok), "ddp", cpu)  # one process: no wrapping, whatever the strategy
    teachers = Teachers({TEACHER: InProcessTeacher(teacher_model, len(tok))})
    optimizer = torch.optim.AdamW(wrapped.trainable(), lr=0.0)
    ids, sampler, batch = _sample(wrapped.model, tok, world, world.train_data, batch_size, world.config.eval_max_new_tokens,
                                  seed)
    cfgs = {m: load_config(None, [f"model.student={world.student}", f"model.teacher={world.teacher}",
                                  f"data.train={world.train_data}", f"loss.method={m}", f"loss.top_k={top_k}",
                                  *world.data_overrides()])
            for m in methods}
    plans = {m: loss_plan(cfgs[m].loss, logit_transform(wrapped.model)) for m in methods}
    times: dict[str, list[dict[str, float]]] = {m: [] for m in [*methods, "generate"]}
    order = [*methods, "generate"]
    rng = random.Random(seed)
    for rep in range(repeats + 1):
        rng.shuffle(order)
        for m in order:
            timer = PhaseTimer(cpu)
            if m == "generate":
                torch.manual_seed(seed)
                with timer("generate"):
                    sampler(ids)
            else:
                with timer("student"):
                    parts = micro_batch_loss(plans[m], wrapped, teachers, batch, float(batch.num_tokens), timer)
                    parts[0].out.loss.backward()
                with timer("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if rep:  # the first round warms up
                times[m].append(timer.metrics())
    gen = statistics.median(t["time_generate"] for t in times.pop("generate"))
    result: dict[str, Any] = {"repeats": repeats, "batch_size": batch_size, "tokens": batch.num_tokens,
                              "generate_s": gen, "methods": {}}
    for m, ts in times.items():
        row = {p: statistics.median(t.get(f"time_{p}", 0.0) for t in ts) for p in ("teacher", "student", "optimizer")}
        row["train_side"] = statistics.median(t["time_step"] for t in ts)
        row["step_with_generation"] = row["train_side"] + gen
        result["methods"][m] = row
    if "opd" in result["methods"]:
        base = result["methods"]["opd"]
        for row in result["methods"].values():
            row["train_side_ratio_to_opd"] = row["train_side"] / base["train_side"]
            row["step_ratio_to_opd"] = row["step_with_generation"] / base["step_with_generation"]
    return result


def plot(runs: dict[str, list[dict[str, Any]]], tables: dict[float, dict[str, Any]], path: Path) -> Path:
    """One row per learning rate: gradient norms, held-out KL, final accuracy and the online variance proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 4, figsize=(19, 3.8 * len(tables)), squeeze=False)
    for ax, (lr, table) in zip(axes, tables.items()):
        methods = list(table)
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        labelled: set[str] = set()
        for name, rows in runs.items():
            method = name.split("-lr")[0]
            if method not in table or f"-lr{lr:g}-" not in name:
                continue
            label = None if method in labelled else method  # one legend entry per method, not per seed
            labelled.add(method)
            ax[0].plot([x["step"] for x in rows], [x["grad_norm"] for x in rows], color=colors[method], alpha=0.5,
                       lw=0.8, label=label)
            pts = [(x["step"], x["eval_kl"]) for x in rows if x.get("eval_kl") is not None]
            if pts:
                ax[1].plot(*zip(*pts), color=colors[method], alpha=0.6, marker="o", ms=3)
        ax[0].set_title(f"lr {lr:g}: gradient norm per step")
        ax[0].set_yscale("log")
        ax[0].legend(fontsize=7)
        ax[1].set_title("held-out KL(student || teacher)")
        for a in ax[:2]:
            a.set_xlabel("step")
        for a, key, title in ((ax[2], "accuracy", "final greedy accuracy (mean ± sd, seeds)"),
                              (ax[3], "grad_var_mean", "online gradient variance proxy (mean over steps)")):
            a.bar(methods, [table[m][key]["mean"] for m in methods], yerr=[table[m][key]["sd"] for m in methods],
                  color=[colors[m] for m in methods])
            a.set_title(title)
            a.tick_params(axis="x", rotation=45)
        ax[3].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_topk(topk: dict[str, Any], sweep: dict[str, Any], path: Path) -> Path:
    """The top-k baseline's error against the exact KL, and `vopd-topk`'s accuracy, against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = [int(k) for k in topk["k"]]
    ax[0].loglog(ks, [max(topk["k"][str(k)]["mse"], 1e-16) for k in ks], marker="o")
    ax[0].set_title("top-k KL baseline: MSE vs the exact KL_t")
    if sweep:
        kk = [int(k) for k in sweep]
        ax[1].semilogx(kk, [sweep[str(k)]["accuracy"] for k in kk], marker="o", label="accuracy")
        ax[1].set_title(f"vopd-topk final accuracy vs k (seed {sweep[str(kk[0])]['seed']})")
    for a in ax:
        a.set_xlabel("k")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: 2 seeds, one learning rate, 8 steps, 64 evaluation problems")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4],
                        help="learning rates; every method runs at each (the same budget for all)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=20, help="k of the top-k methods in the training grid")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 20, 50, 100, 10**9],
                        help="k values for the baseline-error sweep and the accuracy sweep (values >= V mean k = V)")
    parser.add_argument("--sweep-lr", type=float, default=None,
                        help="learning rate of the accuracy-vs-k sweep (default: the last of --lrs)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the accuracy-vs-k training runs")
    parser.add_argument("--timing-repeats", type=int, default=20,
                        help="rounds of the interleaved per-method step timing on one fixed batch")
    parser.add_argument("--output-dir", default="runs/reproduce")


def default_arguments() -> argparse.Namespace:
    """The grid's settings as ``vopd reproduce`` runs them by default (``vopd.tools.regime`` trains on the same)."""
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args([])


def cli_main(args: argparse.Namespace) -> int:
    from vopd.world.build import build_world

    if args.quick:
        (args.seeds, args.lrs, args.steps, args.eval_every, args.eval_problems,
         args.timing_repeats) = args.seeds[:2], args.lrs[-1:], 8, 4, 64, 5
    args.sweep_lr = args.lrs[-1] if args.sweep_lr is None else args.sweep_lr
    for name in ("steps", "batch_size", "top_k", "eval_problems", "timing_repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    world = build_world()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"grid: {args.methods} x lr {args.lrs} x seeds {args.seeds}, {args.steps} steps x {args.batch_size} "
          "rollouts", flush=True)
    runs = run_grid(world, out, args)
    tables = {lr: summarise_grid(runs, args.methods, args.seeds, lr) for lr in args.lrs}
    initial = evaluate_initial_student(world, out, args)
    topk = topk_baseline_error(world, args.ks, prompts=64, max_new_tokens=world.config.eval_max_new_tokens, seed=0)
    sweep: dict[str, Any] = {}
    if not args.no_sweep:
        print(f"accuracy vs k: vopd-topk, lr {args.sweep_lr:g}, seed {args.seeds[0]}", flush=True)
        for k, rows in run_k_sweep(world, out, args, topk["vocab"]).items():
            sweep[str(k)] = {"accuracy": rows[-1].get("eval_avg_at_n"), "heldout_kl": rows[-1].get("eval_kl"),
                             "seed": args.seeds[0], "lr": args.sweep_lr}
    timing = interleaved_step_times(world, args.methods, batch_size=args.batch_size, top_k=args.top_k,
                                    repeats=args.timing_repeats)
    pngs = [plot(runs, tables, out / "reproduce.png"), plot_topk(topk, sweep, out / "topk.png")]
    result = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "world": str(world.root),
              "tables": {f"{lr:g}": t for lr, t in tables.items()}, "topk_baseline": topk, "accuracy_vs_k": sweep,
              "initial_student": initial,
              "interleaved_step_times": timing,
              "seconds": time.perf_counter() - t0}
    (out / "reproduce.json").write_text(json.dumps(result, indent=1, default=str))
    for lr, table in tables.items():
        print(f"\nlr {lr:g}: final greedy accuracy and held-out KL (mean ± sd over seeds {args.seeds}), gradient "
              "statistics")
        print("| method | accuracy | held-out KL | grad norm mean | grad norm sd (steps) | grad var proxy |")
        print("|---|---|---|---|---|---|")
        print(f"| (student before) | {initial['accuracy']['mean']:.3f} | {initial['heldout_kl']['mean']:.4f} ± "
              f"{initial['heldout_kl']['sd']:.4f} | | | |")
        for m, row in table.items():
            print(f"| {m} | {row['accuracy']['mean']:.3f} ± {row['accuracy']['sd']:.3f} | "
                  f"{row['heldout_kl']['mean']:.4f} ± {row['heldout_kl']['sd']:.4f} | "
                  f"{row['grad_norm_mean']['mean']:.3f} ± {row['grad_norm_mean']['sd']:.3f} | "
                  f"{row['grad_norm_sd_over_steps']['mean']:.3f} ± {row['grad_norm_sd_over_steps']['sd']:.3f} | "
                  f"{row['grad_var_mean']['mean']:.3e} |")
    print(f"\nstep time on one fixed batch ({timing['batch_size']} rollouts, {timing['tokens']} completion tokens), "
          f"interleaved, median of {timing['repeats']}: generation {timing['generate_s'] * 1e3:.0f} ms")
    print("| method | teacher ms | student fwd+bwd ms | optimizer ms | training side / opd | "
          "step incl. generation / opd |")
    print("|---|---|---|---|---|---|")
    for m, row in timing["methods"].items():
        print(f"| {m} | {row['teacher'] * 1e3:.1f} | {row['student'] * 1e3:.1f} | {row['optimizer'] * 1e3:.1f} | "
              f"{row.get('train_side_ratio_to_opd', float('nan')):.3f} | "
              f"{row.get('step_ratio_to_opd', float('nan')):.3f} |")
    print("\ntop-k baseline vs exact KL (student's own samples):")
    for k, v in topk["k"].items():
        acc = sweep.get(k, {}).get("accuracy")
        print(f"  k={k:>4}: MSE {v['mse']:.3e}  mean error {v['bias']:+.3e}  top-k mass {v['topk_mass']:.3f}"
              + (f"  vopd-topk accuracy {acc:.3f}" if acc is not None else ""))
    print(f"\nplots: {', '.join(map(str, pngs))}\njson: {out / 'reproduce.json'}\ntotal {result['seconds']:.0f}s")
    return 0
