"""A teacher that reads the student's completion after a prompt of its own (privileged context: a hint, the
reference solution, another system prompt), around any placement.

What it knows: when a rollout carries ``teacher_prompts``, the teacher's sequences are its own prompt followed by the
student's completion ids, so the two grids differ by each row's prompt-length difference; completion token j is
predicted at position ``p_s - 1 + j`` on the student's grid and ``p_t - 1 + j`` on the teacher's. Alignment is by
completion tokens, never by position: the student's top-k ids are moved onto the teacher's grid before scoring and
every score is moved back onto the student's (zero elsewhere, as the loss expects). What it does not know: how the
wrapped teacher scores (in process or over HTTP), the loss, or how teacher prompts are rendered (``vopd.data``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vopd.loss.scores import TeacherScores
from vopd.packing import pack_rows, regrid
from vopd.rollout import Rollout, pack
from vopd.sampling import Samples
from vopd.teacher.base import collective, packs

if TYPE_CHECKING:
    from vopd.loss.methods import MethodSpec
    from vopd.models import Model, Tokenizer
    from vopd.teacher.base import Teacher


def teacher_view(rollout: Rollout, pad_id: int, *, packed: bool = False) -> tuple[Rollout, Grids]:
    """(the teacher's rollout: its prompt + the completion per sequence, packed like the student's when ``packed``
    (``vopd.packing``); the (rows, positions) of every completion target on the student's grid and on the
    teacher's, in the same order)."""
    assert rollout.teacher_prompts is not None
    completions = rollout.completions()
    src = rollout.completion_positions()
    # The student's loss mask (holes included) travels onto the teacher's grid: the teacher scores what is trained.
    flags = rollout.loss_mask[src[0], src[1]].tolist()
    sampled, at = [], 0
    for c in rollout.completion_lengths:
        sampled.append(flags[at:at + c])
        at += c
    view = pack(rollout.teacher_prompts, Samples(completions, [], list(rollout.truncated), sampled), pad_id)
    if packed:
        view = pack_rows(view)
    return view, (src, view.completion_positions())


#: (the student's (rows, positions), the teacher's (rows, positions)) of the same completion targets.
Grids = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


class OwnPromptTeacher:
    """Wraps a ``Teacher``: rollouts with ``teacher_prompts`` are scored after those prompts; others pass through."""

    def __init__(self, inner: Teacher, pad_id: int) -> None:
        self.inner, self.pad_id = inner, pad_id

    @property
    def full_distribution(self) -> bool:
        return self.inner.full_distribution

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.inner.tokenizer

    packs = True  # a packed rollout's teacher view is packed the same way when the wrapped teacher packs, else padded

    @property
    def collective(self) -> bool:
        """The wrapped teacher's (one ``score`` here is one of its own)."""
        return collective(self.inner)

    def supports(self, spec: MethodSpec) -> str | None:
        """The wrapped teacher's: its own prompt changes which positions it reads, not what it sends."""
        return self.inner.supports(spec)

    def score(self, rollout: Rollout, *, topk_ids: Tensor | None = None, lse: bool = False) -> TeacherScores:
        if rollout.teacher_prompts is None:
            return self.inner.score(rollout, topk_ids=topk_ids, lse=lse)
        view, (src, dst) = teacher_view(rollout.to(torch.device("cpu")), self.pad_id,
                                        packed=rollout.packed and packs(self.inner))
        view = view.to(rollout.input_ids.device)
        lead_s, lead_t = tuple(rollout.targets.shape), tuple(view.targets.shape)
        asked = None if topk_ids is None else regrid(topk_ids, src, dst, lead_t)
        scores = self.inner.score(view, topk_ids=asked, lse=lse)

        def back(x: Tensor) -> Tensor:
            return regrid(x, dst, src, lead_s)

        return scores.realigned(back, topk_ids)  # numbers are about the ids the student asked on its own grid

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        return [*self.inner.pairing_checks(student, student_tok),
                "the teacher reads each completion after its own prompt (aligned by completion tokens)"]

    def close(self) -> None:
        self.inner.close()
