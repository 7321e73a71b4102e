"""`vopd bench teacher-overlap`: a training step's gradient with a teacher server, scoring overlapped or inline.

What it knows: serving a teacher with a real ``vopd serve-teacher`` process on loopback (a given model directory, or
a tiny random pair built here), one fixed batch of rollouts, and timing ``vopd.step.accumulate_gradients`` with
the teacher in this process and behind the server with ``model.teachers[].overlap`` on and off, interleaved in a shuffled order over repeats (medians reported), checking that
both give bit-identical gradients. Every number it prints is measured in this run. What it does not know: the loss
math, sampling or the optimizer step (the step's gradient is where scoring and the student overlap).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vopd.errors import UserError
from vopd.tools.bench.pair import serve_teacher, tiny_pair


def add_overlap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher model directory (default: a tiny random pair built here)")
    p.add_argument("--student", default=None, help="student model directory (same tokenizer; with --teacher)")
    p.add_argument("--method", default="opd", help="loss.method (a method the server can serve; default opd)")
    p.add_argument("--hidden", action="store_true", help="the server sends hidden states (the teacher's head = the "
                   "teacher directory): every method, e.g. --method vopd")
    p.add_argument("--batch", type=int, default=8, help="sequences in the step (default 8)")
    p.add_argument("--micro", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (default 1)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process (default 1)")


def run_overlap_bench(args: argparse.Namespace) -> int:
    from vopd import distributed as dist
    from vopd.config import load_config
    from vopd.metrics import PhaseTimer
    from vopd.models import load_model, load_tokenizer
    from vopd.rollout import pack
    from vopd.sampling import Samples
    from vopd.step import accumulate_gradients
    from vopd.teacher.routing import open_teachers

    if (args.teacher is None) != (args.student is None):
        raise UserError("give both --teacher and --student, or neither (a tiny random pair is built)")
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="vopd-overlap-") as tmp:
        root = Path(tmp)
        teacher_dir, student_dir = (Path(args.teacher), Path(args.student)) if args.teacher else tiny_pair(root)
        proc, url = serve_teacher(teacher_dir, args.server_threads, root / "server.log")
        try:
            tok = load_tokenizer(str(student_dir))
            student = load_model(str(student_dir), role="student", dtype=torch.float32, device=cpu)
            overrides = [f"model.student={student_dir}", f"loss.method={args.method}",
                         f"batch_size={args.batch}", f"micro_batch_size={args.micro}", "grad_noise=false",
                         "loss.ratio_cap=0"]
            head = f", head: {json.dumps(str(teacher_dir))}" if args.hidden else ""
            cfgs = {mode: load_config(None, [*overrides, f"model.teachers=[{{model: {json.dumps(url)}{head}, overlap: "
                                                         f"{str(mode == 'overlap').lower()}}}]"], require_paths=False)
                    for mode in ("overlap", "inline")}
            cfgs["in-process"] = load_config(None, [*overrides, f"model.teacher={teacher_dir}"], require_paths=False)
            teachers = open_teachers(cfgs["inline"], vocab_size=len(tok), device=cpu, student=student,
                                     student_tok=tok)
            local = open_teachers(cfgs["in-process"], vocab_size=len(tok), device=cpu, student=student,
                                  student_tok=tok)
            gen = torch.Generator().manual_seed(0)
            vocab = len(tok)
            prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
            comps = [torch.randint(3, vocab, (args.completion_len,), generator=gen).tolist() for _ in prompts]
            rollout = pack(prompts, Samples(comps, [[-1.0] * len(c) for c in comps], [False] * len(comps)),
                           tok.pad_token_id)
            wrapped = dist.wrap(student, vocab, "ddp", cpu)  # one process: the model itself
            times: dict[str, list[tuple[float, float]]] = {"overlap": [], "inline": [], "in-process": []}
            grads: dict[str, list[torch.Tensor]] = {}
            order = list(times)
            rng = random.Random(0)
            for rep in range(args.repeats + 1):
                rng.shuffle(order)
                for mode in order:
                    timer = PhaseTimer(cpu)
                    t0 = time.perf_counter()
                    with timer("student"):
                        accumulate_gradients(cfgs[mode], wrapped, local if mode == "in-process" else teachers,
                                             rollout, cpu, timer)
                    wall = time.perf_counter() - t0
                    if rep == 0:  # the warm-up round also gives the gradients compared below
                        grads[mode] = [p.grad.clone() for p in student.parameters() if p.grad is not None]
                    else:
                        times[mode].append((wall, timer.metrics().get("time_teacher", 0.0)))
                    student.zero_grad(set_to_none=True)
            teachers.close()
            local.close()
        finally:
            proc.terminate()
            proc.wait(30)
    same = len(grads["overlap"]) == len(grads["inline"]) and all(
        torch.equal(a, b) for a, b in zip(grads["overlap"], grads["inline"]))
    med = {m: (statistics.median(w for w, _ in t), statistics.median(s for _, s in t)) for m, t in times.items()}
    local_diff = max(float((a - b).abs().max()) for a, b in zip(grads["in-process"], grads["inline"]))
    tokens = rollout.num_tokens
    sends = "hidden states" if args.hidden else "numbers at ids"
    print(f"# vopd bench teacher-overlap: {args.method} (the server sends {sends}), {args.batch} sequences x ({args.prompt_len} prompt + "
          f"{args.completion_len} completion) tokens, micro-batches of {args.micro}, teacher server on loopback "
          f"({args.server_threads} thread(s)), trainer {args.threads} thread(s); medians of {args.repeats} repeats")
    print("| teacher | step gradient s | of which teacher s | tokens/s |")
    print("|---|---|---|---|")
    names = {"in-process": "in process", "inline": "server, scoring inline", "overlap": "server, scoring overlapped"}
    for mode, name in names.items():
        wall, wait = med[mode]
        print(f"| {name} | {wall:.3f} | {wait:.3f} | {tokens / wall:.0f} |")
    print(f"speedup (inline / overlap): {med['inline'][0] / med['overlap'][0]:.2f}x; gradients bit-identical: "
          f"{'yes' if same else 'NO'}; in process vs server: max gradient difference {local_diff:.1e}")
    return 0 if same else 1
