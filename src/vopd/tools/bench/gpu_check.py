"""The measured part of `scripts/gpu-check`: one bf16-mixed training step at real shapes, and the fused head against
its four-GEMM floor.

What it knows: how to build random-weight Qwen3 models of the public shapes (``vopd.tools.bench.worker.SHAPES``:
a Qwen3-1.7B student, a Qwen3-8B teacher, V = 151,936) and run one training step the way the trainer runs it with
``model.dtype=bfloat16`` over float32 masters (``vopd.precision``: the student stored in float32, its forward and
backward under autocast to bf16, the teacher in bf16, AdamW on the float32 masters): per-phase wall time (teacher
forward, student forward + fused head + backward, optimizer step) and peak memory after each phase; and the fused
head (`vopd` at V = 151,936, forward and backward) against the floor of the four matmuls it cannot avoid (both models'
logits, and the two gradient products), at the same shapes and dtypes. ``--tiny`` runs the same code at CPU-test
size (the shapes of ``SHAPES["tiny"]``), so the script is exercised without a GPU.

What it does not know: the memory planner's prediction for the same step (``scripts/gpu-check`` prints it beside
this output when ``vopd plan`` is available), multi-GPU, vLLM, or what any number will be: all are measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

from vopd.tools.bench.worker import SHAPES, TEACHER, VOCAB, _build


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _timed(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def mixed_step(dev: torch.device, shapes: str, *, batch: int, prompt_len: int, completion_len: int,
               repeats: int) -> dict[str, Any]:
    """One bf16-mixed training step of ``SHAPES[shapes]["1.7b"]`` distilled from ``SHAPES[shapes][TEACHER]`` with
    ``vopd`` (gradient checkpointing on, all weights trained): the median per-phase seconds over ``repeats`` steps
    after one warm-up step, and the peak memory (GiB) after each phase of the last step."""
    from vopd.loss.chunked import fused_distillation_loss
    from vopd.loss.plan import LossPlan
    from vopd.loss.scores import TeacherHidden
    from vopd.models import enable_gradient_checkpointing, last_hidden, output_layer, student_states

    torch.manual_seed(0)
    vocab = VOCAB[shapes]
    compute = torch.bfloat16
    teacher = _build(SHAPES[shapes][TEACHER], vocab, dev, compute, use_cache=False).eval().requires_grad_(False)
    student = _build(SHAPES[shapes]["1.7b"], vocab, dev, torch.float32, use_cache=False)  # the float32 masters
    enable_gradient_checkpointing(student)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
    plan = LossPlan.of("vopd", top_k=20, ratio_cap=0)
    ids = torch.randint(0, vocab, (batch, prompt_len + completion_len), device=dev)
    attention = torch.ones_like(ids)
    targets = ids[:, 1:]
    mask = (torch.arange(prompt_len + completion_len - 1, device=dev) >= prompt_len - 1).expand(batch, -1)
    t_head = output_layer(teacher, vocab)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rows: list[dict[str, float]] = []
    peaks: dict[str, float | None] = {}
    for _ in range(repeats + 1):
        with torch.no_grad():
            ht, t_teacher = _timed(dev, lambda: last_hidden(teacher, ids, attention)[:, :-1])
        peaks["teacher"] = _peak_gib(dev)

        def student_phase() -> float:
            hidden, head = student_states(student, ids, attention, vocab, autocast=compute)
            out = fused_distillation_loss(hidden[:, :-1], head.weight, targets, mask,
                                          TeacherHidden(ht, t_head.weight, t_head.bias, t_head.transform),
                                          plan=plan, student_bias=head.bias)
            out.loss.backward()
            return float(out.loss.detach())

        _loss, t_student = _timed(dev, student_phase)
        peaks["student"] = _peak_gib(dev)
        _none, t_opt = _timed(dev, lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        peaks["optimizer"] = _peak_gib(dev)
        rows.append({"teacher_s": t_teacher, "student_s": t_student, "optimizer_s": t_opt})
    timed = rows[1:]  # the first step warms up (allocator growth, AdamW states, kernels)
    return {"shapes": shapes, "batch": batch, "prompt_len": prompt_len, "completion_len": completion_len,
            "completion_tokens": batch * completion_len, "repeats": repeats,
            **{k: statistics.median(r[k] for r in timed) for k in timed[0]},
            "peak_gib_after": peaks, "master_dtype": "float32", "compute_dtype": "bfloat16"}


def head_floor(dev: torch.device, *, vocab: int, tokens: int, d_s: int, d_t: int, repeats: int) -> dict[str, Any]:
    """The fused head (``vopd``, forward + backward, bf16 inputs) against its floor: the four matmuls z_s = h_s W_s^T,
    z_t = h_t W_t^T, dL/dh = G W_s and dL/dW = G^T h_s at the same shapes and dtype, unchunked (median seconds)."""
    from vopd.loss.chunked import fused_distillation_loss
    from vopd.loss.plan import LossPlan
    from vopd.loss.scores import TeacherHidden

    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16
    hs = torch.randn(1, tokens, d_s, device=dev, dtype=dt, generator=g)
    ws = (torch.randn(vocab, d_s, device=dev, dtype=dt, generator=g) * 0.02)
    ht = torch.randn(1, tokens, d_t, device=dev, dtype=dt, generator=g)
    wt = (torch.randn(vocab, d_t, device=dev, dtype=dt, generator=g) * 0.02)
    y = torch.randint(0, vocab, (1, tokens), device=dev, generator=g)
    mask = torch.ones(1, tokens, dtype=torch.bool, device=dev)
    plan = LossPlan.of("vopd", top_k=20, ratio_cap=0)

    def fused() -> None:
        h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        fused_distillation_loss(h, w, y, mask, TeacherHidden(ht, wt), plan=plan).loss.backward()

    def floor() -> None:
        zs, _zt = hs[0] @ ws.T, ht[0] @ wt.T
        _gh, _gw = zs @ ws, zs.T @ hs[0]  # G has the logits' shape; its values do not change the cost

    out: dict[str, Any] = {"vocab": vocab, "tokens": tokens, "d_student": d_s, "d_teacher": d_t}
    for name, fn in (("fused_s", fused), ("floor_s", floor)):
        fn()  # warm-up
        out[name] = statistics.median(_timed(dev, fn)[1] for _ in range(repeats))
    out["fused_over_floor"] = out["fused_s"] / out["floor_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vopd.tools.bench.gpu_check", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="CPU-test shapes (exercises the code without a GPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dev = torch.device("cpu" if args.tiny else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on a CPU")
    shapes = "tiny" if args.tiny else "real"
    step = mixed_step(dev, shapes, batch=1 if args.tiny else 4, prompt_len=8 if args.tiny else 256,
                      completion_len=16 if args.tiny else 2048, repeats=args.repeats)
    size = SHAPES[shapes]
    head = head_floor(dev, vocab=VOCAB[shapes], tokens=64 if args.tiny else 2048, d_s=size["1.7b"]["hidden_size"],
                      d_t=size[TEACHER]["hidden_size"], repeats=args.repeats)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "step": step, "head": head}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
