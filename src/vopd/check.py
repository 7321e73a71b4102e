"""Pre-flight checks of a student/teacher pair, run before step 0 of every training run and as `vopd check`.

What it knows: that student and teacher must share one token->id map and the same special tokens (else every
per-token reward compares different tokens), that both output layers must cover the tokenizer, which sampling
settings keep the estimators unbiased (temperature 1, no top-p, no top-k: spec "Setting"), and how to self-check the
hidden-state path (teacher = student must give KL = 0, and the chunked log p(y) must equal the model's own forward).
What it does not know: training. Each failed check is a ``UserError`` naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch

from vopd.errors import UserError

_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def compare_tokenizers(student_tok: Any, teacher_tok: Any) -> None:
    """Identical token->id maps and special tokens, or a UserError naming the first difference."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        for token in sorted(set(sv) | set(tv), key=lambda t: (sv.get(t, tv.get(t, -1)), t)):
            if sv.get(token) != tv.get(token):
                raise UserError(
                    f"student and teacher tokenizers differ: token {token!r} has id {sv.get(token)} in the student "
                    f"and {tv.get(token)} in the teacher ({len(sv)} vs {len(tv)} tokens); OPD needs one shared "
                    "tokenizer: pick a teacher from the student's model family"
                )
    for name in _SPECIAL:
        a, b = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if a != b:
            raise UserError(f"student and teacher {name} differ ({a!r} vs {b!r}); set the same special tokens in "
                            "both tokenizers")


def check_heads(student: Any, teacher: Any, vocab_size: int) -> None:
    """Both output layers must have at least the tokenizer's rows (extra rows are padding, sliced off)."""
    from vopd.models import base_model

    for role, model in (("student", student), ("teacher", teacher)):
        head = base_model(model).get_output_embeddings()
        rows = head.weight.shape[0]
        if rows < vocab_size:
            raise UserError(f"the {role}'s output layer has {rows} rows but the tokenizer has {vocab_size} tokens; "
                            "the model does not belong to this tokenizer")


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
    from vopd.chunked import chunked_distillation_loss
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
    kl = float(out.kl.abs().max())
    logp_err = float((out.logp - ref).abs().max())
    tol = 1e-4 if hidden.dtype == torch.float32 else 5e-2
    if kl > tol:
        raise UserError(f"self-check failed: KL(student || student) = {kl:.2e} (should be 0); please report this")
    if logp_err > tol:
        raise UserError(f"self-check failed: the output layer does not reproduce the model's logits (max |log p| "
                        f"error {logp_err:.2e}); models with logit softcapping or scaling are not supported")
    return {"self_kl_max": kl, "logp_max_error": logp_err}


def preflight(student: Any, teacher: Any, student_tok: Any, teacher_tok: Any, cfg: Any) -> list[str]:
    """All checks for a training config; returns human-readable lines describing what passed."""
    compare_tokenizers(student_tok, teacher_tok)
    vocab = len(student_tok)
    check_heads(student, teacher, vocab)
    return [
        f"tokenizers identical ({vocab} tokens, special tokens match)",
        "output layers cover the tokenizer",
        *student_checks(student, student_tok, vocab, cfg),
    ]


def student_checks(student: Any, student_tok: Any, vocab: int, cfg: Any) -> list[str]:
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
    from vopd.models import load_model, load_tokenizer, resolve_device, resolve_dtype

    cfg = load_config(args.config, args.overrides, require_paths=False)  # no training data needed to check models
    for key, value in (("model.student", cfg.model.student), ("model.teacher", cfg.model.teacher)):
        if not value:
            raise UserError(f"config key {key} is required: set it to a local model directory ({key}=PATH)")
    device = resolve_device(cfg.model.device)
    s_tok = load_tokenizer(cfg.model.student, role="student", trust_remote_code=cfg.model.trust_remote_code)
    t_tok = load_tokenizer(cfg.model.teacher, role="teacher", trust_remote_code=cfg.model.trust_remote_code)
    student = load_model(cfg.model.student, role="student", dtype=resolve_dtype(cfg.model.dtype, device),
                         device=device, trust_remote_code=cfg.model.trust_remote_code)
    teacher = load_model(cfg.model.teacher, role="teacher", dtype=resolve_dtype(cfg.model.teacher_dtype, device),
                         device=device, trust_remote_code=cfg.model.trust_remote_code)
    for line in preflight(student, teacher, s_tok, t_tok, cfg):
        print(f"ok  {line}")
    return 0
