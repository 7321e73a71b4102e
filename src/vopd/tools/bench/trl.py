"""`vopd bench trl`: vopd's trainer side by side with Hugging Face TRL's on-policy distillation trainer; the driver.

What it knows: which cases run (TRL's ``DistillationTrainer`` with ``beta=1.0``, vopd's ``opd-full`` and ``vopd``;
timing rounds, then memory rounds, then the loss cross-check), each in a fresh process (``python -m vopd.tools.bench.trl
--worker CASE``) with the same torch thread count, set before any model exists; implementations alternate in rotated
order every round; memory processes get glibc's mmap threshold lowered so the resident set follows live memory;
medians over rounds x steps; the report table and the raw JSON; the command line; whether TRL is recent enough. The
inputs are the cached tiny world unless paths are given.

What it does not know: how a case runs a trainer and measures its steps (``vopd.tools.bench.trl_cases``), how the loss cross-check
is computed (``vopd.tools.bench.trl_crosscheck``), GPUs, vLLM, LoRA, or any number in advance.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from vopd.tools.bench.common import ratio, spawn_case
from vopd.errors import UserError
from vopd.tools.bench.trl_cases import measure
from vopd.tools.bench.trl_crosscheck import crosscheck, crosscheck_lines

IMPLS = ("trl", "opd-full", "vopd")
MIN_TRL = "1.16"  # the first release with the stable DistillationTrainer used here is at most this one (measured)


def require_trl() -> None:
    """A one-line error unless a TRL with the stable ``DistillationTrainer`` is installed."""
    if importlib.util.find_spec("trl") is None:
        raise UserError("TRL is not installed; pip install 'vopd[trl]'")
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("trl")) < Version(MIN_TRL):
        raise UserError(f"TRL {version('trl')} is older than {MIN_TRL}, which this benchmark needs; "
                        "pip install 'vopd[trl]'")


# ---------------------------------------------------------------- worker side (one case per fresh process)

def worker(case: dict[str, Any]) -> dict[str, Any]:
    """One case, meant to run in a fresh process (``--in-process`` runs it in the caller's)."""
    import torch

    torch.set_num_threads(case["threads"])  # the same count on both sides, set before any model exists
    if case["impl"] == "crosscheck":
        return {**case, **crosscheck(case)}
    return measure(case)


# ---------------------------------------------------------------- driver side

def _run(case: dict[str, Any], in_process: bool) -> dict[str, Any]:
    if in_process:
        return worker(case)
    env = dict(os.environ)
    if case["mode"] == "memory":
        # glibc then hands every freed block of 64 KiB or more back to the OS (by default its threshold grows and
        # freed memory stays resident), so the resident set follows live memory. Timing runs keep the defaults.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result, proc = spawn_case("vopd.tools.bench.trl", case, flag="--worker", env=env)
    if result is None:
        raise RuntimeError(f"benchmark case {case['impl']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return result


def _paths(args: argparse.Namespace) -> dict[str, str]:
    given = [args.student, args.teacher, args.data]
    if all(given):
        return {"student": args.student, "teacher": args.teacher, "data": args.data}
    if any(given):
        raise UserError("--student, --teacher and --data go together (or none: the tiny world)")
    from vopd.world.build import build_world

    w = build_world(cache_dir=args.cache_dir)
    return {"student": str(w.student), "teacher": str(w.teacher), "data": str(w.train_data)}


def bench_results(args: argparse.Namespace) -> dict[str, Any]:
    require_trl()
    base = dict(_paths(args), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, lr=args.lr,
                seed=args.seed, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                overrides=list(args.override))
    runs = []
    for mode, rnd in [("time", r) for r in range(args.rounds)] + [("memory", r) for r in range(args.memory_rounds)]:
        k = rnd % len(args.impls)
        for impl in list(args.impls[k:]) + list(args.impls[:k]):  # rotated: none always runs first or last
            r = _run(dict(base, impl=impl, mode=mode, round=rnd), args.in_process)
            what = (f"median step {statistics.median(r['step_ms']):8.1f} ms" if mode == "time" else
                    f"step RSS +{r['rss_step_mb']:.1f} MiB, tensor peak {r['tensor_peak_mb']:.1f} MiB")
            print(f"  {mode} round {rnd} {impl:<8} {what}", file=sys.stderr, flush=True)
            runs.append(r)
    cross = None if args.skip_crosscheck else _run(dict(base, impl="crosscheck", mode="check"), args.in_process)
    return {"settings": base, "runs": runs, "crosscheck": cross}


def summarize(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per implementation: medians over every timed step of every round, and over the memory rounds."""
    out: dict[str, dict[str, Any]] = {}
    med = statistics.median
    for impl in dict.fromkeys(r["impl"] for r in res["runs"]):
        t = [r for r in res["runs"] if r["impl"] == impl and r["mode"] == "time"]
        m = [r for r in res["runs"] if r["impl"] == impl and r["mode"] == "memory"]
        row: dict[str, Any] = {"threads": sorted({r["threads"] for r in t + m})}
        if t:
            row.update(step_ms=med(x for r in t for x in r["step_ms"]), gen_ms=med(x for r in t for x in r["gen_ms"]),
                       rest_ms=med(s - g for r in t for s, g in zip(r["step_ms"], r["gen_ms"])),
                       round_ms=[med(r["step_ms"]) for r in t])
        if m:
            row.update({k: med(r[k] for r in m) for k in ("rss_step_mb", "tensor_peak_mb", "process_peak_mb")})
        out[impl] = row
    return out


def format_report(res: dict[str, Any]) -> str:
    s, summ = res["settings"], summarize(res)
    trl = summ.get("trl", {})
    rounds = len({r["round"] for r in res["runs"] if r["mode"] == "time"})
    lines = [f"vopd bench trl: {s['batch_size']} prompts x {s['max_new_tokens']} completion tokens per step (fixed "
             f"length), fp32 CPU, threads={s['threads']}, lr={s['lr']}; time: {rounds} rounds x {s['repeats']} steps "
             f"after {s['warmup']} warm-up, median, generation included; memory: one step after warm-up",
             "| trainer | step ms | generation ms | step - generation ms | round medians ms | step peak RSS MiB | "
             "step tensor peak MiB | process peak RSS MiB | step / TRL | (step - gen) / TRL | step RSS / TRL | "
             "tensor peak / TRL |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for impl, m in summ.items():
        cells = [format(m[k], ".0f" if k == "process_peak_mb" else ".1f") if m.get(k) is not None else "-"
                 for k in ("step_ms", "gen_ms", "rest_ms", "rss_step_mb", "tensor_peak_mb", "process_peak_mb")]
        cells.insert(3, " / ".join(f"{x:.0f}" for x in m.get("round_ms", [])) or "-")
        name = "TRL DistillationTrainer, beta=1" if impl == "trl" else f"vopd train, loss.method={impl}"
        ratios = [ratio(m.get(k), trl.get(k)) for k in ("step_ms", "rest_ms", "rss_step_mb", "tensor_peak_mb")]
        lines.append("| " + " | ".join([name, *cells, *ratios]) + " |")
    threads = {t for m in summ.values() for t in m["threads"]}
    if threads != {s["threads"]}:
        lines.append(f"warning: torch ran with {sorted(threads)} threads, not {s['threads']}")
    if res.get("crosscheck"):
        lines += ["", *crosscheck_lines(res["crosscheck"])]
    return "\n".join(lines)


def run_trl_bench(args: argparse.Namespace) -> int:
    res = bench_results(args)
    print(format_report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def add_trl_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--batch-size", type=int, default=32, help="prompts (one completion each) per step")
    add("--max-new-tokens", type=int, default=96, help="completion tokens per sequence, exactly")
    add("--rounds", type=int, default=3, help="timing processes per trainer, alternating")
    add("--repeats", type=int, default=5, help="timed steps per process")
    add("--warmup", type=int, default=2, help="unmeasured steps before measuring")
    add("--memory-rounds", type=int, default=1, help="memory-measuring processes per trainer, after the timing")
    add("--threads", type=int, default=1, help="torch CPU threads, both trainers")
    add("--lr", type=float, default=1e-5)
    add("--seed", type=int, default=0)
    add("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="trainers to run (trl = TRL's)")
    add("--student", help="student model directory (default: the tiny world's)")
    add("--teacher", help="teacher model directory")
    add("--data", help="problems file (field 'problem')")
    add("--cache-dir", help="tiny-world cache (default $VOPD_CACHE or ~/.cache/vopd)")
    add("--override", nargs="*", default=[], metavar="KEY=VALUE", help="extra vopd config overrides (vopd runs)")
    add("--skip-crosscheck", action="store_true", help="skip the fixed-batch loss cross-check")
    add("--in-process", action="store_true", help="run every case in this process (tests; memory not independent)")
    add("--json", help="also write the raw results here")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("use `vopd bench trl`")
