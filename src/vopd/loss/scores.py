"""What the fused head takes from a teacher: its hidden states and output layer, or its per-token numbers.

What it knows: the two typed forms a teacher's scores come in, their shapes, and how to select the live rows (the
completion positions) of each, and what each supplies the fused head per chunk of rows (``chunk_inputs``: the
teacher's logits formed from its hidden states, or its numbers), so the head never asks which form it holds.
``TeacherHidden`` carries the teacher's whole distribution (logits are formed chunk
by chunk inside the head, through the teacher's logit transform), so every method can use it; ``TeacherNumbers``
carries only what a teacher server sends per position, enough for the methods whose ``MethodSpec.per_token_teacher``
is true. What it does not know: where the numbers came from (``vopd.teacher`` produces them), or any loss math.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch
from torch import Tensor

from vopd.loss.head import IDENTITY, LogitTransform, raw_logits


@dataclass(frozen=True)
class TeacherHidden:
    """The teacher as its last hidden states (after the final norm) and its output layer.

    hidden: (*lead, D_t), aligned with the rollout's targets; weight: (V, D_t) sliced to the shared vocabulary;
    bias: (V,) or None. All detached (the teacher never receives a gradient). transform: the teacher's logit
    transform (softcapping, scaling), so its logits are ``transform(hidden @ weight.T + bias)``.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform = IDENTITY

    def rows(self, idx: Tensor) -> "TeacherHidden":
        """The live rows ``idx`` of the flattened leading dimensions: hidden becomes (N, D_t)."""
        flat = self.hidden.detach().reshape(-1, self.hidden.shape[-1])
        return TeacherHidden(flat.index_select(0, idx), self.weight.detach(),
                             None if self.bias is None else self.bias.detach(), self.transform)

    def for_head(self, cd: torch.dtype, keep_weight_dtype: bool) -> "TeacherHidden":
        """The form the head reads: the output layer converted to the compute dtype ``cd`` once per call, not per
        chunk (kept as is when ``keep_weight_dtype``: half-precision weights on CUDA, fp32-accumulated matmuls)."""
        return self if keep_weight_dtype else replace(self, weight=self.weight.to(cd))

    def chunk_inputs(self, lo: int, hi: int, cd: torch.dtype) -> dict[str, Tensor | None]:
        """Rows [lo, hi): the teacher's final logits ``zt`` (c, V), formed here without a graph."""
        with torch.no_grad():
            return {"zt": self.transform.apply_(raw_logits(self.hidden[lo:hi], self.weight, self.bias, cd))}

    def to(self, device: torch.device) -> "TeacherHidden":
        return TeacherHidden(self.hidden.to(device), self.weight.to(device),
                             None if self.bias is None else self.bias.to(device), self.transform)


@dataclass(frozen=True)
class TeacherNumbers:
    """The teacher as per-token numbers (a teacher server), 0 outside completion positions.

    logq:        (*lead) log q(y_t), the teacher's log-prob of each sampled token.
    topk_ids:    (*lead, k) int64, the student's top-k ids the teacher was asked about (top-k methods), else None.
    topk_logits: (*lead, k) the teacher's logits at ``topk_ids`` (final: after its logit transform), else None.
    lse:         (*lead) the teacher's full-vocabulary log-sum-exp (``rb-topk``), else None.
    """

    logq: Tensor
    topk_ids: Tensor | None = None
    topk_logits: Tensor | None = None
    lse: Tensor | None = None

    @property
    def k(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[-1])

    def rows(self, idx: Tensor) -> "TeacherNumbers":
        """The live rows ``idx`` of the flattened leading dimensions."""
        lead = self.logq.dim()

        def pick(x: Tensor) -> Tensor:
            return x.detach().reshape(-1, *x.shape[lead:]).index_select(0, idx)

        return TeacherNumbers(pick(self.logq), None if self.topk_ids is None else pick(self.topk_ids).long(),
                              None if self.topk_logits is None else pick(self.topk_logits),
                              None if self.lse is None else pick(self.lse))

    def for_head(self, cd: torch.dtype, keep_weight_dtype: bool) -> "TeacherNumbers":
        return self  # numbers are converted per chunk (``chunk_inputs``): there is no output layer to convert

    def chunk_inputs(self, lo: int, hi: int, cd: torch.dtype) -> dict[str, Tensor | None]:
        """Rows [lo, hi): the ids asked about, log q(y), the logits at the ids and the lse (in ``cd``)."""

        def part(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[lo:hi].to(cd)

        return {"ids": None if self.topk_ids is None else self.topk_ids[lo:hi], "logq": part(self.logq),
                "zt_k": part(self.topk_logits), "lse_t": part(self.lse)}

    def to(self, device: torch.device) -> "TeacherNumbers":
        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return TeacherNumbers(self.logq.to(device), move(self.topk_ids), move(self.topk_logits), move(self.lse))


#: A teacher's scores for one micro-batch, in either form (``vopd.teacher.base.Teacher.score`` returns one).
TeacherScores = Union[TeacherHidden, TeacherNumbers]
