"""The teacher side of the loss: scoring rollouts with a frozen model, in process, and telling a remote one apart.

What it knows: running the teacher (eval mode, no grad, its own dtype and device) over a rollout's sequences and
handing the loss what the chunked estimator path needs (last hidden states + output layer), moved to the student's
device; the exact held-out KL between student and teacher on sampled completions; whether ``model.teacher`` names a
teacher server (a URL) and the pre-flight against one (its tokenizer fingerprint instead of its tokenizer). What it
does not know: optimisers, the training loop, or the wire protocol (``vopd.remote`` is the client, ``vopd.serve``
the server; a remote teacher returns per-token numbers instead of hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from vopd.chunked import chunked_distillation_loss
from vopd.errors import UserError
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
        self.model = model.eval().requires_grad_(False)  # frozen: no gradient is ever taken through the teacher
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


def is_remote(teacher: str) -> bool:
    """``model.teacher`` names a ``vopd serve-teacher`` server rather than a model directory."""
    return teacher.startswith(("http://", "https://"))


def preflight_remote(student: Any, student_tok: Any, remote: Any, cfg: Any) -> list[str]:
    """``vopd.check.preflight`` for a teacher known only by its ``/health``: the tokenizer fingerprint stands in for
    comparing the tokenizers (the teacher's is never loaded here), then the same sampling and self-checks."""
    from vopd.check import student_checks
    from vopd.serve import tokenizer_fingerprint

    health = remote.health()
    vocab = len(student_tok)
    mine, theirs = tokenizer_fingerprint(student_tok), health.get("tokenizer_sha256")
    if mine != theirs:
        raise UserError(f"the teacher server at {remote.url} uses another tokenizer than the student (fingerprint "
                        f"{str(theirs)[:12]}... vs {mine[:12]}..., {health.get('vocab_size')} vs {vocab} tokens); OPD "
                        "needs one shared tokenizer: serve a teacher from the student's model family")
    return [
        f"teacher server {remote.url} ({health.get('model')}, protocol {health.get('protocol')}): same tokenizer "
        f"({vocab} tokens, fingerprint {mine[:12]})",
        *student_checks(student, student_tok, vocab, cfg),
    ]


def open_teacher(cfg: Any, student: Any, student_tok: Any, device: torch.device,
                 info: Callable[[str], None]) -> Any:
    """The teacher of ``cfg.model.teacher`` after its pre-flight (each passed check is reported through ``info``):
    an ``InProcessTeacher`` loaded here, or a ``vopd.remote.RemoteTeacher`` for a URL (its tokenizer is checked by
    fingerprint, never loaded)."""
    if is_remote(cfg.model.teacher):
        from vopd.remote import RemoteTeacher

        remote = RemoteTeacher(cfg.model.teacher, timeout_s=cfg.model.teacher_timeout_s,
                               retries=cfg.model.teacher_retries)
        try:
            for line in preflight_remote(student, student_tok, remote, cfg):
                info(f"pre-flight ok: {line}")
        except BaseException:
            remote.close()
            raise
        return remote
    from vopd.check import preflight
    from vopd.models import load_model, load_tokenizer, resolve_dtype

    t_tok = load_tokenizer(cfg.model.teacher, role="teacher", trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model.teacher, role="teacher", dtype=resolve_dtype(cfg.model.teacher_dtype, device),
                       device=device, trust_remote_code=cfg.model.trust_remote_code)
    for line in preflight(student, model, student_tok, t_tok, cfg):
        info(f"pre-flight ok: {line}")
    return InProcessTeacher(model, len(student_tok))
