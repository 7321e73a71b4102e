"""One training step's gradient: micro-batches, teacher scores, the fused loss, backward, and the variance probe.

What it knows: how a rank's rollouts are split into micro-batches (a one-micro-batch step runs as two when the
variance probe is on), the order of work per micro-batch (teacher scores, the student's forward, the loss through
``vopd.loss.chunked.fused_distillation_loss``, backward, gradients reduced over ranks on the last one), the global
token mean (docs/estimators.md, "dapo" reduction) and the half-batch squared gradient norm that
``vopd.metrics.gradient_noise`` turns into the variance proxy (docs/metrics.md). What it does not know: sampling, the
optimizer step, logging or checkpoints (``vopd.train``), or which teacher placement it talks to (``Teacher``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vopd import distributed as dist
from vopd.config import TrainConfig
from vopd.loss.chunked import fused_distillation_loss, student_topk_ids
from vopd.loss.estimators import LossOutput
from vopd.loss.methods import method_spec
from vopd.metrics import PhaseTimer, TokenStats
from vopd.models import logit_transform
from vopd.rollout import Rollout
from vopd.teacher.base import Teacher


@dataclass(frozen=True)
class StepGradient:
    """What one step's backward passes left besides the gradients: the per-token statistics reduced over every
    micro-batch and rank (``TokenStats.reduce``, docs/metrics.md), the loss (the global token mean, summed over
    ranks), the global completion-token count, and the half-batch probe ((|G_a|^2, a) for
    ``vopd.metrics.gradient_noise``; None when off or not separable)."""

    token_metrics: dict[str, float]
    loss: float
    total_tokens: float
    half_probe: tuple[float, int] | None


def accumulate_gradients(cfg: TrainConfig, engine: dist.Engine, teacher: Teacher, rollout: Rollout,
                         device: torch.device, timer: PhaseTimer) -> StepGradient:
    """Score, loss and backward over this rank's ``rollout`` in micro-batches; the gradients are left in the model
    (reduced over ranks), ready for the optimizer step."""
    # The variance proxy needs the gradient of a part of the batch: a one-micro-batch step runs as two.
    mbs = cfg.micro_batch_size
    if cfg.grad_noise and mbs >= rollout.size >= 2:
        mbs = (rollout.size + 1) // 2
    micro = [rollout.select(lo, lo + mbs).to(device) for lo in range(0, rollout.size, mbs)]
    half = len(micro) // 2 if cfg.grad_noise else 0
    # The token mean is over the whole global batch (docs/estimators.md, "dapo" reduction): every micro-batch and
    # rank divides by N_global / world_size, and DDP/FSDP2 average the gradients over ranks, so the update is
    # (1/W) sum_r grad(sum_r / (N/W)) = grad(sum over all tokens) / N: the exact global token mean.
    total_tokens = dist.all_reduce_sum(torch.tensor(float(rollout.num_tokens))).item()
    normalizer = max(total_tokens, 1.0) / dist.world_size()

    stats = TokenStats(ratio_cap=cfg.loss.ratio_cap)
    loss_sum = 0.0
    half_probe: tuple[float, int] | None = None
    for i, mb in enumerate(micro):
        with engine.sync(last=i == len(micro) - 1):
            out = micro_batch_loss(cfg, engine, teacher, mb, normalizer, timer)
            out.loss.backward()
        loss_sum += float(out.loss.detach())
        stats.add(out, mb.completion_mask, mb.sampler_logprobs)
        if i + 1 == half:
            half_probe = _half_batch_probe(engine, micro[:half], total_tokens, normalizer)
    # Each rank's loss is its share of the global mean times W; any rank's NaN makes every rank skip.
    loss = float(dist.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64))) / dist.world_size()
    return StepGradient(stats.reduce(), loss, total_tokens, half_probe)


def micro_batch_loss(cfg: TrainConfig, engine: dist.Engine, teacher: Teacher, mb: Rollout, normalizer: float,
                     timer: PhaseTimer) -> LossOutput:
    """One micro-batch's loss, its graph ready for ``backward``. The teacher's time is charged to the teacher phase.

    A teacher with the full distribution scores first (only its last hidden states stay alive during the student's
    forward); one that sends per-token numbers is asked about the student's top-k ids for the top-k methods, so it
    scores after the student's forward."""
    spec = method_spec(cfg.loss.method)
    asks_ids = spec.topk and not teacher.full_distribution
    scores = None
    if not asks_ids:
        with timer("teacher"):
            scores = teacher.score(mb, lse=spec.teacher_lse)
    hidden, weight, bias = engine.forward(mb.input_ids, mb.attention_mask)
    hidden = hidden[:, :-1]
    transform = logit_transform(engine.model)  # softcapping / scaling (docs/estimators.md, "Output transforms")
    if scores is None:
        ids = student_topk_ids(hidden.detach(), weight.detach(), mb.completion_mask, cfg.loss.top_k,
                               bias=None if bias is None else bias.detach(), transform=transform,
                               memory_budget_mb=cfg.loss.chunk_memory_mb)  # the head's own chunks: the same ids
        with timer("teacher"):
            scores = teacher.score(mb, topk_ids=ids, lse=spec.teacher_lse)
    use_ratio = cfg.loss.ratio_cap > 0
    out = fused_distillation_loss(
        hidden, weight, mb.targets, mb.completion_mask, scores, method=cfg.loss.method, top_k=cfg.loss.top_k,
        student_bias=bias, normalizer=normalizer, memory_budget_mb=cfg.loss.chunk_memory_mb,
        sampler_logprobs=mb.sampler_logprobs if use_ratio else None, ratio_cap=cfg.loss.ratio_cap if use_ratio else None,
        ratio_mode=cfg.loss.ratio_mode, student_transform=transform)
    if mb.num_tokens == 0:
        # Without completion tokens the loss only touches the hidden states; DDP expects a gradient for every
        # parameter in every backward, so the output layer gets an explicit zero one.
        zero = weight.sum() * 0.0 + (0.0 if bias is None else bias.sum() * 0.0)
        out = dataclasses.replace(out, loss=out.loss + zero)
    return out


def _half_batch_probe(engine: dist.Engine, first: list[Rollout], total_tokens: float,
                      normalizer: float) -> tuple[float, int] | None:
    """(|G_a|^2, a): the squared norm of the token-mean gradient of the first micro-batches' ``a`` rollouts, for
    ``metrics.gradient_noise``. Each micro-batch's loss is divided by ``normalizer`` = N/W, so the accumulated
    gradient is sum_a grad / normalizer; under DDP (``no_sync``) it is this rank's part alone, under FSDP2 already
    the mean over ranks (sum over all ranks' first halves / N)."""
    tokens = float(sum(mb.num_tokens for mb in first))
    units = sum(mb.size for mb in first)
    sq = engine.grad_sq_norm()
    scale = normalizer
    if engine.strategy == "fsdp2":
        counts = dist.all_reduce_sum(torch.tensor([tokens, float(units)], dtype=torch.float64))
        tokens, units, scale = float(counts[0]), int(counts[1]), total_tokens
    if tokens == 0:
        return None
    return sq * (scale / tokens) ** 2, units
