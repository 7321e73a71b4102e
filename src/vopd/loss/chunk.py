"""One chunk of the fused head: the per-chunk view every estimator reads, and the estimators as a table over it.

What it knows: for c rows of the student's logits (c, V) and the teacher in either form (its logits, or the numbers
a server sends: ``vopd.loss.scores.chunk_inputs``), the quantities the eight estimators share (log p(y), log q(y),
both log-sum-exps, KL_t, the top-k renormalised KL~_t on the student's or the teacher's top-k ids), formed once in
one pass (``view``), and then, per entry of the method table's ``rule`` (``vopd.loss.methods.Rule``), the baseline a
sampled method subtracts and the loss term and dL/dz_s (c, V) of its gradient (``RULES``). A new estimator is one
row of the method table, one entry here and one in the dense reference (``vopd.loss.estimators.RULES``). What it
does not know: hidden states, output layers, chunk sizes or the logit transform (``vopd.loss.chunked`` forms the
logits and chains the transform), models.

Closed forms (z_s, z_t student/teacher logits, p = softmax z_s, y the sampled id, w = 1/N the token weight,
docs/estimators.md, "Key equations" and "Pseudocode"):
    KL_t            = sum_v p_v (z_s - z_t)_v - lse_s + lse_t          (one extra reduction, no extra exp)
    sampled:        dL/dz_s = w * A_t * (p - onehot(y)),  A_t = r_t - b_t, detached
    opd-full:       dL/dz_s = w * p * (d - sum_v p_v d_v),   d = z_s - z_t   (= p (log p - log q - KL_t))
    opd-topk:       dL/dz_s = w * p~ * (log p~ - log q~ - KL~_t) on the top-k ids K, 0 elsewhere
p = e / sum(e) is never materialised: each rule folds 1 / sum(e) into the scalars it multiplies by, and writes the
gradient into e's (or d's) buffer, so a chunk holds two (c, V) buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from vopd.loss.estimators import need
from vopd.loss.methods import MethodSpec, Rule


@dataclass
class ChunkView:
    """What the rules read for one chunk of c rows; every tensor is (c,) unless its shape is given.

    y (c, 1): the sampled ids. e (c, V): exp(z_s - max z_s), the student's unnormalised probabilities, the buffer
    the gradient is written into; inv_s = 1 / sum_v e_v; lse_s; logp, logq: log p(y), log q(y); inv_n: the token
    weight 1/N. Top-k methods: ids (c, k) (the student's, or those the teacher was asked about; for ``vopd-ttopk`` the
    teacher's own top-k, sent or taken from its logits), zs_k and zt_k (c, k) both models' logits (or log-probs)
    there. With the teacher's full distribution: lse_t, d (c, V) = z_s - z_t (the teacher's buffer), pd = sum_v p_v
    d_v and kl = KL_t (exact_kl methods); the numbers carry lse_t for ``rb-topk``. Renormalised on K (topk_kl and
    ttopk_kl methods): logp_k, logq_k, p_k (c, k) and kl_k = KL~_t (KL^_t on the teacher's ids). mass: the student's
    mass on K (top-k methods). baseline: b_t, set before a sampled rule's gradient is taken.
    """

    y: Tensor
    e: Tensor
    inv_s: Tensor
    lse_s: Tensor
    logp: Tensor
    logq: Tensor
    inv_n: float
    ids: Tensor | None = None
    zs_k: Tensor | None = None
    zt_k: Tensor | None = None
    lse_t: Tensor | None = None
    d: Tensor | None = None
    pd: Tensor | None = None
    kl: Tensor | None = None
    logp_k: Tensor | None = None
    logq_k: Tensor | None = None
    p_k: Tensor | None = None
    kl_k: Tensor | None = None
    mass: Tensor | None = None
    baseline: Tensor | None = None


def view(zs: Tensor, y: Tensor, spec: MethodSpec, top_k: int, inv_n: float, *, zt: Tensor | None = None,
         ids: Tensor | None = None, logq: Tensor | None = None, zt_k: Tensor | None = None,
         lse_t: Tensor | None = None) -> ChunkView:
    """The shared quantities of one chunk, in one pass. ``zs`` (c, V), the student's final logits, and ``zt``, the
    teacher's (c, V) when given, are consumed: their buffers become e and d. Otherwise the teacher is its numbers
    ``logq``, ``zt_k`` at ``ids`` and ``lse_t``. Top-k ids are the student's own when ``ids`` is None, or the
    teacher's (from ``zt``) for ``vopd-ttopk``: then a teacher server's numbers and an in-process teacher give the same
    set, and the log-sum-exp of either model cancels on it."""
    # Everything that needs raw logits is read first; then both buffers are overwritten in place, so a chunk holds
    # two (c, V) buffers and the student side takes a single exp pass (docs/estimators.md, "Key equations").
    zs_y = zs.gather(-1, y).squeeze(-1)
    zt_y = None if zt is None else zt.gather(-1, y).squeeze(-1)
    zs_k = logp_k = logq_k = p_k = kl_k = None
    if spec.topk:
        # The student's top-k ids (the teacher's for vopd-ttopk); renormalising both models on the same ids cancels
        # their full lse's, so a server's log-probs there serve as well as logits.
        if ids is None:
            ids = (need(zt, "the teacher's logits") if spec.teacher_topk else zs).topk(top_k, dim=-1).indices
        zs_k = zs.gather(-1, ids)
        if zt is not None:
            zt_k = zt.gather(-1, ids)
        zt_k = need(zt_k, "teacher logits at the top-k ids")  # gathered from zt, or sent as numbers
        if spec.topk_kl or spec.ttopk_kl:
            logp_k, logq_k = zs_k.log_softmax(-1), zt_k.log_softmax(-1)
            p_k = logp_k.exp()
            # 0 log 0 = 0: the teacher's ids may hold ids the student bans (-inf), which carry no student mass
            kl_k = (p_k * torch.where(p_k > 0, logp_k - logq_k, 0.0)).sum(-1)
    d = None
    if zt is not None:
        lse_t = zt.logsumexp(-1)
        if spec.exact_kl:
            d = torch.sub(zs, zt, out=zt)  # z_s - z_t, written over the teacher's buffer in one pass
    m_s = zs.amax(-1, keepdim=True)
    e = zs.sub_(m_s).exp_()
    sum_e = e.sum(-1, keepdim=True)
    lse_s = (m_s + sum_e.log()).squeeze(-1)
    inv_s = 1.0 / sum_e.squeeze(-1)
    if zt_y is not None and lse_t is not None:
        logq = zt_y - lse_t
    c = ChunkView(y, e, inv_s, lse_s, zs_y - lse_s, need(logq, "log q(y)"), inv_n, ids, zs_k, zt_k, lse_t, d,
                  logp_k=logp_k, logq_k=logq_k, p_k=p_k, kl_k=kl_k)
    if spec.topk_kl or spec.ttopk_kl:
        c.mass = (need(zs_k, "zs_k") - lse_s.unsqueeze(-1)).exp().sum(-1)
    if d is not None:
        c.pd = torch.linalg.vecdot(e, d) * inv_s  # sum_v p_v (z_s - z_t)_v
        c.kl = c.pd - lse_s + need(lse_t, "lse_t")  # KL_t = A/S - lse_s + lse_t (single-pass KL)
    return c


# ------------------------------------------------------------------------------------------- baselines b_t


def _no_baseline(c: ChunkView) -> Tensor:  # opd
    return torch.zeros_like(c.logp)


def _value(c: ChunkView) -> Tensor:  # vopd: b_t = -KL_t (docs/estimators.md, `vopd`)
    return -need(c.kl, "KL_t")


def _topk_value(c: ChunkView) -> Tensor:  # vopd-topk: b_t = -KL~_t (docs/estimators.md, `vopd-topk`)
    return -need(c.kl_k, "KL~_t")


def _ttopk_value(c: ChunkView) -> Tensor:  # vopd-ttopk: b_t = -KL^_t on the teacher's top-k (docs/estimators.md)
    return -need(c.kl_k, "KL^_t")


def _optimal(c: ChunkView) -> Tensor:
    """b* = sum p w r / sum p w with w_v = 1 - 2 p_v + S2, S2 = sum p^2 (``vopd-opt``), from the chunk's buffers.

    With r_v = -d_v + lse_s - lse_t:  sum p w = 1 - S2  and  sum p w d = (1 + S2) sum p d - 2 sum p^2 d, so two more
    reductions give b*; a one-hot p (S2 = 1) falls back to the value -KL_t."""
    e, d, pd, kl = c.e, need(c.d, "d"), need(c.pd, "pd"), need(c.kl, "KL_t")
    s2 = torch.linalg.vecdot(e, e) * c.inv_s**2
    p2d = torch.linalg.vecdot(e * e, d) * c.inv_s**2
    den = 1 - s2
    b = -((1 + s2) * pd - 2 * p2d) / den.clamp_min(1e-30) + c.lse_s - need(c.lse_t, "lse_t")
    return torch.where(den > 1e-12, b, -kl)


def _on_k(c: ChunkView) -> tuple[Tensor, Tensor, Tensor]:
    """``rb-topk`` on the student's top-k ids K with the full lse's: log p_v, p_v and r_v = log q_v - log p_v."""
    logp_k = need(c.zs_k, "zs_k") - c.lse_s.unsqueeze(-1)
    logq_k = need(c.zt_k, "zt_k") - need(c.lse_t, "lse_t").unsqueeze(-1)
    p_k = logp_k.exp()
    return logp_k, p_k, logq_k - logp_k


def _topk_mean(c: ChunkView) -> Tensor:  # rb-topk: b_t = the mean reward on K
    _, p_k, r_k = _on_k(c)
    c.mass = p_k.sum(-1)
    return (p_k * r_k).sum(-1) / p_k.sum(-1)


# ------------------------------------------------------------------------------- gradients: (loss term, dL/dz_s)


def _score_function(c: ChunkView, coef: Tensor | None) -> tuple[Tensor, Tensor]:
    """-sg(coef) log p(y): dL/dz = w * coef * (p - onehot(y)), written into e's buffer (p = e * inv_s)."""
    coef = need(coef, "the advantage")
    loss = -(coef * c.logp).sum() * c.inv_n
    g = c.e.mul_((coef * c.inv_n * c.inv_s).unsqueeze(-1))
    g.scatter_add_(-1, c.y, -(coef * c.inv_n).unsqueeze(-1))
    return loss, g


def _rao_blackwell(c: ChunkView, coef: Tensor | None) -> tuple[Tensor, Tensor]:
    """``rb-topk``: exact over K, sum_{v in K} p_v A_v (p - e_v); sampled only outside K: A_y (p - e_y)."""
    ids, b = need(c.ids, "ids"), need(c.baseline, "the baseline")
    logp_k, p_k, r_k = _on_k(c)
    coef = need(coef, "the advantage") * ~(ids == c.y).any(-1)
    pa_k = p_k * (r_k - b.unsqueeze(-1))
    loss = -((pa_k * logp_k).sum() + (coef * c.logp).sum()) * c.inv_n
    g = c.e.mul_(((pa_k.sum(-1) + coef) * c.inv_n * c.inv_s).unsqueeze(-1))
    g.scatter_add_(-1, ids, -pa_k * c.inv_n)
    g.scatter_add_(-1, c.y, -(coef * c.inv_n).unsqueeze(-1))
    return loss, g


def _kl_gradient(c: ChunkView, _coef: Tensor | None) -> tuple[Tensor, Tensor]:
    """``opd-full``: dL/dz = w p (log p - log q - KL_t) = w p (d - sum_v p_v d_v), in d's buffer."""
    kl, d, pd = need(c.kl, "KL_t"), need(c.d, "d"), need(c.pd, "pd")
    g = d.sub_(pd.unsqueeze(-1)).mul_(c.e).mul_((c.inv_n * c.inv_s).unsqueeze(-1))
    return kl.sum() * c.inv_n, g


def _topk_kl_gradient(c: ChunkView, _coef: Tensor | None) -> tuple[Tensor, Tensor]:
    """``opd-topk``: dL/dz = w p~ (log p~ - log q~ - KL~_t) on K, 0 elsewhere."""
    kl_k, p_k = need(c.kl_k, "KL~_t"), need(c.p_k, "p~")
    g_k = p_k * (need(c.logp_k, "log p~") - need(c.logq_k, "log q~") - kl_k.unsqueeze(-1)) * c.inv_n
    return kl_k.sum() * c.inv_n, c.e.zero_().scatter_(-1, need(c.ids, "ids"), g_k)


@dataclass(frozen=True)
class ChunkRule:
    """One entry: ``baseline`` (sampled methods: b_t from the view; None for an analytic gradient) and ``gradient``
    (the view and the per-row weight on grad log p(y) -> this chunk's loss term and dL/dz_s (c, V))."""

    baseline: Callable[[ChunkView], Tensor] | None
    gradient: Callable[[ChunkView, Tensor | None], tuple[Tensor, Tensor]]


#: The fused head's estimators, one entry per ``MethodSpec.rule`` (tests check both paths cover the method table).
RULES: dict[Rule, ChunkRule] = {
    "none": ChunkRule(_no_baseline, _score_function),
    "kl": ChunkRule(_value, _score_function),
    "kl-topk": ChunkRule(_topk_value, _score_function),
    "optimal": ChunkRule(_optimal, _score_function),
    "topk-mean": ChunkRule(_topk_mean, _rao_blackwell),
    "kl-ttopk": ChunkRule(_ttopk_value, _score_function),
    "grad-kl": ChunkRule(None, _kl_gradient),
    "grad-kl-topk": ChunkRule(None, _topk_kl_gradient),
}
