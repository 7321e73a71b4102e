"""The loss resolved once (``vopd.loss.plan.LossPlan``): built from ``cfg.loss`` before step 0, it gives the fused
head exactly the options spelled out by hand, refuses a bad method or option at construction, and a teacher
answering with another top-k width than asked is an error instead of a silent override."""

from __future__ import annotations

import pytest
import torch

from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.chunked import fused_distillation_loss
from vopd.loss.head import IDENTITY
from vopd.loss.plan import LossPlan
from vopd.loss.scores import TeacherNumbers
from vopd.step import loss_plan

B, T, D, V = 2, 5, 8, 24


def _inputs(k: int):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=gen, requires_grad=True)
    w = torch.randn(V, D, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(B * T)]).reshape(B, T, k)
    logits = torch.randn(B, T, V, generator=gen).log_softmax(-1)
    numbers = TeacherNumbers(logits.gather(-1, tokens[..., None])[..., 0], ids, logits.gather(-1, ids), None)
    return h, w, tokens, mask, numbers


def test_the_plan_of_a_config_is_its_loss_section(tmp_path):
    cfg = load_config(None, ["loss.method=vopd-topk", "loss.top_k=7", "loss.ratio_cap=0", "loss.chunk_memory_mb=3"],
                      require_paths=False)
    plan = loss_plan(cfg.loss, IDENTITY)
    assert (plan.spec.name, plan.top_k, plan.ratio_cap, plan.memory_budget_mb) == ("vopd-topk", 7, None, 3)
    assert not plan.uses_ratio and LossPlan.of("opd", top_k=1, ratio_cap=2.0).ratio_cap == 2.0
    with pytest.raises(ValueError, match="unknown method 'kl'"):
        LossPlan.of("kl", top_k=4, ratio_cap=0)
    with pytest.raises(ValueError, match="top_k=0 must be >= 1"):
        LossPlan.of("vopd", top_k=0, ratio_cap=0)


def test_the_plan_gives_the_head_the_options_spelled_out():
    h, w, tokens, mask, numbers = _inputs(6)
    plan = LossPlan.of("vopd-topk", top_k=6, ratio_cap=0, memory_budget_mb=0.001)
    got = fused_distillation_loss(h, w, tokens, mask, numbers, plan=plan)
    spelled = fused_distillation_loss(h, w, tokens, mask, numbers, method="vopd-topk", top_k=6,
                                      memory_budget_mb=0.001)
    assert torch.equal(got.loss, spelled.loss) and torch.equal(got.reward, spelled.reward)
    with pytest.raises(TypeError, match="as plan= or as method= and its options, not both"):
        fused_distillation_loss(h, w, tokens, mask, numbers, plan=plan, top_k=6)


def test_a_teacher_answering_at_another_top_k_is_an_error():
    h, w, tokens, mask, numbers = _inputs(4)
    with pytest.raises(UserError, match=r"top-k logits at 4 ids per position, but loss.top_k=6 was asked"):
        fused_distillation_loss(h, w, tokens, mask, numbers, method="vopd-topk", top_k=6)
    with pytest.raises(UserError, match=r"top-k logits at 4 ids per position, but loss.top_k=6 was asked"):
        fused_distillation_loss(h, w, tokens, mask, numbers, plan=LossPlan.of("vopd-topk", top_k=6, ratio_cap=0))
    # Without an asked width the answer's width is the one used.
    assert torch.isfinite(fused_distillation_loss(h, w, tokens, mask, numbers, method="vopd-topk").loss)


def test_each_path_has_one_entry_per_rule_of_the_method_table():
    """A new estimator is one row of the method table plus one entry in each path's table: both cover the rules
    the table uses, no more, and two methods share an entry only when they share a rule."""
    from typing import get_args

    from vopd.loss import chunk, estimators
    from vopd.loss.methods import TABLE, Rule

    used = {spec.rule for spec in TABLE.values()}
    assert used == set(get_args(Rule)) == set(chunk.RULES) == set(estimators.RULES)
    assert len(used) == len(TABLE)  # today every method has a rule of its own
    for spec in TABLE.values():  # a sampled method subtracts a baseline; an analytic one has none
        assert (chunk.RULES[spec.rule].baseline is None) == (estimators.RULES[spec.rule].baseline is None) == (
            not spec.sampled), spec.name
