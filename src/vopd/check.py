"""Pre-flight checks of a student/teacher pair, run before step 0 of every training run and as `vopd check`.

What it knows: the order of the checks (the teacher's pairing with the student first: one token->id map and the
same special tokens, else every per-token reward compares different tokens; each placement checks that its own way,
``Teacher.pairing_checks``), which sampling
settings keep the estimators unbiased (temperature 1, no top-p, no top-k: docs/estimators.md, "Background"), and how to self-check the
hidden-state path (teacher = student must give KL = 0, and the chunked log p(y) must equal the model's own forward).
What it does not know: training. Each failed check is a ``UserError`` naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING, Any

import torch

from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.config import TrainConfig
    from vopd.teacher.base import Teacher

def check_sampling(*, temperature: float, top_p: float, top_k: int, allow_biased: bool) -> list[str]:
    """Refuse sampling settings that bias every estimator unless explicitly allowed; returns warnings to log."""
    problems = []
    if temperature != 1.0:
        problems.append(f"rollout.temperature={temperature}")
    if top_p < 1.0:
        problems.append(f"rollout.top_p={top_p}")
    if top_k > 0:
        problems.append(f"rollout.top_k={top_k}")
    if problems and not allow_biased:
        raise UserError(
            f"{', '.join(problems)} makes the samples come from a different distribution than the student's, which "
            "biases every OPD estimator; use temperature=1.0, top_p=1.0, top_k=0, or set "
            "rollout.allow_biased_sampling=true to proceed anyway"
        )
    return [f"biased sampling allowed by override: {', '.join(problems)}"] if problems else []


@torch.no_grad()
def self_check(student: Any, tokenizer: Any, vocab_size: int, *, text: str = "1 + 2 = 3. \\boxed{3}") -> dict[str, float]:
    """KL(student || student) through the chunked path must be ~0, and its log p(y) must equal the model's own
    forward (a model whose logits are not ``hidden @ W.T + b`` — softcapping, logit scaling — fails here)."""
    from vopd.loss.chunked import chunked_distillation_loss
    from vopd.models import last_hidden, output_layer

    device = next(student.parameters()).device
    ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]], device=device)
    if ids.shape[1] < 2:
        raise UserError("self-check text tokenised to fewer than 2 tokens; the tokenizer looks broken")
    attention = torch.ones_like(ids)
    was_training = student.training
    student.eval()
    try:
        hidden = last_hidden(student, ids, attention)[:, :-1]
        weight, bias = output_layer(student, vocab_size)
        targets, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
        out = chunked_distillation_loss(hidden, weight, hidden, weight, targets, mask, method="vopd",
                                        student_bias=bias, teacher_bias=bias)
        logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1, :vocab_size].float()
        ref = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    finally:
        student.train(was_training)
    assert out.kl is not None  # vopd reports the exact KL_t
    kl = float(out.kl.abs().max())
    logp_err = float((out.logp - ref).abs().max())
    tol = 1e-4 if hidden.dtype == torch.float32 else 5e-2
    if kl > tol:
        raise UserError(f"self-check failed: KL(student || student) = {kl:.2e} (should be 0); please report this")
    if logp_err > tol:
        raise UserError(f"self-check failed: the output layer does not reproduce the model's logits (max |log p| "
                        f"error {logp_err:.2e}); models with logit softcapping or scaling are not supported")
    return {"self_kl_max": kl, "logp_max_error": logp_err}


def preflight(student: Any, student_tok: Any, teacher: Teacher, cfg: TrainConfig) -> list[str]:
    """All checks for a training config, for any teacher placement; returns human-readable lines of what passed.
    The teacher checks its pairing with the student (``Teacher.pairing_checks``), then the student-side checks."""
    return [*teacher.pairing_checks(student, student_tok), *student_checks(student, student_tok, len(student_tok), cfg)]


def student_checks(student: Any, student_tok: Any, vocab: int, cfg: TrainConfig) -> list[str]:
    """The checks that need only the student and the config (sampling settings, self-check), shared by the
    in-process and the remote-teacher pre-flights; biased-sampling overrides are warned about here."""
    notes = check_sampling(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                           allow_biased=cfg.rollout.allow_biased_sampling)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    sc = self_check(student, student_tok, vocab)
    return [
        "sampling settings: " + ("; ".join(notes) if notes else "temperature 1, no top-p/top-k (unbiased)"),
        f"self-check: KL(student||student) max {sc['self_kl_max']:.1e}, chunked vs model log p max error "
        f"{sc['logp_max_error']:.1e}",
    ]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/TOML training config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.student=PATH")


def cli_main(args: argparse.Namespace) -> int:
    from vopd.config import load_config
    from vopd.models import load_student, resolve_device
    from vopd.teacher.base import open_teacher

    cfg = load_config(args.config, args.overrides, require_paths=False)  # no training data needed to check models
    for key, value in (("model.student", cfg.model.student), ("model.teacher", cfg.model.teacher)):
        if not value:
            raise UserError(f"config key {key} is required: set it to a local model directory ({key}=PATH)")
    device = resolve_device(cfg.model.device)
    tok, student = load_student(cfg.model, device)
    teacher = open_teacher(cfg.model.teacher, vocab_size=len(tok), device=device, dtype=cfg.model.teacher_dtype,
                           trust_remote_code=cfg.model.trust_remote_code, timeout_s=cfg.model.teacher_timeout_s,
                           retries=cfg.model.teacher_retries)
    try:
        for line in preflight(student, tok, teacher, cfg):
            print(f"ok  {line}")
    finally:
        teacher.close()
    return 0
