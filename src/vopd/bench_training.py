"""`vopd bench training` and `vopd bench generation`: the training-side step and sampling throughput at real shapes.

What it knows: how to build random-initialised ``Qwen3ForCausalLM`` models from configs written here (Qwen3-1.7B and
-4B students, Qwen3-8B teacher, V = 151,936, bf16 weights; and a ``tiny`` set for CPU smoke tests), and how to time
one training-side step the way the trainer runs it: teacher ``last_hidden`` without grad, student ``last_hidden``
with gradient checkpointing (LoRA or all weights trainable), ``chunked_distillation_loss`` on the completion
positions, backward, optionally an AdamW step. Median of repeats after warm-up, peak memory from
``torch.cuda.max_memory_allocated`` (CPU: peak RSS, indicative only). Every case runs in a fresh process, so each
memory number is clean and an out-of-memory case becomes "OOM" in the table instead of ending the run. It also
measures the loss head alone (chunked ``opd-full`` vs naive dense logits, via ``vopd.bench``'s worker) and
``model.generate`` tokens/s with a static vs a dynamic KV cache.

What it does not know: real weights (random weights give the same FLOPs and memory, not meaningful text), rollouts
from a real sampler (vLLM), multi-GPU, or what any number will be: nothing here is a constant, all are measured.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from vopd.bench import METHOD_ORDER, _ratio, _rss_mb
from vopd.bench import _worker as _head_case  # the loss head alone from random hidden states, dense or chunked
from vopd.errors import UserError

_QWEN3 = dict(head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
              rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


def _tiny(hidden: int, layers: int, tie: bool) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=hidden // 4, intermediate_size=2 * hidden, tie_word_embeddings=tie)


#: Shapes of the public Qwen3 configs (random weights); "tiny" keeps the same structure at CPU-test size.
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "real": {
        "1.7b": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     intermediate_size=6144, tie_word_embeddings=True),
        "4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=9728, tie_word_embeddings=True),
        "8b": dict(_QWEN3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=12288, tie_word_embeddings=False),
    },
    "tiny": {"1.7b": _tiny(32, 2, True), "4b": _tiny(48, 2, True), "8b": _tiny(64, 3, False)},
}
TEACHER = "8b"
VOCAB = {"real": 151_936, "tiny": 1024}
# Defaults per shape set: completion tokens per step, completion/prompt length per sequence (the authors' setup:
# completions <= 2048 tokens), and generation batch sizes / lengths.
DEFAULTS: dict[str, dict[str, Any]] = {
    "real": dict(tokens=[2048, 4096, 8192, 16384], completion_len=2048, prompt_len=256,
                 batch_sizes=[32, 128], new_tokens=512, gen_prompt_len=256),
    "tiny": dict(tokens=[64], completion_len=32, prompt_len=8, batch_sizes=[2], new_tokens=8, gen_prompt_len=8),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"vopd": 1.02, "opd-full": 1.05, "head": 0.10}


# ---------------------------------------------------------------- worker side (one case per fresh process)

def _build(size: dict[str, Any], vocab: int, device: Any, dtype: Any, *, use_cache: bool) -> Any:
    """A random-initialised Qwen3 model built directly on ``device`` (an 8B model never passes through CPU RAM)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, use_cache=use_cache, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None, **size)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")


def _memory(dev: Any) -> tuple[float, float]:
    """(peak, current) in MiB: CUDA allocator statistics, else process RSS (peak since the process started)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20, torch.cuda.memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb()


def _timed(fn: Any, dev: Any, warmup: int, repeats: int) -> tuple[list[float], float, float]:
    """Warm-up calls, then ``repeats`` timed calls; returns (seconds each, peak MiB, resident MiB before)."""
    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = _memory(dev)[1]
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, _memory(dev)[0], base


def _train_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vopd.chunked import chunked_distillation_loss
    from vopd.models import apply_lora, enable_gradient_checkpointing, last_hidden, output_layer

    torch.manual_seed(0)
    dev, dtype = torch.device(case["device"]), torch.bfloat16
    shapes, vocab = SHAPES[case["shapes"]], VOCAB[case["shapes"]]
    teacher = _build(shapes[TEACHER], vocab, dev, dtype, use_cache=False).eval().requires_grad_(False)
    student = _build(shapes[case["student"]], vocab, dev, dtype, use_cache=False)
    if case["trainable"] == "lora":  # the authors' setup: r=64, alpha=128 on every linear projection
        student = apply_lora(student, r=64, alpha=128, dropout=0.0, target_modules=LORA_TARGETS)
    enable_gradient_checkpointing(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0) if case["optimizer"] == "adamw" else None

    b, p_len, c_len = case["batch"], case["prompt_len"], case["completion_len"]
    ids = torch.randint(0, vocab, (b, p_len + c_len), device=dev)
    attention = torch.ones_like(ids)
    targets = ids[:, 1:]
    # Hidden state j predicts token j+1: the completion tokens p_len.. are predicted from positions p_len-1..
    mask = (torch.arange(p_len + c_len - 1, device=dev) >= p_len - 1).expand(b, -1)
    wt, bt = output_layer(teacher, vocab)

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.no_grad():
            ht = last_hidden(teacher, ids, attention)[:, :-1]
        hs = last_hidden(student, ids, attention)[:, :-1]
        ws, bs = output_layer(student, vocab)
        out = chunked_distillation_loss(hs, ws, ht, wt, targets, mask, method=case["method"], top_k=case["top_k"],
                                        student_bias=bs, teacher_bias=bt, memory_budget_mb=case["budget_mb"])
        out.loss.backward()
        if opt is not None:
            opt.step()

    times, peak, base = _timed(step, dev, case["warmup"], case["repeats"])
    return {"time_ms": 1000 * statistics.median(times), "peak_mb": peak, "step_mb": max(peak - base, 0.0),
            "trainable_params": sum(p.numel() for p in params)}


def _generation_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(0)
    dev = torch.device(case["device"])
    model = _build(SHAPES[case["shapes"]][case["student"]], VOCAB[case["shapes"]], dev, torch.bfloat16,
                   use_cache=True).eval()
    b, n_new = case["batch"], case["new_tokens"]
    ids = torch.randint(1, VOCAB[case["shapes"]], (b, case["prompt_len"]), device=dev)
    cache = case["cache"]
    # Every setting written out (as vopd.sampling does): temperature-1 sampling, no top-k/top-p, and no EOS, so
    # every row generates exactly n_new tokens. "static" lets transformers compile the decode step on CUDA;
    # "static-eager" is the same cache with compilation off, to separate the two effects.
    gen = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, num_beams=1, pad_token_id=0, eos_token_id=None,
                           cache_implementation=None if cache == "dynamic" else "static",
                           disable_compile=cache != "static")
    model.generation_config = GenerationConfig()  # nothing filled in from the model's own defaults
    lengths: list[int] = []

    def call() -> None:
        with torch.no_grad():
            lengths.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          generation_config=gen).shape[1])

    t0 = time.perf_counter()
    call()  # the first call pays for compilation (static on CUDA) and allocator growth; reported, not timed
    first = time.perf_counter() - t0
    times, peak, _base = _timed(call, dev, max(case["warmup"] - 1, 0), case["repeats"])
    if set(lengths) != {case["prompt_len"] + n_new}:
        raise RuntimeError(f"generate returned lengths {sorted(set(lengths))}, expected {case['prompt_len'] + n_new}")
    med = statistics.median(times)
    return {"time_ms": 1000 * med, "tokens_per_s": b * n_new / med, "peak_mb": peak, "first_call_s": first}


def _worker(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case; an out-of-memory error becomes a result with what the allocator had and wanted."""
    import torch

    run = {"train": _train_case, "generation": _generation_case, "head": _head_case}[case["kind"]]
    if case["shapes"] == "tiny" and case["device"] == "cpu":
        torch.set_num_threads(1)  # tiny matmuls gain nothing from threads, and idle-spinning ones add noise
    try:
        return {**case, **run(case)}
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        msg = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in msg:  # CPU allocator
            raise
        tried = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB)", msg)
        tried_mb = None if tried is None else float(tried.group(1)) * (1024 if tried.group(2) == "GiB" else 1)
        peak = _memory(torch.device(case["device"]))[0]
        if case["kind"] == "head":  # vopd.bench reports the head's memory above its inputs; do the same here
            n, v, dims = case["tokens"], case["vocab"], case["hidden"] + case["teacher_hidden"]
            peak -= ((n + v) * dims * 2 + n * 9) / 2**20  # bf16 hidden states and weights, int64 ids, bool mask
        return {**case, "oom": True, "peak_mb": max(peak, 0.0), "tried_mb": tried_mb,
                "error": msg.splitlines()[0][:300]}


# ---------------------------------------------------------------- driver side

def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "vopd.bench_training", "--worker", json.dumps(case)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    # A crash (host OOM kill, CUDA error) is one failed row, not a lost run of forty cases.
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    print(f"  case failed (exit {proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
    return {**case, "error": tail[:300]}


def _device(args: argparse.Namespace, what: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if cuda else "cpu")
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
    methods = args.methods or list(METHOD_ORDER[:5])
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


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "error" not in r


def format_training(res: dict[str, list[dict[str, Any]]]) -> str:
    by = {(r["student"], r["tokens"], r["method"]): r for r in res["training"]}
    lines = ["| student | tokens | B x T | method | ms | peak GiB | step GiB | time / opd | peak / opd |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = ["", "ratios to opd (targets: vopd/opd <= 1.02, opd-full/opd <= 1.05):"]
    for student, tokens in sorted({k[:2] for k in by}, key=lambda k: (float(k[0][:-1]), k[1])):
        base = by.get((student, tokens, "opd"))
        base, parts = (base if _ok(base) else None), []
        for method in (m for m in METHOD_ORDER if (student, tokens, m) in by):
            r = by[(student, tokens, method)]
            good = _ok(r)
            lines.append("| " + " | ".join([
                student, str(tokens), f"{r['batch']} x {r['completion_len']}", method, _cell_ms(r),
                f"{r['peak_mb'] / 1024:.2f}" if "peak_mb" in r else "-", f"{r['step_mb'] / 1024:.2f}" if good else "-",
                _ratio(good and r["time_ms"], base and base["time_ms"]),
                _ratio(good and r["peak_mb"], base and base["peak_mb"]),
            ]) + " |")
            if method in ("vopd", "opd-full"):
                ratio = r["time_ms"] / base["time_ms"] if good and base else None
                parts.append(f"{method}/opd -" if ratio is None else
                             f"{method}/opd {ratio:.3f} ({'met' if ratio <= TARGETS[method] else 'missed'})")
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
        ratio = f"{bound}{chunked / naive:.3f}" if chunked and naive else "-"
        lines.append(f"| {student} | {(c or d or {}).get('tokens', '-')} | {_cell_ms(c)} | {_cell_ms(d)} | "
                     f"{'-' if chunked is None else f'{chunked / 1024:.2f}'} | {naive_cell} | {ratio} |")
    return lines


def generation_results(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    common = _common(args, "generation")
    out = []
    for batch in _opt(args, "batch_sizes"):
        for cache in args.caches:
            case = dict(common, kind="generation", student=args.student, batch=batch, cache=cache,
                        new_tokens=_opt(args, "new_tokens"), prompt_len=_opt(args, "gen_prompt_len"))
            out.append(_run_case(case))
            _print_case(out[-1], f"{args.student} batch={batch} {cache}")
    return {"generation": out}


def format_generation(res: dict[str, list[dict[str, Any]]]) -> str:
    by = {(r["batch"], r["cache"]): r for r in res["generation"]}
    lines = ["| batch | prompt | new tokens | cache | tokens/s | ms per call | first call s | peak GiB | "
             "tokens/s vs dynamic |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["generation"]:
        good, dyn = _ok(r), by.get((r["batch"], "dynamic"))
        lines.append("| " + " | ".join([
            str(r["batch"]), str(r["prompt_len"]), str(r["new_tokens"]), r["cache"],
            f"{r['tokens_per_s']:.0f}" if good else _cell_ms(r), _cell_ms(r),
            f"{r['first_call_s']:.1f}" if good else "-",
            f"{r['peak_mb'] / 1024:.2f}" if "peak_mb" in r else "-",
            _ratio(good and r["tokens_per_s"], _ok(dyn) and dyn["tokens_per_s"]),
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
    return _finish(args, res, f"vopd bench generation: shapes={args.shapes} student={args.student} bf16, sampling at "
                   f"temperature 1, fixed lengths, device={res['generation'][0]['device']}", format_generation(res))


def add_bench_arguments(parser: argparse.ArgumentParser, what: str = "training") -> None:
    """Flags of `vopd bench training` (``what="training"``) or `vopd bench generation`."""
    parser.add_argument("--shapes", choices=["real", "tiny"], default="real",
                        help="real: Qwen3 1.7B/4B students, 8B teacher (needs CUDA); tiny: CPU smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    parser.add_argument("--json", help="also write the raw results here")
    if what == "generation":
        parser.add_argument("--student", choices=["1.7b", "4b"], default="1.7b")
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
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, help="default: the five methods of the paper")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--budget-mb", type=float, default=1024, help="chunked loss head budget per chunk (MiB)")
    parser.add_argument("--trainable", choices=["lora", "full"], default="lora",
                        help="LoRA r=64 on all projections (authors' setup) or every student weight")
    parser.add_argument("--optimizer", choices=["none", "adamw"], default="none",
                        help="none: the step is forward+backward; adamw: plus an AdamW step on the trainable set")
    parser.add_argument("--skip-head", action="store_true", help="skip the loss-head-only chunked vs naive cases")


def main(argv: list[str] | None = None) -> int:
    """`python -m vopd.bench_training {training,generation} ...` (the same as `vopd bench ...`)."""
    parser = argparse.ArgumentParser(prog="python -m vopd.bench_training")
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
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
