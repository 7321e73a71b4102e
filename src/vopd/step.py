"""One training step's gradient: micro-batches, teacher scores, the fused loss, backward, and the variance probe.

What it knows: how a rank's rollouts are split into micro-batches (rows in order, or by a token budget through
``vopd.batching``, as many on every rank; each packed into one row with ``packing``, ``vopd.packing``; a
one-micro-batch step runs as two when the variance probe is on) and what they cost (``pad_fraction``), the order
of work per micro-batch (teacher scores, the student's forward, the loss through
``vopd.loss.chunked.fused_distillation_loss`` per teacher part of the micro-batch, backward, gradients reduced over
ranks on the last one), overlapped scoring (``ScoreAhead``: a remote teacher scores micro-batch i+1 while the student
works on i), the global token mean (docs/estimators.md, "dapo" reduction) over all teachers' rows, the per-teacher
metrics, and the half-batch squared gradient norm that ``vopd.metrics.gradient_noise`` turns into the variance proxy
(docs/metrics.md). What it does not know: sampling, the optimizer step, logging or checkpoints (``vopd.train``),
which rows a teacher scores (``vopd.teacher.routing``) or which placement it talks to (``Teacher``)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import torch

from vopd import distributed as dist
from vopd.config import LossConfig, TrainConfig
from vopd.loss.chunked import fused_distillation_loss, student_topk_ids
from vopd.loss.estimators import LossOutput
from vopd.loss.head import LogitTransform
from vopd.loss.plan import LossPlan
from vopd.metrics import PhaseTimer, TokenStats
from vopd.models import logit_transform
from vopd.rollout import Rollout
from vopd.loss.scores import TeacherScores
from vopd.teacher.base import Teacher, score_rollout
from vopd.teacher.routing import Teachers


@dataclass(frozen=True)
class StepGradient:
    """What one step's backward passes left besides the gradients: the per-token statistics reduced over every
    micro-batch and rank (``TokenStats.reduce``, docs/metrics.md), the loss (the global token mean, summed over
    ranks), the global completion-token count, and the half-batch probe ((|G_a|^2, a) for
    ``vopd.metrics.gradient_noise``; None when off or not separable)."""

    token_metrics: dict[str, float]
    loss: float
    total_tokens: float
    half_probe: tuple[float, int] | None
    scored_ahead_s: float | None = None  # seconds of scoring done on the background thread (None: no overlap)


def loss_plan(loss: LossConfig, transform: LogitTransform) -> LossPlan:
    """The run's loss from the ``loss`` section of the config and the student's logit transform (softcapping /
    scaling, docs/estimators.md "Output transforms"), built once before step 0 (``vopd.setup``)."""
    return LossPlan.of(loss.method, top_k=loss.top_k, ratio_cap=loss.ratio_cap, ratio_mode=loss.ratio_mode,
                       memory_budget_mb=loss.chunk_memory_mb, transform=transform)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], *,
                   foreach: bool | None = None) -> torch.optim.Optimizer:
    """The run's AdamW over ``params``. ``foreach``: PyTorch's default (None: the multi-tensor path on CUDA) or forced
    (``vopd.memplan`` traces on CPU tensors that stand for CUDA ones, and the multi-tensor path's temporaries count)."""
    return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay, foreach=foreach)


def accumulate_gradients(cfg: TrainConfig, student: dist.WrappedStudent, teachers: Teachers, rollout: Rollout,
                         device: torch.device, timer: PhaseTimer, plan: LossPlan | None = None) -> StepGradient:
    """Score, loss and backward over this rank's ``rollout`` in micro-batches; the gradients are left in the model
    (reduced over ranks), ready for the optimizer step. ``plan``: the run's loss (None: built here from ``cfg.loss``,
    for callers outside the trainer)."""
    plan = plan or loss_plan(cfg.loss, logit_transform(student.model))
    micro, shape = micro_batches(cfg, rollout)
    micro = [mb.to(device) for mb in micro]
    half = len(micro) // 2 if cfg.grad_noise else 0
    # The token mean is over the whole global batch (docs/estimators.md, "dapo" reduction): every micro-batch and
    # rank divides by N_global / world_size, and DDP/FSDP2 average the gradients over ranks, so the update is
    # (1/W) sum_r grad(sum_r / (N/W)) = grad(sum over all tokens) / N: the exact global token mean. Several
    # teachers change who scores a token, never its weight: every part of a micro-batch divides by the same N.
    total_tokens = dist.all_reduce_sum(torch.tensor(float(rollout.num_tokens))).item()
    normalizer = max(total_tokens, 1.0) / dist.world_size()

    stats = TokenStats(ratio_cap=cfg.loss.ratio_cap)
    by_teacher = {name: TokenStats(ratio_cap=cfg.loss.ratio_cap) for name in teachers.names} if teachers.routed else {}
    loss_sum = 0.0
    half_probe: tuple[float, int] | None = None
    with ScoreAhead(plan, any(t.overlap for t in cfg.model.teacher_configs), teachers, micro) as ahead:
        for i, mb in enumerate(micro):
            with student.grad_reduction(last=i == len(micro) - 1):
                parts = micro_batch_loss(plan, student, teachers, mb, normalizer, timer, ahead=ahead.take(i))
                loss = torch.stack([p.out.loss for p in parts]).sum()
                loss.backward()
            loss_sum += float(loss.detach())
            for p in parts:
                stats.add(p.out, p.rows.loss_mask, p.rows.sampler_logprobs)
                if by_teacher:
                    by_teacher[p.name].add(p.out, p.rows.loss_mask, p.rows.sampler_logprobs)
            if i + 1 == half:
                half_probe = _half_batch_probe(student, micro[:half], total_tokens, normalizer)
    # Each rank's loss is its share of the global mean times W; any rank's NaN makes every rank skip.
    loss_total = float(dist.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64))) / dist.world_size()
    metrics = {**stats.reduce(), **shape.reduce()}
    for name, teacher_stats in by_teacher.items():  # every rank reduces every teacher, in the same order
        metrics.update(teacher_metrics(name, teacher_stats.reduce(), metrics["tokens"]))
    return StepGradient(metrics, loss_total, total_tokens, half_probe, ahead.busy_s if ahead.pool else None)


@dataclass(frozen=True)
class BatchShape:
    """What the step's micro-batches cost on this rank: token slots of the forward passes, real tokens among them,
    micro-batches, sequences over the token budget (``reduce``: over the ranks, docs/metrics.md)."""

    slots: int
    tokens: int
    micro_batches: int
    over_budget: int = 0

    def reduce(self) -> dict[str, float]:
        t = dist.all_reduce_sum(torch.tensor([self.slots, self.tokens, self.over_budget], dtype=torch.float64))
        slots, tokens, over = (float(x) for x in t)
        out = {"pad_fraction": 1.0 - tokens / slots if slots else 0.0, "micro_batches": float(self.micro_batches)}
        if over:
            out["micro_batches_over_budget"] = over
        return out


def micro_batches(cfg: TrainConfig, rollout: Rollout) -> tuple[list[Rollout], BatchShape]:
    """This rank's ``rollout`` as the step's micro-batches (``micro_batch_tokens``: by a token budget,
    ``vopd.batching``; else ``micro_batch_rows`` rows in order), each packed into one row with ``packing``
    (``vopd.packing``), and what they cost. Every rank returns as many micro-batches (a collective all-reduce when
    the budget decides the count)."""
    if cfg.micro_batch_tokens:
        from vopd.batching import group

        lengths = rollout.lengths()
        least = 2 if cfg.grad_noise and rollout.size >= 2 else 1  # the variance probe needs a first half
        split = group(lengths, cfg.micro_batch_tokens, packed=cfg.packing, at_least=least)
        while True:  # FSDP2's and sharded teachers' forwards are collectives: as many micro-batches on every rank
            count = _max_over_ranks(len(split.groups))
            if len(split.groups) < count:  # regrouped into count, or more if the budget needs more bins
                split = group(lengths, cfg.micro_batch_tokens, packed=cfg.packing, at_least=count)
            if _max_over_ranks(len(split.groups)) == count:
                break
        micro = [rollout.take(g).select(0, len(g)) if g else _placeholder(rollout) for g in split.groups]
        over = split.over_budget
    else:
        mbs = micro_batch_rows(cfg, rollout.size)
        micro, over = [rollout.select(lo, lo + mbs) for lo in range(0, rollout.size, mbs)], 0
    if cfg.packing:
        from vopd.packing import pack_rows

        micro = [pack_rows(mb) for mb in micro]
    slots = sum(mb.input_ids.numel() for mb in micro)
    tokens = sum(int(mb.attention_mask.sum()) for mb in micro)
    return micro, BatchShape(slots, tokens, len(micro), over)


def _max_over_ranks(n: int) -> int:
    return int(dist.all_reduce_max(torch.tensor(float(n))).item()) if dist.world_size() > 1 else n


def _placeholder(rollout: Rollout) -> Rollout:
    """A micro-batch without loss tokens (the rollout's first sequence, masked out) for a rank that has fewer
    sequences than the others have micro-batches: it joins the collectives and adds nothing to any sum."""
    first = rollout.select(0, 1)
    return dataclasses.replace(first, loss_mask=torch.zeros_like(first.loss_mask),
                               sampler_logprobs=torch.zeros_like(first.sampler_logprobs))


def micro_batch_rows(cfg: TrainConfig, rows: int) -> int:
    """Rows per micro-batch of a rank's ``rows``: ``micro_batch_size``, except that the variance proxy needs the
    gradient of a part of the batch, so a one-micro-batch step runs as two (``grad_noise``)."""
    if cfg.grad_noise and cfg.micro_batch_size >= rows >= 2:
        return (rows + 1) // 2
    return cfg.micro_batch_size


def teacher_metrics(name: str, reduced: dict[str, float], total_tokens: float) -> dict[str, float]:
    """One teacher's share of a step (docs/metrics.md, "Several teachers"): ``teacher/<name>/tokens_frac`` and its
    tokens' KL estimate, reward and advantage statistics (and exact KL when the method has it)."""
    keys = ("kl_estimate", "reward_mean", "reward_var", "advantage_mean", "advantage_var", "kl_mean")
    out = {f"teacher/{name}/tokens_frac": reduced["tokens"] / total_tokens if total_tokens else 0.0}
    if not reduced["tokens"]:  # no row of this teacher in the step: nothing to average
        return out
    out.update({f"teacher/{name}/{k}": reduced[k] for k in keys if k in reduced})
    return out


@dataclass(frozen=True)
class PartLoss:
    """The loss of the rows of one micro-batch that one teacher scored (``rows``: those rows, at the micro-batch's
    width)."""

    name: str
    rows: Rollout
    out: LossOutput


def micro_batch_loss(plan: LossPlan, student: dist.WrappedStudent, teachers: Teachers, mb: Rollout, normalizer: float,
                     timer: PhaseTimer, *, ahead: Mapping[str, Future[TeacherScores]] | None = None) -> list[PartLoss]:
    """One micro-batch's loss, one part per teacher that scores rows of it (one part with one teacher), each graph
    ready for ``backward`` (their sum is the micro-batch's loss). The teacher's time is charged to the teacher phase.

    A teacher that needs nothing from the student's forward (the full distribution, or ``opd``'s log q(y_t)) scores
    first (only its last hidden states stay alive during the student's forward), or was already asked on the
    background thread (``ahead``: a remote teacher, ``model.teachers[].overlap``), in which case the answer is awaited
    after the forward; one that sends per-token numbers is asked about the student's top-k ids for the top-k
    methods, so it scores after the student's forward. A sharded teacher (``Part.idle`` when it has no rows here)
    scores on every rank, before the student's forward, in the order of ``parts``: the same on every rank."""
    spec = plan.spec
    ahead = ahead or {}
    parts = teachers.parts(mb)
    scores: dict[str, TeacherScores] = {}
    for part in parts:
        if part.name not in ahead and not asks_ids(plan, part.teacher):
            with timer("teacher"):
                scores[part.name] = score_rollout(part.teacher, part.of(mb), lse=spec.teacher_lse)
    if mb.position_ids is not None:  # packed (vopd.packing): no attention mask, the positions mark the sequences
        hidden, weight, bias = student.forward(mb.input_ids, mb.attention_mask, mb.position_ids)
    else:
        hidden, weight, bias = student.forward(mb.input_ids, mb.attention_mask)
    hidden = hidden[:, :-1]
    outs = []
    for part in parts:
        if part.idle:  # a sharded teacher without rows here: it joined the forward above, nothing of it is trained
            continue
        rows = part.of(mb)
        h = hidden if part.rows is None else mb.pick(hidden, part.rows)
        if part.name in ahead:
            with timer("teacher"):
                scores[part.name] = ahead[part.name].result()
        elif part.name not in scores:
            ids = student_topk_ids(h.detach(), weight.detach(), rows.loss_mask, plan.top_k,
                                   bias=None if bias is None else bias.detach(), transform=plan.transform,
                                   memory_budget_mb=plan.memory_budget_mb)  # the head's own chunks: the same ids
            with timer("teacher"):
                scores[part.name] = score_rollout(part.teacher, rows, topk_ids=ids, lse=spec.teacher_lse)
        out = fused_distillation_loss(
            h, weight, rows.targets, rows.loss_mask, scores.pop(part.name), student_bias=bias, normalizer=normalizer,
            sampler_logprobs=rows.sampler_logprobs if plan.uses_ratio else None, plan=plan)
        outs.append(PartLoss(part.name, rows, out))
    if mb.num_tokens == 0:
        # Without completion tokens the loss only touches the hidden states; DDP expects a gradient for every
        # parameter in every backward, so the output layer gets an explicit zero one.
        zero = weight.sum() * 0.0 + (0.0 if bias is None else bias.sum() * 0.0)
        outs[0] = dataclasses.replace(outs[0], out=dataclasses.replace(outs[0].out, loss=outs[0].out.loss + zero))
    return outs


def asks_ids(plan: LossPlan, teacher: Teacher) -> bool:
    """Whether ``teacher`` must be told the student's top-k ids (a top-k method with a teacher that sends per-token
    numbers), and so can only score after the student's forward. ``vopd-ttopk``'s teacher picks its own ids
    (``MethodSpec.student_ids`` is false): it needs nothing from the student."""
    return plan.spec.student_ids and not teacher.full_distribution


class ScoreAhead:
    """Overlapped scoring (``model.teachers[].overlap``): the parts of micro-batch i+1 that a remote teacher can score
    without the student (``asks_ids`` false) are sent on one background thread while the student works on micro-batch
    i. Bounded: at most the current and the next micro-batch are in flight. The rollouts are this step's, so the
    scores are the ones inline scoring would get (the estimators stay on-policy and exact): only the waiting moves.
    A failure is raised where the answer is awaited; leaving the context cancels what was not started
    and, on an error (Ctrl-C included), leaves a running request to its daemon thread instead of waiting for it."""

    def __init__(self, plan: LossPlan, overlap: bool, teachers: Teachers, micro: list[Rollout]) -> None:
        lse = plan.spec.teacher_lse
        self.jobs: list[list[tuple[str, Callable[[], TeacherScores]]]] = []
        for mb in micro:
            parts = teachers.parts(mb) if overlap else []
            self.jobs.append([(p.name, partial(self._timed, p.teacher, p.of(mb), lse)) for p in parts
                              if p.elsewhere and not asks_ids(plan, p.teacher)])
        self.pool = _DaemonWorker("vopd-teacher") if any(self.jobs) else None
        self.sent: dict[int, dict[str, Future[TeacherScores]]] = {}
        self.busy_s = 0.0  # scoring time on the background thread; the part not waited for was hidden

    def _timed(self, teacher: Teacher, rollout: Rollout, lse: bool) -> TeacherScores:
        t0 = time.perf_counter()
        try:
            return score_rollout(teacher, rollout, lse=lse)
        finally:
            self.busy_s += time.perf_counter() - t0  # one worker thread: no race

    def _send(self, i: int) -> None:
        if self.pool is not None and i < len(self.jobs) and i not in self.sent:
            self.sent[i] = {name: self.pool.submit(job) for name, job in self.jobs[i]}

    def take(self, i: int) -> dict[str, Future[TeacherScores]]:
        """Micro-batch i's requests (sent now if they were not yet), after sending micro-batch i+1's."""
        self._send(i)
        self._send(i + 1)
        return self.sent.pop(i, {})

    def __enter__(self) -> "ScoreAhead":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        if self.pool is not None:  # on an error (Ctrl-C too) a request to a hung server is not waited for
            for futures in self.sent.values():
                for future in futures.values():
                    future.cancel()  # those not started
            self.pool.shutdown(wait=exc_type is None)


class _DaemonWorker:
    """One daemon thread running submitted calls in order. Not a ``ThreadPoolExecutor``: its threads are joined at
    interpreter exit, so a request to a hung server kept a Ctrl-C'd run alive for the request's timeouts."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[TeacherScores], Callable[[], TeacherScores]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], TeacherScores]) -> Future[TeacherScores]:
        future: Future[TeacherScores] = Future()
        self._queue.put((future, job))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, job = item
            if future.set_running_or_notify_cancel():  # false: cancelled before it started
                try:
                    future.set_result(job())
                except BaseException as exc:  # raised where the answer is awaited
                    future.set_exception(exc)

    def shutdown(self, wait: bool) -> None:
        """No more calls; ``wait``: until the queued ones have run."""
        self._queue.put(None)
        if wait:
            self._thread.join()


def _half_batch_probe(student: dist.WrappedStudent, first: list[Rollout], total_tokens: float,
                      normalizer: float) -> tuple[float, int] | None:
    """(|G_a|^2, a): the squared norm of the token-mean gradient of the first micro-batches' ``a`` rollouts, for
    ``metrics.gradient_noise``. Each micro-batch's loss is divided by ``normalizer`` = N/W, so the accumulated
    gradient is sum_a grad / normalizer; under DDP (``no_sync``) it is this rank's part alone, under FSDP2 already
    the mean over ranks (sum over all ranks' first halves / N)."""
    tokens = float(sum(mb.num_tokens for mb in first))
    units = sum(mb.size for mb in first)
    sq = student.grad_sq_norm()
    scale = normalizer
    if student.strategy == "fsdp2":
        counts = dist.all_reduce_sum(torch.tensor([tokens, float(units)], dtype=torch.float64))
        tokens, units, scale = float(counts[0]), int(counts[1]), total_tokens
    if tokens == 0:
        return None
    return sq * (scale / tokens) ** 2, units
