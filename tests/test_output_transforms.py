"""Output transforms in the fused head: final-logit softcapping (Gemma 2) and logit scaling (Granite).

chunked == dense == the model's own log-probs, the closed-form gradient chained through the transform, the fp64
enumeration still unbiased through a softcapped head, the teacher server's numbers, and the pre-flight: it passes for
Gemma 2 and Granite pairs and refuses, in one line, a head whose logits vopd does not reproduce.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny_families import make, save_pair

from vopd import METHODS, distillation_loss
from vopd.check import self_check
from vopd.errors import UserError
from vopd.loss.chunked import chunked_distillation_loss, fused_distillation_loss
from vopd.loss.head import IDENTITY, LogitTransform, OutputHead, student_topk_ids
from vopd.loss.scores import TeacherHidden
from vopd.models import head_error, last_hidden, load_tokenizer, logit_transform, output_layer

SOFTCAP = LogitTransform(softcap=2.0)
SCALED = LogitTransform(scale=3.0)
BOTH = LogitTransform(scale=0.5, softcap=1.5)


def test_transform_values_and_derivative_match_autograd():
    z = torch.linspace(-12, 12, 101, dtype=torch.float64)
    for t in (SOFTCAP, SCALED, BOTH, IDENTITY):
        ref = z.clone().requires_grad_(True)
        out = ref * t.scale
        if t.softcap is not None:
            out = torch.tanh(out / t.softcap) * t.softcap
        (grad,) = torch.autograd.grad(out.sum(), ref)
        final = t.apply_(z.clone())
        torch.testing.assert_close(final, out.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(t(z), out.detach(), rtol=0, atol=1e-14)
        d = t.derivative(final)
        d = d if isinstance(d, torch.Tensor) else torch.full_like(z, d)
        torch.testing.assert_close(d, grad, rtol=0, atol=1e-12)
    assert SOFTCAP.apply_(z.clone()).abs().max() < 2.0  # capped
    for bad in (dict(scale=0.0), dict(scale=-1.0), dict(softcap=0.0), dict(softcap=float("inf"))):
        with pytest.raises(ValueError, match="positive finite"):
            LogitTransform(**bad)


def _batch(dtype=torch.float32, b=3, t=7, v=37, ds=16, dt=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, t, ds, generator=g).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, ds, generator=g) * 1.5).to(dtype).requires_grad_(True)  # wide logits: the cap binds
    bs = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_(True)
    ht = torch.randn(b, t, dt, generator=g).to(dtype)
    wt = (torch.randn(v, dt, generator=g) * 1.5).to(dtype)
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, 0] = True
    return hs, ws, bs, ht, wt, y, mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transforms", [(SOFTCAP, SCALED), (BOTH, SOFTCAP)],
                         ids=["softcap-vs-scaled", "both-vs-softcap"])
def test_chunked_equals_dense_through_transforms(method, transforms):
    ts, tt = transforms
    hs, ws, bs, ht, wt, y, mask = _batch()
    kw = dict(method=method, top_k=5, sampler_logprobs=torch.randn(y.shape) * 0.01 - 3.0, ratio_cap=2.0)
    d = distillation_loss(ts(hs @ ws.T + bs), tt(ht @ wt.T), y, mask, **kw)
    gd = torch.autograd.grad(d.loss, (hs, ws, bs))
    c = chunked_distillation_loss(hs, ws, ht, wt, y, mask, student_bias=bs, memory_budget_mb=0.002,
                                  student_transform=ts, teacher_transform=tt, **kw)
    gc = torch.autograd.grad(c.loss, (hs, ws, bs))
    torch.testing.assert_close(c.loss, d.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, gd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for field in ("logp", "logq", "kl", "kl_topk", "advantage"):
        a, b = getattr(c, field), getattr(d, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=field)
    # The transform matters here: leaving it out changes the loss (so the comparison above could fail).
    plain = chunked_distillation_loss(hs, ws, ht, wt, y, mask, student_bias=bs, **kw)
    assert (plain.logp - c.logp).abs().max() > 1e-2


def test_student_topk_ids_rank_the_final_logits():
    """Two raw logits that the cap saturates to the same fp32 value tie after the transform: the ids the head would
    ask a teacher server about are those of the final logits."""
    hs, ws, bs, _, _, _, mask = _batch(seed=1)
    ids = student_topk_ids(hs.detach(), ws.detach(), mask, 4, bias=bs.detach(), transform=SOFTCAP)
    final = SOFTCAP(hs.detach() @ ws.detach().T + bs.detach())
    picked = final.gather(-1, ids)
    torch.testing.assert_close(picked[mask], final.topk(4, dim=-1).values[mask])


@pytest.mark.parametrize("method,k", [("opd", 1), ("vopd", 1), ("vopd-opt", 1), ("vopd-topk", 2), ("vopd-topk", 5),
                                      ("rb-topk", 1), ("rb-topk", 3)])
def test_enumeration_unbiased_through_a_softcapped_head(method, k):
    """fp64, one state, V = 6: E_y~p[chunked gradient w.r.t. hidden and weight] over every sampled id equals the exact
    gradient of KL(p || q) with p, q the softcapped heads' distributions (autograd on torch's kl_div)."""
    g = torch.Generator().manual_seed(3)
    v, d = 6, 4
    h = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 3.0  # |logits| ~ 6: the cap (2.0) binds hard
    zt = SOFTCAP(torch.randn(v, generator=g, dtype=torch.float64) * 3.0)
    teacher = TeacherHidden(zt.reshape(1, 1, v), torch.eye(v, dtype=torch.float64))  # logits = zt exactly
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    zs = SOFTCAP(hr.reshape(1, d) @ wr.T)
    kl = torch.nn.functional.kl_div(zt.log_softmax(-1).reshape(1, v), zs.log_softmax(-1), log_target=True,
                                    reduction="sum")
    exact = torch.autograd.grad(kl, (hr, wr))
    assert exact[1].abs().max() > 1e-3
    p = zs.detach().softmax(-1).reshape(v)
    mean = [torch.zeros_like(h), torch.zeros_like(w)]
    mask = torch.ones(1, 1, dtype=torch.bool)
    for y in range(v):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fused_distillation_loss(hh, ww, torch.tensor([[y]]), mask, teacher, method=method, top_k=k,
                                      student_transform=SOFTCAP)
        for m, gr in zip(mean, torch.autograd.grad(out.loss, (hh, ww))):
            m += p[y] * gr
    for got, want in zip(mean, exact):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- real (tiny, random) Gemma 2 and Granite models


@pytest.fixture(scope="module")
def tok(micro_world):
    return load_tokenizer(str(micro_world.student))


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_model_log_probs_equal_chunked_and_dense(family, tok):
    v = len(tok)
    model = make(family, v + 24)  # padded rows past the tokenizer
    head = output_layer(model, v)
    assert not head.transform.identity and head.weight.shape[0] == v
    assert head.transform == (LogitTransform(softcap=2.0) if family == "gemma2" else LogitTransform(scale=4.0))
    ids = torch.tensor([tok("12 + 7 = 19. Then 19 - 3 = 16. \\boxed{16}")["input_ids"]])
    with torch.no_grad():
        own = model(input_ids=ids).logits[..., :v].log_softmax(-1)
        hidden = last_hidden(model, ids, torch.ones_like(ids))
    targets, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
    own_y = own[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    dense = distillation_loss(head.logits(hidden[:, :-1]), head.logits(hidden[:, :-1]), targets, mask, method="vopd")
    chunked = chunked_distillation_loss(hidden[:, :-1], head.weight, hidden[:, :-1], head.weight, targets, mask,
                                        method="vopd", student_bias=head.bias, teacher_bias=head.bias,
                                        student_transform=head.transform, teacher_transform=head.transform)
    torch.testing.assert_close(dense.logp, own_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.logp, own_y, rtol=0, atol=1e-5)
    assert chunked.kl.abs().max() < 1e-5
    assert head_error(model, ids, v) < 1e-5
    raw = (hidden[:, :-1] @ head.weight.T).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert (raw - own_y).abs().max() > 1e-2  # without the transform the head would be wrong
    assert self_check(model, tok, v)["logp_max_error"] < 1e-4


def test_teacher_server_scores_through_the_transform(tok):
    from vopd.teacher.server import TeacherScorer
    from vopd.teacher.wire import ParsedSequence

    v = len(tok)
    model = make("gemma2", v)
    ids = torch.tensor(tok("3 + 4 = 7. \\boxed{7}")["input_ids"])
    topk = torch.tensor([[5, 9]] * (ids.numel() - 3))
    (logq, logits, lse), = TeacherScorer(model, v).score([ParsedSequence(ids=ids, start=2, topk_ids=topk)], 2)
    with torch.no_grad():
        own = model(input_ids=ids[None]).logits[0, :, :v]
    want = own.log_softmax(-1)[2:-1].gather(-1, ids[3:, None]).squeeze(-1)
    torch.testing.assert_close(logq, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, own[2:-1].gather(-1, topk), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, own[2:-1].logsumexp(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_vopd_check_passes_for_the_pair(family, tok, micro_world, tmp_path, capsys):
    from vopd.check import cli_main

    student, teacher = save_pair(tmp_path, family, tok, student_rows=len(tok) + 8)
    overrides = [f"model.student={student}", f"model.teacher={teacher}", "rollout.max_new_tokens=32"]
    assert cli_main(argparse.Namespace(config=None, overrides=overrides)) == 0
    out = capsys.readouterr().out
    assert "self-check" in out and "teacher head reproduces its logits" in out
    assert ("softcap 2" if family == "gemma2" else "logits x 4") in out


def test_a_head_vopd_cannot_reproduce_is_refused_in_one_line(tok):
    """An architecture that transforms its logits in a way no config key declares: the student's self-check and the
    teacher's head check name the class and say it is not supported."""
    from transformers import LlamaForCausalLM

    from vopd.teacher.local import InProcessTeacher

    class OddHeadForCausalLM(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0 + 1.0 / (1 + out.logits.abs())
            return out

    base = make("llama", len(tok))
    odd = OddHeadForCausalLM(base.config).eval()
    odd.load_state_dict(base.state_dict())
    assert logit_transform(odd) == IDENTITY
    with pytest.raises(UserError, match=r"^student self-check failed: OddHeadForCausalLM's .*not supported$") as exc:
        self_check(odd, tok, len(tok))
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match=r"^teacher self-check failed: OddHeadForCausalLM's"):
        InProcessTeacher(odd, len(tok), tokenizer=tok).pairing_checks(base, tok)
    assert isinstance(OutputHead(base.lm_head.weight).logits(torch.zeros(2, 32)), torch.Tensor)
