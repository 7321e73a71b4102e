"""The tool world: the calculator, the Qwen3 tool template and its tokens, tool calls rendered then parsed, the
multi-turn SFT loss mask (assistant tokens only), a micro tool world built and reused, `vopd sft --world tools`'s
refusals, and the arithmetic world's cache key left as it was."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vopd.cli import main as vopd_main
from vopd.errors import UserError
from vopd.prompts import format_prompt, render_prompt
from vopd.world.build import WorldConfig
from vopd.env.calculator import TOOL as CALCULATOR_TOOL
from vopd.env.calculator import answer as evaluate
from vopd.env.calculator import answer_call, render_call
from vopd.env.toolcalls import parse_tool_calls as parse_calls
from vopd.world.tool_sft import MALFORMED, TOOLS
from vopd.world.sft import IGNORE, SFTConfig
from vopd.world.task import TaskConfig, solve
from vopd.world.tiny_models import CHAT_TEMPLATE, IM_END, TOOL_TOKENS, ModelShape, train_tokenizer
from vopd.world.tool_build import ToolWorldConfig, _student_kinds, _tokenizer_corpus, build_tool_world, tool_world_data
from vopd.world.tool_sft import collate_masked, encode_episode, stop_ids
from vopd.world.tool_task import (ToolTaskConfig, broken_call, generate_problems, grade_episode, prompt_messages,
                                  solve_steps, trace)

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = ToolWorldConfig(
    task=ToolTaskConfig(small=TaskConfig(max_start=30, max_value=40)),
    n_train=64,
    n_test=6,
    vocab_size=700,
    teacher=ModelShape(hidden_size=32, num_layers=1, intermediate_size=64),
    student=ModelShape(hidden_size=16, num_layers=1, intermediate_size=32),
    teacher_sft=SFTConfig(steps=3, batch_size=8, warmup_steps=1),
    student_sft=SFTConfig(steps=2, batch_size=8, warmup_steps=1),
    max_turns=2,
    eval_max_new_tokens=8,
)


@pytest.fixture(scope="module")
def problems() -> list[str]:
    return generate_problems(200, seed=0)


@pytest.fixture(scope="module")
def tok(problems, tmp_path_factory):
    from transformers import AutoTokenizer

    conversations = [prompt_messages(p) + trace(p, k) for p in problems for k in ("tool", "skip", "malformed")]
    path = tmp_path_factory.mktemp("tool_tok")
    train_tokenizer(_tokenizer_corpus(conversations), 700, chat=True, tools=True).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)  # the template and the added tokens must come back from disk


def test_the_default_worlds_cache_key_is_unchanged() -> None:
    assert WorldConfig().key() == "27d08bdf27b2be43"  # the key of the world `vopd sft` built before the tool world
    assert MICRO.key() != dataclasses.replace(MICRO, seed=1).key() != ToolWorldConfig().key()


def test_problems_and_traces(problems) -> None:
    assert problems == generate_problems(200, seed=0) and len(set(problems)) == 200
    for p in problems[:50]:
        first, tool, second = trace(p, "tool")
        assert first["role"] == second["role"] == "assistant" and tool == {
            "role": "tool", "name": "calculator", "content": tool["content"]}
        assert first["content"].endswith("</tool_call>") and "<tool_call>" not in second["content"]
        left, right = json.loads(first["content"].split("\n")[2])["arguments"]["expression"].split("*")
        assert 10 <= int(left) <= 99 and 100 <= int(right) <= 999 and tool["content"] == str(int(left) * int(right))
        assert grade_episode(prompt_messages(p) + [first, tool, second], str(solve(p)))
        (skip,) = trace(p, "skip")
        assert skip["content"] == first["content"].split("\n")[0] + " " + second["content"]  # the same steps, no call
        assert grade_episode([skip], str(solve(p))) and not grade_episode([skip], str(solve(p) + 1))
        assert trace(p, "malformed")[1]["content"].startswith(MALFORMED)
    # an episode that ran out of turns on a tool call has no final answer
    assert not grade_episode(prompt_messages(problems[0]) + trace(problems[0])[:1], str(solve(problems[0])))


def test_the_student_skips_the_tool_on_small_multipliers_and_garbles_some_calls(problems) -> None:
    config = ToolWorldConfig()
    kinds = _student_kinds(problems, config)
    assert kinds == _student_kinds(problems, config)  # seeded
    multipliers = [solve_steps(p)[-1].operand for p in problems]
    assert [k == "skip" for k in kinds] == [m < config.student_skip_below for m in multipliers]
    calls = [k for k in kinds if k != "skip"]
    assert 0.1 < calls.count("malformed") / len(calls) < 0.3  # student_malformed = 0.2 of 100-odd calls


def test_the_template_renders_qwen3s_tool_format(tok, problems) -> None:
    p = problems[0]
    first, tool, second = trace(p)
    conversation = [{"role": "system", "content": "Be exact."}, *prompt_messages(p), first, tool,
                    dict(tool, content="2"), second]
    text = tok.apply_chat_template(conversation, tools=TOOLS, tokenize=False)
    assert text == (
        "<|bos|><|im_start|>system\nBe exact.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(CALCULATOR_TOOL) + "\n</tools>\n\nFor each function call, return a json object with function name "
        'and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        f"<|im_start|>user\n{format_prompt(p)}<|im_end|>\n<|im_start|>assistant\n{first['content']}<|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{tool['content']}\n</tool_response>\n<tool_response>\n2\n"
        f"</tool_response><|im_end|>\n<|im_start|>assistant\n{second['content']}<|im_end|>\n")
    # without tools, exactly the arithmetic world's ChatML
    plain = [*prompt_messages(p), second]
    assert tok.apply_chat_template(plain, tokenize=False) == type(tok)(
        tokenizer_object=tok.backend_tokenizer, bos_token="<|bos|>", chat_template=CHAT_TEMPLATE).apply_chat_template(
        plain, tokenize=False)
    # a tool_calls field is written as the call text an assistant turn holds verbatim
    before, call = first["content"].split("\n", 1)
    arguments = json.loads(call.split("\n")[1])["arguments"]
    structured = {"role": "assistant", "content": before,
                  "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": arguments}}]}
    assert tok.apply_chat_template([*prompt_messages(p), structured], tools=TOOLS, tokenize=False) == \
        tok.apply_chat_template([*prompt_messages(p), first], tools=TOOLS, tokenize=False)


def test_tool_tokens_are_single_ids_kept_by_decode(tok) -> None:
    for token in TOOL_TOKENS:
        (i,) = tok(token, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(i) == token
        assert i not in tok.all_special_ids  # as in Qwen3's tokenizer: decode(skip_special_tokens=True) keeps it
    assert stop_ids(tok) == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("</tool_call>")]
    assert tok.eos_token == IM_END and len(tok) <= 700
    # the whole tools block is a few tokens (the BPE merged its fixed text)
    prompt = render_prompt(tok, prompt_messages("Let a = 1. Let b = a * 100. What is b?"), chat=MICRO.chat_options)
    assert len(prompt) < 80


@pytest.mark.parametrize("expression", ["45*123", "12*345 - 6", "(1+2)/4"])
def test_a_rendered_call_tokenizes_decodes_and_parses_back(tok, expression: str) -> None:
    text = f"b = 3 + 4 = 7.\n{render_call(expression)}"
    assert text.endswith('{"name": "calculator", "arguments": {"expression": "' + expression + '"}}\n</tool_call>')
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("</tool_call>")
    decoded = tok.decode(ids + [tok.convert_tokens_to_ids(IM_END)], skip_special_tokens=True)
    assert decoded == text
    (call,) = parse_calls(decoded)
    assert (call.name, call.arguments) == ("calculator", {"expression": expression})
    assert answer_call(call) == evaluate(expression)
    (broken,) = parse_calls(broken_call(expression))
    assert broken.error and answer_call(broken).startswith(MALFORMED)
    assert parse_calls("c = 5. The answer is \\boxed{5}.") == []


def test_the_loss_covers_the_assistants_tokens_only(tok, problems) -> None:
    conversation = prompt_messages(problems[3]) + trace(problems[3])
    ids, mask = encode_episode(tok, conversation)
    full = tok.apply_chat_template(conversation, tools=TOOLS, tokenize=True, return_dict=False)
    assert ids == full[: len(ids)] and tok.decode(full[len(ids):]) == "\n"
    assert ids[-1] == tok.convert_tokens_to_ids(IM_END)
    # the expected positions, found independently: after each "<|im_start|>assistant\n" up to the first stop token
    names = tok.convert_ids_to_tokens(ids)
    expected = [False] * len(ids)
    starts = [i + 3 for i in range(len(ids) - 2) if names[i: i + 3] == ["<|im_start|>", "assistant", "Ċ"]]
    assert len(starts) == 2
    for start in starts:
        end = next(j for j in range(start, len(ids)) if names[j] in ("</tool_call>", IM_END))
        expected[start: end + 1] = [True] * (end + 1 - start)
    assert mask == expected
    masked = [n for n, m in zip(names, mask) if m]
    assert masked.count("</tool_call>") == 1 and masked.count(IM_END) == 1 and "<tool_response>" not in masked
    close = names.index("</tool_call>", starts[0])
    assert names[close + 1] == IM_END and not mask[close + 1]  # the template's <|im_end|> after a call: environment's
    response = slice(names.index("<tool_response>"), names.index("</tool_response>") + 1)
    assert not any(mask[response]) and tok.decode(ids[response]) == "<tool_response>\n" + trace(problems[3])[1][
        "content"] + "\n</tool_response>"
    batch = collate_masked([(ids, mask), (ids[:5], mask[:5])], tok.pad_token_id)
    labels = batch["labels"][0].tolist()
    assert [t for t, m in zip(labels, mask) if m] == [i for i, m in zip(ids, mask) if m]
    assert all(t == IGNORE for t, m in zip(labels, mask) if not m) and batch["attention_mask"][1].sum() == 5


def test_a_micro_tool_world_builds_and_is_reused(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines: list[str] = []
    world = build_tool_world(MICRO, tmp_path, log=lines.append)
    assert not world.reused and world.root.name == f"world-tools-{MICRO.key()}"
    for role in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(world.root / role)
        assert AutoModelForCausalLM.from_pretrained(world.root / role).config.vocab_size == len(tok)
        for how in ("greedy", "sampled"):
            assert 0.0 <= world.metrics[f"{role}_{how}_accuracy"] <= 1.0
            assert 1 <= world.metrics[f"{role}_{how}_turns"] <= MICRO.max_turns
    assert world.metrics["teacher_sft_steps"] == 3 and world.metrics["student_sft_steps"] == 2
    assert sum(world.metrics["student_kinds"].values()) == 64 and "tool world" in world.summary()
    rows, tools = tool_world_data(world, "test")
    assert tools == TOOLS and len(rows) == 6
    for row in rows:
        assert row["messages"] == prompt_messages(row["problem"]) and row["answer"] == str(solve(row["problem"]))
        assert grade_episode(row["messages"] + row["trace"], row["answer"])
    again = build_tool_world(MICRO, tmp_path, log=lines.append)
    assert again.reused and again.metrics == world.metrics
    with pytest.raises(UserError, match="split"):
        tool_world_data(world, "val")


def test_sft_world_tools_refuses_the_arithmetic_worlds_options(capsys) -> None:
    for extra in (["--no-chat"], ["--student-target", "0.3"]):
        assert vopd_main(["sft", "--world", "tools", *extra]) != 0
        assert "--world tools" in capsys.readouterr().err
    with pytest.raises(UserError, match="student_malformed"):
        ToolWorldConfig(student_malformed=1.5)
