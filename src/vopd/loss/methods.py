"""The method table: every estimator's properties, declared once and read everywhere.

What it knows: the eight method names (the paper's five, then three beyond it: docs/estimators.md, "Beyond the
paper") and, per method, what kind of gradient it is, which baseline it subtracts, whether it is unbiased, and what
it needs from the teacher and the student (full distribution, log-sum-exp, the student's top-k ids, or the teacher's
own top-k). The estimators, the fused head, the teachers, the trainer and the tools all read these properties
instead of spelling method sets of their own. What it does not know: any math; ``vopd.loss.estimators`` and ``vopd.loss.chunked`` implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

#: The paper's five methods, then three beyond it: ``vopd-opt`` uses the variance-optimal closed-form baseline;
#: ``rb-topk`` is exact on the student's top-k ids and samples only the tail; ``vopd-ttopk`` takes its baseline on the
#: teacher's own top-k ids (what a stock server's prompt log-probs give: shared/spec/stock-engines.md).
Method = Literal["opd", "vopd", "vopd-topk", "opd-full", "opd-topk", "vopd-opt", "rb-topk", "vopd-ttopk"]

#: What a sampled method subtracts from r_t (docs/estimators.md, one row per method): nothing, the exact value
#: -KL_t, the top-k value -KL~_t, the variance-optimal b*_t, the mean reward on the student's top-k ids, or the
#: value on the teacher's own top-k ids -KL^_t (p and q renormalised on them).
Baseline = Literal["none", "kl", "kl-topk", "optimal", "topk-mean", "kl-ttopk"]


#: How the estimators compute a method, one entry per kind in each path's table (``vopd.loss.estimators``, dense;
#: ``vopd.loss.chunked``, fused): a sampled method by the baseline it subtracts, an analytic one by the KL it
#: differentiates (``grad-kl``: the exact KL_t, ``grad-kl-topk``: KL~_t on the student's top-k ids).
Rule = Literal["none", "kl", "kl-topk", "optimal", "topk-mean", "kl-ttopk", "grad-kl", "grad-kl-topk"]


@dataclass(frozen=True)
class MethodSpec:
    """One method's properties.

    sampled:           a score-function estimator, -sg(A_t) grad log p(y_t) (False: an analytic gradient of a KL).
    baseline:          what A_t = r_t - b_t subtracts (sampled methods), None for the analytic ones.
    unbiased:          its expected gradient is the exact reverse-KL gradient.
    full_distribution: needs the teacher's whole distribution at every position (sums over the vocabulary).
    topk:              works on k = ``loss.top_k`` ids per position and the teacher's logits at them: the student's
                       top-k ids, or the teacher's own (``teacher_topk``).
    teacher_lse:       needs the teacher's full-vocabulary log-sum-exp beside its logits at the top-k ids.
    paper:             one of the paper's five methods.
    teacher_topk:      the ids are the teacher's own top-k, which it picks and sends with its log-probs there (and
                       log q(y_t)): it needs nothing from the student and can score before the student's forward.
    """

    name: Method
    sampled: bool
    baseline: Baseline | None
    unbiased: bool
    full_distribution: bool
    topk: bool
    teacher_lse: bool
    paper: bool
    teacher_topk: bool = False

    @property
    def exact_kl(self) -> bool:
        """It reports the exact KL_t (every method that reads the full distribution computes it)."""
        return self.full_distribution

    @property
    def topk_kl(self) -> bool:
        """It reports KL~_t between p and q renormalised on the student's top-k ids."""
        return self.baseline == "kl-topk" or (self.topk and not self.sampled)

    @property
    def ttopk_kl(self) -> bool:
        """It reports KL^_t between p and q renormalised on the teacher's own top-k ids (docs/estimators.md)."""
        return self.teacher_topk

    @property
    def student_ids(self) -> bool:
        """A teacher that sends per-token numbers must be told the student's top-k ids (so it scores after the
        student's forward)."""
        return self.topk and not self.teacher_topk

    @property
    def rule(self) -> Rule:
        """This method's entry in the estimators' tables: its baseline when sampled, else the KL it differentiates."""
        if self.baseline is not None:
            return self.baseline
        return "grad-kl" if self.full_distribution else "grad-kl-topk"

    @property
    def per_token_teacher(self) -> bool:
        """A teacher that sends per-token numbers (log q(y_t), logits at ids, lse) is enough: no full distribution."""
        return not self.full_distribution


def _spec(name: Method, *, sampled: bool, baseline: Baseline | None, unbiased: bool = True,
          full_distribution: bool = False, topk: bool = False, teacher_lse: bool = False,
          paper: bool = True, teacher_topk: bool = False) -> MethodSpec:
    return MethodSpec(name, sampled, baseline, unbiased, full_distribution, topk, teacher_lse, paper, teacher_topk)


#: The table, in the order every tool prints it.
TABLE: dict[str, MethodSpec] = {s.name: s for s in (
    _spec("opd", sampled=True, baseline="none"),
    _spec("vopd", sampled=True, baseline="kl", full_distribution=True),
    _spec("vopd-topk", sampled=True, baseline="kl-topk", topk=True),
    _spec("opd-full", sampled=False, baseline=None, full_distribution=True),
    _spec("opd-topk", sampled=False, baseline=None, unbiased=False, topk=True),
    _spec("vopd-opt", sampled=True, baseline="optimal", full_distribution=True, paper=False),
    _spec("rb-topk", sampled=True, baseline="topk-mean", topk=True, teacher_lse=True, paper=False),
    _spec("vopd-ttopk", sampled=True, baseline="kl-ttopk", topk=True, teacher_topk=True, paper=False),
)}
assert tuple(TABLE) == get_args(Method), "the table and the Method literal must list the same methods in one order"

METHODS: tuple[str, ...] = tuple(TABLE)
PAPER_METHODS: tuple[str, ...] = tuple(n for n, s in TABLE.items() if s.paper)
#: Score-function estimators (a per-token weight on grad log p(y_t)).
SAMPLED_METHODS: frozenset[str] = frozenset(n for n, s in TABLE.items() if s.sampled)
#: Methods that work on k ids per position and the teacher's logits at them (the student's ids, or the teacher's).
TOPK_METHODS: frozenset[str] = frozenset(n for n, s in TABLE.items() if s.topk)
#: Methods that need the teacher's full distribution at every position.
FULL_VOCAB_METHODS: frozenset[str] = frozenset(n for n, s in TABLE.items() if s.full_distribution)


def method_spec(name: str) -> MethodSpec:
    """The table row of ``name``; a ValueError naming the valid methods otherwise."""
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None
