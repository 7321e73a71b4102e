"""The teacher side of the loss: scoring rollouts with a frozen model, in process.

What it knows: running the teacher (eval mode, no grad, its own dtype and device) over a rollout's sequences and
handing the loss what the chunked estimator path needs (last hidden states + output layer), moved to the student's
device; and the exact held-out KL between student and teacher on sampled completions. What it does not know:
optimisers, the training loop, or remote serving (a server-backed teacher would return per-token numbers instead
of hidden states; that is the scale-out work's ``serve-teacher``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vopd.chunked import chunked_distillation_loss
from vopd.models import last_hidden, output_layer
from vopd.rollout import Rollout


@dataclass(frozen=True)
class TeacherScores:
    """What the chunked loss needs from the teacher for one micro-batch: hidden (B, L-1, D_t) aligned with the
    rollout's targets, and the teacher's output layer sliced to the shared vocabulary."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


class InProcessTeacher:
    """A frozen Hugging Face causal LM living in this process."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, rollout: Rollout, device: torch.device) -> TeacherScores:
        r = rollout.to(self.device)
        hidden = last_hidden(self.model, r.input_ids, r.attention_mask)[:, :-1]
        weight, bias = output_layer(self.model, self.vocab_size)
        return TeacherScores(hidden.to(device), weight.to(device), None if bias is None else bias.to(device))


@torch.no_grad()
def rollout_kl(student: Any, teacher: InProcessTeacher, rollout: Rollout, *, vocab_size: int,
               micro_batch_size: int, memory_budget_mb: float = 256) -> tuple[float, float]:
    """Exact mean KL_t(student || teacher) over the rollout's completion tokens, and the token count.

    Uses the ``opd-full`` chunked path without gradients (its value is the mean KL_t). The student's train/eval
    mode is left as it was."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        for lo in range(0, rollout.size, micro_batch_size):
            mb = rollout.select(lo, lo + micro_batch_size).to(device)
            n = int(mb.completion_mask.sum())
            if n == 0:
                continue
            t = teacher.score(mb, device)
            hs = last_hidden(student, mb.input_ids, mb.attention_mask)[:, :-1]
            w, b = output_layer(student, vocab_size)
            out = chunked_distillation_loss(hs, w, t.hidden, t.weight, mb.targets, mb.completion_mask,
                                            method="opd-full", student_bias=b, teacher_bias=t.bias,
                                            memory_budget_mb=memory_budget_mb)
            total += float(out.kl.sum())
            count += n
    finally:
        student.train(was_training)
    return (total / count if count else float("nan")), float(count)
