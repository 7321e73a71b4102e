"""The memory-efficient path of the five estimators: from hidden states and output-layer weights, chunked over
positions, with closed-form gradients.

What it knows: for the completion positions only (the mask selects rows before any matmul), it walks over chunks of
rows sized from a memory budget; per chunk it forms both models' logits once, takes log p(y), log q(y), both
log-sum-exps and (when the method needs it) KL_t in the same pass, and writes the gradient w.r.t. the student's
hidden states and output weights right there. No (B, T, V) tensor of either model ever exists, the student head runs
once, and backward only scales the stored gradients. The per-chunk math (``_head_chunk``) takes the teacher either as
its full logits (in process) or as the numbers a teacher server sends (``TeacherRows``); ``vopd.remote`` runs the
same head through ``fused_head_loss``. What it does not know: models (the caller passes the last hidden states and
the head), sampling, optimisers, HTTP. ``vopd.estimators`` is the dense reference it is tested against.

Closed forms per position (z_s, z_t student/teacher logits, p = softmax z_s, y the sampled id, w = 1/N the token
weight, spec and ``shared/spec/performance.md``):
    KL_t            = sum_v p_v (z_s - z_t)_v - lse_s + lse_t          (one extra reduction, no extra exp)
    opd/vopd/topk:  dL/dz_s = w * A_t * (p - onehot(y)),  A_t = r_t (+ KL_t or + KL~_t), detached
    opd-full:       dL/dz_s = w * p * (d - sum_v p_v d_v),   d = z_s - z_t   (= p (log p - log q - KL_t))
    opd-topk:       dL/dz_s = w * p~ * (log p~ - log q~ - KL~_t) on the top-k ids K, 0 elsewhere
and dL/dh = dL/dz_s @ W_s, dL/dW_s = dL/dz_s^T @ h, dL/db_s = sum of dL/dz_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vopd.estimators import (
    SAMPLED_METHODS,
    TOPK_METHODS,
    LossOutput,
    Method,
    check_inputs,
    compute_dtype,
    importance_ratio,
    token_normalizer,
)

# Columns of the per-row statistics returned by the fused head.
_LOGP, _LOGQ, _KL, _KL_TOPK, _MASS, _RATIO, _ADV = range(7)
_NUM_STATS = 7
# fp32 (rows x V) buffers alive per chunk: student logits/probabilities, teacher logits/difference, and one for
# matmul and top-k temporaries.
_BUFFERS_PER_ROW = 3


def chunk_rows(vocab_size: int, memory_budget_mb: float, *, itemsize: int = 4, multiple: int = 8) -> int:
    """Rows per chunk so that the chunk's vocabulary-sized buffers fit in ``memory_budget_mb``.

    Chosen from memory, not from a fixed row rule: bigger chunks mean fewer, larger (faster) matmuls.
    """
    rows = int(memory_budget_mb * 2**20 // (vocab_size * itemsize * _BUFFERS_PER_ROW))
    return max(multiple, rows // multiple * multiple)


def _logits(h: Tensor, w: Tensor, b: Tensor | None, cd: torch.dtype) -> Tensor:
    """h @ w.T (+ b) in ``cd``. On CUDA with half inputs, accumulate the matmul straight into fp32 (spec: rounding
    logits to bf16 first costs ~1e-2 nats); elsewhere ``w`` already arrives in ``cd``."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and cd == torch.float32:
        z = torch.mm(h, w.t(), out_dtype=torch.float32)
    else:
        z = h.to(cd) @ w.t()
    return z if b is None else z + b.to(cd)


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


@dataclass(frozen=True)
class TeacherRows:
    """The teacher's side of the fused head for the N live rows, in one of two forms.

    In process: ``hidden`` (N, D_t), ``weight`` (V, D_t) and ``bias``; every teacher number is computed per chunk
    from its full logits, so every method works. As numbers (a teacher server, ``vopd.remote``): ``logq`` (N,)
    log q(y), ``topk_logits`` (N, k) its raw logits at ``topk_ids`` (N, k), the student's top-k ids, and ``lse``
    (N,) its full-vocabulary log-sum-exp; enough for ``opd``, ``vopd-topk``, ``opd-topk`` and (with ``lse``)
    ``rb-topk``. All detached.
    """

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logq: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logits: Tensor | None = None
    lse: Tensor | None = None


def _head_chunk(zs: Tensor, y_c: Tensor, st: Tensor, method: str, top_k: int, inv_n: float, sampler_lp: Tensor | None,
                ratio_cap: float | None, *, zt: Tensor | None = None, ids: Tensor | None = None,
                logq: Tensor | None = None, zt_k: Tensor | None = None, lse_t: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """One chunk of c rows: (this chunk's loss term, dL/dz_s (c, V)), and its statistics written into ``st``.

    ``zs``: the student's logits (c, V) in the compute dtype; consumed (the gradient is written into its buffer).
    The teacher is either ``zt``, its logits (c, V) (consumed too), or its numbers: ``logq`` (c,), ``zt_k`` (c, k) at
    ``ids`` and ``lse_t`` (c,) (``rb-topk`` only). Top-k ids are the student's own when ``ids`` is None."""
    needs_kl = method in ("vopd", "opd-full", "vopd-opt")
    # Everything that needs raw logits is read first; then both buffers are transformed in place, so a chunk holds
    # two (c, V) buffers and the student side takes a single exp pass (performance.md).
    zs_y = zs.gather(-1, y_c).squeeze(-1)
    zt_y = None if zt is None else zt.gather(-1, y_c).squeeze(-1)
    if method in TOPK_METHODS:
        # Student's top-k ids; renormalising both models on the same ids cancels their full lse's.
        if ids is None:
            ids = zs.topk(top_k, dim=-1).indices
        zs_k = zs.gather(-1, ids)
        if zt is not None:
            zt_k = zt.gather(-1, ids)
        if method != "rb-topk":
            logp_k, logq_k = zs_k.log_softmax(-1), zt_k.log_softmax(-1)  # type: ignore[union-attr]
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
    if zt_y is not None:
        logq = zt_y - lse_t
    st[:, _LOGP], st[:, _LOGQ] = logp, logq
    if method in ("vopd-topk", "opd-topk"):
        st[:, _MASS] = (zs_k - lse_s.unsqueeze(-1)).exp().sum(-1)
    if needs_kl:
        pd = torch.linalg.vecdot(e, d) * inv_s  # sum_v p_v (z_s - z_t)_v
        kl = pd - lse_s + lse_t  # KL_t = A/S - lse_s + lse_t (performance.md)
        st[:, _KL] = kl

    if method in SAMPLED_METHODS:
        reward = logq - logp  # r_t
        if method == "opd":
            adv = reward
        elif method == "vopd":
            adv = reward + kl  # A_t = r_t + KL_t (spec `vopd`)
        elif method == "vopd-topk":
            adv = reward + kl_k  # A_t = r_t + KL~_t (spec `vopd-topk`)
        elif method == "vopd-opt":
            adv = reward - _optimal_baseline(e, inv_s, d, pd, kl, lse_s, lse_t)
        else:  # rb-topk: baseline = mean reward on K, r_v = log q_v - log p_v exactly (full lse's)
            logp_k, logq_k = zs_k - lse_s.unsqueeze(-1), zt_k - lse_t.unsqueeze(-1)  # type: ignore[operator]
            p_k = logp_k.exp()
            r_k = logq_k - logp_k
            b = (p_k * r_k).sum(-1) / p_k.sum(-1)
            adv = reward - b
            st[:, _MASS] = p_k.sum(-1)
        st[:, _ADV] = adv
        ratio = importance_ratio(logp, sampler_lp, ratio_cap)
        coef = adv if ratio is None else adv * ratio
        if ratio is not None:
            st[:, _RATIO] = ratio
        if method == "rb-topk":
            # Exact over K: sum_{v in K} p_v A_v (p - e_v); sampled only outside K: A_y (p - e_y).
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
    elif method == "opd-full":
        loss = kl.sum() * inv_n
        # dL/dz = w p (log p - log q - KL_t) = w p (d - sum_v p_v d_v), in d's buffer.
        g = d.sub_(pd.unsqueeze(-1)).mul_(e).mul_((inv_n * inv_s).unsqueeze(-1))
    else:  # opd-topk
        loss = kl_k.sum() * inv_n
        g_k = p_k * (logp_k - logq_k - kl_k.unsqueeze(-1)) * inv_n
        g = e.zero_().scatter_(-1, ids, g_k)
    return loss, g


class _FusedHead(torch.autograd.Function):
    """Forward computes the loss *and* its gradients chunk by chunk; backward rescales the stored gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hs: Tensor, ws: Tensor, bs: Tensor | None, y: Tensor, sampler_lp: Tensor | None,
        teacher: TeacherRows, method: str, top_k: int, inv_n: float, ratio_cap: float | None, rows: int,
    ) -> tuple[Tensor, Tensor]:
        cd = compute_dtype(hs.dtype)
        half_cuda = hs.is_cuda and hs.dtype in (torch.bfloat16, torch.float16) and cd == torch.float32
        ws_c = ws if half_cuda else ws.to(cd)  # converted once, not per chunk
        in_process = teacher.hidden is not None
        if in_process:
            wt_c = teacher.weight if half_cuda else teacher.weight.to(cd)  # type: ignore[union-attr]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, dev = hs.shape[0], hs.device
        gdt = torch.float32 if half_cuda else cd
        grad_h = torch.zeros(hs.shape, dtype=gdt, device=dev) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=gdt, device=dev) if need_w else None
        grad_b = torch.zeros(ws.shape[0], dtype=cd, device=dev) if need_b else None
        stats = torch.zeros(n, _NUM_STATS, dtype=cd, device=dev)
        loss = torch.zeros((), dtype=cd, device=dev)

        def part(x: Tensor | None, lo: int, hi: int) -> Tensor | None:
            return None if x is None else x[lo:hi].to(cd)

        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h_c, y_c = hs[lo:hi], y[lo:hi].unsqueeze(-1)
            zs = _logits(h_c, ws_c, bs, cd)  # (c, V)
            if in_process:
                with torch.no_grad():
                    given: dict[str, Tensor | None] = {
                        "zt": _logits(teacher.hidden[lo:hi], wt_c, teacher.bias, cd)}  # type: ignore[index]
            else:
                ids = None if teacher.topk_ids is None else teacher.topk_ids[lo:hi]
                given = {"ids": ids, "logq": part(teacher.logq, lo, hi), "zt_k": part(teacher.topk_logits, lo, hi),
                         "lse_t": part(teacher.lse, lo, hi)}
            loss_c, g = _head_chunk(zs, y_c, stats[lo:hi], method, top_k, inv_n,
                                    None if sampler_lp is None else sampler_lp[lo:hi], ratio_cap, **given)
            loss += loss_c
            if need_h:
                gh = torch.mm(g.to(ws.dtype), ws, out_dtype=torch.float32) if half_cuda else g @ ws_c
                grad_h[lo:hi] = gh  # type: ignore[index]
            if need_w:
                if half_cuda:
                    grad_w += torch.mm(g.t().to(h_c.dtype), h_c, out_dtype=torch.float32)  # type: ignore[operator]
                else:
                    grad_w.addmm_(g.t(), h_c.to(cd))  # type: ignore[union-attr]
            if need_b:
                grad_b += g.sum(0)  # type: ignore[operator]
            del zs, g, given  # the chunk's (c, V) buffers are gone before the next chunk allocates its own

        ctx.grads = (
            None if grad_h is None else grad_h.to(hs.dtype),
            None if grad_w is None else grad_w.to(ws.dtype),
            None if grad_b is None else grad_b.to(bs.dtype),  # type: ignore[union-attr]
        )
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:
        gh, gw, gb = ctx.grads
        scale = grad_loss.to(torch.float32)
        out = [None if g is None else g * scale.to(g.dtype) for g in (gh, gw, gb)]
        return (out[0], out[1], out[2]) + (None,) * 8


def fused_head_loss(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None, tokens: Tensor,
                    mask: Tensor, teacher: TeacherRows, *, method: str, top_k: int,
                    normalizer: float | Tensor | None, sampler_logprobs: Tensor | None, ratio_cap: float | None,
                    memory_budget_mb: float) -> LossOutput:
    """The shared body of ``chunked_distillation_loss`` and ``vopd.remote.remote_distillation_loss`` (inputs
    already validated): select the live rows, run the fused head, put the statistics back on the (B, T) grid.
    ``teacher`` holds the live rows only (``mask.reshape(-1)`` order)."""
    lead = tuple(student_hidden.shape[:-1])
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
    sampled = method in SAMPLED_METHODS
    loss, stats = _FusedHead.apply(
        hs, student_weight, student_bias, y, slp, teacher, method, top_k, 1.0 / float(n),
        ratio_cap if sampled else None, chunk_rows(student_weight.shape[0], memory_budget_mb),
    )

    def per_token(col: int) -> Tensor:
        out = zeros.reshape(-1).clone()
        out[idx] = stats[:, col]
        return out.reshape(lead)

    logp, logq = per_token(_LOGP), per_token(_LOGQ)
    reward = logq - logp
    advantage = per_token(_ADV) if sampled else None
    return LossOutput(
        loss=loss, num_tokens=mask.sum().detach(), logp=logp, logq=logq, reward=reward,
        baseline=None if advantage is None else reward - advantage, advantage=advantage,
        kl=per_token(_KL) if method in ("vopd", "opd-full", "vopd-opt") else None,
        kl_topk=per_token(_KL_TOPK) if method in ("vopd-topk", "opd-topk") else None,
        topk_mass=per_token(_MASS) if method in TOPK_METHODS else None,
        ratio=per_token(_RATIO) if (sampled and sampler_logprobs is not None) else None,
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
    memory_budget_mb: float = 1024,
) -> LossOutput:
    """The same loss and gradients as ``distillation_loss`` without materialising (B, T, V) logits.

    Shapes:
        student_hidden: (B, T, D_s), the student's last hidden states (after the final norm), requires grad.
        student_weight: (V, D_s), the student's output layer (``lm_head.weight``); gets a gradient if it requires one.
        teacher_hidden: (B, T, D_t), no gradient.
        teacher_weight: (V, D_t), no gradient.
        tokens, mask, sampler_logprobs: (B, T), as in ``distillation_loss``.
        student_bias/teacher_bias: optional (V,) output biases.
    Options: as ``distillation_loss``, plus ``memory_budget_mb``, the budget for a chunk's (rows x V) fp32
    buffers (``chunk_rows``).
    """
    lead = tuple(student_hidden.shape[:-1])
    check_inputs(
        method, top_k, student_weight.shape[0], teacher_weight.shape[0], tokens, mask, lead,
        tuple(teacher_hidden.shape[:-1]),
    )
    if student_weight.shape[1] != student_hidden.shape[-1] or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: student hidden {student_hidden.shape[-1]} vs weight {tuple(student_weight.shape)}, "
            f"teacher hidden {teacher_hidden.shape[-1]} vs weight {tuple(teacher_weight.shape)}"
        )
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)
    teacher = TeacherRows(
        hidden=teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx),
        weight=teacher_weight.detach(), bias=None if teacher_bias is None else teacher_bias.detach(),
    )
    return fused_head_loss(student_hidden, student_weight, student_bias, tokens, mask, teacher, method=method,
                           top_k=top_k, normalizer=normalizer, sampler_logprobs=sampler_logprobs, ratio_cap=ratio_cap,
                           memory_budget_mb=memory_budget_mb)
