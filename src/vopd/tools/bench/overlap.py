"""`vopd bench teacher-overlap`: a training step's gradient with a teacher server, scoring overlapped or inline.

What it knows: serving a teacher with a real ``vopd serve-teacher`` process on loopback (a given model directory, or
a tiny random pair built here), one fixed batch of rollouts, and timing ``vopd.step.accumulate_gradients`` with
the teacher in this process and behind the server with ``model.teacher_overlap`` on and off, interleaved in a shuffled order over repeats (medians reported), checking that
both give bit-identical gradients. Every number it prints is measured in this run. What it does not know: the loss
math, sampling or the optimizer step (the step's gradient is where scoring and the student overlap).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vopd.errors import UserError


def add_overlap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher model directory (default: a tiny random pair built here)")
    p.add_argument("--student", default=None, help="student model directory (same tokenizer; with --teacher)")
    p.add_argument("--method", default="opd", help="loss.method (a method the server can serve; default opd)")
    p.add_argument("--teacher-head", default="", help="model.teacher_head: the server then sends hidden states")
    p.add_argument("--batch", type=int, default=8, help="sequences in the step (default 8)")
    p.add_argument("--micro", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (default 1)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process (default 1)")


def _tiny_pair(root: Path) -> tuple[Path, Path]:
    """A tiny random teacher (4 layers, width 256) and student (2 layers, width 128) sharing one tokenizer."""
    from vopd.world.tiny_models import ModelShape, make_model, train_tokenizer

    texts = [f"{a} + {b} = {a + b}. " * 3 for a in range(60) for b in range(0, 60, 7)]
    tok = train_tokenizer(texts, vocab_size=512)
    paths = []
    for name, shape, seed in (("teacher", ModelShape(hidden_size=256, num_layers=4, intermediate_size=768,
                                                     num_heads=8, num_kv_heads=4, max_positions=512), 1),
                              ("student", ModelShape(hidden_size=128, num_layers=2, intermediate_size=384,
                                                     max_positions=512), 2)):
        model = make_model(shape, tok, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def _serve(teacher: Path, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("VOPD_TEACHER_TOKEN", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vopd", "serve-teacher", str(teacher), "--port", str(port),
                                 "--device", "cpu"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the teacher server exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise UserError(f"the teacher server did not answer within 120 s; see {log}")


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
        teacher_dir, student_dir = (Path(args.teacher), Path(args.student)) if args.teacher else _tiny_pair(root)
        proc, url = _serve(teacher_dir, args.server_threads, root / "server.log")
        try:
            tok = load_tokenizer(str(student_dir))
            student = load_model(str(student_dir), role="student", dtype=torch.float32, device=cpu)
            overrides = [f"model.student={student_dir}", f"model.teacher={url}", f"loss.method={args.method}",
                         f"batch_size={args.batch}", f"micro_batch_size={args.micro}", "grad_noise=false",
                         "loss.ratio_cap=0", *([f"model.teacher_head={args.teacher_head}"] if args.teacher_head
                                               else [])]
            cfgs = {mode: load_config(None, [*overrides, f"model.teacher_overlap={mode == 'overlap'}"],
                                      require_paths=False) for mode in ("overlap", "inline")}
            in_process = [o for o in overrides if not o.startswith("model.teacher_head=")]
            cfgs["in-process"] = load_config(None, [*in_process, f"model.teacher={teacher_dir}"], require_paths=False)
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
            engine = dist.wrap(student, vocab, "ddp", cpu)  # one process: the model itself
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
                        accumulate_gradients(cfgs[mode], engine, local if mode == "in-process" else teachers,
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
    print(f"# vopd bench teacher-overlap: {args.method}, {args.batch} sequences x ({args.prompt_len} prompt + "
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
