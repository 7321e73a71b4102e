"""The eight OPD estimators of docs/estimators.md as pure tensor functions on dense logits.

What it knows: given the student's and teacher's logits at each completion position and the sampled tokens, build
a scalar loss whose gradient w.r.t. the student logits is the chosen method's gradient estimator, reduced as a mean
over completion tokens, plus detached per-token diagnostics. The gradient here comes from autograd on the
surrogates of docs/estimators.md, so this module is also the *reference* the memory-efficient path (``vopd.loss.chunked``, closed-form
gradients from hidden states) is tested against.

What it does not know: models, sampling, optimisers, distributed reduction (pass ``normalizer`` to keep a global
token mean across micro-batches or ranks).

Notation (docs/estimators.md, "Background"): p = student, q = teacher, y_t the sampled token, s_t the state.
    r_t  = log q(y_t|s_t) - log p(y_t|s_t)                     single-sample reward, E_p[r_t] = -KL_t
    KL_t = sum_v p(v|s_t) (log p(v|s_t) - log q(v|s_t))         per-token reverse KL
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from vopd.loss.methods import Method, MethodSpec, Rule, method_spec


@dataclass(frozen=True)
class LossOutput:
    """Result of an estimator. Per-token tensors are (B, T), detached, zero at unmasked positions.

    loss:       scalar; its gradient w.r.t. the student is the method's estimator, token-mean reduced.
    num_tokens: scalar, the number of masked tokens in this call (not the normalizer).
    logp:       log p(y_t), the student's log-prob of the sampled token (trainer side, fp32).
    logq:       log q(y_t), the teacher's.
    reward:     r_t = log q(y_t) - log p(y_t).
    baseline:   b_t subtracted from r_t: 0 for ``opd``, -KL_t for ``vopd``, -KL~_t for ``vopd-topk``, b*_t for
                ``vopd-opt``, the top-k mean reward for ``rb-topk``, -KL^_t for ``vopd-ttopk``; None for the analytic
                methods (``opd-full``, ``opd-topk``), which sample nothing.
    advantage:  A_t = r_t - b_t, the detached weight on grad log p(y_t) (before the importance ratio; for
                ``rb-topk`` it is used only when y_t falls outside the top-k ids); None for the analytic methods.
    kl:         exact KL_t over the full vocabulary (``vopd``, ``opd-full``, ``vopd-opt``), else None.
    kl_topk:    KL~_t between p and q renormalised on the student's top-k ids (``vopd-topk``, ``opd-topk``).
    topk_mass:  sum of p over the student's top-k ids (top-k methods, ``rb-topk`` included), else None.
    kl_ttopk:   KL^_t between p and q renormalised on the teacher's own top-k ids (``vopd-ttopk``), else None.
    ttopk_mass: sum of p (the student's) over the teacher's top-k ids (``vopd-ttopk``), else None.
    ratio:      detached importance ratio min(p(y)/p_sampler(y), cap) when sampler log-probs were given, else None.
    """

    loss: Tensor
    num_tokens: Tensor
    logp: Tensor
    logq: Tensor
    reward: Tensor
    baseline: Tensor | None = None
    advantage: Tensor | None = None
    kl: Tensor | None = None
    kl_topk: Tensor | None = None
    topk_mass: Tensor | None = None
    ratio: Tensor | None = None
    kl_ttopk: Tensor | None = None
    ttopk_mass: Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax/KL precision: fp32 at least (docs/estimators.md, "API": fp32 math), fp64 kept for exact tests."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    spec: MethodSpec,
    top_k: int,
    vocab_student: int,
    vocab_teacher: int,
    tokens: Tensor,
    mask: Tensor,
    leading_student: tuple[int, ...],
    leading_teacher: tuple[int, ...],
) -> MethodSpec:
    """Shared argument validation: one ``ValueError`` naming the problem and the fix. Returns ``spec``, the
    method's row of the table (``vopd.loss.methods``), so the math reads properties, not names."""
    if vocab_student != vocab_teacher:
        raise ValueError(
            f"student vocabulary size {vocab_student} != teacher vocabulary size {vocab_teacher}; both models "
            "must share a tokenizer (slice padded output rows to the tokenizer's size first)"
        )
    if spec.topk and not 1 <= top_k <= vocab_student:
        raise ValueError(f"top_k={top_k} is outside [1, V={vocab_student}]; choose 1 <= top_k <= V")
    if tuple(tokens.shape) != leading_student:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal the student's leading shape {leading_student}")
    if leading_teacher != leading_student:
        raise ValueError(f"teacher leading shape {leading_teacher} != student leading shape {leading_student}")
    if tuple(mask.shape) != leading_student:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the student's leading shape {leading_student}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor of ids, got {tokens.dtype}")
    return spec


def token_normalizer(mask: Tensor, normalizer: float | Tensor | None) -> Tensor | None:
    """The denominator of the token mean; None (with a warning) when there is nothing to average."""
    n = mask.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float64)
    if float(n) <= 0:
        warnings.warn("mask selects no completion token: returning a zero loss", RuntimeWarning, stacklevel=3)
        return None
    return n


#: What a ratio above the cap does (docs/estimators.md, "Key equations"): ``truncate`` weighs the token by the cap
#: (truncated importance sampling, the default: it keeps every token's gradient, bounded), ``mask`` by 0 (masked
#: importance sampling: a token the sampler and trainer disagree on that much contributes nothing).
RatioMode = Literal["truncate", "mask"]


def importance_ratio(logp: Tensor, sampler_logprobs: Tensor | None, ratio_cap: float | None,
                     mode: RatioMode = "truncate") -> Tensor | None:
    """Detached ratio p_train(y)/p_sampler(y), truncated at (or masked above) ``ratio_cap``: on-policy it is 1 up
    to numerical mismatch between the sampler's and the trainer's kernels."""
    if sampler_logprobs is None:
        return None
    ratio = torch.exp(logp.detach() - sampler_logprobs.to(logp.dtype))
    if not ratio_cap:
        return ratio
    return ratio.clamp(max=ratio_cap) if mode == "truncate" else torch.where(ratio > ratio_cap, 0.0, ratio)


def _xlogy_diff(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """sum_v p_v (log p_v - log q_v) with 0 log 0 = 0, so -inf logits (masked vocabulary rows) give no NaN.

    logp is replaced where p == 0 *before* the subtraction so no -inf - -inf is ever formed (a NaN there would
    leak into the gradient even behind a ``where``)."""
    live = p > 0
    diff = torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0)
    return (p * diff).sum(-1)


def _topk_kl(s: Tensor, t: Tensor, k: int, *, teacher_ids: bool = False) -> tuple[Tensor, Tensor]:
    """KL between p and q renormalised on the student's top-k ids K (the teacher's own with ``teacher_ids``:
    ``vopd-ttopk``), and the student mass on K.

    Renormalising on the same K cancels each model's full log-sum-exp (docs/estimators.md, "Key equations"): only the k logits of each
    model at K are needed. Differentiable w.r.t. ``s`` (the id selection itself is not)."""
    ids = (t if teacher_ids else s.detach()).topk(k, dim=-1).indices
    s_k, t_k = s.gather(-1, ids), t.gather(-1, ids)
    logp_k, logq_k = s_k.log_softmax(-1), t_k.log_softmax(-1)
    kl_k = _xlogy_diff(logp_k.exp(), logp_k, logq_k)
    mass = s.detach().softmax(-1).gather(-1, ids).sum(-1)
    return kl_k, mass


def _optimal_baseline(logp_all: Tensor, logq_all: Tensor) -> Tensor:
    """Variance-optimal state baseline b* = sum_v p_v w_v r_v / sum_v p_v w_v, w_v = 1 - 2 p_v + sum_u p_u^2
    (docs/estimators.md, "Key equations"): w_v = ||p - e_v||^2 is the squared norm of the logit score, so b* minimises E[(r - b)^2 w].
    Falls back to the value -KL_t when p is one-hot (then every baseline gives a zero gradient)."""
    p = logp_all.exp()
    live = p > 0
    r = torch.where(live, logq_all, 0.0) - torch.where(live, logp_all, 0.0)
    s2 = (p * p).sum(-1, keepdim=True)
    w = 1 - 2 * p + s2
    den = (p * w).sum(-1)  # = 1 - sum p^2
    num = (p * w * r).sum(-1)
    value = (p * r).sum(-1)  # -KL_t
    return torch.where(den > 1e-12, num / den.clamp_min(1e-30), value)


def _rb_topk_parts(logp_all: Tensor, logq_all: Tensor, s: Tensor, y: Tensor, k: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``rb-topk``: baseline b = sum_{v in K} p~_v r_v (mean reward on the student's top-k ids K), the exact
    surrogate over K, -sum_{v in K} sg(p_v (r_v - b)) log p_v, whether y is in K, and the mass on K.

    E_y of the full estimator is sum_v p_v (r_v - b)(p - e_v) = the exact KL gradient for any state baseline b used
    in *both* parts (the b terms sum to b * sum_v p_v (p - e_v) = 0)."""
    ids = s.topk(k, dim=-1).indices
    logp_k = logp_all.gather(-1, ids)
    p_k = logp_k.detach().exp()
    live = p_k > 0  # ids with -inf logits (masked vocabulary rows) carry no mass and must not form -inf - -inf
    logp_k = torch.where(live, logp_k, 0.0)
    r_k = torch.where(live, logq_all.gather(-1, ids), 0.0) - logp_k.detach()
    mass = p_k.sum(-1)
    baseline = (p_k * r_k).sum(-1) / mass
    exact_part = -(p_k * (r_k - baseline.unsqueeze(-1)) * logp_k).sum(-1)
    in_k = (ids == y).any(-1)
    return baseline, exact_part, in_k, mass


@dataclass
class DenseView:
    """What the dense rules read, all (B, T) unless said, zero outside the mask ``m``.

    s, t (B, T, V): both models' logits (masked positions zeroed); logp_all, logq_all (B, T, V): their log-softmax;
    y (B, T, 1): the sampled ids; logp: log p(y) (with its graph); reward: r_t, detached; top_k. kl: KL_t with its
    graph (``exact_kl`` methods); kl_k, mass: KL~_t with its graph and the student's mass on its top-k ids
    (``topk_kl`` methods; on the teacher's top-k ids for ``ttopk_kl``: KL^_t). A rule may add what its surrogate needs (``rb-topk``: the exact part over K, in_k) and the
    mass it defines."""

    s: Tensor
    t: Tensor
    logp_all: Tensor
    logq_all: Tensor
    y: Tensor
    m: Tensor
    logp: Tensor
    reward: Tensor
    top_k: int
    kl: Tensor | None = None
    kl_k: Tensor | None = None
    mass: Tensor | None = None
    exact_part: Tensor | None = None
    in_k: Tensor | None = None


def need(x: Tensor | None, what: str) -> Tensor:
    """A view field the rule's method always has (the method table says so), for either path's rules; a bug
    otherwise, not a user error."""
    if x is None:
        raise AssertionError(f"the estimator's view has no {what}: the method table and the view disagree")
    return x


def _no_baseline(v: DenseView) -> Tensor:  # opd
    return torch.zeros_like(v.reward)


def _value(v: DenseView) -> Tensor:  # vopd: V(s_t) = -KL_t over the full vocabulary (docs/estimators.md, `vopd`)
    return -(need(v.kl, "KL_t").detach() * v.m)


def _topk_value(v: DenseView) -> Tensor:  # vopd-topk: the top-k KL; the sampled terms keep the full softmax
    return -(need(v.kl_k, "KL~_t").detach() * v.m)


def _ttopk_value(v: DenseView) -> Tensor:
    """vopd-ttopk: -KL^_t on the teacher's top-k ids S_t, a function of the state alone (S_t is picked from the
    teacher's logits, never from y_t), so E[b_t grad log p(y_t)] = 0 for every k (docs/estimators.md)."""
    return -(need(v.kl_k, "KL^_t").detach() * v.m)


def _optimal(v: DenseView) -> Tensor:  # vopd-opt
    return _optimal_baseline(v.logp_all.detach(), v.logq_all) * v.m


def _topk_mean(v: DenseView) -> Tensor:  # rb-topk: the mean reward on K, and the exact part over K
    baseline, v.exact_part, v.in_k, mass = _rb_topk_parts(v.logp_all, v.logq_all, v.s.detach(), v.y, v.top_k)
    v.mass = mass * v.m
    return baseline * v.m


def _score_function(v: DenseView, weight: Tensor | None) -> Tensor:
    return -need(weight, "the weight") * v.logp  # the surrogate -sg(A_t) log p(y_t): its gradient is the estimator


def _rao_blackwell(v: DenseView, weight: Tensor | None) -> Tensor:
    # Exact over K, plus the sampled token only when it falls outside K (Rao-Blackwellised over K).
    return need(v.exact_part, "the exact part") - (~need(v.in_k, "in_k")) * need(weight, "the weight") * v.logp


def _kl_surrogate(v: DenseView, _weight: Tensor | None) -> Tensor:  # opd-full: KL_t, differentiated analytically
    return need(v.kl, "KL_t")


def _topk_kl_surrogate(v: DenseView, _weight: Tensor | None) -> Tensor:  # opd-topk: biased, ignores the tail mass
    return need(v.kl_k, "KL~_t")


@dataclass(frozen=True)
class DenseRule:
    """One entry: ``baseline`` (sampled methods: b_t; None for an analytic gradient) and ``surrogate`` (the view and
    the detached weight on log p(y) -> the per-token term whose autograd gradient is the estimator)."""

    baseline: Callable[[DenseView], Tensor] | None
    surrogate: Callable[[DenseView, Tensor | None], Tensor]


#: The dense reference's estimators, one entry per ``MethodSpec.rule`` (``vopd.loss.chunk.RULES`` is the fused one).
RULES: dict[Rule, DenseRule] = {
    "none": DenseRule(_no_baseline, _score_function),
    "kl": DenseRule(_value, _score_function),
    "kl-topk": DenseRule(_topk_value, _score_function),
    "optimal": DenseRule(_optimal, _score_function),
    "topk-mean": DenseRule(_topk_mean, _rao_blackwell),
    "kl-ttopk": DenseRule(_ttopk_value, _score_function),
    "grad-kl": DenseRule(None, _kl_surrogate),
    "grad-kl-topk": DenseRule(None, _topk_kl_surrogate),
}


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    method: Method,
    top_k: int = 100,
    normalizer: float | Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    ratio_cap: float | None = None,
    ratio_mode: RatioMode = "truncate",
) -> LossOutput:
    """On-policy distillation loss from dense logits.

    Shapes:
        student_logits:   (B, T, V), requires grad; ``student_logits[:, t]`` produced ``tokens[:, t]``.
        teacher_logits:   (B, T, V); detached here, never receives a gradient.
        tokens:           (B, T) int, the sampled completion ids.
        mask:             (B, T) bool/0-1, 1 on completion tokens, 0 on prompt and padding.
        sampler_logprobs: (B, T) optional, the sampler's log p(y_t); gives the importance ratio (sampled methods).
    Options:
        method:     one of ``METHODS`` (docs/estimators.md, "Key equations").
        top_k:      |K| for the top-k methods (student's top-k ids per position).
        normalizer: token count to divide by; default ``mask.sum()``. Pass the global count when the batch is
                    split into micro-batches or over ranks so the token mean stays global (docs/estimators.md, "Key equations": the "dapo" reduction).
        ratio_cap:  truncation of the importance ratio (None: no cap).
        ratio_mode: what a ratio above ``ratio_cap`` does: ``truncate`` (weight = cap) or ``mask`` (weight = 0).

    All softmax/KL math runs in fp32 (fp64 if the inputs are fp64), whatever the input dtype. The per-method math is
    the method's entry of ``RULES``.
    """
    spec = check_inputs(
        method_spec(method), top_k, student_logits.shape[-1], teacher_logits.shape[-1], tokens, mask,
        tuple(student_logits.shape[:-1]), tuple(teacher_logits.shape[:-1]),
    )
    v = _dense_view(student_logits, teacher_logits, tokens, mask, spec, top_k)
    rule = RULES[spec.rule]
    baseline = advantage = ratio = weight = None
    if rule.baseline is not None:
        baseline = rule.baseline(v)
        advantage = v.reward - baseline  # A_t = r_t - b_t, detached (docs/estimators.md: sg(r_t + KL_t) for vopd)
        ratio = importance_ratio(v.logp, sampler_logprobs, ratio_cap, ratio_mode)
        weight = advantage if ratio is None else advantage * ratio
        if ratio is not None:
            ratio = ratio * v.m
    per_token = rule.surrogate(v, weight)

    n = token_normalizer(mask, normalizer)
    loss = (per_token * v.m).sum() / n.to(v.m.dtype) if n is not None else (per_token * 0.0).sum()
    return LossOutput(
        loss=loss,
        num_tokens=mask.sum().detach(),
        logp=v.logp.detach() * v.m,
        logq=v.logq_all.gather(-1, v.y).squeeze(-1).detach() * v.m,
        reward=v.reward,
        baseline=baseline,
        advantage=advantage,
        kl=None if v.kl is None else v.kl.detach() * v.m,
        kl_topk=None if v.kl_k is None or spec.ttopk_kl else v.kl_k.detach() * v.m,
        topk_mass=v.mass if spec.student_ids else None,
        ratio=ratio,
        kl_ttopk=None if v.kl_k is None or not spec.ttopk_kl else v.kl_k.detach() * v.m,
        ttopk_mass=v.mass if spec.ttopk_kl else None,
    )


def _dense_view(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, mask: Tensor, spec: MethodSpec,
                top_k: int) -> DenseView:
    """The shared quantities of the dense path, in the compute dtype."""
    cd = compute_dtype(student_logits.dtype)
    live = mask.bool()
    m = live.to(cd)
    # Positions outside the mask may hold anything (padding, -inf rows, out-of-range ids): replace them by zeros
    # before any arithmetic, so nothing there can turn into a NaN in the loss or its gradient.
    s = torch.where(live.unsqueeze(-1), student_logits.to(cd), 0.0)
    t = torch.where(live.unsqueeze(-1), teacher_logits.detach().to(cd), 0.0)
    y = torch.where(live, tokens.long(), 0).unsqueeze(-1)
    logp_all, logq_all = s.log_softmax(-1), t.log_softmax(-1)
    logp = logp_all.gather(-1, y).squeeze(-1)
    reward = (logq_all.gather(-1, y).squeeze(-1) - logp).detach() * m  # r_t, docs/estimators.md, "Background"
    v = DenseView(s, t, logp_all, logq_all, y, m, logp, reward, top_k)
    if spec.exact_kl:
        v.kl = _xlogy_diff(logp_all.exp(), logp_all, logq_all)  # KL_t
    if spec.topk_kl or spec.ttopk_kl:
        v.kl_k, mass = _topk_kl(s, t, top_k, teacher_ids=spec.teacher_topk)
        v.mass = mass * m
    return v
