"""The memory-efficient path of the eight estimators: from hidden states and output-layer weights, chunked over
positions, with closed-form gradients.

What it knows: for the completion positions only (the mask selects rows before any matmul), it walks over chunks of
rows sized from a memory budget; per chunk it forms the student's logits once (the teacher supplies its own per-chunk
inputs: its logits from hidden states, or a server's numbers, ``vopd.loss.scores``), hands them to the per-chunk math
of ``vopd.loss.chunk`` (the shared view, then the plan's estimator from its table), and writes the gradient w.r.t. the
student's hidden states and output weights right there. No (B, T, V) tensor of either model ever exists, the student
head runs once, and backward only scales the stored gradients. One entry point, ``fused_distillation_loss``, takes
the loss as a ``LossPlan`` (``chunked_distillation_loss`` is the older spelling, kept for users who import it). What
it does not know: models (the caller passes the last hidden states and the head), sampling, optimisers, HTTP.
``vopd.loss.estimators`` is the dense reference it is tested against. A logit transform (softcapping, scaling:
``vopd.loss.head.LogitTransform``) is applied to each chunk's logits of either model, and the student's gradient is
chained through it elementwise (docs/estimators.md, "Output transforms").

From dL/dz_s (c, V) of a chunk (``vopd.loss.chunk``): dL/dh = dL/dz_s @ W_s, dL/dW_s = dL/dz_s^T @ h,
dL/db_s = sum of dL/dz_s, with dL/dz_s first multiplied by the transform's derivative when the student's logits are
transformed (z_s is then the final logit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss import chunk
from vopd.loss.estimators import (LossOutput, RatioMode, check_inputs, compute_dtype, importance_ratio,
                                  token_normalizer)
from vopd.loss.head import (IDENTITY, LogitTransform, buffers_for, chunk_rows, fp32_accumulating, raw_logits,
                            student_topk_ids)
from vopd.loss.methods import Method, method_spec
from vopd.loss.plan import LossPlan
from vopd.loss.scores import TeacherHidden, TeacherScores

# Columns of the per-row statistics returned by the fused head.
_LOGP, _LOGQ, _KL, _KL_TOPK, _MASS, _RATIO, _ADV = range(7)
_NUM_STATS = 7


def _head_chunk(zs: Tensor, y_c: Tensor, st: Tensor, plan: LossPlan, inv_n: float, sampler_lp: Tensor | None,
                given: dict[str, Tensor | None]) -> tuple[Tensor, Tensor]:
    """One chunk of c rows: (this chunk's loss term, dL/dz_s (c, V)), its statistics written into ``st``.

    ``zs``: the student's final logits (c, V) in the compute dtype, consumed (the gradient is written into its
    buffer); ``given``: the teacher's inputs for these rows (``TeacherScores.chunk_inputs``). The math is the plan's
    entry of ``vopd.loss.chunk.RULES``."""
    spec = plan.spec
    c = chunk.view(zs, y_c, spec, plan.top_k, inv_n, **given)
    st[:, _LOGP], st[:, _LOGQ] = c.logp, c.logq
    rule = chunk.RULES[spec.rule]
    coef = None
    if rule.baseline is not None:  # a sampled method: A_t = r_t - b_t, times the importance ratio
        c.baseline = rule.baseline(c)
        adv = (c.logq - c.logp) - c.baseline
        st[:, _ADV] = adv
        ratio = importance_ratio(c.logp, sampler_lp, plan.ratio_cap, plan.ratio_mode)
        coef = adv if ratio is None else adv * ratio
        if ratio is not None:
            st[:, _RATIO] = ratio
    loss, g = rule.gradient(c, coef)
    for col, x in ((_KL, c.kl), (_KL_TOPK, c.kl_k), (_MASS, c.mass)):
        if x is not None:
            st[:, col] = x
    return loss, g


class _FusedHead(torch.autograd.Function):
    """Forward computes the loss *and* its gradients chunk by chunk; backward rescales the stored gradients."""

    @staticmethod
    def forward(
        ctx: Any, hs: Tensor, ws: Tensor, bs: Tensor | None, y: Tensor, sampler_lp: Tensor | None,
        teacher: TeacherScores, plan: LossPlan, inv_n: float, rows: int,
    ) -> tuple[Tensor, Tensor]:
        transform = plan.transform
        cd = compute_dtype(hs.dtype)
        half_cuda = fp32_accumulating(hs) and cd == torch.float32
        ws_c = ws if half_cuda else ws.to(cd)  # converted once, not per chunk
        teacher = teacher.for_head(cd, keep_weight_dtype=half_cuda)  # the teacher's output layer too
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, dev = hs.shape[0], hs.device
        gdt = torch.float32 if half_cuda else cd
        grad_h = torch.zeros(hs.shape, dtype=gdt, device=dev) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=gdt, device=dev) if need_w else None
        grad_b = torch.zeros(ws.shape[0], dtype=cd, device=dev) if need_b else None
        stats = torch.zeros(n, _NUM_STATS, dtype=cd, device=dev)
        loss = torch.zeros((), dtype=cd, device=dev)

        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h_c, y_c = hs[lo:hi], y[lo:hi].unsqueeze(-1)
            zs = transform.apply_(raw_logits(h_c, ws_c, bs, cd))  # (c, V), the final logits
            # d final / d raw, taken before _head_chunk consumes zs (docs/estimators.md, "Output transforms").
            dz = None if transform.identity else transform.derivative(zs)
            given = teacher.chunk_inputs(lo, hi, cd)  # each score form supplies its own (vopd.loss.scores)
            loss_c, g = _head_chunk(zs, y_c, stats[lo:hi], plan, inv_n,
                                    None if sampler_lp is None else sampler_lp[lo:hi], given)
            loss += loss_c
            if dz is not None:
                g.mul_(dz)  # chain rule: dL/draw = dL/dfinal * dfinal/draw
            if grad_h is not None:  # need_h
                gh = torch.mm(g.to(ws.dtype), ws, out_dtype=torch.float32) if half_cuda else g @ ws_c
                grad_h[lo:hi] = gh
            if grad_w is not None:  # need_w
                if half_cuda:
                    grad_w += torch.mm(g.t().to(h_c.dtype), h_c, out_dtype=torch.float32)
                else:
                    grad_w.addmm_(g.t(), h_c.to(cd))
            if grad_b is not None:  # need_b
                grad_b += g.sum(0)
            del zs, g, given, dz  # the chunk's (c, V) buffers are gone before the next chunk allocates its own

        ctx.grads = (
            None if grad_h is None else grad_h.to(hs.dtype),
            None if grad_w is None else grad_w.to(ws.dtype),
            None if grad_b is None or bs is None else grad_b.to(bs.dtype),  # need_b implies a bias
        )
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:
        gh, gw, gb = ctx.grads
        scale = grad_loss.to(torch.float32)
        out = [None if g is None else g * scale.to(g.dtype) for g in (gh, gw, gb)]
        return (out[0], out[1], out[2]) + (None,) * 6  # no gradient for y, sampler_lp, teacher, plan, inv_n, rows


#: ``loss.top_k``'s default, when a caller names no width and the teacher's answer carries none.
_DEFAULT_TOP_K = 100


def fused_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    teacher: TeacherScores,
    *,
    plan: LossPlan | None = None,
    method: Method | None = None,
    top_k: int | None = None,
    student_bias: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    ratio_cap: float | None = None,
    ratio_mode: RatioMode = "truncate",
    memory_budget_mb: float = 1024,
    student_transform: LogitTransform = IDENTITY,
) -> LossOutput:
    """The one loss entry point of vopd: the student's hidden states and output layer, and the teacher's scores in
    either form, through the fused chunked head. The same loss and gradients as ``distillation_loss``.

    The loss is ``plan`` (``vopd.loss.plan.LossPlan``, resolved once before step 0: the trainer's way), or spelled
    out by ``method`` and the options below (then resolved here, per call).

    Shapes:
        student_hidden: (B, T, D_s), the student's last hidden states (after the final norm), requires grad.
        student_weight: (V, D_s), the student's output layer; gets a gradient if it requires one. student_bias (V,).
        tokens, mask, sampler_logprobs: (B, T), as in ``distillation_loss``.
        teacher: ``TeacherHidden`` (hidden (B, T, D_t), weight (V, D_t), bias): every method; or ``TeacherNumbers``
                 (logq (B, T); topk_ids/topk_logits (B, T, k) for top-k methods, the teacher's own top-k ids and its
                 log-probs there for ``vopd-ttopk``; lse (B, T) for ``rb-topk``): the
                 methods whose ``MethodSpec.per_token_teacher`` holds. With numbers, k is the width of the ids, which
                 must be ``top_k`` when both are given (a teacher answering at another width is an error).
    Options: as ``distillation_loss``, plus ``memory_budget_mb``, the budget for a chunk's (rows x V) fp32 buffers
    (``chunk_rows``), and ``student_transform``, the student's logit transform (a ``TeacherHidden`` carries the
    teacher's; ``TeacherNumbers`` are already final).
    """
    if plan is not None and (method, top_k, ratio_cap, ratio_mode, memory_budget_mb, student_transform) != (
            None, None, None, "truncate", 1024, IDENTITY):
        raise TypeError("fused_distillation_loss takes the loss as plan= or as method= and its options, not both")
    asked = top_k if plan is None else plan.top_k
    if asked is not None and teacher.k and teacher.k != asked:  # never silently trained at another width
        raise UserError(f"the teacher answered with top-k logits at {teacher.k} ids per position, but "
                        f"loss.top_k={asked} was asked: the teacher or server does not follow the request; "
                        "update vopd on the teacher server and restart it")
    if plan is None:
        if method is None:
            raise TypeError("fused_distillation_loss needs the loss: plan=LossPlan.of(...) or method=NAME")
        plan = LossPlan(method_spec(method), asked or teacher.k or _DEFAULT_TOP_K, ratio_cap, ratio_mode,
                        memory_budget_mb, student_transform)
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    t_vocab, t_lead = teacher.grid(vocab)
    spec = check_inputs(plan.spec, plan.top_k, vocab, t_vocab, tokens, mask, lead, t_lead)
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: student hidden {student_hidden.shape[-1]} vs weight "
                         f"{tuple(student_weight.shape)}")
    teacher.check_for(spec, lead)

    cd = compute_dtype(student_hidden.dtype)
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)
    n = token_normalizer(mask, normalizer)
    zeros = torch.zeros(lead, dtype=cd, device=student_hidden.device)
    if n is None or idx.numel() == 0:
        # Keep the graph connected (every rank/micro-batch must be able to call backward) with a zero gradient.
        loss = torch.nan_to_num(student_hidden).sum() * 0.0
        return LossOutput(loss=loss.to(cd), num_tokens=mask.sum().detach(), logp=zeros, logq=zeros, reward=zeros)

    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    y = tokens.reshape(-1).long().index_select(0, idx)
    slp = None if sampler_logprobs is None else sampler_logprobs.reshape(-1).index_select(0, idx).to(cd)
    loss, stats = _FusedHead.apply(
        hs, student_weight, student_bias, y, slp, teacher.rows(idx), plan, 1.0 / float(n),
        chunk_rows(vocab, plan.memory_budget_mb, buffers=buffers_for(plan.transform)))

    def per_token(col: int) -> Tensor:
        out = zeros.reshape(-1).clone()
        out[idx] = stats[:, col]
        return out.reshape(lead)

    logp, logq = per_token(_LOGP), per_token(_LOGQ)
    reward = logq - logp
    advantage = per_token(_ADV) if spec.sampled else None
    return LossOutput(
        loss=loss, num_tokens=mask.sum().detach(), logp=logp, logq=logq, reward=reward,
        baseline=None if advantage is None else reward - advantage, advantage=advantage,
        kl=per_token(_KL) if spec.exact_kl else None,
        kl_topk=per_token(_KL_TOPK) if spec.topk_kl else None,
        topk_mass=per_token(_MASS) if spec.student_ids else None,
        ratio=per_token(_RATIO) if (spec.sampled and sampler_logprobs is not None) else None,
        kl_ttopk=per_token(_KL_TOPK) if spec.ttopk_kl else None,  # the same column: the set is the method's
        ttopk_mass=per_token(_MASS) if spec.ttopk_kl else None,
    )


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    method: Method,
    top_k: int = 100,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    ratio_cap: float | None = None,
    ratio_mode: RatioMode = "truncate",
    memory_budget_mb: float = 1024,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
) -> LossOutput:
    """``fused_distillation_loss`` for a teacher given as its hidden states and output layer (kept for users who
    import it from ``vopd``; vopd itself calls ``fused_distillation_loss``, the one entry point). The same loss and
    gradients as ``distillation_loss`` without materialising (B, T, V) logits.

    Shapes:
        student_hidden: (B, T, D_s), the student's last hidden states (after the final norm), requires grad.
        student_weight: (V, D_s), the student's output layer (``lm_head.weight``); gets a gradient if it requires one.
        teacher_hidden: (B, T, D_t), no gradient.
        teacher_weight: (V, D_t), no gradient.
        tokens, mask, sampler_logprobs: (B, T), as in ``distillation_loss``.
        student_bias/teacher_bias: optional (V,) output biases.
        student_transform/teacher_transform: each model's logit transform (``vopd.loss.head.LogitTransform``:
        softcapping, scaling; the identity by default), so the logits are ``transform(h @ W.T + b)``.
    Options: as ``distillation_loss``, plus ``memory_budget_mb``, the budget for a chunk's (rows x V) fp32
    buffers (``chunk_rows``).
    """
    return fused_distillation_loss(
        student_hidden, student_weight, tokens, mask,
        TeacherHidden(teacher_hidden, teacher_weight, teacher_bias, teacher_transform),
        method=method, top_k=top_k, student_bias=student_bias, normalizer=normalizer,
        sampler_logprobs=sampler_logprobs, ratio_cap=ratio_cap, ratio_mode=ratio_mode,
        memory_budget_mb=memory_budget_mb, student_transform=student_transform)
