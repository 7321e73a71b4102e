"""`vopd bench estimators`: time and peak memory of every method, dense vs chunked, each case in a fresh process.

What it knows: how to build random hidden states and output layers at a given vocabulary and token count, run one
forward+backward of the loss head (both paths start from hidden states, so the dense path pays for its
(T, V) logits and the chunked path does not), and measure wall time (median of repeats after a warm-up) and the
peak memory the step added (CUDA: ``max_memory_allocated``; CPU: peak RSS above the RSS once inputs exist, which is
why every case runs in its own process). It prints the table and the ratios docs/performance.md quotes.
What it does not know: models or training; the numbers it prints are measurements, never constants.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from vopd.errors import UserError
from vopd.loss.methods import METHODS, PAPER_METHODS
from vopd.tools.bench.common import ratio, spawn_case

def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    result, proc = spawn_case("vopd.tools.bench.worker", {**case, "kind": "head"})
    if result is None:
        raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-2000:]}")
    return result


def run_estimator_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case in a fresh process, the whole list ``args.rounds`` times with its order rotated each round, so a
    change of machine load hits every method alike; per case the median time over rounds, the largest peak."""
    methods = args.methods or list(PAPER_METHODS)
    cases = [dict(vocab=vocab, tokens=tokens, method=method, path=path, hidden=args.hidden,
                  teacher_hidden=args.teacher_hidden, top_k=args.top_k, repeats=args.repeats,
                  budget_mb=args.budget_mb, device=args.device, dtype=args.dtype, threads=args.threads)
             for vocab in args.vocab for tokens in args.tokens for method in methods for path in args.paths]
    runs: list[list[dict[str, Any]]] = [[] for _ in cases]
    for rnd in range(args.rounds):
        shift = rnd % len(cases)
        for i in [*range(shift, len(cases)), *range(shift)]:
            r = _run_case(cases[i])
            print(f"  round {rnd + 1} V={r['vocab']:>6} T={r['tokens']:>5} {r['method']:<9} {r['path']:<7} "
                  f"{r['time_ms']:9.1f} ms {r['peak_mb']:9.1f} MB", file=sys.stderr, flush=True)
            runs[i].append(r)
    return [{**rs[0], "time_ms": statistics.median(r["time_ms"] for r in rs),
             "peak_mb": max(r["peak_mb"] for r in rs), "round_times_ms": [r["time_ms"] for r in rs]} for rs in runs]


def format_table(results: list[dict[str, Any]]) -> str:
    by = {(r["vocab"], r["tokens"], r["method"], r["path"]): r for r in results}
    lines = ["| V | tokens | method | dense ms | chunked ms | dense peak MB | chunked peak MB | chunked/dense mem |"
             " time / opd (chunked) |", "|---|---|---|---|---|---|---|---|---|"]
    for vocab, tokens in sorted({(r["vocab"], r["tokens"]) for r in results}):
        for method in METHODS:
            d, c = by.get((vocab, tokens, method, "dense")), by.get((vocab, tokens, method, "chunked"))
            if d is None and c is None:
                continue
            base = by.get((vocab, tokens, "opd", "chunked"))
            cells = [
                str(vocab), str(tokens), method,
                f"{d['time_ms']:.1f}" if d else "-", f"{c['time_ms']:.1f}" if c else "-",
                f"{d['peak_mb']:.0f}" if d else "-", f"{c['peak_mb']:.0f}" if c else "-",
                ratio(c and c["peak_mb"], d and d["peak_mb"]),
                ratio(c and c["time_ms"], base and base["time_ms"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="completion tokens per step")
    parser.add_argument("--hidden", type=int, default=512, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=768)
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: the five methods of the paper")
    parser.add_argument("--paths", nargs="+", choices=["dense", "chunked"], default=["dense", "chunked"])
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, rotating the order (median over rounds)")
    parser.add_argument("--budget-mb", type=float, default=256, help="chunked path memory budget per chunk")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per case (CPU only)")
    parser.add_argument("--json", help="also write the raw results here")


def run_estimators_bench(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} but CUDA is not available here; use --device cpu")
    if args.rounds < 1 or args.repeats < 1:
        raise UserError(f"--rounds {args.rounds} --repeats {args.repeats}: both must be >= 1")
    results = run_estimator_bench(args)
    table = format_table(results)
    print(f"vopd bench estimators: hidden={args.hidden} teacher_hidden={args.teacher_hidden} top_k={args.top_k} "
          f"device={args.device} dtype={args.dtype} repeats={args.repeats} rounds={args.rounds} "
          f"budget_mb={args.budget_mb} "
          f"threads={args.threads}")
    print(table)
    by = {(r["vocab"], r["tokens"], r["method"], r["path"]): r for r in results}
    print("\nratios (chunked path unless noted):")
    for vocab, tokens in sorted({(r["vocab"], r["tokens"]) for r in results}):
        opd = by.get((vocab, tokens, "opd", "chunked"))
        parts = []
        for m in ("vopd", "opd-full"):
            r = by.get((vocab, tokens, m, "chunked"))
            parts.append(f"{m}/opd time {ratio(r and r['time_ms'], opd and opd['time_ms'])}")
        mems = [ratio(by[(vocab, tokens, m, 'chunked')]['peak_mb'], by[(vocab, tokens, m, 'dense')]['peak_mb'])
                for m in METHODS if (vocab, tokens, m, "chunked") in by and (vocab, tokens, m, "dense") in by]
        parts.append("chunked/dense peak memory " + (" ".join(mems) or "-") + " (per method, table order)")
        print(f"  V={vocab} T={tokens}: " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0

