"""`vopd bench packing`: padded rows against packed tokens on a long-tailed length distribution, side by side.

One step's gradient (``vopd.step.accumulate_gradients``: teacher forward, student forward and backward through the
fused head, method ``vopd``) of the same rollout, run in turns: padded micro-batches of ``--micro-batch`` rows in
sampling order (``micro_batch_tokens: 0``, today's default), and packed micro-batches under a token budget of the
same worst case (``--micro-batch`` x the longest possible sequence; ``packing: true``, ``micro_batch_tokens``).
Completion lengths are drawn once (``--seed``) from a log-normal with median 40% of ``--max-new-tokens`` and 10%
truncated at it (docs/performance.md, "Tokens, not rows"), the same draw for both sides. Printed: token slots and
the padding share, micro-batches, the median step time, and the peak of live tensor memory
(``vopd.memtrace.MemTrace``, in a separate untimed step), with packed/padded ratios.

What it knows: the distribution, the two configurations and how to time them fairly (alternating, medians, one
thread). What it does not know: any number before it runs (nothing is written here but the settings).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vopd.tools.bench.common import ratio


def add_packing_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--max-new-tokens", type=int, default=1024, help="completion limit; lengths are drawn below it (default 1024)")
    a("--prompt-tokens", type=int, default=64, help="prompt length of every sequence (default 64)")
    a("--rollouts", type=int, default=32, help="sequences in the step (default 32)")
    a("--micro-batch", type=int, default=8, help="padded side's rows per micro-batch, vopd's default (default 8)")
    a("--budget", type=int, default=0, help="packed side's micro_batch_tokens (default 0: --micro-batch x the "
      "longest possible sequence, the padded side's worst case)")
    a("--repeats", type=int, default=3, help="timed steps per side, alternating (default 3)")
    a("--lengths", choices=("long-tailed", "equal"), default="long-tailed",
      help="completion lengths: the long-tailed draw, or all equal to half the limit (no padding to remove)")
    a("--seed", type=int, default=0, help="seed of the length draw and the token ids (default 0)")
    a("--threads", type=int, default=1, help="torch threads (default 1)")
    a("--json", action="store_true", help="print one JSON object instead of the table")


def completion_lengths(n: int, max_new: int, seed: int) -> list[int]:
    """``n`` completion lengths: log-normal with median 0.4 x ``max_new`` and P(length >= max_new) = 10%
    (sigma = ln(2.5) / z_0.9), rounded, at least 1, cut at ``max_new``."""
    sigma = math.log(2.5) / 1.2815515655446004
    gen = torch.Generator().manual_seed(seed)
    draw = torch.exp(math.log(0.4 * max_new) + sigma * torch.randn(n, generator=gen, dtype=torch.float64))
    return [max(1, min(max_new, int(round(float(x))))) for x in draw]


def _models(root: Path, max_len: int) -> tuple[Path, Path]:
    from vopd.world.tiny_models import ModelShape, make_model, train_tokenizer

    tok = train_tokenizer([f"{a} + {b} = {a + b}. " * 3 for a in range(60) for b in range(0, 60, 7)], vocab_size=512)
    paths = []
    for name, shape, seed in (("teacher", ModelShape(hidden_size=256, num_layers=4, intermediate_size=768, num_heads=8,
                                                     num_kv_heads=4, max_positions=max_len), 1),
                              ("student", ModelShape(hidden_size=128, num_layers=2, intermediate_size=384,
                                                     max_positions=max_len), 2)):
        make_model(shape, tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def run_packing_bench(args: argparse.Namespace) -> int:
    from vopd import distributed as dist
    from vopd.attention import use_packed_attention
    from vopd.config import load_config
    from vopd.memtrace import MemTrace
    from vopd.metrics import PhaseTimer
    from vopd.models import load_model, load_tokenizer
    from vopd.rollout import pack
    from vopd.sampling import Samples
    from vopd.step import accumulate_gradients
    from vopd.teacher.local import InProcessTeacher
    from vopd.teacher.routing import Teachers

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    max_len = args.prompt_tokens + args.max_new_tokens
    lengths = completion_lengths(args.rollouts, args.max_new_tokens, args.seed) if args.lengths == "long-tailed" \
        else [max(1, args.max_new_tokens // 2)] * args.rollouts
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, student_dir = _models(Path(tmp), max_len)
        tok = load_tokenizer(str(student_dir))
        student = load_model(str(student_dir), role="student", dtype=torch.float32, device=cpu)
        teacher_model = load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=cpu)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(3, len(tok), (args.prompt_tokens,), generator=gen).tolist() for _ in lengths]
    completions = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths]
    logprobs = [(-3 * torch.rand(n, generator=gen)).tolist() for n in lengths]
    rollout = pack(prompts, Samples(completions, logprobs, [n == args.max_new_tokens for n in lengths]),
                   tok.pad_token_id)
    for model in (student, teacher_model):
        use_packed_attention(model)  # what the trainer's pre-flight does with packing: SDPA per sequence
    teachers = Teachers({"teacher": InProcessTeacher(teacher_model, len(tok))})
    wrapped = dist.wrap(student, len(tok), "ddp", cpu)
    common = [f"batch_size={args.rollouts}", f"micro_batch_size={args.micro_batch}", "loss.method=vopd",
              "grad_noise=false", f"model.student={student_dir}", f"model.teacher={teacher_dir}", "data.train=x"]
    sides = {"padded": load_config(None, common, require_paths=False),
             "packed": load_config(None, [*common, "packing=true",
                                          f"micro_batch_tokens={args.budget or args.micro_batch * max_len}"],
                                   require_paths=False)}

    def step(cfg: Any) -> dict[str, float]:
        got = accumulate_gradients(cfg, wrapped, teachers, rollout, cpu, PhaseTimer(cpu))
        student.zero_grad(set_to_none=True)
        return got.token_metrics

    results: dict[str, dict[str, Any]] = {}
    for name, cfg in sides.items():
        shape = step(cfg)  # warm-up, and the shape of its micro-batches
        with MemTrace() as trace:
            step(cfg)
        results[name] = {"pad_fraction": shape["pad_fraction"], "micro_batches": shape["micro_batches"],
                         "peak_mb": trace.peak / 2**20, "times": []}
    for _ in range(args.repeats):
        for name, cfg in sides.items():
            t0 = time.perf_counter()
            step(cfg)
            results[name]["times"].append(time.perf_counter() - t0)
    tokens = int(rollout.attention_mask.sum())
    for r in results.values():
        r["step_s"] = statistics.median(r.pop("times"))
        r["slots"] = tokens / (1 - r["pad_fraction"]) if r["pad_fraction"] < 1 else float("inf")
    out = {"settings": {k: getattr(args, k) for k in ("max_new_tokens", "prompt_tokens", "rollouts", "micro_batch",
                                                       "repeats", "seed", "threads", "lengths", "budget")},
           "tokens": tokens, "truncated": sum(n == args.max_new_tokens for n in lengths),
           "median_completion": statistics.median(lengths), **results,
           "ratio": {k: results["packed"][k] / results["padded"][k] for k in ("slots", "step_s", "peak_mb")}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.rollouts} sequences: prompt {args.prompt_tokens} + completion (median {out['median_completion']}, "
          f"{out['truncated']} truncated at {args.max_new_tokens}) = {tokens} tokens; method vopd, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'':8} {'token slots':>12} {'padding':>8} {'micro-batches':>14} {'step s':>8} {'peak MiB':>9}")
    for name, r in results.items():
        print(f"{name:8} {r['slots']:>12.0f} {r['pad_fraction']:>8.1%} {r['micro_batches']:>14.0f} "
              f"{r['step_s']:>8.3f} {r['peak_mb']:>9.1f}")
    p, q = results["packed"], results["padded"]
    print(f"{'packed/padded':14} slots {ratio(p['slots'], q['slots'])}  step {ratio(p['step_s'], q['step_s'])}  "
          f"peak {ratio(p['peak_mb'], q['peak_mb'])}")
    return 0
