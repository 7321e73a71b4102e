"""The one teacher seam: the ``Teacher`` protocol every placement implements, and ``open_teacher`` to pick one.

What it knows: what the training loop may ask of a teacher (scores for a micro-batch of rollouts, in one of the two
typed forms of ``vopd.loss.scores``; which of the two forms it answers in; which methods it can serve, with the
reason and the fix when it cannot (``supports``, read by the pre-flight before step 1; ``vopd.teacher.answers`` helps
a placement say it); its pre-flight pairing checks against the student; its tokenizer, when it holds one; closing),
and which placement a teacher's ``model`` names (``vopd.teacher_config.TeacherConfig``: a local model directory, the
URL of a `vopd serve-teacher` server or of stock vLLM or SGLang servers (``entry.server``), or ``self``: the student's initial weights). What it does not know: how a placement computes its scores (``vopd.teacher.local``, ``vopd.teacher.client`` over ``vopd.teacher.http``; a prompt
of the teacher's own is ``vopd.teacher.reprompt``), the loss math, or the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from vopd.loss.scores import TeacherScores
from vopd.rollout import Rollout
from vopd.teacher_config import SELF, STOCK  # noqa: F401  (SELF re-exported: vopd.teacher.base.SELF)

if TYPE_CHECKING:
    from vopd.loss.methods import MethodSpec
    from vopd.teacher_config import TeacherConfig
    from vopd.models import Model, Tokenizer


class Teacher(Protocol):
    """A frozen teacher as the loop sees it.

    ``supports(spec)``: None when this placement can serve method ``spec``, else one line naming what is missing and
    the fix; the pre-flight asks it for the run's method before step 1 (``vopd.check.check_placement``).
    ``full_distribution`` says which form ``score`` answers in, not which methods it serves: ``TeacherHidden``
    (the whole distribution at every position: every method, and the exact held-out KL), or ``TeacherNumbers``
    (log q(y_t) and what else ``supports`` promises: logits at asked ids, lse); such a teacher must be asked about
    the student's top-k ids (``topk_ids``) for the top-k methods, so it scores after the student's forward.
    """

    @property
    def full_distribution(self) -> bool: ...

    def supports(self, spec: MethodSpec) -> str | None:
        """None when ``score`` can give method ``spec`` what it needs; otherwise a one-line reason that names the
        method, what this placement lacks, and the fix (another placement, an option, another method)."""
        ...

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The teacher's own tokenizer when this placement holds it (in process), for the pre-flight's stop-token
        and chat-template comparison (``vopd.check.chat_checks``); None for a server, or when the caller vouched
        that it is the student's."""
        ...

    def score(self, rollout: Rollout, *, topk_ids: Tensor | None = None, lse: bool = False) -> TeacherScores:
        """Scores aligned with ``rollout.targets`` (B, L-1), on the rollout's device. ``topk_ids`` (B, L-1, k):
        the ids to return the teacher's logits at; ``lse``: also its full-vocabulary log-sum-exp. A teacher with the
        full distribution needs neither."""
        ...

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        """Pre-flight: the teacher shares the student's tokenizer (and covers it); one line per passed check, a
        ``UserError`` naming the first difference otherwise."""
        ...

    def close(self) -> None: ...




def collective(teacher: Teacher) -> bool:
    """Whether ``teacher.score`` is a collective that every rank must join, as often and in the same order: a teacher
    sharded over the ranks (``InProcessTeacher.shard``) says so with ``collective = True``; a placement without
    the attribute scores on its own (an optional member of the protocol, so that no placement must declare it)."""
    return bool(getattr(teacher, "collective", False))


def packs(teacher: Teacher) -> bool:
    """Whether ``teacher.score`` reads a packed rollout (``vopd.packing``) as packed: an in-process model runs the
    packed row itself (``packs = True``); a placement without the attribute (a server) is sent the padded rows."""
    return bool(getattr(teacher, "packs", False))


def prepare_for(teacher: Teacher, spec: MethodSpec, top_k: int) -> None:
    """Tell ``teacher`` (under any prompt of its own: unwrapped through ``inner``) what the run's loss needs of its
    answers beyond what ``score``'s arguments say: the teacher's own top-k ids (``vopd-ttopk``), which a placement
    that picks its answers (a stock vLLM generate server, ``serve_own_topk``) must be told once, before step 0."""
    while not hasattr(teacher, "serve_own_topk") and hasattr(teacher, "inner"):
        teacher = teacher.inner
    serve = getattr(teacher, "serve_own_topk", None)
    if serve is not None and spec.teacher_topk:
        serve(top_k)


def score_rollout(teacher: Teacher, rollout: Rollout, *, topk_ids: Tensor | None = None,
                  lse: bool = False) -> TeacherScores:
    """``teacher.score`` of any rollout: a packed one reaches a teacher that does not pack (``packs``) as its padded
    rows, the ids asked and the answer moved between the grids by completion positions (``vopd.packing.regrid``)."""
    if not rollout.packed or packs(teacher):
        return teacher.score(rollout, topk_ids=topk_ids, lse=lse)
    from vopd.packing import regrid, unpack

    padded = unpack(rollout, pad_id=0)  # padding is never attended to nor sent: its id does not matter
    src, dst = rollout.completion_positions(), padded.completion_positions()
    asked = None if topk_ids is None else regrid(topk_ids, src, dst, tuple(padded.targets.shape))
    scores = teacher.score(padded, topk_ids=asked, lse=lse)
    return scores.realigned(lambda x: regrid(x, dst, src, tuple(rollout.targets.shape)), topk_ids)


def open_teacher(entry: TeacherConfig, *, vocab_size: int, device: torch.device, trust_remote_code: bool = False,
                 student: Model | None = None, student_tok: Tokenizer | None = None, lora: bool = False,
                 student_dtype: torch.dtype | None = None, load_device: torch.device | None = None) -> Teacher:
    """The teacher that ``entry`` (one of ``model.teachers``) names by its ``model``: a frozen model loaded here from
    a local directory (in ``entry.dtype``), the client of a teacher server for a URL (``entry.server``: a `vopd
    serve-teacher` server; nothing is sent until it is first used), or ``self``: the ``student``'s initial weights,
    as the base model with its LoRA adapters disabled when ``lora`` (no second copy), else a frozen copy made now, in
    ``student_dtype`` (the student's compute dtype: the copy of float32 master weights is a half teacher, as it was
    before masters; None: the student's own dtype).
    ``entry.head`` (a server only): the local checkpoint of the served teacher, whose output layer turns the server's
    hidden states (in ``entry.hidden_dtype``) into its full distribution. ``load_device``: where a local directory's
    model is loaded (None: ``device``; the host, for a teacher sharded onto ``device`` later, so that it is never
    whole on the GPU). No pre-flight here: the caller runs ``vopd.check.preflight`` with it."""
    path = entry.model
    if path == SELF:
        from vopd.teacher.local import InProcessTeacher, SelfTeacher

        if student is None:
            raise ValueError("model.teacher=self needs the student (open_teacher(..., student=model))")
        if lora:
            return SelfTeacher(student, vocab_size, tokenizer=student_tok)
        import copy

        return InProcessTeacher(copy.deepcopy(student).to(dtype=student_dtype), vocab_size, tokenizer=student_tok)
    if entry.remote:
        from vopd.teacher.client import RemoteTeacher

        if entry.server in STOCK:
            from vopd.teacher.stock_sglang import StockSglangTeacher
            from vopd.teacher.stock_vllm import StockVllmTeacher

            stock = StockVllmTeacher if entry.server == "vllm" else StockSglangTeacher
            extra: dict[str, Any] = {"head_reference": entry.head_reference or None} if entry.server == "vllm" else {}
            return stock([u.strip() for u in path.split(",")], vocab_size=vocab_size, head=entry.head or None,
                         timeout_s=entry.timeout_s, retries=entry.retries, max_seqs=entry.request_seqs,
                         max_mb=entry.request_mb, trust_remote_code=trust_remote_code, **extra)
        assert entry.server == "vopd"  # the kinds of TeacherConfig.server
        return RemoteTeacher(path, timeout_s=entry.timeout_s, retries=entry.retries, head=entry.head or None,
                             hidden_dtype=entry.hidden_dtype, trust_remote_code=trust_remote_code)
    from vopd.models import load_model, load_tokenizer, torch_dtype
    from vopd.teacher.local import InProcessTeacher

    tokenizer = load_tokenizer(path, role="teacher", trust_remote_code=trust_remote_code)
    model = load_model(path, role="teacher", dtype=torch_dtype(entry.dtype, device), device=load_device or device,
                       trust_remote_code=trust_remote_code)
    return InProcessTeacher(model, vocab_size, tokenizer=tokenizer)
