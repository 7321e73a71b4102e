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
from vopd.rollout import Rollout, pack
from vopd.sampling import Samples

if TYPE_CHECKING:
    from vopd.loss.methods import MethodSpec
    from vopd.models import Model, Tokenizer
    from vopd.teacher.base import Teacher


def teacher_view(rollout: Rollout, pad_id: int) -> tuple[Rollout, tuple[Tensor, Tensor, Tensor]]:
    """(the teacher's rollout: its prompt + the completion per row, (rows, student positions, teacher positions) of
    every completion target)."""
    assert rollout.teacher_prompts is not None
    completions = rollout.completions()
    # The student's loss mask (holes included) travels onto the teacher's grid: the teacher scores what is trained.
    sampled = [rollout.loss_mask[i, p - 1:p - 1 + c].tolist()
               for i, (p, c) in enumerate(zip(rollout.prompt_lengths, rollout.completion_lengths))]
    view = pack(rollout.teacher_prompts, Samples(completions, [], list(rollout.truncated), sampled), pad_id)
    rows: list[int] = []
    s_pos: list[int] = []
    t_pos: list[int] = []
    for i, (p_s, p_t, c) in enumerate(zip(rollout.prompt_lengths, view.prompt_lengths, rollout.completion_lengths)):
        rows += [i] * c
        s_pos += range(p_s - 1, p_s - 1 + c)
        t_pos += range(p_t - 1, p_t - 1 + c)
    index = tuple(torch.tensor(x, dtype=torch.long) for x in (rows, s_pos, t_pos))
    return view, (index[0], index[1], index[2])


def _move(x: Tensor, lead: tuple[int, ...], src: tuple[Tensor, Tensor], dst: tuple[Tensor, Tensor]) -> Tensor:
    """A (B, T_src, ...) tensor's completion positions ``src`` copied to ``dst`` of a zero (B, T_dst, ...) tensor."""
    out = torch.zeros(lead + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    out[dst[0].to(x.device), dst[1].to(x.device)] = x[src[0].to(x.device), src[1].to(x.device)]
    return out


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

    @property
    def collective(self) -> bool:
        """The wrapped teacher's (one ``score`` here is one of its own)."""
        from vopd.teacher.base import collective

        return collective(self.inner)

    def supports(self, spec: MethodSpec) -> str | None:
        """The wrapped teacher's: its own prompt changes which positions it reads, not what it sends."""
        return self.inner.supports(spec)

    def score(self, rollout: Rollout, *, topk_ids: Tensor | None = None, lse: bool = False) -> TeacherScores:
        if rollout.teacher_prompts is None:
            return self.inner.score(rollout, topk_ids=topk_ids, lse=lse)
        view, (rows, s_pos, t_pos) = teacher_view(rollout.to(torch.device("cpu")), self.pad_id)
        view = view.to(rollout.input_ids.device)
        lead_s, lead_t = tuple(rollout.targets.shape), tuple(view.targets.shape)
        asked = None if topk_ids is None else _move(topk_ids, lead_t, (rows, s_pos), (rows, t_pos))
        scores = self.inner.score(view, topk_ids=asked, lse=lse)

        def back(x: Tensor) -> Tensor:
            return _move(x, lead_s, (rows, t_pos), (rows, s_pos))

        return scores.realigned(back, topk_ids)  # numbers are about the ids the student asked on its own grid

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        return [*self.inner.pairing_checks(student, student_tok),
                "the teacher reads each completion after its own prompt (aligned by completion tokens)"]

    def close(self) -> None:
        self.inner.close()
