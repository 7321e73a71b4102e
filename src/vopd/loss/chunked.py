"""The memory-efficient path of the seven estimators: from hidden states and output-layer weights, chunked over
positions, with closed-form gradients.

What it knows: for the completion positions only (the mask selects rows before any matmul), it walks over chunks of
rows sized from a memory budget; per chunk it forms both models' logits once, takes log p(y), log q(y), both
log-sum-exps and (when the method needs it) KL_t in the same pass, and writes the gradient w.r.t. the student's
hidden states and output weights right there. No (B, T, V) tensor of either model ever exists, the student head runs
once, and backward only scales the stored gradients. The per-chunk math (``_head_chunk``) takes the teacher either as
its full logits (``TeacherHidden``: in process) or as the numbers a teacher server sends (``TeacherNumbers``), through
one entry point, ``fused_distillation_loss``. What it does not know: models (the caller passes the last hidden states
and the head), sampling, optimisers, HTTP. ``vopd.loss.estimators`` is the dense reference it is tested against.
A logit transform (softcapping, scaling: ``vopd.loss.head.LogitTransform``) is applied to each chunk's logits of
either model, and the student's gradient is chained through it elementwise (docs/estimators.md, "Output transforms").

Closed forms per position (z_s, z_t student/teacher logits, p = softmax z_s, y the sampled id, w = 1/N the token
weight, docs/estimators.md, "Key equations" and "Pseudocode"):
    KL_t            = sum_v p_v (z_s - z_t)_v - lse_s + lse_t          (one extra reduction, no extra exp)
    opd/vopd/topk:  dL/dz_s = w * A_t * (p - onehot(y)),  A_t = r_t (+ KL_t or + KL~_t), detached
    opd-full:       dL/dz_s = w * p * (d - sum_v p_v d_v),   d = z_s - z_t   (= p (log p - log q - KL_t))
    opd-topk:       dL/dz_s = w * p~ * (log p~ - log q~ - KL~_t) on the top-k ids K, 0 elsewhere
and dL/dh = dL/dz_s @ W_s, dL/dW_s = dL/dz_s^T @ h, dL/db_s = sum of dL/dz_s, with dL/dz_s first multiplied by
the transform's derivative when the student's logits are transformed (z_s is then the final logit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.estimators import (LossOutput, RatioMode, check_inputs, compute_dtype, importance_ratio,
                                  token_normalizer)
from vopd.loss.head import IDENTITY, LogitTransform, buffers_for, chunk_rows, raw_logits, student_topk_ids
from vopd.loss.methods import Method, MethodSpec
from vopd.loss.scores import TeacherHidden, TeacherNumbers, TeacherScores

# Columns of the per-row statistics returned by the fused head.
_LOGP, _LOGQ, _KL, _KL_TOPK, _MASS, _RATIO, _ADV = range(7)
_NUM_STATS = 7
def _optimal_baseline(e: Tensor, inv_s: Tensor, d: Tensor, pd: Tensor, kl: Tensor, lse_s: Tensor,
                      lse_t: Tensor) -> Tensor:
    """b* = sum p w r / sum p w with w_v = 1 - 2 p_v + S2, S2 = sum p^2 (``vopd-opt``), from the chunk's buffers.

    With r_v = -d_v + lse_s - lse_t:  sum p w = 1 - S2  and  sum p w d = (1 + S2) sum p d - 2 sum p^2 d, so two more
    reductions give b*; a one-hot p (S2 = 1) falls back to the value -KL_t."""
    # p = e * inv_s is never materialised: the sums are taken on e and rescaled.
    s2 = torch.linalg.vecdot(e, e) * inv_s**2
    p2d = torch.linalg.vecdot(e * e, d) * inv_s**2
    den = 1 - s2
    b = -((1 + s2) * pd - 2 * p2d) / den.clamp_min(1e-30) + lse_s - lse_t
    return torch.where(den > 1e-12, b, -kl)


def _head_chunk(zs: Tensor, y_c: Tensor, st: Tensor, spec: MethodSpec, top_k: int, inv_n: float, sampler_lp: Tensor | None,
                ratio_cap: float | None, ratio_mode: RatioMode, *, zt: Tensor | None = None, ids: Tensor | None = None,
                logq: Tensor | None = None, zt_k: Tensor | None = None, lse_t: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """One chunk of c rows: (this chunk's loss term, dL/dz_s (c, V)), and its statistics written into ``st``.

    ``zs``: the student's logits (c, V) in the compute dtype; consumed (the gradient is written into its buffer).
    The teacher is either ``zt``, its logits (c, V) (consumed too), or its numbers: ``logq`` (c,), ``zt_k`` (c, k) at
    ``ids`` and ``lse_t`` (c,) (``rb-topk`` only). Top-k ids are the student's own when ``ids`` is None."""
    needs_kl = spec.exact_kl
    # Everything that needs raw logits is read first; then both buffers are transformed in place, so a chunk holds
    # two (c, V) buffers and the student side takes a single exp pass (docs/estimators.md, "Key equations": single-pass KL).
    zs_y = zs.gather(-1, y_c).squeeze(-1)
    zt_y = None if zt is None else zt.gather(-1, y_c).squeeze(-1)
    if spec.topk:
        # Student's top-k ids; renormalising both models on the same ids cancels their full lse's.
        if ids is None:
            ids = zs.topk(top_k, dim=-1).indices
        zs_k = zs.gather(-1, ids)
        if zt is not None:
            zt_k = zt.gather(-1, ids)
        assert zt_k is not None  # the teacher's logits at the ids: gathered from zt, or sent as numbers
        if spec.topk_kl:
            logp_k, logq_k = zs_k.log_softmax(-1), zt_k.log_softmax(-1)
            p_k = logp_k.exp()
            kl_k = (p_k * (logp_k - logq_k)).sum(-1)
            st[:, _KL_TOPK] = kl_k
    if zt is not None:
        lse_t = zt.logsumexp(-1)
        if needs_kl:
            d = torch.sub(zs, zt, out=zt)  # z_s - z_t, written over the teacher's buffer in one pass
    m_s = zs.amax(-1, keepdim=True)
    e = zs.sub_(m_s).exp_()
    sum_e = e.sum(-1, keepdim=True)
    lse_s = (m_s + sum_e.log()).squeeze(-1)
    # p = e / sum_e is folded into the scalars each method multiplies by, saving a pass over (c, V).
    inv_s = 1.0 / sum_e.squeeze(-1)
    logp = zs_y - lse_s
    if zt_y is not None and lse_t is not None:
        logq = zt_y - lse_t
    assert logq is not None  # from the teacher's logits, or sent as a number
    st[:, _LOGP], st[:, _LOGQ] = logp, logq
    if spec.topk_kl:
        st[:, _MASS] = (zs_k - lse_s.unsqueeze(-1)).exp().sum(-1)
    if needs_kl:
        assert lse_t is not None  # the full-distribution methods always have the teacher's logits
        pd = torch.linalg.vecdot(e, d) * inv_s  # sum_v p_v (z_s - z_t)_v
        kl = pd - lse_s + lse_t  # KL_t = A/S - lse_s + lse_t (docs/estimators.md, "Key equations": single-pass KL)
        st[:, _KL] = kl

    if spec.sampled:
        reward = logq - logp  # r_t
        if spec.baseline == "none":  # opd
            adv = reward
        elif spec.baseline == "kl":  # vopd
            adv = reward + kl  # A_t = r_t + KL_t (docs/estimators.md, `vopd`)
        elif spec.baseline == "kl-topk":  # vopd-topk
            adv = reward + kl_k  # A_t = r_t + KL~_t (docs/estimators.md, `vopd-topk`)
        elif spec.baseline == "optimal":  # vopd-opt (a full-distribution method: lse_t is set)
            assert lse_t is not None
            adv = reward - _optimal_baseline(e, inv_s, d, pd, kl, lse_s, lse_t)
        else:  # rb-topk: baseline = mean reward on K, r_v = log q_v - log p_v exactly (full lse's)
            assert zt_k is not None and lse_t is not None
            logp_k, logq_k = zs_k - lse_s.unsqueeze(-1), zt_k - lse_t.unsqueeze(-1)
            p_k = logp_k.exp()
            r_k = logq_k - logp_k
            b = (p_k * r_k).sum(-1) / p_k.sum(-1)
            adv = reward - b
            st[:, _MASS] = p_k.sum(-1)
        st[:, _ADV] = adv
        ratio = importance_ratio(logp, sampler_lp, ratio_cap, ratio_mode)
        coef = adv if ratio is None else adv * ratio
        if ratio is not None:
            st[:, _RATIO] = ratio
        if spec.baseline == "topk-mean":  # rb-topk
            # Exact over K: sum_{v in K} p_v A_v (p - e_v); sampled only outside K: A_y (p - e_y).
            assert ids is not None
            coef = coef * ~(ids == y_c).any(-1)
            pa_k = p_k * (r_k - b.unsqueeze(-1))
            loss = -((pa_k * logp_k).sum() + (coef * logp).sum()) * inv_n
            g = e.mul_(((pa_k.sum(-1) + coef) * inv_n * inv_s).unsqueeze(-1))
            g.scatter_add_(-1, ids, -pa_k * inv_n)
        else:
            loss = -(coef * logp).sum() * inv_n
            # dL/dz = w * coef * (p - onehot(y)), written into e's buffer (p = e * inv_s)
            g = e.mul_((coef * inv_n * inv_s).unsqueeze(-1))
        g.scatter_add_(-1, y_c, -(coef * inv_n).unsqueeze(-1))
    elif spec.full_distribution:  # opd-full
        loss = kl.sum() * inv_n
        # dL/dz = w p (log p - log q - KL_t) = w p (d - sum_v p_v d_v), in d's buffer.
        g = d.sub_(pd.unsqueeze(-1)).mul_(e).mul_((inv_n * inv_s).unsqueeze(-1))
    else:  # opd-topk
        loss = kl_k.sum() * inv_n
        g_k = p_k * (logp_k - logq_k - kl_k.unsqueeze(-1)) * inv_n
        assert ids is not None
        g = e.zero_().scatter_(-1, ids, g_k)
    return loss, g


class _FusedHead(torch.autograd.Function):
    """Forward computes the loss *and* its gradients chunk by chunk; backward rescales the stored gradients."""

    @staticmethod
    def forward(
        ctx: Any, hs: Tensor, ws: Tensor, bs: Tensor | None, y: Tensor, sampler_lp: Tensor | None,
        teacher: TeacherScores, spec: MethodSpec, top_k: int, inv_n: float, ratio_cap: float | None, ratio_mode: RatioMode,
        rows: int, transform: LogitTransform,
    ) -> tuple[Tensor, Tensor]:
        cd = compute_dtype(hs.dtype)
        half_cuda = hs.is_cuda and hs.dtype in (torch.bfloat16, torch.float16) and cd == torch.float32
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
            loss_c, g = _head_chunk(zs, y_c, stats[lo:hi], spec, top_k, inv_n,
                                    None if sampler_lp is None else sampler_lp[lo:hi], ratio_cap, ratio_mode,
                                    **given)
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
        return (out[0], out[1], out[2]) + (None,) * 10


#: ``loss.top_k``'s default, when a caller names no width and the teacher's answer carries none.
_DEFAULT_TOP_K = 100


def fused_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    teacher: TeacherScores,
    *,
    method: Method,
    top_k: int | None = None,
    student_bias: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    ratio_cap: float | None = None,
    ratio_mode: RatioMode = "truncate",
    memory_budget_mb: float = 1024,
    student_transform: LogitTransform = IDENTITY,
) -> LossOutput:
    """The trainer's one loss entry point: the student's hidden states and output layer, and the teacher's scores in
    either form, through the fused chunked head. The same loss and gradients as ``distillation_loss``.

    Shapes:
        student_hidden: (B, T, D_s), the student's last hidden states (after the final norm), requires grad.
        student_weight: (V, D_s), the student's output layer; gets a gradient if it requires one. student_bias (V,).
        tokens, mask, sampler_logprobs: (B, T), as in ``distillation_loss``.
        teacher: ``TeacherHidden`` (hidden (B, T, D_t), weight (V, D_t), bias): every method; or ``TeacherNumbers``
                 (logq (B, T); topk_ids/topk_logits (B, T, k) for top-k methods; lse (B, T) for ``rb-topk``): the
                 methods whose ``MethodSpec.per_token_teacher`` holds. With numbers, k is the width of the ids, which
                 must be ``top_k`` when both are given (a teacher answering at another width is an error).
    Options: as ``distillation_loss``, plus ``memory_budget_mb``, the budget for a chunk's (rows x V) fp32 buffers
    (``chunk_rows``), and ``student_transform``, the student's logit transform (a ``TeacherHidden`` carries the
    teacher's; ``TeacherNumbers`` are already final).
    """
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    if isinstance(teacher, TeacherHidden):
        t_vocab, t_lead = teacher.weight.shape[0], tuple(teacher.hidden.shape[:-1])
        if teacher.weight.shape[1] != teacher.hidden.shape[-1]:
            raise ValueError(f"hidden size mismatch: teacher hidden {teacher.hidden.shape[-1]} vs weight "
                             f"{tuple(teacher.weight.shape)}")
    else:
        t_vocab, t_lead = vocab, tuple(teacher.logq.shape)
        if top_k is not None and teacher.k and teacher.k != top_k:  # never silently trained at another width
            raise UserError(f"the teacher answered with top-k logits at {teacher.k} ids per position, but "
                            f"loss.top_k={top_k} was asked: the teacher or server does not follow the request; "
                            "update vopd on the teacher server and restart it")
        top_k = top_k or teacher.k
    top_k = top_k or _DEFAULT_TOP_K
    spec = check_inputs(method, top_k, vocab, t_vocab, tokens, mask, lead, t_lead)
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: student hidden {student_hidden.shape[-1]} vs weight "
                         f"{tuple(student_weight.shape)}")
    if isinstance(teacher, TeacherNumbers):
        _check_numbers(teacher, spec, lead)

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
        hs, student_weight, student_bias, y, slp, teacher.rows(idx), spec, top_k, 1.0 / float(n),
        ratio_cap if spec.sampled else None, ratio_mode,
        chunk_rows(vocab, memory_budget_mb, buffers=buffers_for(student_transform)), student_transform,
    )

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
        topk_mass=per_token(_MASS) if spec.topk else None,
        ratio=per_token(_RATIO) if (spec.sampled and sampler_logprobs is not None) else None,
    )


def _check_numbers(teacher: TeacherNumbers, spec: MethodSpec, lead: tuple[int, ...]) -> None:
    """A teacher known only by its numbers must have sent what ``spec`` needs, on the student's grid."""
    if spec.full_distribution:
        raise UserError(f"loss.method={spec.name} needs the teacher's full distribution at every position (sums over "
                        "the whole vocabulary), which a teacher sending per-token numbers does not give; use vopd-topk "
                        "(the same unbiased gradient with a top-k baseline), a teacher server's hidden states "
                        "(model.teacher_head) or an in-process teacher")
    if spec.topk:
        if teacher.topk_ids is None or teacher.topk_logits is None:
            raise ValueError(f"method {spec.name} needs topk_ids and topk_logits (B, T, k) from the teacher")
        for name, x in (("topk_ids", teacher.topk_ids), ("topk_logits", teacher.topk_logits)):
            if tuple(x.shape) != lead + (teacher.k,):
                raise ValueError(f"{name} shape {tuple(x.shape)} must be (B, T, k) = {lead + (teacher.k,)}")
    if spec.teacher_lse and (teacher.lse is None or tuple(teacher.lse.shape) != lead):
        raise ValueError(f"method {spec.name} needs teacher_lse (B, T) = {lead}, the teacher's log-sum-exp "
                         "(TeacherNumbers.lse, RemoteTeacher.score(..., lse=True)); got "
                         f"{None if teacher.lse is None else tuple(teacher.lse.shape)}")


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
