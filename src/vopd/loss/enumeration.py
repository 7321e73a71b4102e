"""Exact moments of a per-token estimator by enumerating the sampled token over a small vocabulary.

What it knows: at one fixed state (student logits z_s, teacher logits z_t, both (V,)), every sampled-token method's
gradient w.r.t. z_s is a function of the sampled id y; weighting each y by p(y) gives the estimator's exact mean and
covariance, to compare with the exact KL gradient (``opd-full``). This is how the tests prove unbiasedness
(docs/estimators.md, "What proves what") and how docs/estimators.md reports exact variances.
What it does not know: models or batches (it works on one state at a time, in float64).

Run ``python -m vopd.loss.enumeration`` to print the exact-variance table quoted in docs/estimators.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vopd.loss.estimators import distillation_loss
from vopd.loss.methods import SAMPLED_METHODS, method_spec


@dataclass(frozen=True)
class Moments:
    """Exact mean (V,) and trace of the covariance of an estimator's logit gradient at one state."""

    mean: Tensor
    variance: float


def logit_gradient(z_s: Tensor, z_t: Tensor, y: int, *, method: str, top_k: int) -> Tensor:
    """Gradient w.r.t. the student logits (V,) of the method's loss when token ``y`` was sampled."""
    s = z_s.detach().clone().reshape(1, 1, -1).requires_grad_(True)
    out = distillation_loss(
        s, z_t.reshape(1, 1, -1), torch.tensor([[y]]), torch.ones(1, 1), method=method_spec(method).name, top_k=top_k
    )
    (grad,) = torch.autograd.grad(out.loss, s)
    return grad.reshape(-1)


def exact_moments(z_s: Tensor, z_t: Tensor, *, method: str, top_k: int = 1) -> Moments:
    """E_y~p[g(y)] and E||g(y) - E g||^2 by enumeration; analytic methods have zero variance."""
    z_s, z_t = z_s.double(), z_t.double()
    if method not in SAMPLED_METHODS:
        g = logit_gradient(z_s, z_t, 0, method=method, top_k=top_k)  # does not depend on y
        return Moments(g, 0.0)
    p = z_s.softmax(-1)
    grads = torch.stack([logit_gradient(z_s, z_t, y, method=method, top_k=top_k) for y in range(z_s.numel())])
    mean = (p.unsqueeze(-1) * grads).sum(0)
    variance = float((p * ((grads - mean) ** 2).sum(-1)).sum())
    return Moments(mean, variance)


def variance_table(vocab: int = 8, states: int = 200, seed: int = 0, scale: float = 2.0) -> dict[str, float]:
    """Mean over random states of each sampled-token estimator's exact variance (trace of the covariance)."""
    gen = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    for _ in range(states):
        z_s = torch.randn(vocab, generator=gen, dtype=torch.float64) * scale
        z_t = torch.randn(vocab, generator=gen, dtype=torch.float64) * scale
        for name, method, k in (("opd", "opd", 1), ("vopd", "vopd", 1), ("vopd-topk k=2", "vopd-topk", 2),
                                ("vopd-topk k=4", "vopd-topk", 4), ("vopd-opt", "vopd-opt", 1),
                                ("rb-topk k=2", "rb-topk", 2), ("rb-topk k=4", "rb-topk", 4),
                                ("vopd-ttopk k=2", "vopd-ttopk", 2), ("vopd-ttopk k=4", "vopd-ttopk", 4)):
            totals[name] = totals.get(name, 0.0) + exact_moments(z_s, z_t, method=method, top_k=k).variance / states
    return totals


if __name__ == "__main__":
    table = variance_table()
    print("exact trace-variance of the logit gradient, V=8, 200 random states (logits ~ 2*N(0,1)):")
    for name, v in table.items():
        print(f"  {name:<14} {v:.4f}   ratio to opd {v / table['opd']:.3f}")
