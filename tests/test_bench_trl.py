"""vopd's `opd-full` loss against TRL's reverse-KL losses, and a smoke run of `vopd bench trl`.

The TRL tests need TRL (`pip install 'vopd[trl]'`, or `VOPD_EXTRAS=trl bash scripts/test`) and are skipped, with
that reason, without it.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from vopd.loss.chunked import chunked_distillation_loss
from vopd.loss.estimators import distillation_loss


@pytest.fixture
def trl():
    return pytest.importorskip("trl", reason="TRL is not installed: pip install 'vopd[trl]' "
                               "(or VOPD_EXTRAS=trl bash scripts/test)")


def _batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Three sequences with a prompt part, completions of different lengths and right padding (mask 0 there)."""
    g = torch.Generator().manual_seed(0)
    b, t, v, ds, dt = 3, 11, 37, 8, 12
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 3:11], mask[1, 2:6], mask[2, 5:9] = True, True, True
    return {"hs": torch.randn(b, t, ds, generator=g, dtype=dtype), "ws": torch.randn(v, ds, generator=g, dtype=dtype),
            "ht": 2 * torch.randn(b, t, dt, generator=g, dtype=dtype),
            "wt": torch.randn(v, dt, generator=g, dtype=dtype), "tokens": torch.randint(0, v, (b, t), generator=g),
            "mask": mask}


@pytest.mark.filterwarnings("ignore:You are importing from .trl.experimental.")
def test_opd_full_equals_gkd_reverse_kl_loss_and_logit_gradient(trl):
    """GKD's generalized_jsd_loss with beta=1 is KL(student || teacher) per position (F.kl_div with the teacher as
    input and the student as target); with -100 labels off the completion tokens and reduction="batchmean" it is
    divided by the number of completion tokens: the token mean that `opd-full` computes."""
    from trl.experimental.gkd import GKDTrainer

    x = _batch(torch.float64)
    zs = (x["hs"] @ x["ws"].T).requires_grad_(True)
    zt = x["ht"] @ x["wt"].T
    ours = distillation_loss(zs, zt, x["tokens"], x["mask"], method="opd-full").loss
    (g_ours,) = torch.autograd.grad(ours, zs)
    labels = x["tokens"].masked_fill(~x["mask"], -100)
    theirs = GKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=1.0, temperature=1.0, reduction="batchmean")
    (g_theirs,) = torch.autograd.grad(theirs, zs)
    assert abs(ours.item() - theirs.item()) < 1e-12
    assert torch.allclose(g_ours, g_theirs, atol=1e-12, rtol=0)
    assert float(g_ours[~x["mask"]].abs().max()) == 0.0  # nothing flows from prompt or padding positions


def test_chunked_opd_full_equals_trl_chunked_divergence(trl):
    """The DistillationTrainer's own loss function (hidden states + output layers, chunked, fp32): same value and
    same gradients w.r.t. the student's hidden states and output layer as vopd's chunked `opd-full`."""
    divergence = pytest.importorskip("trl.trainer.distillation_trainer", reason="this TRL has no DistillationTrainer")
    x = _batch(torch.float32)
    hs, ws = x["hs"].requires_grad_(True), x["ws"].requires_grad_(True)
    ours = chunked_distillation_loss(hs, ws, x["ht"], x["wt"], x["tokens"], x["mask"], method="opd-full",
                                     memory_budget_mb=0.001)  # several chunks
    g_ours = torch.autograd.grad(ours.loss, (hs, ws))
    theirs, _entropy, n_valid = divergence._chunked_divergence_loss(hs, x["ht"], ws, x["wt"], x["mask"], beta=1.0)
    g_theirs = torch.autograd.grad(theirs, (hs, ws))
    assert int(n_valid) == int(x["mask"].sum())
    assert abs(ours.loss.item() - theirs.item()) < 1e-5
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def _args(micro_world, **kw) -> argparse.Namespace:
    base = dict(batch_size=2, max_new_tokens=4, rounds=1, repeats=1, warmup=0, memory_rounds=1, threads=1, lr=1e-5,
                seed=0, impls=["trl", "opd-full", "vopd"], student=str(micro_world.student),
                teacher=str(micro_world.teacher), data=str(micro_world.train), cache_dir=None, override=[],
                skip_crosscheck=False, in_process=True, json=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.filterwarnings("ignore:You are importing from .trl.experimental.")
def test_bench_trl_smoke_and_trainer_level_crosscheck(trl, micro_world):
    """Every case of the benchmark in this process at tiny settings; the cross-check compares the losses and
    parameter gradients of the real trainers' code paths on one batch of sampled sequences."""
    from vopd.tools.bench.trl import bench_results, format_report, summarize

    res = bench_results(_args(micro_world, max_new_tokens=12))
    summ = summarize(res)
    assert set(summ) == {"trl", "opd-full", "vopd"}
    for m in summ.values():
        assert m["step_ms"] > 0 and m["gen_ms"] > 0 and m["tensor_peak_mb"] > 0 and m["threads"] == [1]
    c = res["crosscheck"]
    assert c["tokens"] > 0
    assert abs(c["trl"] - c["opd_full"]) < 1e-5 and abs(c["gkd"] - c["opd_full"]) < 1e-5
    assert c["grad_rel_diff_trl"] < 1e-4 and c["grad_rel_diff_gkd"] < 1e-4
    report = format_report(res)
    assert "TRL DistillationTrainer" in report and "loss cross-check" in report


def test_missing_trl_is_one_line_error(monkeypatch):
    import importlib.util

    from vopd.tools.bench.trl import require_trl
    from vopd.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'vopd\[trl\]'"):
        require_trl()
