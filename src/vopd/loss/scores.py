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
from typing import Callable, Union

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.head import IDENTITY, LogitTransform, raw_logits
from vopd.loss.methods import MethodSpec

#: A map of per-position tensors from one grid of positions to another (``vopd.teacher.reprompt``: the teacher's
#: own prompt moves the completion tokens), applied to the leading dimensions.
Realign = Callable[[Tensor], Tensor]


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

    @property
    def k(self) -> int:
        """The width of top-k logits sent: none, the head gathers them from the full logits at the asked ids."""
        return 0

    def grid(self, vocab: int) -> tuple[int, tuple[int, ...]]:
        """(the teacher's vocabulary size, its leading shape), after checking its own hidden size; ``vocab`` (the
        student's) is not needed here, as the output layer says the teacher's."""
        if self.weight.shape[1] != self.hidden.shape[-1]:
            raise ValueError(f"hidden size mismatch: teacher hidden {self.hidden.shape[-1]} vs weight "
                             f"{tuple(self.weight.shape)}")
        return self.weight.shape[0], tuple(self.hidden.shape[:-1])

    def check_for(self, spec: MethodSpec, lead: tuple[int, ...]) -> None:
        """Hidden states serve every method (``vopd.loss.methods``): nothing to check."""

    def realigned(self, move: Realign, topk_ids: Tensor | None) -> "TeacherHidden":
        """The same scores on another grid of positions (the head gathers at ``topk_ids`` itself)."""
        return TeacherHidden(move(self.hidden), self.weight, self.bias, self.transform)

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
    topk_ids:    (*lead, k) int64, the student's top-k ids the teacher was asked about (top-k methods), or the
                 teacher's own top-k ids at each position (``vopd-ttopk``: ``MethodSpec.teacher_topk``), else None.
    topk_logits: (*lead, k) the teacher's logits at ``topk_ids`` (final: after its logit transform), or its
                 log-probs there (a stock server's prompt log-probs; renormalising on the ids cancels the
                 difference, docs/estimators.md), else None.
    lse:         (*lead) the teacher's full-vocabulary log-sum-exp (``rb-topk``), else None.
    """

    logq: Tensor
    topk_ids: Tensor | None = None
    topk_logits: Tensor | None = None
    lse: Tensor | None = None

    @property
    def k(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[-1])

    def grid(self, vocab: int) -> tuple[int, tuple[int, ...]]:
        """(the vocabulary size, the leading shape): numbers are sent on the student's ids, so its ``vocab``."""
        return vocab, tuple(self.logq.shape)

    def check_for(self, spec: MethodSpec, lead: tuple[int, ...]) -> None:
        """The numbers must be what ``spec`` needs, on the student's grid ``lead``."""
        if spec.full_distribution:
            raise UserError(f"loss.method={spec.name} needs the teacher's full distribution at every position (sums "
                            "over the whole vocabulary), which a teacher sending per-token numbers does not give; use "
                            "vopd-topk (the same unbiased gradient with a top-k baseline), a teacher server's hidden "
                            "states (model.teachers[].head) or an in-process teacher")
        if spec.topk:
            if self.topk_ids is None or self.topk_logits is None:
                raise ValueError(f"method {spec.name} needs topk_ids and topk_logits (B, T, k) from the teacher")
            for name, x in (("topk_ids", self.topk_ids), ("topk_logits", self.topk_logits)):
                if tuple(x.shape) != lead + (self.k,):
                    raise ValueError(f"{name} shape {tuple(x.shape)} must be (B, T, k) = {lead + (self.k,)}")
        if spec.teacher_lse and (self.lse is None or tuple(self.lse.shape) != lead):
            raise ValueError(f"method {spec.name} needs teacher_lse (B, T) = {lead}, the teacher's log-sum-exp "
                             "(TeacherNumbers.lse, RemoteTeacher.score(..., lse=True)); got "
                             f"{None if self.lse is None else tuple(self.lse.shape)}")

    def realigned(self, move: Realign, topk_ids: Tensor | None) -> "TeacherNumbers":
        """The same numbers on another grid of positions, about ``topk_ids`` (the ids asked on that grid); when
        nothing was asked (None), the ids are the teacher's own (``vopd-ttopk``) and move with its numbers."""
        if topk_ids is None and self.topk_ids is not None:
            topk_ids = move(self.topk_ids)
        return TeacherNumbers(move(self.logq), topk_ids, None if self.topk_logits is None else move(self.topk_logits),
                              None if self.lse is None else move(self.lse))

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
