"""The agent pre-flight (``vopd.agent_checks``): a Qwen3-format template with tools passes all three properties;
a teacher template that renders tool answers otherwise, a template that rewrites earlier turns, and a template that
drops the assistant's text each fail with one line naming the property."""

from __future__ import annotations

import copy

import pytest

from vopd.agent_checks import agent_checks, probe_episode
from vopd.env.calculator import Calculator
from vopd.errors import UserError
from vopd.prompts import ChatOptions
from vopd.world.tiny_models import TOOL_CHAT_TEMPLATE, train_tokenizer

TEXTS = ["What is 12 * 34? The answer is 408.", "calculator expression arguments name", "user assistant tool"] * 20
CHAT = ChatOptions(text_as_chat=True)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300, chat=True, tools=True)


def _with(tok, template: str):
    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


def test_the_tool_template_passes_every_property(tok):
    lines = agent_checks(tok, [("", copy.deepcopy(tok)), ("remote", None)], Calculator().tools, CHAT)
    assert any("appends turns" in line for line in lines)
    assert any("round-trip" in line and "<tool_call>, </tool_call> one token each" in line for line in lines)
    assert any("to the same ids" in line for line in lines)
    assert any("teacher remote holds its own tokenizer" in line for line in lines)


def test_a_teacher_rendering_tool_answers_otherwise_is_refused(tok):
    teacher = _with(tok, TOOL_CHAT_TEMPLATE.replace("<tool_response>\\n", "<tool_response>"))
    with pytest.raises(UserError, match=r"student and the teacher render the same episode with tools to other ids"):
        agent_checks(tok, [("", teacher)], Calculator().tools, CHAT)


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # Earlier assistant turns shown as "(called a tool)" once a later turn follows: the rendering does not extend.
    rewriting = TOOL_CHAT_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' + (message.content or '') }}",
        "{{- '<|im_start|>assistant\\n' + ((message.content or '') if loop.last else '(called a tool)') }}")
    assert rewriting != TOOL_CHAT_TEMPLATE
    with pytest.raises(UserError, match=r"the student rewrites earlier turns once a tool answers"):
        agent_checks(_with(tok, rewriting), [], Calculator().tools, CHAT)


def test_a_template_that_drops_the_tool_call_is_refused(tok):
    dropping = TOOL_CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' + (message.content or '') }}",
                                          "{{- '<|im_start|>assistant\\n' + (message.content or '')[:5] }}")
    assert dropping != TOOL_CHAT_TEMPLATE
    with pytest.raises(UserError, match=r"does not keep the assistant's tool call"):
        agent_checks(_with(tok, dropping), [], Calculator().tools, CHAT)


def test_the_probe_calls_the_environments_first_tool(tok):
    messages, call = probe_episode(Calculator().tools, ChatOptions(system_prompt="Be brief."))
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert '"name": "calculator"' in call and '"expression"' in call
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "tool", "assistant"]


def test_the_tools_are_declared_to_the_template(tok):
    """The probe is rendered as episodes are, with the tools block (whose example call must not be read as the
    assistant's)."""
    from vopd.agent_checks import _render, _text
    from vopd.env import env_chat

    chat = env_chat(CHAT, Calculator().tools)
    messages, _ = probe_episode(Calculator().tools, chat)
    text = _text(tok, _render(tok, messages, chat, gen=False, who="the student"))
    assert "<tools>" in text and '"calculator"' in text.split("\n</tools>")[0].split("<tools>")[-1]


def test_the_preflight_of_an_agent_run_runs_them(tok, micro_world, train_overrides, tmp_path):
    """``vopd.check.preflight`` with rollout.env: the three properties' lines, and a teacher whose template renders
    tool answers otherwise stops the run before step 1."""
    from vopd.check import preflight
    from vopd.config import load_config
    from vopd.teacher.local import InProcessTeacher
    from vopd.teacher.routing import Teachers
    from vopd.world.tiny_models import ModelShape, make_model

    shape = ModelShape(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=32,
                       max_positions=1024)
    student, teacher = make_model(shape, tok, seed=1), make_model(shape, tok, seed=2)
    for name, model in (("s", student), ("t", teacher)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cfg = load_config(None, [*train_overrides, f"model.student={tmp_path / 's'}", f"model.teacher={tmp_path / 't'}",
                             "rollout.env=calculator", "data.max_prompt_tokens=1000"])
    lines = preflight(student, tok, Teachers({"teacher": InProcessTeacher(teacher, len(tok), tokenizer=tok)}), cfg)
    assert any("appends turns" in line for line in lines) and any("round-trip" in line for line in lines)
    assert any("render a" in line and "episode with tools to the same ids" in line for line in lines)
    other = _with(tok, TOOL_CHAT_TEMPLATE.replace("<tool_response>\\n", "<tool_response>"))
    with pytest.raises(UserError, match="render the same episode with tools to other ids"):
        preflight(student, tok, Teachers({"teacher": InProcessTeacher(teacher, len(tok), tokenizer=other)}), cfg)
