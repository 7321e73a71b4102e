"""Chat templates and stop tokens: conversation rows rendered with the tokenizer's chat template by one function
(vopd.prompts.render_prompt) for SFT, rollouts, the teacher and evaluation; completions stop on the template's
end-of-turn token as well as EOS; the pre-flight compares student and teacher; every refusal is one line.

The chat tokenizer is the micro world's with two added special tokens and a ChatML template (with an
``enable_thinking`` switch, as Qwen3's), so the tiny world itself is unchanged.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tiny_families import make

from vopd.config import load_config
from vopd.data import load_prompts
from vopd.errors import UserError
from vopd.models import load_tokenizer
from vopd.prompts import (ChatOptions, compare_rendering, compare_stop_tokens, encode_example, encode_prompt,
                          format_prompt, render_prompt, require_chat_template, stop_token_ids)

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 5 + 4?"}]


def chat_tokenizer(micro_world, template: str = CHATML):
    tok = load_tokenizer(str(micro_world.student))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok(micro_world):
    return chat_tokenizer(micro_world)


@pytest.fixture(scope="module")
def chat_pair(micro_world, tok, tmp_path_factory):
    """(student dir, teacher dir, conversation train file): tiny random Qwen3 models over the chat tokenizer."""
    root = tmp_path_factory.mktemp("chat_pair")
    dirs = []
    for role, seed, hidden, layers in (("student", 1, 32, 1), ("teacher", 2, 48, 2)):
        make("qwen3", len(tok), seed=seed, hidden=hidden, layers=layers).save_pretrained(root / role)
        tok.save_pretrained(root / role)
        dirs.append(root / role)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"}]} for a, b in ((1, 2), (3, 4), (5, 6))]
    rows.append({"messages": CONVERSATION})
    rows.append({"problem": "7 + 1 = ?"})  # a text row in the same file keeps today's template
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dirs[0], dirs[1], train


def test_rendering_equals_apply_chat_template_and_text_rows_are_unchanged(tok):
    chat = ChatOptions(system_prompt="Be brief.", template_kwargs={"enable_thinking": False})
    want = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATION],
                                   add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False)
    assert render_prompt(tok, CONVERSATION, chat=chat) == list(want)
    tail = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.decode(render_prompt(tok, CONVERSATION, chat=chat)).endswith(tail)
    # a conversation that has a system turn keeps its own
    own = [{"role": "system", "content": "Mine."}, *CONVERSATION]
    assert tok.decode(render_prompt(tok, own, chat=chat)).count("system") == 1
    # text rows: today's template, unless text_as_chat
    assert render_prompt(tok, "1 + 2 = ?") == encode_prompt(tok, format_prompt("1 + 2 = ?"))
    as_chat = render_prompt(tok, "1 + 2 = ?", chat=ChatOptions(text_as_chat=True))
    assert as_chat == list(tok.apply_chat_template([{"role": "user", "content": format_prompt("1 + 2 = ?")}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False))


def test_stop_tokens_are_eos_and_the_end_of_turn(tok, micro_world):
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == [eos, im_end]
    assert stop_token_ids(load_tokenizer(str(micro_world.student))) == [eos]  # no chat template: EOS only


def test_sft_sampler_teacher_and_eval_render_the_same_ids(tok, chat_pair, monkeypatch):
    """One rendering: load_prompts (the sampler's and the teacher's prompts), SFT's examples and evaluation's
    prompts are byte-identical to render_prompt; SFT trains only the final assistant turn."""
    from vopd.eval import evaluate
    from vopd.world.sft import collate, encode_rows

    _, _, train_file = chat_pair
    chat = ChatOptions(system_prompt="Be brief.")
    rows = [json.loads(x) for x in train_file.read_text().splitlines()]
    prompts = load_prompts(train_file, tok, field="problem", template=format_prompt("{problem}"), max_tokens=500,
                           long_prompts="error", log=lambda _m: None, chat=chat)
    want = [render_prompt(tok, r.get("messages") or r["problem"], chat=chat) for r in rows]
    assert prompts == want
    assert tok.decode(prompts[3]).count("<|im_start|>assistant") == 2  # the given assistant turn is context

    # SFT: the prompt part is the sampler's rendering; the completion is the answer + <|im_end|>, nothing else
    sft_row = {"messages": CONVERSATION + [{"role": "assistant", "content": "9"}]}
    (p_ids, c_ids), = encode_rows(tok, [sft_row])
    assert p_ids == render_prompt(tok, CONVERSATION)
    assert tok.decode(c_ids) == "9<|im_end|>" and c_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    batch = collate([(p_ids, c_ids)], tok.pad_token_id)
    trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert trained == c_ids  # given turns (the earlier "5" included) are never trained
    assert encode_example(tok, "1 + 2 = ?", "3")[1][-1] == tok.eos_token_id  # text rows end with EOS, as before

    # evaluation renders the benchmark text with the same function
    seen = []

    def fake_generate(model, tokenizer, prompts, **kw):
        from vopd.sampling import Samples

        seen.extend(prompts)
        return Samples([[5, 2]] * len(prompts), [[]] * len(prompts), [False] * len(prompts))

    monkeypatch.setattr("vopd.sampling.generate", fake_generate)
    evaluate(make("qwen3", len(tok)), tok, [{"problem": "7 + 1 = ?", "answer": "8"}], n=1, greedy=True,
             chat=ChatOptions(text_as_chat=True, system_prompt="Be brief."))
    assert seen == [render_prompt(tok, "7 + 1 = ?", chat=ChatOptions(text_as_chat=True, system_prompt="Be brief."))]


def _stopper(tok):
    """A tiny model that emits <|im_end|> first whatever the prompt (its hidden states are zeroed by the final norm and
    its output layer has a bias)."""
    model = make("qwen3", len(tok))
    model.model.norm.weight.data.zero_()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.zero_()
    head.bias.data.zero_()
    head.bias.data[tok.convert_tokens_to_ids("<|im_end|>")] = 30.0
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


def test_generation_stops_at_the_end_of_turn_and_the_teacher_scores_it(tok, micro_world):
    from vopd.rollout import pack
    from vopd.sampling import generate
    from vopd.teacher.local import InProcessTeacher

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = _stopper(tok)
    prompts = [render_prompt(tok, CONVERSATION)] * 2
    torch.manual_seed(0)
    out = generate(model, tok, prompts, max_new_tokens=6, return_logprobs=True)
    assert out.completions == [[im_end]] * 2 and out.truncated == [False, False]
    plain = load_tokenizer(str(micro_world.student))  # no template: <|im_end|> is not a stop token, nothing stops
    plain.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    late = generate(model, plain, prompts[:1], max_new_tokens=4)
    assert late.completions == [[im_end] * 4] and late.truncated == [True]
    rollout = pack(prompts, out, tok.pad_token_id)
    assert rollout.targets[rollout.loss_mask.bool()].tolist() == [im_end, im_end]
    scores = InProcessTeacher(make("qwen3", len(tok), seed=3), len(tok)).score(rollout)
    assert scores.hidden.shape[:2] == rollout.targets.shape  # the stop token's position is scored like any other


def test_training_on_conversations_masks_the_given_turns(chat_pair, tmp_path, monkeypatch):
    """One `vopd train` step on a conversation file: the sampler gets the rendered prompts, the teacher scores the
    same ids, and the completion mask covers the sampled completion only (never a given turn)."""
    from vopd.teacher.local import InProcessTeacher
    from vopd.train import train

    student, teacher, train_file = chat_pair
    scored = []
    original = InProcessTeacher.score

    def spy(self, rollout, **kw):
        scored.append(rollout)
        return original(self, rollout, **kw)

    monkeypatch.setattr(InProcessTeacher, "score", spy)
    cfg = load_config(None, [f"model.student={student}", f"model.teacher={teacher}", f"data.train={train_file}",
                             f"output_dir={tmp_path / 'run'}", "rollout.max_new_tokens=5", "batch_size=5",
                             "micro_batch_size=5", "steps=1", "progress=false", "data.shuffle=false",
                             "data.system_prompt=Be brief.", "data.chat_template_kwargs={enable_thinking: false}"])
    logs: list[str] = []
    result = train(cfg, log=logs.append)
    assert result.steps_done == 1
    assert any("pre-flight ok: student and teacher chat templates agree" in m for m in logs), logs
    assert any("completions stop on" in m or "stop on the same tokens" in m for m in logs)
    tok = load_tokenizer(str(student))
    chat = ChatOptions("Be brief.", {"enable_thinking": False})
    rollout = scored[0]
    for i in range(rollout.size):
        n = rollout.prompt_lengths[i]
        prompt = rollout.input_ids[i, :n].tolist()
        row = json.loads(train_file.read_text().splitlines()[i])
        assert prompt == render_prompt(tok, row.get("messages") or row["problem"], chat=chat)
        mask = rollout.loss_mask[i].bool()
        # targets[t] is input_ids[t + 1]: the mask starts at the first sampled token, after every given turn
        assert mask[: n - 1].sum() == 0 and int(mask.sum()) == rollout.completion_lengths[i]


def test_preflight_compares_templates_and_stop_tokens_in_one_line(tok, micro_world):
    other = chat_tokenizer(micro_world, CHATML.replace("<|im_start|>assistant\n", "<|im_start|>model\n"))
    with pytest.raises(UserError, match=r"render the same conversation differently: first difference at token \d+ "
                                        r"\('a' vs 'm'\)") as exc:
        compare_rendering(tok, other, ChatOptions())
    assert "\n" not in str(exc.value)
    assert "agree" in compare_rendering(tok, chat_tokenizer(micro_world), ChatOptions())
    plain = load_tokenizer(str(micro_world.student))
    plain.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    with pytest.raises(UserError, match=r"stop on different tokens \(\['<\|eos\|>', '<\|im_end\|>'\] vs "
                                        r"\['<\|eos\|>'\]"):
        compare_stop_tokens(tok, plain)


def test_vopd_check_reports_the_chat_checks(chat_pair, capsys):
    from vopd.check import cli_main

    student, teacher, train_file = chat_pair
    assert cli_main(argparse.Namespace(config=None, overrides=[
        f"model.student={student}", f"model.teacher={teacher}", f"data.train={train_file}",
        "rollout.max_new_tokens=32"])) == 0
    out = capsys.readouterr().out
    assert "stop on the same tokens ['<|eos|>', '<|im_end|>']" in out
    assert "chat template: the generation prompt adds" in out and "chat templates agree" in out


@pytest.mark.parametrize("case", ["no template", "empty generation prompt", "ends with assistant", "bad turn",
                                  "template error"])
def test_refusals_are_one_line(case, micro_world, tmp_path):
    tok = chat_tokenizer(micro_world)
    rows = [{"messages": [{"role": "user", "content": "1 + 2 = ?"}]}]
    match = {"no template": r"line 1: the row holds a conversation \(data.messages_field\), which is rendered with "
                          r"the chat template, but the tokenizer of .* has none",
             "empty generation prompt": "renders nothing for the generation prompt",
             "ends with assistant": "ends with an assistant turn",
             "bad turn": "turn 1 must be an object with string fields 'role' and 'content'",
             "template error": "cannot render .*System role not supported"}[case]
    chat = ChatOptions()
    if case == "no template":
        tok = load_tokenizer(str(micro_world.student))
    elif case == "empty generation prompt":
        tok.chat_template = CHATML.split("{% if add_generation_prompt %}")[0]
    elif case == "ends with assistant":
        rows[0]["messages"].append({"role": "assistant", "content": "3"})
    elif case == "bad turn":
        rows[0]["messages"] = [{"role": "user", "text": "1 + 2"}]
    else:
        tok.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                             "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML)
        chat = ChatOptions(system_prompt="Be brief.")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=match) as exc:
        load_prompts(path, tok, field="problem", template="{problem}", max_tokens=100, long_prompts="error",
                     log=lambda _m: None, chat=chat)
    assert "\n" not in str(exc.value)


def test_chat_config_keys_parse_and_refuse(micro_world):
    base = ["model.student=a", "model.teacher=b", "data.train=c"]
    cfg = load_config(None, base + ["data.chat_template_kwargs={enable_thinking: false}", "data.text_as_chat=true"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False} and cfg.data.text_as_chat
    assert load_config(None, base).data.chat_template_kwargs == {}
    with pytest.raises(UserError, match="data.chat_template_kwargs.*a table of names to values"):
        load_config(None, base + ["data.chat_template_kwargs=[1]"])
    assert require_chat_template(chat_tokenizer(micro_world), ChatOptions()).startswith("chat template:")
