"""The divergence guard (vopd.guard): the predicted update equals the one AdamW then applies, and the verdicts."""

from __future__ import annotations

import math

import pytest
import torch

from vopd.guard import judge_step, predicted_update_norms


def _model_and_step(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    model(torch.randn(4, 7)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize("cls,options", [
    (torch.optim.AdamW, {"weight_decay": 0.1}),
    (torch.optim.AdamW, {"amsgrad": True}),
    (torch.optim.AdamW, {"maximize": True, "betas": (0.5, 0.9)}),
    (torch.optim.Adam, {"weight_decay": 0.05}),  # weight decay through the gradient
])
def test_the_predicted_update_is_the_applied_one(cls, options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    optimizer = cls(model.parameters(), lr=1e-2, **options)
    for _ in range(3):  # the first step (no moments yet) and later ones
        model(torch.randn(4, 7)).pow(2).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        update_sq, weight_sq, new_sq = predicted_update_norms(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            after = list(model.parameters())
            assert update_sq == pytest.approx(sum(float((a.double() - b.double()).square().sum())
                                                  for a, b in zip(after, before)), rel=1e-5)
            assert weight_sq == pytest.approx(sum(float(b.double().square().sum()) for b in before), rel=1e-12)
            assert new_sq == pytest.approx(sum(float(a.double().square().sum()) for a in after), rel=1e-6)


def test_verdicts():
    model = _model_and_step()
    weights = [p.detach().clone() for p in model.parameters()]

    def verdict(lr: float, max_ratio: float = 1.0, loss: float = 1.0, grad_norm: float = 1.0):
        return judge_step(loss, grad_norm, torch.optim.AdamW(model.parameters(), lr=lr), strategy="single",
                          max_update_ratio=max_ratio)

    ok = verdict(1e-3)
    assert ok.ok and 0 < ok.update_ratio < 0.1 and ok.reason == ""
    exploding = verdict(1e30)
    assert not exploding.ok and exploding.update_ratio > 1e25
    assert "move the weights by" in exploding.reason and "optim.max_update_ratio=1" in exploding.reason
    assert verdict(1e30, max_ratio=0).ok  # no ratio limit: weights of ~1e30 are still finite
    overflow = verdict(1e39, max_ratio=0)  # ~1e39 does not fit a float32
    assert not overflow.ok and overflow.reason == "the update would make the weights non-finite"
    nan = verdict(1e-3, loss=math.nan)
    assert not nan.ok and math.isnan(nan.update_ratio) and "non-finite loss (nan)" in nan.reason
    assert not verdict(1e-3, grad_norm=math.inf).ok
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters())), "judging changed the weights"
    with pytest.raises(TypeError, match="use torch.optim.AdamW"):
        predicted_update_norms(torch.optim.SGD(model.parameters(), lr=1.0))
