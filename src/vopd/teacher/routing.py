"""The run's teachers: one (``model.teacher``) or several by name (``model.teachers``), and which rows each scores.

What it knows: opening every teacher a config names (each through ``vopd.teacher.base.open_teacher``, so each is
any placement: a local directory, a server URL, ``self``), wrapping them all alike (a teacher prompt of their own),
closing them, and splitting a micro-batch into the rows of each teacher (``Rollout.routes``, from
``data.teacher_field``), in a fixed order so that every rank and every run splits the same way. The loss of a step
stays one global token mean over all teachers' rows (``vopd.step``): routing chooses who scores a token, never how
much it weighs. What it does not know: how a teacher scores, the loss, or the pre-flight (``vopd.check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from vopd.rollout import Rollout
from vopd.teacher.base import Teacher, is_remote, open_teacher

if TYPE_CHECKING:
    from vopd.config import TrainConfig
    from vopd.models import Model, Tokenizer

#: The name of the one teacher of ``model.teacher`` (no routing; metrics carry no per-teacher keys).
ONLY = ""


@dataclass(frozen=True)
class Part:
    """The rows of a micro-batch one teacher scores: ``rows`` None means all of them."""

    name: str
    teacher: Teacher
    rows: list[int] | None
    elsewhere: bool = False  # scoring runs in another process (a server): it can overlap the student's work

    def of(self, rollout: Rollout) -> Rollout:
        return rollout if self.rows is None else rollout.take(self.rows)


class Teachers:
    """Teachers by name, in a fixed (sorted) order. ``routed``: rows name their teacher (``Rollout.routes``).
    ``elsewhere``: the names of the teachers that score in another process (a teacher server)."""

    def __init__(self, by_name: dict[str, Teacher], *, elsewhere: set[str] | frozenset[str] = frozenset()) -> None:
        if not by_name:
            raise ValueError("Teachers needs at least one teacher")
        self.by_name = dict(sorted(by_name.items()))
        self.elsewhere = frozenset(elsewhere) & set(self.by_name)

    @property
    def routed(self) -> bool:
        return ONLY not in self.by_name

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    @property
    def single(self) -> Teacher | None:
        """The teacher of every row, when there is one (evaluation's exact KL needs it), else None."""
        return None if self.routed else self.by_name[ONLY]

    def __iter__(self) -> Iterator[tuple[str, Teacher]]:
        return iter(self.by_name.items())

    def map(self, wrap: Callable[[Teacher], Teacher]) -> "Teachers":
        return Teachers({name: wrap(t) for name, t in self}, elsewhere=self.elsewhere)

    def parts(self, rollout: Rollout) -> list[Part]:
        """The micro-batch ``rollout`` split by teacher: one part per teacher that has rows in it, in name order."""
        if not self.routed:
            return [Part(ONLY, self.by_name[ONLY], None, ONLY in self.elsewhere)]
        if rollout.routes is None:
            raise ValueError("a rollout without routes reached several teachers: pack(..., routes=...) is missing")
        parts = []
        for name, teacher in self:
            rows = [i for i, r in enumerate(rollout.routes) if r == name]
            if rows:
                parts.append(Part(name, teacher, None if len(rows) == rollout.size else rows, name in self.elsewhere))
        return parts

    def close(self) -> None:
        errors = []
        for _name, teacher in self:
            try:
                teacher.close()
            except Exception as exc:  # close every teacher even if one fails; report the first
                errors.append(exc)
        if errors:
            raise errors[0]


def open_teachers(cfg: TrainConfig, *, vocab_size: int, device: torch.device, student: Model,
                  student_tok: Tokenizer) -> Teachers:
    """Every teacher of ``cfg``: ``model.teacher`` alone (named ``ONLY``), or each of ``model.teachers``. A teacher
    that fails to open closes the ones opened before it."""
    m = cfg.model
    places = m.teachers or {ONLY: m.teacher}
    opened: dict[str, Teacher] = {}
    try:
        for name, path in sorted(places.items()):
            opened[name] = open_teacher(path, vocab_size=vocab_size, device=device, dtype=m.teacher_dtype,
                                        trust_remote_code=m.trust_remote_code, timeout_s=m.teacher_timeout_s,
                                        retries=m.teacher_retries, student=student, student_tok=student_tok,
                                        lora=cfg.lora.enabled, head=_head(cfg, name) or None,
                                        hidden_dtype=m.teacher_hidden_dtype)
    except BaseException:
        if opened:
            Teachers(opened).close()
        raise
    return Teachers(opened, elsewhere={name for name, path in places.items() if is_remote(path)})


def _head(cfg: TrainConfig, name: str) -> str:
    """``open_teacher``'s ``head`` (the local checkpoint whose output layer turns a server's hidden states into the
    full distribution) for teacher ``name``: ``model.teacher_head`` for the one teacher, ``model.teacher_heads``
    by name; "" for none."""
    return cfg.model.teacher_head if name == ONLY else cfg.model.teacher_heads.get(name, "")
