"""A frozen teacher living in this process: a Hugging Face causal LM scored on the rollout's sequences.

What it knows: running the teacher (eval mode, no grad, its own dtype and device) over a rollout and handing the
loss its last hidden states and output layer (``TeacherHidden``: the full distribution, so every method works),
moved to the rollout's device; its pre-flight pairing with the student (one token->id map, output layers that cover
it). What it does not know: optimisers, the training loop, the loss math, or HTTP (``vopd.teacher.client``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.scores import TeacherHidden
from vopd.models import base_model, last_hidden, output_layer
from vopd.rollout import Rollout


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
    for role, model in (("student", student), ("teacher", teacher)):
        head = base_model(model).get_output_embeddings()
        rows = head.weight.shape[0]
        if rows < vocab_size:
            raise UserError(f"the {role}'s output layer has {rows} rows but the tokenizer has {vocab_size} tokens; "
                            "the model does not belong to this tokenizer")


class InProcessTeacher:
    """A frozen Hugging Face causal LM in this process. ``tokenizer``: its own tokenizer, compared with the
    student's in the pre-flight (None: the caller vouches that it is the student's)."""

    full_distribution = True

    def __init__(self, model: Any, vocab_size: int, *, tokenizer: Any = None) -> None:
        self.model = model.eval().requires_grad_(False)  # frozen: no gradient is ever taken through the teacher
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, rollout: Rollout, *, topk_ids: Tensor | None = None, lse: bool = False) -> TeacherHidden:
        """The teacher's last hidden states (B, L-1, D_t) and output layer: the full distribution, so ``topk_ids``
        and ``lse`` are not needed."""
        r = rollout.to(self.device)
        hidden = last_hidden(self.model, r.input_ids, r.attention_mask)[:, :-1]
        weight, bias = output_layer(self.model, self.vocab_size)
        return TeacherHidden(hidden, weight, bias).to(rollout.input_ids.device)

    def pairing_checks(self, student: Any, student_tok: Any) -> list[str]:
        lines = []
        if self.tokenizer is not None:
            compare_tokenizers(student_tok, self.tokenizer)
            lines.append(f"tokenizers identical ({len(student_tok)} tokens, special tokens match)")
        check_heads(student, self.model, self.vocab_size)
        return [*lines, "output layers cover the tokenizer"]

    def close(self) -> None:
        """Nothing to release: the model goes with the object."""
