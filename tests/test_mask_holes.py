"""A loss mask with holes (``Samples.loss_masks``: completion tokens the student did not sample, such as a tool's
output or another speaker's turn): for every method, in process and over a real teacher server, the loss, the
gradients and the metrics of a rollout with holes equal those of the same tokens with the hole positions removed
from the mask by hand, and every kept token's numbers are the ones it has without holes (the hole tokens stay in
the sequence both models read)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vopd import distributed as dist
from vopd.config import load_config
from vopd.loss.methods import METHODS, method_spec
from vopd.metrics import PhaseTimer
from vopd.rollout import Rollout, pack
from vopd.sampling import Samples
from vopd.loss.head import IDENTITY
from vopd.step import accumulate_gradients, loss_plan, micro_batch_loss
from vopd.teacher.client import RemoteTeacher
from vopd.teacher.routing import Teachers
from vopd.teacher_config import TEACHER as ONLY

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _samples(tok) -> tuple[list[list[int]], Samples]:
    """Five prompts with completions of 4..13 tokens; positions 1, 4, 5 (and 9 when there) are not the student's."""
    gen = torch.Generator().manual_seed(3)
    prompts = [tok(f"{i} + {2 * i} =")["input_ids"] for i in range(5)]
    lengths = [6, 13, 4, 9, 11]
    completions = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths]
    logprobs = [(-2 * torch.rand(n, generator=gen)).tolist() for n in lengths]
    holes = [[j not in (1, 4, 5, 9) for j in range(n)] for n in lengths]
    return prompts, Samples(completions, logprobs, [False] * len(prompts), holes)


def _by_hand(prompts: list[list[int]], samples: Samples, pad_id: int) -> tuple[Rollout, Rollout]:
    """(the rollout without holes, the same rollout with the hole positions taken out of its mask by hand)."""
    full = pack(prompts, dataclasses.replace(samples, loss_masks=None), pad_id)
    mask, lp = full.loss_mask.clone(), full.sampler_logprobs.clone()
    assert samples.loss_masks is not None
    for i, (p, keep) in enumerate(zip(prompts, samples.loss_masks)):
        for j, sampled in enumerate(keep):
            if not sampled:  # completion token j is predicted at position len(p) - 1 + j
                mask[i, len(p) - 1 + j] = False
                lp[i, len(p) - 1 + j] = 0.0
    return full, dataclasses.replace(full, loss_mask=mask, sampler_logprobs=lp)


@pytest.fixture(scope="module")
def pair(micro_pair):
    return micro_pair


@pytest.fixture(scope="module")
def server(launch_teacher_servers) -> str:
    return launch_teacher_servers({"holes": ([], None)})["holes"][1]


def _step(cfg, student, teacher, rollout: Rollout):
    """(loss, token metrics, gradients, per-token rewards) of one step's gradient over ``rollout``."""
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", CPU)  # one process: the model itself
    got = accumulate_gradients(cfg, wrapped, Teachers({ONLY: teacher}), rollout, CPU, PhaseTimer(CPU))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        parts = micro_batch_loss(loss_plan(cfg.loss, IDENTITY), wrapped, Teachers({ONLY: teacher}), rollout, 1.0, PhaseTimer(CPU))
    return got.loss, got.token_metrics, grads, parts[0].out


def _config(train_overrides, method: str):
    return load_config(None, train_overrides + [f"loss.method={method}", "batch_size=5", "micro_batch_size=5",
                                                "grad_noise=false", "loss.ratio_cap=2.0"])


def _assert_holes_excluded(cfg, student, teacher, prompts, samples, pad_id) -> None:
    holes = pack(prompts, samples, pad_id)
    full, by_hand = _by_hand(prompts, samples, pad_id)
    assert torch.equal(holes.loss_mask, by_hand.loss_mask) and holes.num_tokens < full.num_tokens
    loss, metrics, grads, out = _step(cfg, student, teacher, holes)
    loss_h, metrics_h, grads_h, _ = _step(cfg, student, teacher, by_hand)
    assert loss == loss_h and metrics == metrics_h and metrics["tokens"] == holes.num_tokens
    assert grads.keys() == grads_h.keys() and all(torch.equal(grads[n], grads_h[n]) for n in grads)
    # Each kept token's numbers are its numbers without holes; the holes carry none.
    _, _, _, out_full = _step(cfg, student, teacher, full)
    kept = holes.loss_mask
    for name in ("logp", "logq", "reward"):
        torch.testing.assert_close(getattr(out, name)[kept], getattr(out_full, name)[kept], rtol=1e-5, atol=1e-6)
        assert not getattr(out, name)[~kept].any()
    kl = float(-(out_full.reward * kept).sum() / kept.sum())  # the mean over the kept tokens, by hand
    assert metrics["kl_estimate"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_holes_in_process(method, pair, train_overrides):
    tok, student, teacher = pair
    prompts, samples = _samples(tok)
    _assert_holes_excluded(_config(train_overrides, method), student, teacher, prompts, samples, tok.pad_token_id)


#: Every method over hidden states; over per-token numbers, the methods that need no full distribution and no
#: teacher's own top-k (a vopd server sends logits at asked ids: tests/test_ttopk.py checks that it refuses vopd-ttopk).
SERVED = [(m, "hidden") for m in METHODS] + [(m, "numbers") for m in METHODS
    if not method_spec(m).full_distribution and not method_spec(m).teacher_topk]


@pytest.mark.parametrize("method,form", SERVED)
def test_holes_over_the_server(method, form, pair, server, micro_world, train_overrides):
    """Over HTTP, in both answer forms: hidden states (every method; the served checkpoint's output layer here) and
    per-token numbers (the methods that need no full distribution) give the in-process teacher's numbers with
    holes too."""
    tok, student, local = pair
    prompts, samples = _samples(tok)
    cfg = _config(train_overrides, method)
    head = str(micro_world.teacher) if form == "hidden" else None
    with RemoteTeacher(server, head=head, hidden_dtype="float32") as remote:
        _assert_holes_excluded(cfg, student, remote, prompts, samples, tok.pad_token_id)
        rollout = pack(prompts, samples, tok.pad_token_id)
        loss, metrics, grads, _ = _step(cfg, student, remote, rollout)
    loss_l, metrics_l, grads_l, _ = _step(cfg, student, local, rollout)
    assert loss == pytest.approx(loss_l, rel=1e-5) and metrics["tokens"] == metrics_l["tokens"]
    for n in grads:
        torch.testing.assert_close(grads[n], grads_l[n], rtol=1e-4, atol=1e-6, msg=n)


def test_loss_masks_must_match_the_completions(pair):
    tok, _, _ = pair
    prompts, samples = _samples(tok)
    assert samples.loss_masks is not None
    bad = dataclasses.replace(samples, loss_masks=[m[:-1] for m in samples.loss_masks])
    with pytest.raises(ValueError, match="one flag per completion token"):
        pack(prompts, bad, tok.pad_token_id)
