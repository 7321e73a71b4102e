"""Evaluation of an agent run (``rollout.env``, vopd.eval_episodes): every sample is an episode with the environment,
graded on its final answer, with the episode counts as metrics; the held-out KL counts the student's tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from vopd.config import load_config
from vopd.eval_episodes import EpisodeEvalEngine, eval_chat
from vopd.eval_student import evaluate_student
from vopd.eval_split import model_inference
from vopd.models import load_model, load_tokenizer
from vopd.prompts import render_prompt
from vopd.sampling import SamplingSettings
from vopd.teacher.local import InProcessTeacher

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def agent(tool_world, tmp_path_factory):
    """(tokenizer, student, teacher, path of 6 evaluation problems)."""
    student_dir, teacher_dir, _ = tool_world
    tok = load_tokenizer(str(student_dir))
    student = load_model(str(student_dir), role="student", dtype=torch.float32, device=CPU)
    teacher = InProcessTeacher(load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=CPU), len(tok))
    path = tmp_path_factory.mktemp("agent_eval") / "eval.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {a} * {b}?", "answer": str(a * b)}) + "\n"
                            for a, b in [(12, 34), (3, 7), (45, 6), (8, 9), (11, 11), (5, 60)]))
    return tok, student, teacher, path


def _cfg(train_overrides, tool_world, path, *extra: str):
    student_dir, teacher_dir, _ = tool_world
    return load_config(None, [*train_overrides, f"model.student={student_dir}", f"model.teacher={teacher_dir}",
                              f"data.eval={path}", "rollout.env=calculator", "rollout.max_turns=3",
                              "rollout.max_new_tokens=10", "rollout.max_total_tokens=80", "data.max_prompt_tokens=1000",
                              "eval.greedy=false", "eval.temperature=1.0", "eval.n=4", "rollout.batch_size=8",
                              *extra])


def test_every_evaluation_sample_is_an_episode(agent, tool_world, train_overrides):
    tok, student, _teacher, path = agent
    cfg = _cfg(train_overrides, tool_world, path)
    prompts = ["What is 12 * 34?", "What is 3 * 7?"]
    engine = EpisodeEvalEngine(model_inference(student), tok, cfg, prompts)
    ids = [render_prompt(tok, p, template=cfg.data.template, chat=eval_chat(cfg)) for p in prompts]
    settings = SamplingSettings(max_new_tokens=10)  # temperature 1: the nudged student calls the tool at times
    (got,) = engine([ids * 4], [0], settings)
    assert got.episodes is not None and got.loss_masks is not None
    assert any(e.turns > 1 and e.tool_calls > 0 for e in got.episodes), got.episodes
    for c, m, e in zip(got.completions, got.loss_masks, got.episodes):
        assert len(m) == len(c) <= 80 and sum(not x for x in m) == e.env_tokens
    assert engine([ids * 4], [0], settings)[0] == got  # the batch's seed: the same episodes again
    # The prompt's tools block is there: the evaluation renders as training does.
    assert "<tools>" in tok.decode(ids[0])
    with pytest.raises(ValueError, match="not the rendering"):
        engine([[ids[0][:-1]]], [0], settings)


def test_evaluate_student_reports_episode_metrics_and_a_kl_over_student_tokens(agent, tool_world, train_overrides):
    tok, student, teacher, path = agent
    cfg = _cfg(train_overrides, tool_world, path)
    out = evaluate_student(student, teacher, tok, cfg, len(tok))
    for key in ("eval_avg_at_n", "eval_tool_calls_mean", "eval_tool_errors_mean", "eval_turns_mean", "eval_kl"):
        assert key in out, key
    assert 1.0 <= out["eval_turns_mean"] <= 3.0 and out["eval_tool_calls_mean"] > 0
    assert out["eval_kl"] > 0
    # The teacher = the student: the KL over the student's tokens is 0, whatever the environment wrote.
    same = InProcessTeacher(student, len(tok))
    assert evaluate_student(student, same, tok, cfg, len(tok))["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    # Single-turn evaluation of the same run has no episode metrics.
    single = _cfg(train_overrides, tool_world, path, "rollout.env=", "data.text_as_chat=true")
    assert "eval_turns_mean" not in evaluate_student(student, teacher, tok, single, len(tok))
