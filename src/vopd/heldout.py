"""The exact held-out KL(student || teacher) of a training run: one fresh temperature-1 completion per problem, and
the mean per-token KL over a rollout.

What it knows: how the held-out sample is drawn (``heldout_kl``: seeded, the caller's torch RNG state restored;
prompts rendered as in training) and how its KL is computed exactly (``rollout_kl``: the ``opd-full`` fused head
without gradients, whose value is the mean KL_t, so the teacher must send its full distribution). What it does not
know: accuracy, grading and the evaluation protocol (``vopd.eval``, whose ``evaluate_student`` calls this module),
how tokens are drawn (``vopd.rollout``, ``vopd.sampling``), how the teacher scores (``vopd.teacher``), or the loss math
(``vopd.loss``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vopd.prompts import chat_options, render_prompt

if TYPE_CHECKING:
    import torch

    from vopd.config import TrainConfig
    from vopd.models import Model, Tokenizer
    from vopd.rollout import Rollout
    from vopd.teacher.base import Teacher


def heldout_kl(student: Model, teacher: Teacher, tok: Tokenizer, problems: list[str], cfg: TrainConfig,
               vocab: int, seed: int | None = None, *, autocast: torch.dtype | None = None,
               synced: bool = False) -> float:
    """Mean exact KL_t(student || teacher) on one temperature-1 completion per problem; RNG state is restored.
    ``autocast``: the student's compute dtype when it is stored as float32 masters (``vopd.precision``); ``synced``:
    the student is sharded over the ranks, and every rank computes this in step (``vopd.sampling.generate``)."""
    import torch

    from vopd.rollout import hf_sampler, pack

    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 12345 if seed is None else seed)
    try:
        ids = [render_prompt(tok, p, template=cfg.data.template, chat=chat_options(cfg.data)) for p in problems]
        sampler = hf_sampler(student, tok, max_new_tokens=cfg.eval_max_new_tokens, temperature=1.0, top_p=1.0,
                             top_k=0, batch_size=cfg.rollout.batch_size, autocast=autocast, synced=synced)
        rollout = pack(ids, sampler(ids), tok.pad_token_id)
        kl, _ = rollout_kl(student, teacher, rollout, vocab_size=vocab, micro_batch_size=cfg.micro_batch_size,
                           autocast=autocast)
    finally:
        torch.set_rng_state(rng)
    return kl


def rollout_kl(student: Model, teacher: Teacher, rollout: Rollout, *, vocab_size: int, micro_batch_size: int,
               memory_budget_mb: float = 256, autocast: torch.dtype | None = None) -> tuple[float, float]:
    """Exact mean KL_t(student || teacher) over the rollout's completion tokens, and the token count.

    Uses the ``opd-full`` fused head without gradients (its value is the mean KL_t), so the teacher must have the
    full distribution; the student's states reach it as in training (``vopd.models.student_states``, ``autocast``).
    The student's train/eval mode is left as it was. Every micro-batch runs both models' forwards, so a sharded
    model's collectives come in the same number on every rank."""
    import torch

    from vopd.loss.chunked import fused_distillation_loss
    from vopd.models import student_states

    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for lo in range(0, rollout.size, micro_batch_size):
                mb = rollout.select(lo, lo + micro_batch_size).to(device)
                n = int(mb.loss_mask.sum())
                # Both forwards run even without tokens to count: a sharded student's or teacher's forward is a
                # collective, and every rank must run as many.
                scores = teacher.score(mb)
                hidden, head = student_states(student, mb.input_ids, mb.attention_mask, vocab_size,
                                              autocast=autocast)
                if n == 0:
                    continue
                hs = hidden[:, :-1]
                out = fused_distillation_loss(hs, head.weight, mb.targets, mb.loss_mask, scores,
                                              method="opd-full", student_bias=head.bias,
                                              memory_budget_mb=memory_budget_mb, student_transform=head.transform)
                assert out.kl is not None  # opd-full always reports the exact KL_t
                total += float(out.kl.sum())
                count += n
    finally:
        student.train(was_training)
    return (total / count if count else float("nan")), float(count)
