"""`vopd bench training` and `vopd bench generation`: the training-side step and sampling throughput at real shapes.

What it knows: the flags and their defaults per shape set, which cases a benchmark runs (per student and token
count: every method's training-side step, then the loss head alone, chunked ``opd-full`` vs naive dense logits; or
``model.generate`` tokens/s per batch size with a static vs a dynamic KV cache), the targets, and the markdown
tables with the ratio columns. Every case runs in a fresh process (``python -m vopd.tools.bench.worker``), so each memory
number is clean and an out-of-memory case or a crash becomes one row ("OOM", "ERROR") instead of ending the run.

What it does not know: how a case is built and timed (models, shapes, memory: ``vopd.tools.bench.worker``), real weights
(random weights give the same FLOPs and memory, not meaningful text), rollouts from a real sampler (vLLM),
multi-GPU, or what any number will be: nothing here is a constant, all are measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TypeGuard

from vopd.loss.methods import METHODS, PAPER_METHODS
from vopd.tools.bench.common import ratio, spawn_case
from vopd.tools.bench.worker import SHAPES, TEACHER, VOCAB
from vopd.errors import UserError

# Defaults per shape set: completion tokens per step, completion/prompt length per sequence (the authors' setup:
# completions <= 2048 tokens), and generation batch sizes / lengths.
DEFAULTS: dict[str, dict[str, Any]] = {
    "real": dict(tokens=[2048, 4096, 8192, 16384], completion_len=2048, prompt_len=256,
                 batch_sizes=[32, 128], new_tokens=512, gen_prompt_len=256),
    "tiny": dict(tokens=[64], completion_len=32, prompt_len=8, batch_sizes=[2], new_tokens=8, gen_prompt_len=8),
    "cpu": dict(tokens=[256], completion_len=128, prompt_len=32, batch_sizes=[32], new_tokens=256,
                gen_prompt_len=32),
}
TARGETS = {"vopd": 1.02, "opd-full": 1.05, "head": 0.10}


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    """``vopd.tools.bench.worker.measure_case`` in a fresh process."""
    result, proc = spawn_case("vopd.tools.bench.worker", case)
    if result is not None:
        return result
    # A crash (host OOM kill, CUDA error) is one failed row, not a lost run of forty cases.
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    print(f"  case failed (exit {proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
    return {**case, "error": tail[:300]}


def _device(args: argparse.Namespace, what: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if cuda else "cpu")
    student = getattr(args, "student", None)
    if student is not None and student not in SHAPES[args.shapes]:
        raise UserError(f"--student {student} is not in --shapes {args.shapes} (it has {', '.join(SHAPES[args.shapes])})")
    if args.shapes == "real" and (not device.startswith("cuda") or not cuda):
        raise UserError(f"{what} benchmark with --shapes real needs a CUDA device (none here); use --shapes tiny "
                        "to smoke-test")
    if device.startswith("cuda") and not cuda:
        raise UserError(f"--device {device} but CUDA is not available here; use --device cpu")
    return device


def _opt(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return DEFAULTS[args.shapes][name] if value is None else value


def _common(args: argparse.Namespace, what: str) -> dict[str, Any]:
    return dict(shapes=args.shapes, device=_device(args, what), repeats=args.repeats, warmup=args.warmup)


def _print_case(r: dict[str, Any], label: str) -> None:
    print(f"  {label:<36} {_cell_ms(r):>9} ms  peak {r.get('peak_mb', 0) / 1024:.2f} GiB", file=sys.stderr, flush=True)


def training_results(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    common = _common(args, "training")
    methods = args.methods or list(PAPER_METHODS)
    c_len, p_len = _opt(args, "completion_len"), _opt(args, "prompt_len")
    tokens_list = _opt(args, "tokens")
    bad = [t for t in tokens_list if t > c_len and t % c_len]
    if bad:  # checked before the first case, not forty minutes into a GPU run
        raise UserError(f"--tokens {bad} are not multiples of --completion-len {c_len}")
    train, head = [], []
    for student in args.students:
        for tokens in tokens_list:
            batch, seq = (1, tokens) if tokens <= c_len else (tokens // c_len, c_len)  # B sequences x T tokens
            for method in methods:
                case = dict(common, kind="train", student=student, tokens=tokens, batch=batch, completion_len=seq,
                            prompt_len=p_len, method=method, top_k=args.top_k, budget_mb=args.budget_mb,
                            trainable=args.trainable, optimizer=args.optimizer)
                train.append(_run_case(case))
                _print_case(train[-1], f"{student} T={tokens} {method}")
        if args.skip_head:
            continue
        hs, ht = SHAPES[args.shapes][student]["hidden_size"], SHAPES[args.shapes][TEACHER]["hidden_size"]
        for path in ("chunked", "dense"):  # loss head alone, hidden states given: what the chunking saves
            case = dict(common, kind="head", student=student, vocab=VOCAB[args.shapes], tokens=max(tokens_list),
                        method="opd-full", path=path, hidden=hs, teacher_hidden=ht, top_k=args.top_k,
                        budget_mb=args.budget_mb, dtype="bfloat16")
            head.append(_run_case(case))
            _print_case(head[-1], f"{student} head T={max(tokens_list)} {path}")
    return {"training": train, "head": head}


def _cell_ms(r: dict[str, Any] | None) -> str:
    return "-" if r is None else "OOM" if r.get("oom") else "ERROR" if "error" in r else f"{r['time_ms']:.1f}"


def _ok(r: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """A case that ran (not missing, no error row)."""
    return r is not None and "error" not in r


def format_training(res: dict[str, list[dict[str, Any]]]) -> str:
    by = {(r["student"], r["tokens"], r["method"]): r for r in res["training"]}
    lines = ["| student | tokens | B x T | method | ms | peak GiB | step GiB | time / opd | peak / opd |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = ["", "ratios to opd (targets: vopd/opd <= 1.02, opd-full/opd <= 1.05):"]
    for student, tokens in sorted({k[:2] for k in by}, key=lambda k: (float(k[0][:-1]), k[1])):
        base = by.get((student, tokens, "opd"))
        base, parts = (base if _ok(base) else None), []
        for method in (m for m in METHODS if (student, tokens, m) in by):
            r = by[(student, tokens, method)]
            good = _ok(r)
            lines.append("| " + " | ".join([
                student, str(tokens), f"{r['batch']} x {r['completion_len']}", method, _cell_ms(r),
                f"{r['peak_mb'] / 1024:.2f}" if "peak_mb" in r else "-", f"{r['step_mb'] / 1024:.2f}" if good else "-",
                ratio(good and r["time_ms"], base and base["time_ms"]),
                ratio(good and r["peak_mb"], base and base["peak_mb"]),
            ]) + " |")
            if method in ("vopd", "opd-full"):
                rel = r["time_ms"] / base["time_ms"] if good and base else None
                parts.append(f"{method}/opd -" if rel is None else
                             f"{method}/opd {rel:.3f} ({'met' if rel <= TARGETS[method] else 'missed'})")
        summary.append(f"  {student} T={tokens}: " + ("; ".join(parts) or "-"))
    return "\n".join(lines + summary + format_head(res["head"]))


def format_head(head: list[dict[str, Any]]) -> list[str]:
    """Loss head alone: chunked vs naive peak memory above the inputs. A naive case that ran out of memory needs at
    least what it held when it failed plus the allocation that was refused, so its ratio is an upper bound."""
    if not head:
        return []
    lines = ["", f"loss head only, opd-full (target chunked/naive peak <= {TARGETS['head']}):",
             "| student | tokens | chunked ms | naive ms | chunked peak GiB | naive peak GiB | chunked / naive |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["student"], r["path"]): r for r in head}
    for student in dict.fromkeys(r["student"] for r in head):
        c, d = by.get((student, "chunked")), by.get((student, "dense"))
        chunked = c["peak_mb"] if _ok(c) else None
        naive = d["peak_mb"] if _ok(d) else None
        naive_cell, bound = ("-" if naive is None else f"{naive / 1024:.2f}"), ""
        if d is not None and d.get("oom"):
            naive, bound = d["peak_mb"] + (d.get("tried_mb") or 0.0), "<= "
            naive_cell = f"OOM (needs >= {naive / 1024:.1f})"
        cell = f"{bound}{chunked / naive:.3f}" if chunked and naive else "-"
        lines.append(f"| {student} | {(c or d or {}).get('tokens', '-')} | {_cell_ms(c)} | {_cell_ms(d)} | "
                     f"{'-' if chunked is None else f'{chunked / 1024:.2f}'} | {naive_cell} | {cell} |")
    return lines


def generation_results(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    common = _common(args, "generation")
    out = []
    runs = [("hf", cache) for cache in args.caches if "hf" in args.engines]
    runs += [("vllm", "-")] if "vllm" in args.engines else []
    for batch in _opt(args, "batch_sizes"):
        for engine, cache in runs:
            case = dict(common, kind="generation", student=args.student, batch=batch, cache=cache, engine=engine,
                        new_tokens=_opt(args, "new_tokens"), prompt_len=_opt(args, "gen_prompt_len"))
            out.append(_run_case(case))
            _print_case(out[-1], f"{args.student} batch={batch} {engine} {cache}")
    return {"generation": out}


def format_generation(res: dict[str, list[dict[str, Any]]]) -> str:
    by = {(r["batch"], r.get("engine", "hf"), r["cache"]): r for r in res["generation"]}
    lines = ["| batch | prompt | new tokens | engine | cache | tokens/s | ms per call | first call s | peak GiB | "
             "weight sync ms | tokens/s vs hf dynamic |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["generation"]:
        good, dyn = _ok(r), by.get((r["batch"], "hf", "dynamic"))
        lines.append("| " + " | ".join([
            str(r["batch"]), str(r["prompt_len"]), str(r["new_tokens"]), r.get("engine", "hf"), r["cache"],
            f"{r['tokens_per_s']:.0f}" if good else _cell_ms(r), _cell_ms(r),
            f"{r['first_call_s']:.1f}" if good else "-",
            f"{r['peak_mb'] / 1024:.2f}" if "peak_mb" in r else "-",
            f"{r['sync_ms']:.1f}" if good and "sync_ms" in r else "-",
            ratio(good and r["tokens_per_s"], dyn["tokens_per_s"] if _ok(dyn) else None),
        ]) + " |")
    return "\n".join(lines)


def _finish(args: argparse.Namespace, res: dict[str, Any], header: str, table: str) -> int:
    if any(r["device"] == "cpu" for rows in res.values() for r in rows):
        header += " (memory columns: process RSS, indicative only)"
    print(f"{header} repeats={args.repeats} (median) warmup={args.warmup}\n{table}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def run_training_bench(args: argparse.Namespace) -> int:
    res = training_results(args)
    return _finish(args, res, f"vopd bench training: shapes={args.shapes} teacher={TEACHER} V={VOCAB[args.shapes]} "
                   f"bf16 trainable={args.trainable} optimizer={args.optimizer} budget_mb={args.budget_mb} "
                   f"device={res['training'][0]['device']}", format_training(res))


def run_generation_bench(args: argparse.Namespace) -> int:
    res = generation_results(args)
    return _finish(args, res, f"vopd bench generation: shapes={args.shapes} student={args.student} (bf16 on CUDA, fp32 on the CPU), sampling at "
                   f"temperature 1, fixed lengths, device={res['generation'][0]['device']}", format_generation(res))


def add_bench_arguments(parser: argparse.ArgumentParser, what: str = "training") -> None:
    """Flags of `vopd bench training` (``what="training"``) or `vopd bench generation`."""
    parser.add_argument("--shapes", choices=["real", "tiny", "cpu"], default="real",
                        help="real: Qwen3 1.7B/4B students, 8B teacher (needs CUDA); tiny: CPU smoke test; cpu "
                        "(generation): the tiny world's student ('world') and a 512x8 model with V=32k ('wide')")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    parser.add_argument("--json", help="also write the raw results here")
    if what == "generation":
        parser.add_argument("--student", choices=["1.7b", "4b", "world", "wide"], default="1.7b",
                            help="1.7b/4b with --shapes real or tiny; world/wide with --shapes cpu")
        parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf"],
                            help="rollout engines to compare on the same model, prompts and lengths (vllm: the "
                            "colocated engine of rollout.engine=vllm, weight push included in each call)")
        parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 32 128 (tiny: 2)")
        parser.add_argument("--new-tokens", type=int, help="tokens generated per sequence (default 512; tiny 8)")
        parser.add_argument("--prompt-len", dest="gen_prompt_len", type=int,
                            help="random prompt tokens per sequence (default 256; tiny 8)")
        parser.add_argument("--caches", nargs="+", choices=["dynamic", "static", "static-eager"],
                            default=["dynamic", "static"],
                            help="static compiles the decode step on CUDA; static-eager is the static cache uncompiled")
        return
    parser.add_argument("--students", nargs="+", choices=["1.7b", "4b"], default=["1.7b", "4b"])
    parser.add_argument("--tokens", type=int, nargs="+", help="completion tokens per step (default 2048 4096 8192 "
                        "16384; tiny 64), as B sequences of --completion-len")
    parser.add_argument("--completion-len", type=int, help="completion tokens per sequence (default 2048; tiny 32)")
    parser.add_argument("--prompt-len", type=int, help="masked prompt tokens per sequence (default 256; tiny 8)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: the five methods of the paper")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--budget-mb", type=float, default=1024, help="chunked loss head budget per chunk (MiB)")
    parser.add_argument("--trainable", choices=["lora", "full"], default="lora",
                        help="LoRA r=64 on all projections (authors' setup) or every student weight")
    parser.add_argument("--optimizer", choices=["none", "adamw"], default="none",
                        help="none: the step is forward+backward; adamw: plus an AdamW step on the trainable set")
    parser.add_argument("--skip-head", action="store_true", help="skip the loss-head-only chunked vs naive cases")


def main(argv: list[str] | None = None) -> int:
    """`python -m vopd.tools.bench.training {training,generation} ...` (the same as `vopd bench ...`)."""
    parser = argparse.ArgumentParser(prog="python -m vopd.tools.bench.training")
    sub = parser.add_subparsers(dest="what", required=True)
    for what in ("training", "generation"):
        add_bench_arguments(sub.add_parser(what), what)
    args = parser.parse_args(argv)
    try:
        return (run_training_bench if args.what == "training" else run_generation_bench)(args)
    except UserError as exc:
        print(f"vopd bench {args.what}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
