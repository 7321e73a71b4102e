"""``vopd-ttopk``: the baseline on the teacher's own top-k ids (issue #22 item 2, docs/estimators.md).

Exact enumeration proves it unbiased for every k (and proves that a set that depends on y_t — the teacher's top-k
plus the sampled token, what a stock server's answer holds — is not); a stock server's numbers (the teacher's own
top-k ids and its log-probs there) give the same loss, gradients and diagnostics as an in-process teacher; the
teacher picks the ids, so the step never asks it about the student's; a vopd server without its output layer
refuses it in one line; the trainer logs its metrics.
"""

from __future__ import annotations

import pytest
import torch

from vopd.loss import chunk
from vopd.loss.chunked import fused_distillation_loss
from vopd.loss.enumeration import exact_moments
from vopd.loss.estimators import distillation_loss
from vopd.loss.methods import method_spec
from vopd.loss.plan import LossPlan
from vopd.loss.scores import TeacherHidden, TeacherNumbers
from vopd.metrics import TokenStats
from vopd.step import asks_ids
from vopd.teacher.answers import Answers, lacks
from vopd.teacher.client import RemoteTeacher

DEAD = "http://127.0.0.1:9"  # nothing listens: supports must refuse without contacting it


def _state(v: int, seed: int, scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, generator=g, dtype=torch.float64) * scale,
            torch.randn(v, generator=g, dtype=torch.float64) * scale)


def _kl_on(z_s: torch.Tensor, z_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(p~ || q~) on ``ids``, written out independently of vopd's code."""
    lp, lq = z_s[ids].log_softmax(-1), z_t[ids].log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum()


def _exact_gradient(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    s = z_s.clone().requires_grad_(True)
    kl = torch.nn.functional.kl_div(z_t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="sum")
    return torch.autograd.grad(kl, s)[0]


def test_unbiased_for_every_k_by_enumeration_and_the_baseline_is_the_teachers_topk_kl():
    for v, seed in ((4, 0), (6, 1), (8, 2)):
        z_s, z_t = _state(v, seed)
        exact = _exact_gradient(z_s, z_t)
        assert exact.abs().max() > 1e-3
        for k in range(1, v + 1):
            assert (exact_moments(z_s, z_t, method="vopd-ttopk", top_k=k).mean - exact).abs().max() < 1e-10, k
            out = distillation_loss(z_s.reshape(1, 1, v), z_t.reshape(1, 1, v), torch.tensor([[0]]), torch.ones(1, 1),
                                    method="vopd-ttopk", top_k=k)
            ids = z_t.topk(k).indices  # the teacher's top-k, not the student's
            assert out.baseline is not None and out.kl_ttopk is not None and out.ttopk_mass is not None
            torch.testing.assert_close(out.kl_ttopk.reshape(()), _kl_on(z_s, z_t, ids))
            torch.testing.assert_close(out.baseline.reshape(()), -_kl_on(z_s, z_t, ids))
            torch.testing.assert_close(out.ttopk_mass.reshape(()), z_s.softmax(-1)[ids].sum())
            assert out.kl_topk is None and out.topk_mass is None  # those name the student's top-k


def test_a_set_that_includes_the_sampled_token_would_be_biased():
    """The control: the teacher's top-k plus y_t when it falls outside (what a stock server's answer holds) makes the
    baseline depend on y_t, and the enumeration sees the bias. So the test above could fail."""
    z_s, z_t = _state(6, seed=3)
    p, exact = z_s.softmax(-1), _exact_gradient(z_s, z_t)
    r = z_t.log_softmax(-1) - z_s.log_softmax(-1)
    for k in (1, 2, 3):
        top = z_t.topk(k).indices
        mean = torch.zeros_like(z_s)
        for y in range(6):
            ids = top if y in top.tolist() else torch.cat([top, torch.tensor([y])])
            mean += p[y] * (r[y] + _kl_on(z_s, z_t, ids)) * (p - torch.nn.functional.one_hot(torch.tensor(y), 6))
        assert (mean - exact).abs().max() > 1e-4, k


def test_full_k_is_vopd_and_small_k_differs_from_the_students_topk():
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    y, mask = torch.randint(0, 11, (2, 5), generator=g), torch.ones(2, 5)
    full = distillation_loss(zs, zt, y, mask, method="vopd-ttopk", top_k=11)
    vopd = distillation_loss(zs, zt, y, mask, method="vopd")
    torch.testing.assert_close(full.kl_ttopk, vopd.kl)
    torch.testing.assert_close(full.loss, vopd.loss)
    t3 = distillation_loss(zs, zt, y, mask, method="vopd-ttopk", top_k=3)
    s3 = distillation_loss(zs, zt, y, mask, method="vopd-topk", top_k=3)
    assert t3.baseline is not None and s3.baseline is not None
    assert (t3.baseline - s3.baseline).abs().max() > 1e-3  # another set: the teacher's, not the student's


def _batch(seed: int = 0, b: int = 3, t: int = 6, v: int = 29, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, t, d, generator=g).requires_grad_(True)
    ws = (torch.randn(v, d, generator=g) * 0.5).requires_grad_(True)
    ht, wt = torch.randn(b, t, d + 3, generator=g), torch.randn(v, d + 3, generator=g) * 0.5
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return hs, ws, ht, wt, y, mask


def _stock_numbers(zt: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, k: int) -> TeacherNumbers:
    """What a stock server's prompt log-probs give (shared/spec/stock-engines.md): log q(y_t), the teacher's own top-k
    ids and its log-softmax values there; 0 off the mask."""
    lq = zt.log_softmax(-1)
    top = lq.topk(k, dim=-1)
    m = mask.unsqueeze(-1)
    return TeacherNumbers(logq=lq.gather(-1, y.unsqueeze(-1)).squeeze(-1) * mask,
                          topk_ids=torch.where(m, top.indices, 0), topk_logits=torch.where(m, top.values, 0.0))


def test_a_stock_servers_numbers_give_what_an_in_process_teacher_gives():
    hs, ws, ht, wt, y, mask = _batch()
    zt = (ht @ wt.T).detach()
    kw = dict(method="vopd-ttopk", top_k=5, memory_budget_mb=0.001)  # 8-row chunks
    a = fused_distillation_loss(hs, ws, y, mask, TeacherHidden(ht, wt), **kw)
    ga = torch.autograd.grad(a.loss, (hs, ws))
    b = fused_distillation_loss(hs, ws, y, mask, _stock_numbers(zt, y, mask, 5), **kw)
    gb = torch.autograd.grad(b.loss, (hs, ws))
    d = distillation_loss(hs @ ws.T, zt, y, mask, method="vopd-ttopk", top_k=5)
    gd = torch.autograd.grad(d.loss, (hs, ws))
    for out, grads in ((a, ga), (b, gb)):
        torch.testing.assert_close(out.loss, d.loss, rtol=1e-5, atol=1e-6)
        for x, ref in zip(grads, gd):
            torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)
        for field in ("logq", "baseline", "advantage", "kl_ttopk", "ttopk_mass"):
            torch.testing.assert_close(getattr(out, field), getattr(d, field), rtol=1e-5, atol=1e-5, msg=field)
    # numbers at the *student's* top-k ids are another baseline: the head really reads the ids it is given
    ids = (hs @ ws.T).detach().topk(5, dim=-1).indices
    wrong = TeacherNumbers(logq=b.logq, topk_ids=ids, topk_logits=zt.log_softmax(-1).gather(-1, ids))
    c = fused_distillation_loss(hs, ws, y, mask, wrong, **kw)
    assert c.baseline is not None and b.baseline is not None and (c.baseline - b.baseline).abs().max() > 1e-3


def test_the_teacher_picks_the_ids_and_a_vopd_server_without_its_head_refuses_in_one_line():
    spec = method_spec("vopd-ttopk")
    assert spec.sampled and spec.unbiased and spec.teacher_topk and not spec.full_distribution
    assert spec.per_token_teacher and not spec.student_ids and spec.rule in chunk.RULES

    class Numbers:  # a placement that sends per-token numbers
        full_distribution = False

    plan = LossPlan.of("vopd-ttopk", top_k=4, ratio_cap=0)
    assert not asks_ids(plan, Numbers())  # scores before the student's forward, nothing asked
    assert asks_ids(LossPlan.of("vopd-topk", top_k=4, ratio_cap=0), Numbers())
    assert lacks(spec, Answers(own_topk=True)) is None and lacks(spec, Answers(full=True)) is None
    assert lacks(spec, Answers(at_ids=True, lse=True)) == "the teacher's own top-k ids and log-probs at every position"
    assert lacks(method_spec("vopd-topk"), Answers(own_topk=True)) is not None  # the student's ids are not the same
    reason = RemoteTeacher(DEAD, retries=0).supports(spec)  # refused without contacting the server
    assert reason is not None and "\n" not in reason
    assert reason.startswith("loss.method=vopd-ttopk needs the teacher's own top-k ids and log-probs at every "
                             f"position, which a teacher server ({DEAD}) sends only as hidden states: set its head")


def test_its_metrics_are_logged():
    hs, ws, ht, wt, y, mask = _batch(seed=1)
    out = fused_distillation_loss(hs, ws, y, mask, TeacherHidden(ht, wt), method="vopd-ttopk", top_k=4)
    stats = TokenStats()
    stats.add(out, mask)
    got = stats.reduce()
    m = mask.double()
    assert out.kl_ttopk is not None and out.ttopk_mass is not None
    assert abs(got["kl_ttopk_mean"] - float((out.kl_ttopk * m).sum() / m.sum())) < 1e-6
    assert 0 < got["ttopk_mass_mean"] < 1 and "kl_topk_mean" not in got


# ------------------------------------------------------------- a stock-like numbers teacher through the step


class TopkOnlyTeacher:
    """What a stock server gives, made from an in-process teacher: log q(y_t) and its own top-k ids and log-probs,
    per-token numbers only. Like a server it does not pack (it is sent the padded rows) and it is never asked ids."""

    full_distribution = False
    tokenizer = None

    def __init__(self, inner, k: int) -> None:
        self.inner, self.k, self.calls = inner, k, 0

    def supports(self, spec):
        need = lacks(spec, Answers(own_topk=True))
        return None if need is None else f"loss.method={spec.name} needs {need}"

    def score(self, rollout, *, topk_ids=None, lse=False):
        assert topk_ids is None and not lse  # the teacher picks the ids: the step asks it for nothing
        self.calls += 1
        h = self.inner.score(rollout)
        lq = h.transform(h.hidden @ h.weight.T + (0 if h.bias is None else h.bias)).log_softmax(-1)
        return _stock_numbers(lq, rollout.targets, rollout.loss_mask.bool(), self.k)

    def pairing_checks(self, student, student_tok):
        return []

    def close(self):
        pass


def test_a_numbers_teacher_gives_the_in_process_step_padded_packed_and_with_its_own_prompt(micro_world,
                                                                                           train_overrides):
    from vopd import distributed as dist
    from vopd.config import load_config
    from vopd.metrics import PhaseTimer
    from vopd.models import load_model, load_tokenizer
    from vopd.rollout import pack
    from vopd.sampling import Samples
    from vopd.step import accumulate_gradients
    from vopd.teacher.local import InProcessTeacher
    from vopd.teacher.reprompt import OwnPromptTeacher
    from vopd.teacher.routing import Teachers
    from vopd.teacher_config import TEACHER as ONLY

    cpu = torch.device("cpu")
    tok = load_tokenizer(str(micro_world.student))
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=cpu)
    local = InProcessTeacher(load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=cpu),
                             len(tok))
    gen = torch.Generator().manual_seed(5)
    lengths = [6, 13, 4, 9]
    prompts = [tok(f"{i} + {2 * i} =")["input_ids"] for i in range(len(lengths))]
    samples = Samples([torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths],
                      [[-1.0] * n for n in lengths], [False] * len(lengths), None)
    own = [tok(f"Hint: {i}.")["input_ids"] for i in range(len(lengths))]
    rollout = pack(prompts, samples, tok.pad_token_id, teacher_prompts=own)

    def step(teacher, *extra):
        cfg = load_config(None, train_overrides + ["loss.method=vopd-ttopk", "loss.top_k=5", "batch_size=4",
                                                   "micro_batch_size=2", *extra])
        got = accumulate_gradients(cfg, dist.wrap(student, student.config.vocab_size, "ddp", cpu),
                                   Teachers({ONLY: teacher}), rollout, cpu, PhaseTimer(cpu))
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        student.zero_grad(set_to_none=True)
        return got.loss, got.token_metrics, grads

    numbers = TopkOnlyTeacher(local, 5)
    for wrap in (lambda t: t, lambda t: OwnPromptTeacher(t, tok.pad_token_id)):
        ref = step(wrap(local))
        assert ref[1]["ttopk_mass_mean"] < 1 and ref[1]["kl_ttopk_mean"] > 0
        for extra in ((), ("packing=true",)):
            loss, metrics, grads = step(wrap(numbers), *extra)
            assert loss == pytest.approx(ref[0], rel=1e-5)
            for key in ("kl_ttopk_mean", "ttopk_mass_mean", "advantage_mean", "reward_mean"):
                assert metrics[key] == pytest.approx(ref[1][key], rel=1e-4, abs=1e-6), key
            assert grads.keys() == ref[2].keys() and grads
            for n in grads:
                torch.testing.assert_close(grads[n], ref[2][n], rtol=1e-5, atol=1e-6, msg=n)
    assert numbers.calls == 8  # 2 micro-batches x 4 steps


def test_a_run_over_a_vopd_server_without_its_head_is_refused_up_front(train_overrides, tmp_path):
    from vopd.config import load_config
    from vopd.errors import UserError
    from vopd.train import train

    cfg = load_config(None, train_overrides + ["loss.method=vopd-ttopk", f"model.teacher={DEAD}"])
    with pytest.raises(UserError, match=r"^loss.method=vopd-ttopk needs the teacher's own top-k ids .* set its head"):
        train(cfg, log=lambda _m: None)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_numbers_without_the_teachers_topk_are_refused():
    h, w = torch.randn(1, 3, 4, requires_grad=True), torch.randn(10, 4)
    y, mask = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="vopd-ttopk needs topk_ids and topk_logits"):
        fused_distillation_loss(h, w, y, mask, TeacherNumbers(torch.zeros(1, 3)), method="vopd-ttopk", top_k=2)
