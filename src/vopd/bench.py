"""`vopd bench estimators`: time and peak memory of every method, dense vs chunked, each case in a fresh process.

What it knows: how to build random hidden states and output layers at a given vocabulary and token count, run one
forward+backward of the loss head (both paths start from hidden states, so the dense path pays for its
(T, V) logits and the chunked path does not), and measure wall time (median of repeats after a warm-up) and the
peak memory the step added (CUDA: ``max_memory_allocated``; CPU: peak RSS above the RSS once inputs exist, which is
why every case runs in its own process). It prints the table and the ratios the estimator issue asks for.
What it does not know: models or training; the numbers it prints are measurements, never constants.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from vopd.errors import UserError

METHOD_ORDER = ("opd", "vopd", "vopd-topk", "opd-full", "opd-topk", "vopd-opt", "rb-topk")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement, meant to run in a fresh process."""
    import torch

    from vopd.chunked import chunked_distillation_loss
    from vopd.estimators import distillation_loss

    torch.manual_seed(0)
    if case["device"] == "cpu":
        torch.set_num_threads(case.get("threads", 1))  # a fixed thread count keeps timings comparable on a shared CPU
    dev = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    n, v, ds, dt = case["tokens"], case["vocab"], case["hidden"], case["teacher_hidden"]
    hs = (torch.randn(1, n, ds, device=dev) ).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, ds, device=dev) * ds**-0.5).to(dtype).requires_grad_(True)
    ht = torch.randn(1, n, dt, device=dev).to(dtype)
    wt = (torch.randn(v, dt, device=dev) * dt**-0.5).to(dtype)
    y = torch.randint(0, v, (1, n), device=dev)
    mask = torch.ones(1, n, dtype=torch.bool, device=dev)

    def step() -> None:
        hs.grad = ws.grad = None
        if case["path"] == "dense":
            with torch.no_grad():
                zt = ht @ wt.T
            out = distillation_loss(hs @ ws.T, zt, y, mask, method=case["method"], top_k=case["top_k"])
        else:
            out = chunked_distillation_loss(hs, ws, ht, wt, y, mask, method=case["method"], top_k=case["top_k"],
                                            memory_budget_mb=case["budget_mb"])
        out.loss.backward()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, kernels)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    times = []
    for _ in range(case["repeats"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {**case, "time_ms": 1000 * statistics.median(times), "peak_mb": max(peak, 0.0)}


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vopd.bench", "--worker", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.2f}"


def run_estimator_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case in a fresh process, the whole list ``args.rounds`` times with its order rotated each round, so a
    change of machine load hits every method alike; per case the median time over rounds, the largest peak."""
    methods = args.methods or list(METHOD_ORDER[:5])
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
        for method in METHOD_ORDER:
            d, c = by.get((vocab, tokens, method, "dense")), by.get((vocab, tokens, method, "chunked"))
            if d is None and c is None:
                continue
            base = by.get((vocab, tokens, "opd", "chunked"))
            cells = [
                str(vocab), str(tokens), method,
                f"{d['time_ms']:.1f}" if d else "-", f"{c['time_ms']:.1f}" if c else "-",
                f"{d['peak_mb']:.0f}" if d else "-", f"{c['peak_mb']:.0f}" if c else "-",
                _ratio(c and c["peak_mb"], d and d["peak_mb"]),
                _ratio(c and c["time_ms"], base and base["time_ms"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from vopd.bench_training import add_bench_arguments

    # One sub-parser per benchmark: training/generation reuse flag names (--tokens, --methods, --device, ...) with
    # other defaults, which a single flat parser cannot hold.
    sub = parser.add_subparsers(dest="what", required=True, metavar="{estimators,training,generation,trl}")
    add_bench_arguments(sub.add_parser("training", help="training-side step at real shapes (needs CUDA)"), "training")
    add_bench_arguments(sub.add_parser("generation", help="model.generate tokens/s, static vs dynamic KV cache"),
                        "generation")
    from vopd.bench_trl import add_trl_arguments  # TRL itself is imported only when the benchmark runs

    add_trl_arguments(sub.add_parser("trl", help="vopd's trainer side by side with TRL's DistillationTrainer "
                                     "(needs `pip install 'vopd[trl]'`)"))
    parser = sub.add_parser("estimators", help="loss head alone: every method, dense vs chunked")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="completion tokens per step")
    parser.add_argument("--hidden", type=int, default=512, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=768)
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, help="default: the five methods of the paper")
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


def cli_main(args: argparse.Namespace) -> int:
    if args.what == "trl":
        from vopd.bench_trl import run_trl_bench

        return run_trl_bench(args)
    if args.what in ("training", "generation"):
        from vopd.bench_training import run_generation_bench, run_training_bench

        return (run_training_bench if args.what == "training" else run_generation_bench)(args)
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
            parts.append(f"{m}/opd time {_ratio(r and r['time_ms'], opd and opd['time_ms'])}")
        mems = [_ratio(by[(vocab, tokens, m, 'chunked')]['peak_mb'], by[(vocab, tokens, m, 'dense')]['peak_mb'])
                for m in METHOD_ORDER if (vocab, tokens, m, "chunked") in by and (vocab, tokens, m, "dense") in by]
        parts.append("chunked/dense peak memory " + (" ".join(mems) or "-") + " (per method, table order)")
        print(f"  V={vocab} T={tokens}: " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("use `vopd bench estimators`")
