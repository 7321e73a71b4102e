"""`vopd bench teacher-overlap`: a training step's gradient with a teacher server, scoring overlapped or inline.

What it knows: serving a teacher with a real ``vopd serve-teacher`` process on loopback (a given model directory, or
a tiny random pair built here) and, with ``--stock-vllm``, a stock vLLM server of it beside (the pooling route with
the teacher's head for ``--hidden``, else the generate route), one fixed batch of rollouts, and timing
``vopd.step.accumulate_gradients`` with the teacher in this process and behind each server with
``model.teachers[].overlap`` on and off, interleaved in a shuffled order over repeats (medians reported), checking
that overlapped and inline scoring give bit-identical gradients on each server. Every number it prints is measured
in this run. What it does not know: the loss math, sampling or the optimizer step (the step's gradient is where
scoring and the student overlap).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vopd.errors import UserError
from vopd.tools.bench.common import ratio
from vopd.tools.bench.pair import random_rollout, serve_teacher, tiny_pair
from vopd.tools.bench.stock import Route, route_flags, serve_vllm, stop_vllm

if TYPE_CHECKING:
    from vopd.config import TrainConfig
    from vopd.rollout import Rollout
    from vopd.teacher.routing import Teachers

#: The modes timed, and their rows' names; the vLLM ones only with --stock-vllm.
NAMES = {"in-process": "in process", "inline": "server, scoring inline", "overlap": "server, scoring overlapped",
         "vllm-inline": "stock vLLM, scoring inline", "vllm-overlap": "stock vLLM, scoring overlapped"}


def add_overlap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher model directory (default: a tiny random pair built here)")
    p.add_argument("--student", default=None, help="student model directory (same tokenizer; with --teacher)")
    p.add_argument("--method", default="opd", help="loss.method (a method the server can serve; default opd)")
    p.add_argument("--hidden", action="store_true", help="the server sends hidden states (the teacher's head = the "
                   "teacher directory): every method, e.g. --method vopd")
    p.add_argument("--stock-vllm", action="store_true", help="also a stock vLLM server of the teacher, started here "
                   "(the pooling route with --hidden, else the generate route: opd); needs vLLM and a head size "
                   "vLLM's CPU build takes, e.g. 32")
    p.add_argument("--batch", type=int, default=8, help="sequences in the step (default 8)")
    p.add_argument("--micro", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (default 1)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server processes (default 1)")


def _configs(args: argparse.Namespace, student_dir: Path, teacher_dir: Path, url: str,
             vllm_url: str | None) -> dict[str, TrainConfig]:
    """The run's config per mode: the same step, its teacher in process or behind a server, overlap on or off."""
    from vopd.config import load_config

    overrides = [f"model.student={student_dir}", f"loss.method={args.method}", f"batch_size={args.batch}",
                 f"micro_batch_size={args.micro}", "grad_noise=false", "loss.ratio_cap=0"]
    head = f", head: {json.dumps(str(teacher_dir))}" if args.hidden else ""
    servers = {"": (url, ""), **({"vllm-": (vllm_url, ", server: vllm")} if vllm_url else {})}
    cfgs = {"in-process": load_config(None, [*overrides, f"model.teacher={teacher_dir}"], require_paths=False)}
    for prefix, (where, kind) in servers.items():
        for mode in ("overlap", "inline"):
            entry = f"{{model: {json.dumps(where)}{kind}{head}, overlap: {str(mode == 'overlap').lower()}}}"
            cfgs[prefix + mode] = load_config(None, [*overrides, f"model.teachers=[{entry}]"], require_paths=False)
    return cfgs


def _time_modes(cfgs: dict[str, TrainConfig], teachers: dict[str, Teachers], student: Any, rollout: Rollout,
                repeats: int) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[torch.Tensor]]]:
    """(per mode: (step seconds, of which waiting for the teacher) per timed repeat; per mode: the warm-up's
    gradients), the modes interleaved in a shuffled order in every round."""
    from vopd import distributed as dist
    from vopd.metrics import PhaseTimer
    from vopd.step import accumulate_gradients

    cpu = torch.device("cpu")
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", cpu)  # one process: the model itself
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in cfgs}
    grads: dict[str, list[torch.Tensor]] = {}
    order = list(cfgs)
    rng = random.Random(0)
    for rep in range(repeats + 1):
        rng.shuffle(order)
        for mode in order:
            timer = PhaseTimer(cpu)
            t0 = time.perf_counter()
            with timer("student"):
                accumulate_gradients(cfgs[mode], wrapped, teachers[mode], rollout, cpu, timer)
            wall = time.perf_counter() - t0
            if rep == 0:  # the warm-up round also gives the gradients compared below
                grads[mode] = [p.grad.clone() for p in student.parameters() if p.grad is not None]
            else:
                times[mode].append((wall, timer.metrics().get("time_teacher", 0.0)))
            student.zero_grad(set_to_none=True)
    return times, grads


def run_overlap_bench(args: argparse.Namespace) -> int:
    from vopd.models import load_model, load_tokenizer
    from vopd.teacher.routing import open_teachers

    if (args.teacher is None) != (args.student is None):
        raise UserError("give both --teacher and --student, or neither (a tiny random pair is built)")
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="vopd-overlap-") as tmp:
        root = Path(tmp)
        teacher_dir, student_dir = (Path(args.teacher), Path(args.student)) if args.teacher else tiny_pair(root)
        proc, url = serve_teacher(teacher_dir, args.server_threads, root / "server.log")
        stock: list[subprocess.Popen[bytes]] = []
        try:
            vllm_url = None
            if args.stock_vllm:  # beside vopd's server, timed in the same rounds
                route: Route = "pooling" if args.hidden else "generate"
                (vproc, vllm_url), = serve_vllm(teacher_dir, {route: route_flags(route)}, root,
                                                threads=args.server_threads).values()
                stock.append(vproc)
            tok = load_tokenizer(str(student_dir))
            student = load_model(str(student_dir), role="student", dtype=torch.float32, device=cpu)
            cfgs = _configs(args, student_dir, teacher_dir, url, vllm_url)
            opened: dict[str, Teachers] = {  # one client per server: overlap is the step's choice, not the client's
                mode: open_teachers(cfgs[mode], vocab_size=len(tok), device=cpu, student=student, student_tok=tok)
                for mode in ("in-process", "inline", "vllm-inline") if mode in cfgs}
            teachers = {mode: opened[mode if mode == "in-process" else mode.replace("overlap", "inline")]
                        for mode in cfgs}
            rollout = random_rollout(tok, args.batch, args.prompt_len, args.completion_len,
                                     torch.Generator().manual_seed(0))
            times, grads = _time_modes(cfgs, teachers, student, rollout, args.repeats)
            for t in opened.values():
                t.close()
        finally:
            proc.terminate()
            proc.wait(30)
            stop_vllm(*stock)
    return _report(args, times, grads, rollout.num_tokens)


def _report(args: argparse.Namespace, times: dict[str, list[tuple[float, float]]],
            grads: dict[str, list[torch.Tensor]], tokens: int) -> int:
    """Print the table and the ratios; 0 when overlapped and inline scoring gave bit-identical gradients on every
    server."""
    def same(a: str, b: str) -> bool:
        return len(grads[a]) == len(grads[b]) and all(torch.equal(x, y) for x, y in zip(grads[a], grads[b]))

    def diff(a: str, b: str) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(grads[a], grads[b]))

    med = {m: (statistics.median(w for w, _ in t), statistics.median(s for _, s in t)) for m, t in times.items()}
    prefixes = ["", "vllm-"] if "vllm-inline" in med else [""]
    identical = {p: same(p + "overlap", p + "inline") for p in prefixes}
    sends = "hidden states" if args.hidden else "numbers at ids"
    stock = (f"; stock vLLM {'pooling' if args.hidden else 'generate'} route" if len(prefixes) > 1 else "")
    print(f"# vopd bench teacher-overlap: {args.method} (the server sends {sends}{stock}), {args.batch} sequences x "
          f"({args.prompt_len} prompt + {args.completion_len} completion) tokens, micro-batches of {args.micro}, "
          f"teacher servers on loopback ({args.server_threads} thread(s) each), trainer {args.threads} thread(s); "
          f"medians of {args.repeats} repeats")
    print("| teacher | step gradient s | of which teacher s | tokens/s |")
    print("|---|---|---|---|")
    for mode in (m for m in NAMES if m in med):
        wall, wait = med[mode]
        print(f"| {NAMES[mode]} | {wall:.3f} | {wait:.3f} | {tokens / wall:.0f} |")
    for p in prefixes:
        server = "stock vLLM" if p else "vopd server"
        print(f"{server}: speedup (inline / overlap): {ratio(med[p + 'inline'][0], med[p + 'overlap'][0])}x; gradients "
              f"bit-identical: {'yes' if identical[p] else 'NO'}; in process vs server: max gradient difference "
              f"{diff('in-process', p + 'inline'):.1e}")
    if len(prefixes) > 1:
        print(f"stock vLLM / vopd server step time: inline {ratio(med['vllm-inline'][0], med['inline'][0])}x, "
              f"overlapped {ratio(med['vllm-overlap'][0], med['overlap'][0])}x")
    return 0 if all(identical.values()) else 1
