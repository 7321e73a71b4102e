"""`vopd variance`: how noisy and how biased each estimator's *parameter* gradient is, measured over many rollouts.

What it knows: drawing R independent rollout batches from a student (one completion per prompt, temperature 1),
computing every method's parameter gradient on the *same* rollouts (common random numbers, so differences between
methods are not sampling luck), and summarising each method by the trace of the gradient covariance and by its bias
against ``opd-full`` on the same states, each with a bootstrap confidence interval. The statistics are pure functions
of a (R, P) matrix, tested on synthetic data with a known answer. What it does not know: training.

Bias: for an unbiased method, g_m - g_opd-full has zero mean *per state*, so
    ||mean_r(g_m - g_full)||^2 - tr Cov(g_m - g_full) / R
is an unbiased estimate of the squared bias norm (0 in expectation; it can come out slightly negative).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.methods import METHODS, method_spec

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer
    from vopd.teacher.local import InProcessTeacher


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def _gram_stats(gram: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of squared norms and squared norm of the sum of rows ``idx`` (with repeats), from the Gram matrix: with
    c_i the times row i is drawn, Σ_a G[a,a] = c·diag(G) and Σ_ab G[a,b] = cᵀGc (no (R, R) copy per resample)."""
    c = torch.bincount(idx, minlength=gram.shape[0]).to(gram.dtype)
    return c @ gram.diagonal(), c @ (gram @ c)


def trace_covariance(g: Tensor, *, boot: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """tr Cov of the rows of ``g`` (R, P), unbiased (1/(R-1)), with a percentile bootstrap interval over rows."""
    r = g.shape[0]
    if r < 2:
        raise ValueError("need at least 2 replicates to estimate a variance")
    gram = g.double() @ g.double().T

    def stat(idx: Tensor) -> float:
        sq, total = _gram_stats(gram, idx)
        return float((sq - total / r) / (r - 1))

    return _bootstrap(stat, r, boot, level, seed)


def squared_bias(diff: Tensor, *, boot: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Unbiased estimate of ||E[diff]||^2 from rows of ``diff`` (R, P): ||mean||^2 - tr Cov / R, which is the
    U-statistic mean_{i != j} <d_i, d_j>.

    In a bootstrap resample a row drawn twice would pair with itself and add ||d_i||^2 terms, shifting every
    resample up by about tr Cov / R (for isotropic noise sqrt(P/2) standard errors: the interval would miss 0 for
    an unbiased method). So a resample averages <d_a, d_b> over pairs of *distinct original* rows only, weighted
    by how often each was drawn."""
    r = diff.shape[0]
    if r < 2:
        raise ValueError("need at least 2 replicates to estimate a bias")
    gram = diff.double() @ diff.double().T
    diag = gram.diagonal()

    def stat(idx: Tensor) -> float:
        c = torch.bincount(idx, minlength=r).to(gram.dtype)
        pairs = c.sum() ** 2 - (c * c).sum()
        if pairs <= 0:  # every draw was the same row: no pair of distinct rows
            return math.nan
        return float((c @ gram @ c - (c * c * diag).sum()) / pairs)

    return _bootstrap(stat, r, boot, level, seed)


def _bootstrap(stat: Callable[[Tensor], float], r: int, boot: int, level: float, seed: int) -> Interval:
    gen = torch.Generator().manual_seed(seed)
    point = stat(torch.arange(r))
    draws = torch.tensor([stat(torch.randint(0, r, (r,), generator=gen)) for _ in range(boot)])
    draws = draws[~draws.isnan()]
    lo, hi = torch.quantile(draws, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype)).tolist()
    return Interval(point, lo, hi)


def _flat_grad(params: list[Tensor]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


def collect_gradients(student: Model, teacher: InProcessTeacher, tok: Tokenizer, prompts: list[list[int]], *,
                      methods: list[str], replicates: int, max_new_tokens: int, top_k: int, seed: int,
                      memory_budget_mb: float = 256) -> dict[str, Tensor]:
    """(R, P) parameter gradients per method, every method on the same R rollout batches."""
    from vopd.loss.chunked import fused_distillation_loss
    from vopd.models import last_hidden, output_layer
    from vopd.rollout import hf_sampler, pack

    vocab = len(tok)
    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    sampler = hf_sampler(student, tok, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                         batch_size=len(prompts))
    grads: dict[str, list[Tensor]] = {m: [] for m in methods}
    for rep in range(replicates):
        torch.manual_seed(seed + rep)
        rollout = pack(prompts, sampler(prompts), tok.pad_token_id).to(device)
        scores = teacher.score(rollout)
        for method in methods:
            student.zero_grad(set_to_none=True)
            hidden = last_hidden(student, rollout.input_ids, rollout.attention_mask)[:, :-1]
            head = output_layer(student, vocab)
            out = fused_distillation_loss(hidden, head.weight, rollout.targets, rollout.loss_mask, scores,
                                          method=method_spec(method).name, top_k=top_k, student_bias=head.bias,
                                          memory_budget_mb=memory_budget_mb, student_transform=head.transform)
            out.loss.backward()
            grads[method].append(_flat_grad(params))
    student.zero_grad(set_to_none=True)
    return {m: torch.stack(g) for m, g in grads.items()}


def summarise(grads: dict[str, Tensor], *, boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per method: tr Cov with CI, ratio to opd, squared bias vs opd-full with CI, relative bias."""
    full = grads.get("opd-full")
    ref_norm = float(full.mean(0).norm()) if full is not None else math.nan
    out: dict[str, dict[str, Any]] = {}
    for method, g in grads.items():
        row: dict[str, Any] = {"trace_cov": asdict(trace_covariance(g, boot=boot, seed=seed)),
                               "mean_grad_norm": float(g.mean(0).norm())}
        if full is not None and method != "opd-full":
            b = squared_bias(g - full, boot=boot, seed=seed)
            row["squared_bias"] = asdict(b)
            row["relative_bias"] = math.sqrt(max(b.estimate, 0.0)) / ref_norm if ref_norm > 0 else math.nan
            row["relative_bias_high"] = math.sqrt(max(b.high, 0.0)) / ref_norm if ref_norm > 0 else math.nan
            row["bias_detected"] = b.low > 0.0  # the interval excludes 0
        out[method] = row
    if "opd" in out:
        base = out["opd"]["trace_cov"]["estimate"]
        for row in out.values():
            row["variance_ratio_to_opd"] = row["trace_cov"]["estimate"] / base if base > 0 else math.nan
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | tr Cov(grad) [95% CI] | ratio to opd | squared bias vs opd-full [95% CI] | "
             "relative bias (upper bound) | bias detected |", "|---|---|---|---|---|---|"]
    for method, row in summary.items():
        tc = row["trace_cov"]
        sb = row.get("squared_bias")
        bias = f"{sb['estimate']:.3e} [{sb['low']:.2e}, {sb['high']:.2e}]" if sb else "(reference)"
        rel = f"{row['relative_bias']:.3f} (≤ {row['relative_bias_high']:.3f})" if "relative_bias" in row else "-"
        detected = ("yes" if row["bias_detected"] else "no") if "bias_detected" in row else "-"
        lines.append(f"| {method} | {tc['estimate']:.4e} [{tc['low']:.3e}, {tc['high']:.3e}] | "
                     f"{row.get('variance_ratio_to_opd', math.nan):.3f} | {bias} | {rel} | {detected} |")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", help="student model dir (default: the tiny world's student)")
    parser.add_argument("--teacher", help="teacher model dir (default: the tiny world's teacher)")
    parser.add_argument("--data", help="problems file (default: the tiny world's test split)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--replicates", type=int, default=32, help="independent rollout batches")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--chat", action="store_true", help="render each problem as a user turn through the chat "
                        "template (data.text_as_chat; always on with the tiny world's student, which was SFT'd so)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--out", help="write the summary JSON here")


def cli_main(args: argparse.Namespace) -> int:
    from vopd.data import load_problems
    from vopd.models import load_model, load_tokenizer
    from vopd.prompts import ChatOptions, render_prompt
    from vopd.teacher.local import InProcessTeacher

    if args.replicates < 2:
        raise UserError("--replicates must be at least 2 to estimate a variance")
    student_dir, teacher_dir, data = args.student, args.teacher, args.data
    chat = ChatOptions(text_as_chat=args.chat)
    if not (student_dir and teacher_dir and data):
        from vopd.world.build import build_world

        world = build_world()
        if not student_dir:  # the world's student samples as it was SFT'd
            chat = world.config.chat_options
        student_dir, teacher_dir = student_dir or str(world.student), teacher_dir or str(world.teacher)
        data = data or str(world.test_data)
    methods = list(dict.fromkeys(["opd-full", *args.methods]))  # opd-full is the bias reference
    cpu = torch.device("cpu")
    tok = load_tokenizer(student_dir)
    student = load_model(student_dir, role="student", dtype=torch.float32, device=cpu)
    teacher = InProcessTeacher(load_model(teacher_dir, role="teacher", dtype=torch.float32, device=cpu), len(tok))
    problems = load_problems(data, kind="math", limit=args.prompts)
    prompts = [render_prompt(tok, p.problem, chat=chat) for p in problems]
    grads = collect_gradients(student, teacher, tok, prompts, methods=methods, replicates=args.replicates,
                              max_new_tokens=args.max_new_tokens, top_k=args.top_k, seed=args.seed)
    summary = summarise(grads, boot=args.boot, seed=args.seed)
    print(f"gradient variance over {args.replicates} rollout batches of {len(prompts)} prompts "
          f"(student {student_dir}, top_k={args.top_k}, seed={args.seed}):")
    print(format_table(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args) | {"student": student_dir,
                                                                         "teacher": teacher_dir, "data": data},
                                              "summary": summary}, indent=1, default=str))
    return 0
