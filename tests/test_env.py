"""The environment seam (vopd.env): the calculator evaluates safely (values, errors, refusals of names, calls and
huge numbers), tool calls are parsed in the Hermes/Qwen3 format (malformed ones kept, in order), rollout.env names
load or are refused in one line, and bad environments (raising, hanging, returning non-text or a huge answer) are
bounded: one-line errors naming the environment and the row, or a cut answer."""

from __future__ import annotations

import json
import time

import pytest

from vopd.env import Reply, check_spec, env_chat, load_env, tools_of
from vopd.env.calculator import MAX_CHARS, Calculator, answer, evaluate, show
from vopd.env.calls import CUT_MARK, EnvCalls
from vopd.env.toolcalls import parse_tool_calls
from vopd.errors import UserError
from vopd.prompts import ChatOptions


def call(expression: str, name: str = "calculator") -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": {"expression": expression}}) + "\n</tool_call>"


@pytest.mark.parametrize("expression, value", [
    ("123*456", "56088"), ("7 - 10", "-3"), ("8/2", "4"), ("7/2", "3.5"), ("1/3", "0.333333"), ("2/3", "0.666667"),
    ("-7/3", "-2.333333"), ("10//3", "3"), ("-7//2", "-4"), ("10 % 3", "1"), ("2**10", "1024"), ("2**-2", "0.25"),
    ("(1 + 2) * -3", "-9"), ("+5", "5"), ("1/3000000", "3.33333e-07"), ("(2**50) * (2**50) // 2**99", "2"),
])
def test_calculator_values(expression, value):
    assert answer(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("x + 1", "names and calls"), ("__import__('os').system('true')", "names and calls"), ("abs(-1)", "names"),
    ("(1).real", "names and calls"), ("[1][0]", "unsupported syntax"), ("1.5 * 2", "only integers"),
    ("True + 1", "only integers"), ("'a' * 3", "only integers"), ("2 ** 0.5", "only integers"),
    ("1 +", "unsupported syntax"), ("1 < 2", "unsupported syntax"), ("lambda: 1", "unsupported syntax"),
    ("2 ** 101", "exponent larger than 100"), ("9 ** 9 ** 9", "exponent larger than"),
    ("99999 ** 99", "number too large"), ("(10**90) * (10**90) * (10**90) * (10**90)", "number too large"),
    ("1" + "+1" * MAX_CHARS, "longer than"), ("", "malformed tool call"),
])
def test_calculator_errors_and_refusals(expression, reason):
    got = answer(expression)
    assert got.startswith("error: ") and reason in got


def test_calculator_is_exact_and_never_evaluates_python():
    assert evaluate("1/3 + 1/3 + 1/3") == 1  # exact rationals: no float rounding
    assert show(evaluate("10**20 + 1")) == "100000000000000000001"
    start = time.perf_counter()
    answer("(" * 90 + "9**99" + ")" * 90)  # deep nesting and a big power: refused or computed, never slow
    answer("9**99**99**99")
    assert time.perf_counter() - start < 5


def test_tool_calls_are_parsed_in_order_with_the_malformed_ones():
    text = (f"Let me compute. {call('1+1')} then <tool_call>\nnot json\n</tool_call>"
            '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2*3\\"}"}</tool_call>'
            '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "c", "arguments": [1]}</tool_call>'
            "<tool_call>\n{\"name\": \"calculator\"")
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls[:1]] == [("calculator", {"expression": "1+1"})]
    assert calls[2].arguments == {"expression": "2*3"} and not calls[2].error
    assert [c.error.split(" (")[0] for c in calls] == ["", "malformed tool call", "", "malformed tool call",
                                                       "malformed tool call", "malformed tool call"]
    assert "no </tool_call>" in calls[-1].error
    assert parse_tool_calls("The answer is 42.") == []


def test_the_calculator_env_answers_each_call_and_ends_on_a_final_answer():
    env = Calculator()
    env.start([{"role": "user", "content": "What is 123*456?"}])
    reply = env.step(f"I will use the tool.\n{call('123*456')}\n{call('1/0')}<tool_call>oops</tool_call>"
                     f"{call('1', name='search')}")
    assert not reply.done
    assert [m["content"] for m in reply.messages] == [
        "56088", "error: division by zero", "error: malformed tool call (not JSON)",
        "error: unknown tool 'search' (the only tool is calculator)"]
    assert all(m["role"] == "tool" and m["name"] == "calculator" for m in reply.messages)
    assert env.step("The answer is 56088.") == Reply(done=True)
    assert env.tools[0]["function"]["name"] == "calculator"
    assert env.tools[0]["function"]["parameters"]["required"] == ["expression"]


def test_env_names_load_or_are_refused_in_one_line(tmp_path, monkeypatch):
    assert load_env("calculator") is Calculator
    for bad in ("calc ulator", "pkg.mod", "pkg.mod:", ":Name", "pkg.mod:Name:x"):
        with pytest.raises(UserError, match=r"rollout.env=.*is invalid: it must be empty"):
            check_spec(bad)
    check_spec("")
    (tmp_path / "my_envs.py").write_text(
        "from vopd.env import Reply\n"
        "class Echo:\n    tools = []\n    def start(self, messages): pass\n"
        "    def step(self, text): return Reply(done=True, reward=1.0)\n"
        "class BadTools:\n    tools = 'calculator'\n"
        "class Broken:\n    def __init__(self): raise RuntimeError('no config\\nfound')\n"
        "NOT_A_CLASS = 3\n")
    (tmp_path / "fails_at_import.py").write_text("raise ImportError('missing dependency foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_env("my_envs:Echo")().step("x").reward == 1.0
    for spec, match in (("no_such_module_xyz:Env", "cannot import no_such_module_xyz"),
                        ("fails_at_import:Env", "missing dependency foo"),
                        ("my_envs:Missing", "has no class Missing"), ("my_envs:NOT_A_CLASS", "has no class")):
        with pytest.raises(UserError, match=match) as got:
            load_env(spec)
        assert "\n" not in str(got.value)
    with pytest.raises(UserError, match="tools must be a list"):
        tools_of(load_env("my_envs:BadTools"), "my_envs:BadTools")
    with pytest.raises(UserError, match="building the environment failed .*no config found"):
        tools_of(load_env("my_envs:Broken"), "my_envs:Broken")


def test_env_chat_declares_the_tools_and_renders_rows_as_chat():
    chat = env_chat(ChatOptions("sys", {"enable_thinking": False}), Calculator.tools)
    assert chat.text_as_chat and chat.system_prompt == "sys"
    assert dict(chat.template_kwargs) == {"enable_thinking": False, "tools": Calculator.tools}
    assert "tools" not in env_chat(ChatOptions(), []).template_kwargs


class _Scripted:
    """An environment whose step does what ``behaviour`` says."""

    tools: list = []

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def start(self, messages):
        if self.behaviour == "start-raises":
            raise KeyError("answer")

    def step(self, text):
        b = self.behaviour
        if b == "raises":
            raise ValueError("tool crashed\nwith a traceback-like\nmessage")
        if b == "hangs":
            time.sleep(30)
        if b == "not-a-reply":
            return "just a string"
        if b == "non-text":
            return Reply(({"role": "tool", "content": {"value": 3}},))
        if b == "bad-role":
            return Reply(({"role": "assistant", "content": "I answer for you"},))
        if b == "no-messages":
            return Reply(())
        if b == "bad-reward":
            return Reply(done=True, reward="high")
        if b == "huge":
            return Reply(({"role": "tool", "name": "t", "content": "x" * 1_000_000},))
        return Reply(({"role": "user", "content": "go on"},))


@pytest.mark.parametrize("behaviour, match", [
    ("raises", r"step\(\) failed at training row 7 \(ValueError: tool crashed with a traceback-like message\)"),
    ("hangs", r"step\(\) did not return within 0.3 s at training row 7; .*rollout.env_timeout_s"),
    ("not-a-reply", r"step\(\) returned str at training row 7, not a vopd.env.Reply"),
    ("non-text", r"returned the message .*not \{'role'"), ("bad-role", r"returned the message .*assistant"),
    ("no-messages", "returned no messages and is not done"), ("bad-reward", "reward 'high', not a number"),
])
def test_bad_environments_are_one_line_errors_naming_the_env_and_row(behaviour, match):
    calls = EnvCalls("my_envs:Scripted", seconds=0.3, max_chars=100)
    env = calls.make(lambda: _Scripted(behaviour), "training row 7")
    start = time.perf_counter()
    with pytest.raises(UserError, match=match) as got:
        calls.step(env, "some turn", "training row 7")
    assert time.perf_counter() - start < 10  # a hanging environment is given up on, not waited for
    assert "\n" not in str(got.value) and "my_envs:Scripted" in str(got.value)


def test_start_failures_and_objects_without_methods_are_one_line():
    calls = EnvCalls("x:Y", seconds=1, max_chars=100)
    with pytest.raises(UserError, match=r"start\(\) failed at row 0 \(KeyError: 'answer'\)"):
        calls.start(calls.make(lambda: _Scripted("start-raises"), "row 0"), [{"role": "user", "content": "q"}],
                    "row 0")
    with pytest.raises(UserError, match=r"has no start\(\) method"):
        calls.make(lambda: object(), "row 0")


def test_a_huge_answer_is_cut_to_the_limit():
    calls = EnvCalls("x:Y", seconds=5, max_chars=100)
    reply = calls.step(calls.make(lambda: _Scripted("huge"), "row 0"), "turn", "row 0")
    (message,) = reply.messages
    assert message["content"] == "x" * 100 + CUT_MARK and message["name"] == "t"
    assert calls.step(_Scripted("ok"), "t", "row 0").messages == ({"role": "user", "content": "go on"},)


def test_the_rollout_keys_of_environments_are_validated():
    from vopd.config import RolloutConfig

    RolloutConfig(env="calculator", max_turns=1, max_total_tokens=0).validate()
    assert RolloutConfig(env="calculator", max_new_tokens=64).completion_tokens == (64, "rollout.max_new_tokens")
    assert RolloutConfig(env="calculator", max_total_tokens=300).completion_tokens == (300, "rollout.max_total_tokens")
    assert RolloutConfig(max_total_tokens=300).completion_tokens[1] == "rollout.max_new_tokens"  # single turn
    for bad, match in ((dict(env="my env"), "rollout.env"), (dict(max_turns=0), "rollout.max_turns"),
                       (dict(max_total_tokens=-1), "rollout.max_total_tokens"),
                       (dict(env_timeout_s=0.0), "rollout.env_timeout_s"), (dict(env_max_chars=0), "env_max_chars")):
        with pytest.raises(UserError, match=match):
            RolloutConfig(**bad).validate()
