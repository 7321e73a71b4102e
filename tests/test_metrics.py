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


# ------------------------------------------------------------------------------------------- the history


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_a_resumed_history_keeps_one_line_per_step_up_to_the_checkpoint(tmp_path):
    import json

    from vopd.metrics import truncate_history

    path = tmp_path / "metrics.jsonl"
    # written by a version that only appended: steps 3 and 4 twice (the later lines are the resumed run's), then a
    # line torn by a kill in the middle of a write
    rows = [{"step": 1}, {"step": 2}, {"step": 3, "v": "old"}, {"step": 4, "v": "old"}, {"step": 3, "v": "new"},
            {"step": 4, "v": "new"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss": 0.1')
    with pytest.warns(RuntimeWarning, match=r"dropped 1 unreadable line\(s\) \(line 7\)"):
        kept = truncate_history(path, 3)
    assert kept == [{"step": 1}, {"step": 2}, {"step": 3, "v": "new"}]
    assert _lines(path) == [json.dumps(r) for r in kept]
    mtime = path.stat().st_mtime_ns
    assert truncate_history(path, 9) == kept and path.stat().st_mtime_ns == mtime  # nothing to change: not rewritten
    assert truncate_history(path, 0) == [] and path.read_text() == ""
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_read_metrics_skips_a_torn_line_with_a_warning(tmp_path):
    from vopd.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable line\(s\) \(line 3\)"):
        assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert path.read_text().endswith('"lo')  # reading never changes the file


def test_the_writer_resumes_the_history_and_the_optional_loggers(tmp_path, monkeypatch):
    """TensorBoard hides the events after the resumed step (purge_step); W&B continues the same run id."""
    import sys
    import types

    from vopd.metrics import MetricsWriter, read_metrics

    seen: dict[str, list] = {"purge": [], "id": [], "tb": [], "wandb": []}

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            (tmp_path / "tensorboard").mkdir(exist_ok=True)
            seen["purge"].append(purge_step)

        def add_scalar(self, key, value, step):
            seen["tb"].append((key, step))

        def close(self):
            pass

    class Run:
        def log(self, values, step):
            seen["wandb"].append((sorted(values), step))

        def finish(self):
            pass

    def init(project, dir, config, id, resume):
        assert resume == "allow"
        seen["id"].append(id)
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    loggers = ["tensorboard", "wandb"]
    writer = MetricsWriter(tmp_path, loggers, {})
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step), "step_skipped": False, "abort": "text is not a scalar"})
    writer.close()
    writer = MetricsWriter(tmp_path, loggers, {}, resume_step=2)  # resumed from the checkpoint of step 2
    writer.write(3, {"loss": 30.0})
    writer.flush()
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert seen["purge"] == [None, 3]
    assert len(seen["id"]) == 2 and seen["id"][0] == seen["id"][1]
    assert ("abort", 1) not in seen["tb"] and ("step_skipped", 1) in seen["tb"]
