"""The gradient-variance statistics recover known answers; the command runs on the micro world."""

from __future__ import annotations

import json

import torch

from vopd.tools.variance import squared_bias, summarise, trace_covariance


def test_trace_covariance_recovers_a_known_variance():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0])  # tr Cov = sum of squares = 14.25
    g = torch.randn(4000, 4, generator=gen, dtype=torch.float64) * scales + torch.tensor([1.0, -2.0, 0.0, 5.0])
    est = trace_covariance(g, boot=200)
    assert est.low < 14.25 < est.high
    assert abs(est.estimate - 14.25) < 0.05 * 14.25
    assert est.high - est.low < 0.2 * 14.25


def test_squared_bias_is_zero_for_zero_mean_noise_and_finds_a_real_bias():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2000, 6, generator=gen, dtype=torch.float64)
    unbiased = squared_bias(noise, boot=200)
    assert unbiased.low < 0.0 < unbiased.high
    shifted = squared_bias(noise + torch.tensor([0.3, 0, 0, 0.4, 0, 0]), boot=200)  # ||bias||^2 = 0.25
    assert shifted.low < 0.25 < shifted.high and shifted.low > 0.1


def test_summary_on_the_micro_world(micro_world):
    from vopd.data import encode_prompt, format_prompt
    from vopd.models import load_model, load_tokenizer
    from vopd.world.task import read_jsonl
    from vopd.teacher.local import InProcessTeacher
    from vopd.tools.variance import collect_gradients, format_table

    cpu = torch.device("cpu")
    tok = load_tokenizer(str(micro_world.student))
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=cpu)
    teacher = InProcessTeacher(load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=cpu),
                               len(tok))
    prompts = [encode_prompt(tok, format_prompt(r["problem"])) for r in read_jsonl(micro_world.test)[:4]]
    grads = collect_gradients(student, teacher, tok, prompts, methods=["opd-full", "opd", "vopd", "opd-topk"],
                              replicates=6, max_new_tokens=8, top_k=4, seed=0)
    assert {g.shape for g in grads.values()} == {(6, sum(p.numel() for p in student.parameters()))}
    summary = summarise(grads, boot=100)
    json.dumps(summary)
    assert summary["opd"]["variance_ratio_to_opd"] == 1.0
    # On identical states, opd-full has no token-sampling noise: its gradients vary less than opd's.
    assert summary["opd-full"]["trace_cov"]["estimate"] < summary["opd"]["trace_cov"]["estimate"]
    assert "| vopd |" in format_table(summary)


def test_squared_bias_interval_covers_zero_for_unbiased_differences():
    # A percentile bootstrap of ||mean||^2 - tr Cov/R is shifted up by ~tr Cov/R (a resample repeats rows, and a
    # repeated row pairs with itself), i.e. by sqrt(dim/2) standard errors for isotropic noise: with a gradient's
    # many dimensions the shift alone would push 0 out of every interval.
    gen = torch.Generator().manual_seed(2)
    trials, covered = 60, 0
    for t in range(trials):
        d = torch.randn(24, 40, generator=gen, dtype=torch.float64)
        est = squared_bias(d, boot=200, seed=t)
        covered += est.low <= 0.0 <= est.high
    assert covered >= 0.85 * trials, f"95% interval covered the true value 0 in {covered}/{trials} trials"
