"""What a teacher placement's answer may hold, and so what a method lacks from it: the vocabulary of ``supports``.

What it knows: the four things a placement can send per scored position beside log q(y_t) (the whole
distribution; logits at asked ids; the full-vocabulary log-sum-exp; the teacher's own top-k ids and log-probs) and,
from the method table (``vopd.loss.methods``), which of them each method needs. A placement's ``Teacher.supports`` states its answer as
``Answers`` and words the refusal with its own fix (``lacks`` gives the missing part as a phrase). What it
does not know: any placement, HTTP, or the loss math.
"""

from __future__ import annotations

from dataclasses import dataclass

from vopd.loss.methods import MethodSpec


@dataclass(frozen=True)
class Answers:
    """What a placement can send back per scored position, beside log q(y_t) (which every placement sends).

    full:   the teacher's whole distribution (its last hidden states and output layer): every method.
    at_ids: its logits at ids the caller asks about (the student's top-k): the top-k methods.
    lse:    its full-vocabulary log-sum-exp beside those logits (``MethodSpec.teacher_lse``: rb-topk).
    own_topk: its own top-k ids at each position and its log-probs there (``MethodSpec.teacher_topk``: vopd-ttopk;
            what a stock server's prompt log-probs give, shared/spec/stock-engines.md).
    """

    full: bool = False
    at_ids: bool = False
    lse: bool = False
    own_topk: bool = False


def lacks(spec: MethodSpec, answers: Answers) -> str | None:
    """What method ``spec`` needs that a placement answering ``answers`` cannot send, as a phrase for a message
    ("loss.method=vopd needs <phrase>"), or None when it has everything."""
    if answers.full:
        return None
    if spec.full_distribution:
        return "the teacher's full distribution at every position"
    if spec.teacher_topk:  # the teacher picks the ids: logits at asked ids are no substitute
        return None if answers.own_topk else "the teacher's own top-k ids and log-probs at every position"
    if spec.topk and not answers.at_ids:
        return "the teacher's logits at the student's top-k ids"
    if spec.teacher_lse and not answers.lse:
        return "the teacher's log-sum-exp"
    return None

