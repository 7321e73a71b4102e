"""The online gradient-variance proxy (metrics.gradient_noise) recovers a known variance on synthetic gradients."""

from __future__ import annotations

import pytest
import torch

from vopd.metrics import gradient_noise


def test_gradient_noise_is_unbiased_for_known_mean_and_covariance():
    # Per-rollout gradients g_i ~ N(mu, Sigma); the step's gradient is their mean over n, its first half over a.
    g = torch.Generator().manual_seed(0)
    d, n, a, trials = 6, 8, 4, 40_000
    mu = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)
    scale = torch.rand(d, d, generator=g, dtype=torch.float64)
    sigma = scale @ scale.T
    x = mu + torch.randn(trials, n, d, generator=g, dtype=torch.float64) @ scale.T
    half_sq = x[:, :a].mean(1).pow(2).sum(-1)
    full_sq = x.mean(1).pow(2).sum(-1)
    est = [gradient_noise(float(h), a, float(f), n) for h, f in zip(half_sq, full_sq)]
    var = torch.tensor([e["grad_var"] for e in est], dtype=torch.float64)
    sig = torch.tensor([e["grad_sq_signal"] for e in est], dtype=torch.float64)
    # Both are unbiased: the mean over trials is within 4 standard errors of the truth.
    true_var, true_sig = float(torch.trace(sigma)) / n, float(mu.pow(2).sum())
    assert abs(var.mean() - true_var) < 4 * var.std() / trials**0.5, (float(var.mean()), true_var)
    assert abs(sig.mean() - true_sig) < 4 * sig.std() / trials**0.5, (float(sig.mean()), true_sig)


@pytest.mark.parametrize("half,full", [(0, 8), (8, 8), (9, 8)])
def test_gradient_noise_needs_a_proper_part(half, full):
    assert gradient_noise(1.0, half, 1.0, full) == {}


def test_gradient_noise_rejects_non_finite():
    assert gradient_noise(float("nan"), 2, 1.0, 4) == {}
