"""The run's teachers by name (``model.teachers``, or the one of ``model.teacher``), and which rows each scores.

What it knows: opening every teacher a config names (each through ``vopd.teacher.base.open_teacher``, so each is
any placement: a local directory, a server URL, ``self``), wrapping them all alike (a teacher prompt of their own),
closing them, and, when rows are routed (``data.teacher_field``), splitting a micro-batch into the rows of each
teacher (``Rollout.routes``), in a fixed order so that every rank and every run splits the same way. The loss of a
step stays one global token mean over all teachers' rows (``vopd.step``): routing chooses who scores a token, never
how much it weighs. What it does not know: how a teacher scores, the loss, or the pre-flight (``vopd.check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from vopd.precision import torch_dtype
from vopd.rollout import Rollout
from vopd.teacher.base import Teacher, collective, open_teacher

if TYPE_CHECKING:
    from vopd.config import TrainConfig
    from vopd.models import Model, Tokenizer


@dataclass(frozen=True)
class Part:
    """The rows of a micro-batch one teacher scores: ``rows`` None means all of them. ``idle``: a collective teacher
    (sharded over the ranks) with no row here, which must still join its forward: it scores ``rows`` (one
    placeholder row) and its scores are dropped."""

    name: str
    teacher: Teacher
    rows: list[int] | None
    elsewhere: bool = False  # scoring runs in another process (a server) and may overlap the student's work
    idle: bool = False

    def of(self, rollout: Rollout) -> Rollout:
        return rollout if self.rows is None else rollout.take(self.rows)


class Teachers:
    """Teachers by name, in a fixed (sorted) order. ``routed``: rows name their teacher (``Rollout.routes``); else
    there is one teacher and it scores every row. ``elsewhere``: the names of the teachers that score in another
    process (a teacher server) and may score ahead on a background thread (``overlap``)."""

    def __init__(self, by_name: dict[str, Teacher], *, routed: bool | None = None,
                 elsewhere: set[str] | frozenset[str] = frozenset()) -> None:
        """``routed`` None: routed when there are several teachers."""
        if not by_name:
            raise ValueError("Teachers needs at least one teacher")
        if routed is False and len(by_name) > 1:
            raise ValueError("several teachers need routed rows (data.teacher_field)")
        self.by_name = dict(sorted(by_name.items()))
        self.routed = len(by_name) > 1 if routed is None else routed
        self.elsewhere = frozenset(elsewhere) & set(self.by_name)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    @property
    def single(self) -> Teacher | None:
        """The teacher of every row, when there is one (evaluation's exact KL needs it), else None."""
        return None if self.routed else next(iter(self.by_name.values()))

    def __iter__(self) -> Iterator[tuple[str, Teacher]]:
        return iter(self.by_name.items())

    def map(self, wrap: Callable[[Teacher], Teacher]) -> "Teachers":
        return Teachers({name: wrap(t) for name, t in self}, routed=self.routed, elsewhere=self.elsewhere)

    @property
    def collective(self) -> bool:
        """Some teacher's ``score`` is a collective (sharded): every rank must score, and evaluate, in step."""
        return any(collective(t) for _name, t in self)

    def parts(self, rollout: Rollout) -> list[Part]:
        """The micro-batch ``rollout`` split by teacher: one part per teacher that has rows in it, in name order, and
        an ``idle`` part, at its place in that order, for each collective teacher without rows in it. The ranks' micro-
        batches hold different teachers' rows, but a sharded teacher's forward all-gathers its weights with every rank,
        so every rank runs each collective teacher's forward once per micro-batch, in the same order."""
        if not self.routed:
            ((name, teacher),) = self.by_name.items()
            return [Part(name, teacher, None, name in self.elsewhere)]
        if rollout.routes is None:
            raise ValueError("a rollout without routes reached several teachers: pack(..., routes=...) is missing")
        parts = []
        for name, teacher in self:
            rows = [i for i, r in enumerate(rollout.routes) if r == name]
            if rows:
                parts.append(Part(name, teacher, None if len(rows) == rollout.size else rows, name in self.elsewhere))
            elif collective(teacher):
                parts.append(Part(name, teacher, [0], idle=True))
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
    """Every teacher of ``cfg`` (``model.teachers``, or the shorthand ``model.teacher`` as the one named
    ``teacher``), routed when ``data.teacher_field`` is set. A teacher this run shards (``vopd.sharding.
    teacher_is_sharded``; ``vopd.setup`` shards it after the pre-flight) is loaded on the host. A teacher that fails
    to open closes the ones opened before it."""
    from vopd.sharding import teacher_is_sharded

    configs = sorted(cfg.model.teacher_configs, key=lambda t: t.name)
    routed = bool(cfg.data.teacher_field)
    opened: dict[str, Teacher] = {}
    try:
        for entry in configs:
            sharded = teacher_is_sharded(entry, strategy=cfg.distributed.strategy, lora=cfg.lora.enabled)
            opened[entry.name] = open_teacher(entry, vocab_size=vocab_size, device=device,
                                              trust_remote_code=cfg.model.trust_remote_code, student=student,
                                              student_tok=student_tok, lora=cfg.lora.enabled,
                                              student_dtype=torch_dtype(cfg.model.dtype, device),
                                              load_device=torch.device("cpu") if sharded else None)
    except BaseException:
        if opened:
            Teachers(opened, routed=True).close()
        raise
    return Teachers(opened, routed=routed, elsewhere={t.name for t in configs if t.remote and t.overlap})
