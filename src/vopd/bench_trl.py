"""`vopd bench trl`: vopd's trainer side by side with Hugging Face TRL's on-policy distillation trainer.

What it knows: how to run both trainers on the same tiny teacher and student (the cached tiny world unless paths are
given), the same prompts in the same order, batch size and completion length, temperature-1 sampling without
top-k/top-p, AdamW with the same learning rate, constant schedule and gradient clip 1.0, fp32 on the CPU, the same
torch thread count. TRL's side is ``trl.DistillationTrainer`` with ``beta=1.0`` (reverse KL(student || teacher) in
its generalized-JSD convention; it always trains on completions the student has just sampled, GKD's ``lmbda=1``), run
by ``Trainer.train``; vopd's side is ``vopd.train.train`` with ``loss.method=opd-full`` (the same exact gradient) and
``vopd``. A step is timed from the start of one optimizer step to the start of the next, generation included for both;
every completion has exactly ``--max-new-tokens`` tokens (TRL: ``min_new_tokens``; vopd: its sampler with EOS
ignored), so both do the same work. Memory is measured in separate processes, on one step after warm-up: the peak
RSS above the step's start, and the peak of torch CPU tensor bytes allocated above those live at the start (torch
profiler allocation events). Every case runs in a fresh process; implementations alternate in rotated order every
round; medians over rounds x steps. It also cross-checks, on one fixed batch, vopd's ``opd-full`` loss against TRL's
(the trainer's ``compute_loss`` and GKD's ``generalized_jsd_loss``), values and gradients.

What it does not know: GPUs, vLLM, LoRA, or any number in advance. Two hooks are this file's: a callback and a wrapper
around TRL's generation call on TRL's side, and on vopd's side a sampler factory handed to ``train(make_sampler=...)``
(fixed-length sampling needs a sampler that ignores EOS).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from vopd.bench import _ratio
from vopd.errors import UserError

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

class _StepClock:
    """Called at the start of every optimizer step. mode "time": steps [warmup, warmup+repeats) are timed. mode
    "memory": step ``warmup`` is measured by its resident memory, step ``warmup+1`` by torch's allocation events
    under the profiler (which slows it down, so nothing is timed in this mode)."""

    def __init__(self, mode: str, warmup: int, repeats: int) -> None:
        self.mode, self.warmup, self.repeats = mode, warmup, repeats
        self.steps = warmup + (repeats + 1 if mode == "time" else 3)  # one more start closes the last measured step
        self.starts: list[float] = []
        self.gen_s: list[float] = []
        self.prof: Any = None
        self.out: dict[str, Any] = {}

    def mark(self) -> None:
        import torch

        self.starts.append(time.perf_counter())
        k = len(self.starts) - 1 - self.warmup
        if k == 0:
            self.out["threads"] = torch.get_num_threads()  # what the trainer really ran with
        if self.mode != "memory":
            return
        if k == 0:
            self.out["rss_start_mb"] = _vm("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS: the next reading is this step's peak
        elif k == 1:
            self.out["rss_step_mb"] = _vm("VmHWM") - self.out["rss_start_mb"]
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.start()
        elif k == 2:
            self.prof.stop()
            self.out["tensor_peak_mb"] = _tensor_peak_mb(self.prof)

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a step's generation call) with its duration recorded."""
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.gen_s.append(time.perf_counter() - t0)
            return out
        return wrapper

    def result(self) -> dict[str, Any]:
        if len(self.starts) != self.steps:
            raise RuntimeError(f"{len(self.starts)} step starts seen, expected {self.steps}")
        if self.mode == "memory":  # plus the whole process's peak RSS (imports, models, everything)
            return {**self.out, "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        w, n = self.warmup, self.repeats
        return {**self.out, "step_ms": [1000 * (self.starts[i + 1] - self.starts[i]) for i in range(w, w + n)],
                "gen_ms": [1000 * g for g in self.gen_s[w:w + n]]}


def _vm(key: str) -> float:
    """A line of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _tensor_peak_mb(prof: Any) -> float:
    """Peak of the running sum of CPU allocation events (frees count negative): the most torch tensor memory live at
    once during the window above what was live when it opened. Allocated bytes, touched or not."""
    import torch

    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    running = itertools.accumulate(e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()))
    return max(0, max(running, default=0)) / 2**20


def _prompt_texts(data: str, n: int) -> list[str]:
    """The first ``n`` problems of ``data``, formatted as vopd's trainer formats them (no chat template)."""
    from vopd.data import format_prompt, read_rows

    rows = [row for _, row in read_rows(data)][:n]
    if len(rows) < n:
        raise UserError(f"{data} has {len(rows)} problems; this benchmark needs {n}")
    return [format_prompt(r["problem"]) for r in rows]


def _exactly(n: int, out: Any, completions: Callable[[Any], list[list[int]]]) -> Any:
    """``out`` once every completion in it is known to have ``n`` tokens: both sides must do the same work."""
    lengths = {len(c) for c in completions(out)}
    if lengths != {n}:
        raise RuntimeError(f"completion lengths {sorted(lengths)}, expected exactly {n}")
    return out


def _fixed_length_sampler(clock: _StepClock, length: int) -> Callable[[Any, Any, dict[str, Any]], Any]:
    """``train(make_sampler=...)``: vopd's own Hugging Face sampler with EOS ignored, and the clock at the start of
    each step."""
    from vopd.rollout import hf_sampler

    def factory(model: Any, tok: Any, settings: dict[str, Any]) -> Callable[[list[list[int]]], Any]:
        # generate() reads these three ids; without an EOS id every completion runs to max_new_tokens
        view = SimpleNamespace(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=None)
        sample = clock.timed(hf_sampler(model, view, **settings))

        def step_start(prompts: list[list[int]]) -> Any:
            clock.mark()  # train() calls the sampler first thing in every step
            return _exactly(length, sample(prompts), lambda out: out.completions)
        return step_start

    return factory


def _vopd_case(case: dict[str, Any], clock: _StepClock, tmp: Path) -> None:
    from vopd.config import load_config
    from vopd.train import train

    b = case["batch_size"]
    overrides = [
        f"model.student={case['student']}", f"model.teacher={case['teacher']}", f"data.train={case['data']}",
        f"loss.method={case['impl']}", f"output_dir={tmp / 'run'}", f"steps={case['steps']}", f"batch_size={b}",
        f"micro_batch_size={b}", f"rollout.max_new_tokens={case['max_new_tokens']}", f"rollout.batch_size={b}",
        f"optim.lr={case['lr']}", "optim.schedule=constant", "optim.grad_clip=1.0", "optim.weight_decay=0.0",
        "data.shuffle=false", "progress=false", f"seed={case['seed']}", "model.device=cpu", "model.dtype=float32",
        "model.teacher_dtype=float32", "model.gradient_checkpointing=false",
    ]
    overrides.append("grad_noise=false")  # an optional diagnostic costing an extra micro-batch; TRL has none
    train(load_config(None, overrides + list(case["overrides"])), log=lambda _msg: None,
          make_sampler=_fixed_length_sampler(clock, case["max_new_tokens"]))


def _trl_args(case: dict[str, Any], out: Path, steps: int) -> Any:
    from trl import DistillationConfig

    n = case["max_new_tokens"]
    fields = {f.name for f in dataclasses.fields(DistillationConfig)}  # transformers 5 renamed the option
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in fields else
                        "gradient_checkpointing": False}  # TRL's default is on; vopd's (and the bench's) off
    return DistillationConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=case["batch_size"], gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=case["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, seed=case["seed"], beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=n, generation_kwargs={"min_new_tokens": n}, bf16=False, fp16=False,
        use_cpu=True, shuffle_dataset=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, **no_checkpointing)


def _load_pair(case: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch

    from vopd.models import load_model, load_tokenizer

    load = lambda role: load_model(case[role], role=role, dtype=torch.float32, device=torch.device("cpu"))  # noqa: E731
    tok = load_tokenizer(case["student"])
    tok.padding_side = "left"  # TRL requires it for prompts; vopd pads its own batches
    return tok, load("student"), load("teacher")


def _trl_case(case: dict[str, Any], clock: _StepClock, tmp: Path) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationTrainer

    tok, student, teacher = _load_pair(case)
    prompts = _prompt_texts(case["data"], case["batch_size"] * case["steps"])

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.mark()  # Trainer fetched the batch just before; generation happens inside the step

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_trl_args(case, tmp, case["steps"]),
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                                  processing_class=tok, callbacks=[Clock()])
    generate = clock.timed(trainer._generate_single_turn)
    # An instance attribute: TRL's own generation call, timed and its lengths checked.
    trainer._generate_single_turn = lambda *a, **kw: _exactly(case["max_new_tokens"], generate(*a, **kw), list)
    trainer.train()


def crosscheck(case: dict[str, Any]) -> dict[str, Any]:
    """vopd ``opd-full`` vs TRL's reverse KL on one fixed batch of the student's own samples (natural lengths: EOS
    ends a completion, shorter rows are padded). Convention on every side: the per-token KL(student || teacher) at
    every completion position (EOS included), averaged over all completion tokens of the batch."""
    import torch
    from datasets import Dataset
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer

    from vopd.chunked import chunked_distillation_loss
    from vopd.data import encode_prompt
    from vopd.models import last_hidden, output_layer
    from vopd.rollout import pack
    from vopd.sampling import generate
    from vopd.teacher import InProcessTeacher

    tok, student, teacher = _load_pair(case)
    vocab, pad = len(tok), tok.pad_token_id
    prompts = [encode_prompt(tok, p) for p in _prompt_texts(case["data"], case["batch_size"])]
    torch.manual_seed(case["seed"])
    r = pack(prompts, generate(student, tok, prompts, max_new_tokens=case["max_new_tokens"]), pad)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    scores = InProcessTeacher(teacher, vocab).score(r, torch.device("cpu"))
    weight, bias = output_layer(student, vocab)
    ours = chunked_distillation_loss(last_hidden(student, r.input_ids, r.attention_mask)[:, :-1], weight,
                                     scores.hidden, scores.weight, r.targets, r.completion_mask, method="opd-full",
                                     student_bias=bias, teacher_bias=scores.bias).loss

    # TRL's layout: prompts left-padded, completions right-padded, completion_mask 1 up to and including EOS.
    p_w, c_w = max(r.prompt_lengths), max(r.completion_lengths)
    inputs = {k: torch.full((r.size, w), fill, dtype=torch.long) for k, w, fill in (
        ("prompt_ids", p_w, pad), ("prompt_mask", p_w, 0), ("completion_ids", c_w, pad), ("completion_mask", c_w, 0))}
    for i, (pl, cl) in enumerate(zip(r.prompt_lengths, r.completion_lengths)):
        inputs["prompt_ids"][i, p_w - pl:], inputs["prompt_mask"][i, p_w - pl:] = r.input_ids[i, :pl], 1
        inputs["completion_ids"][i, :cl], inputs["completion_mask"][i, :cl] = r.input_ids[i, pl:pl + cl], 1
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    with tempfile.TemporaryDirectory() as out:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_trl_args(case, Path(out), 1),
                                      train_dataset=Dataset.from_list([{"prompt": "x"}]), processing_class=tok)
        trl = trainer.compute_loss(trainer.model, inputs)

    # GKD's dense loss: full logits of both models, -100 labels off the completion tokens, beta=1, batchmean.
    logits = student(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1, :vocab]
    with torch.no_grad():
        t_logits = teacher(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1, :vocab]
    gkd = GKDTrainer.generalized_jsd_loss(logits, t_logits, labels=r.targets.masked_fill(~r.completion_mask, -100),
                                          beta=1.0, temperature=1.0, reduction="batchmean")

    g_ours = torch.autograd.grad(ours, params)
    scale = max(float(g.abs().max()) for g in g_ours)
    res = {"tokens": r.num_tokens, "sequences": r.size, "min_len": min(r.completion_lengths),
           "max_len": max(r.completion_lengths), "opd_full": float(ours.detach())}
    for name, loss in (("trl", trl), ("gkd", gkd)):  # value, and max |gradient difference| / max |gradient|
        diff = max(float((a - b).abs().max()) for a, b in zip(g_ours, torch.autograd.grad(loss, params)))
        res.update({name: float(loss.detach()), f"grad_rel_diff_{name}": diff / scale})
    return res


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """One case, meant to run in a fresh process (``--in-process`` runs it in the caller's)."""
    import torch

    from vopd.data import read_rows

    torch.set_num_threads(case["threads"])  # the same count on both sides, set before any model exists
    if case["impl"] == "crosscheck":
        return {**case, **crosscheck(case)}
    clock = _StepClock(case["mode"], case["warmup"], case["repeats"])
    with tempfile.TemporaryDirectory(prefix="vopd-bench-trl-") as tmp:
        # The same prompts for both: the first batch_size x steps problems, in order, in a file of their own.
        subset = Path(tmp) / "prompts.jsonl"
        rows = [row for _, row in read_rows(case["data"])][:case["batch_size"] * clock.steps]
        subset.write_text("".join(json.dumps(row) + "\n" for row in rows))
        case = {**case, "data": str(subset), "steps": clock.steps}
        (_trl_case if case["impl"] == "trl" else _vopd_case)(case, clock, Path(tmp))
    return {**case, **clock.result()}


# ---------------------------------------------------------------- driver side

def _run(case: dict[str, Any], in_process: bool) -> dict[str, Any]:
    if in_process:
        return worker(case)
    env = dict(os.environ)
    if case["mode"] == "memory":
        # glibc then hands every freed block of 64 KiB or more back to the OS (by default its threshold grows and
        # freed memory stays resident), so the resident set follows live memory. Timing runs keep the defaults.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, "-m", "vopd.bench_trl", "--worker", json.dumps(case)],
                          capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark case {case['impl']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _paths(args: argparse.Namespace) -> dict[str, str]:
    given = [args.student, args.teacher, args.data]
    if all(given):
        return {"student": args.student, "teacher": args.teacher, "data": args.data}
    if any(given):
        raise UserError("--student, --teacher and --data go together (or none: the tiny world)")
    from vopd.world import build_world

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
        ratios = [_ratio(m.get(k), trl.get(k)) for k in ("step_ms", "rest_ms", "rss_step_mb", "tensor_peak_mb")]
        lines.append("| " + " | ".join([name, *cells, *ratios]) + " |")
    threads = {t for m in summ.values() for t in m["threads"]}
    if threads != {s["threads"]}:
        lines.append(f"warning: torch ran with {sorted(threads)} threads, not {s['threads']}")
    c = res.get("crosscheck")
    if c:
        lines += ["", f"loss cross-check on one fixed batch ({c['sequences']} sampled sequences, completion lengths "
                  f"{c['min_len']}-{c['max_len']}, {c['tokens']} completion tokens; token-mean reverse "
                  "KL(student || teacher)):", f"  vopd opd-full (chunked)  {c['opd_full']:.8f}"]
        for key, name in (("trl", "TRL DistillationTrainer.compute_loss, beta=1"),
                          ("gkd", "TRL GKDTrainer.generalized_jsd_loss, beta=1, batchmean, -100 labels")):
            lines.append(f"  {name}  {c[key]:.8f}  |diff| {abs(c[key] - c['opd_full']):.1e}  "
                         f"max |grad diff| / max |grad| {c['grad_rel_diff_' + key]:.1e}")
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
