"""The tiny world: tokenizer (its ChatML chat template included), model round-trips, SFT rows rendered through the
chat template, the cached build (with a micro config that builds in seconds), and a run on it through the chat path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vopd.data import encode_completion, encode_prompt, format_prompt
from vopd.prompts import ChatOptions, render_prompt, stop_token_ids
from vopd.world.sft import SFTConfig, collate, encode_rows
from vopd.world.task import TaskConfig, generate_problems
from vopd.world.tiny_models import IM_END, IM_START, ModelShape, make_model, tokenizer_corpus, train_tokenizer
from vopd.world.build import World, WorldConfig, build_world, verify_world

MICRO = WorldConfig(
    task=TaskConfig(n_steps=2, max_start=20, max_value=40),
    n_train=200,
    n_test=8,
    vocab_size=300,
    teacher=ModelShape(hidden_size=32, num_layers=1, intermediate_size=64),
    student=ModelShape(hidden_size=16, num_layers=1, intermediate_size=32),
    teacher_sft=SFTConfig(steps=4, batch_size=8, warmup_steps=1),
    student_sft=SFTConfig(steps=3, batch_size=8, warmup_steps=1),
    student_target_accuracy=0.0,  # always reached: the student's SFT stops at the first check
    student_check_from=1,
    student_check_every=1,
    n_val=4,
    eval_max_new_tokens=8,
)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return generate_problems(300, seed=0)


@pytest.fixture(scope="module")
def tokenizer(rows, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = train_tokenizer(tokenizer_corpus(rows))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)  # test what everyone else loads, not the in-memory object


def test_tokenizer_special_tokens(tokenizer) -> None:
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert None not in ids and len(set(ids)) == 3
    assert 100 < len(tokenizer) <= 384


def test_tokenizer_round_trip(tokenizer, rows) -> None:
    for row in rows[:100]:
        for text in (row["problem"], row["solution"], format_prompt(row["problem"])):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
    # Any text encodes (byte-level alphabet), even characters the corpus never had.
    odd = "Ünïcode ∑ 12\t{x}\n"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


def test_prompt_and_completion_encoding(tokenizer, rows) -> None:
    row = rows[0]
    prompt = encode_prompt(tokenizer, format_prompt(row["problem"]))
    assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(prompt, skip_special_tokens=True) == format_prompt(row["problem"])
    completion = encode_completion(tokenizer, row["solution"])
    assert completion[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in completion
    assert tokenizer.decode(completion, skip_special_tokens=True) == row["solution"]
    # Digits are one token each, so numbers are spelled digit by digit.
    assert tokenizer.convert_ids_to_tokens(tokenizer("1234", add_special_tokens=False)["input_ids"]) == list("1234")


# ------------------------------------------------------------------------------------------------ chat template


@pytest.fixture(scope="module")
def chat_tokenizer(rows, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = train_tokenizer(tokenizer_corpus(rows, chat=True), chat=True)
    path = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)  # the template must come back from disk


def test_chat_tokenizer_renders_chatml_from_disk(chat_tokenizer, rows) -> None:
    tok = chat_tokenizer
    prompt = format_prompt(rows[0]["problem"])
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"},
                    {"role": "assistant", "content": "3"}, {"role": "user", "content": prompt}]
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == ("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n3<|im_end|>\n"
                    f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    without = tok.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    assert text == without + "<|im_start|>assistant\n"
    # tokenised, the rendering is the text's tokens: one BOS first (the template's), the markers one token each
    ids = tok.apply_chat_template(conversation[-1:], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids) == f"<|bos|><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(tok.bos_token_id) == 1 and ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids(IM_START)]
    assert tok.convert_ids_to_tokens(ids[-3:]) == [IM_START, "assistant", "Ċ"]  # role names are one token each


def test_im_end_is_one_special_token_and_the_stop_token(chat_tokenizer, rows) -> None:
    tok = chat_tokenizer
    for marker in (IM_START, IM_END):
        (marker_id,) = tok(marker, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(marker_id) == marker and marker_id in tok.all_special_ids
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert tok.eos_token == IM_END and tok.eos_token_id == im_end  # as Qwen's instruct tokenizers declare it
    assert stop_token_ids(tok) == [im_end]  # EOS and the template's end of turn are the same token
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<|pad|>", "<|bos|>", "<|eos|>", IM_START, IM_END]
    assert (tok.pad_token_id, tok.bos_token_id) == (0, 1)  # <|eos|> stays, unused (as Qwen's <|endoftext|>)
    model = make_model(ModelShape(hidden_size=32, num_layers=1, intermediate_size=64), tok, seed=0)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == im_end  # HF generate stops on it
    # a text still round-trips, and decode drops the markers
    text = format_prompt(rows[1]["problem"])
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = render_prompt(tok, rows[1]["problem"], chat=ChatOptions(text_as_chat=True))
    assert tok.decode(rendered, skip_special_tokens=True) == f"user\n{text}\nassistant\n"


def test_sft_rows_are_rendered_by_vopd_prompts_and_train_only_the_answer(chat_tokenizer, rows) -> None:
    """SFT's ids are the chat template's (``vopd.prompts``, the sampler's and the evaluator's rendering) + the solution
    + <|im_end|>; the loss covers the solution and <|im_end|> only."""
    tok, chat = chat_tokenizer, ChatOptions(text_as_chat=True)
    im_end = tok.convert_tokens_to_ids(IM_END)
    examples = encode_rows(tok, rows[:8], chat)
    for (p_ids, c_ids), row in zip(examples, rows[:8]):
        user = [{"role": "user", "content": format_prompt(row["problem"])}]
        assert p_ids == tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert p_ids == render_prompt(tok, row["problem"], chat=chat)
        assert c_ids == tok(row["solution"], add_special_tokens=False)["input_ids"] + [im_end]
        # the whole example is the template's rendering of the exchange, up to the end of the assistant's turn
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": row["solution"]}], tokenize=True,
                                       return_dict=False)
        assert p_ids + c_ids == full[: len(p_ids) + len(c_ids)] and tok.decode(full[len(p_ids) + len(c_ids):]) == "\n"
    batch = collate(examples, tok.pad_token_id)
    for i, (p_ids, c_ids) in enumerate(examples):
        labels = batch["labels"][i]
        assert labels[: len(p_ids)].eq(-100).all() and labels[len(p_ids) + len(c_ids):].eq(-100).all()
        assert labels[len(p_ids): len(p_ids) + len(c_ids)].tolist() == c_ids
    # without text_as_chat, the same rows keep the text rendering (BOS + prompt, and the EOS, <|im_end|>, at the end)
    (p_text, c_text), = encode_rows(tok, rows[:1])
    assert p_text == encode_prompt(tok, format_prompt(rows[0]["problem"])) and c_text[-1] == im_end


def test_model_save_load_round_trip(tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_model(ModelShape(hidden_size=32, num_layers=2, intermediate_size=64), tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == loaded.config.vocab_size == len(tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, "Start with 3, then add 4.")])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_same_seed_same_init_and_shapes_differ(tokenizer) -> None:
    a = make_model(ModelShape(hidden_size=32, num_layers=1, intermediate_size=64), tokenizer, seed=3)
    b = make_model(ModelShape(hidden_size=32, num_layers=1, intermediate_size=64), tokenizer, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = make_model(ModelShape(hidden_size=16, num_layers=1, intermediate_size=32), tokenizer, seed=3)
    assert c.config.vocab_size == a.config.vocab_size
    assert sum(p.numel() for p in c.parameters()) < sum(p.numel() for p in a.parameters())


def test_config_key_is_stable_and_sensitive() -> None:
    assert MICRO.key() == dataclasses.replace(MICRO).key()
    assert MICRO.key() != dataclasses.replace(MICRO, seed=1).key()
    assert MICRO.key() != dataclasses.replace(MICRO, student_sft=SFTConfig(steps=3)).key()
    assert MICRO.chat and MICRO.key() != dataclasses.replace(MICRO, chat=False).key()


def _check_world(world: World) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (world.teacher, world.student, world.tokenizer):
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.bos_token_id is not None
        assert tok.chat_template and tok.eos_token == IM_END  # the chat world (WorldConfig.chat)
    teacher = AutoModelForCausalLM.from_pretrained(world.teacher)
    student = AutoModelForCausalLM.from_pretrained(world.student)
    assert teacher.config.vocab_size == student.config.vocab_size
    assert teacher.num_parameters() > student.num_parameters()
    assert world.train_data.is_file() and world.test_data.is_file()
    assert 0.0 <= world.teacher_accuracy <= 1.0 and 0.0 <= world.student_accuracy <= 1.0
    assert world.teacher_sft_seconds > 0 and world.student_sft_seconds > 0


def test_build_then_reuse_then_detect_corruption(tmp_path) -> None:
    messages: list[str] = []
    first = build_world(MICRO, tmp_path, log=messages.append)
    assert not first.reused and first.root.parent == tmp_path
    _check_world(first)
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # the temporary build directory is gone
    manifest = json.loads((first.root / "world.json").read_text())
    assert "teacher/model.safetensors" in manifest["files"]
    assert manifest["metrics"]["teacher_sft_steps"] == 4 and manifest["metrics"]["student_sft_steps"] == 1
    stamp = (first.root / "world.json").stat().st_mtime_ns

    # Same config: reused without retraining (the manifest is untouched and nothing is logged).
    messages.clear()
    second = build_world(MICRO, tmp_path, log=messages.append)
    assert second.reused and second.root == first.root and messages == []
    assert (second.root / "world.json").stat().st_mtime_ns == stamp
    assert second.teacher_accuracy == first.teacher_accuracy

    # A truncated weight file is detected, reported in one line, and the world rebuilt.
    weights = first.root / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert verify_world(first.root) is not None
    third = build_world(MICRO, tmp_path, log=messages.append)
    assert not third.reused
    assert "corrupt" in messages[0] and "teacher/model.safetensors" in messages[0] and "\n" not in messages[0]
    assert verify_world(third.root) is None
    _check_world(third)

    # A partial build (no manifest) is rebuilt too; --force rebuilds a valid one.
    (third.root / "world.json").unlink()
    assert not build_world(MICRO, tmp_path, log=messages.append).reused
    assert not build_world(MICRO, tmp_path, force=True, log=messages.append).reused
    assert len(list(tmp_path.iterdir())) == 1


def test_a_run_on_the_world_renders_prompts_through_its_chat_template(tmp_path, monkeypatch) -> None:
    """World.data_overrides() (data.text_as_chat=true): rollouts sample from the chat rendering the world's SFT used
    and stop on <|im_end|>; evaluation renders the same way."""
    from transformers import AutoTokenizer

    from vopd import eval as vopd_eval
    from vopd.config import load_config
    from vopd.rollout import hf_engine
    from vopd.train import train
    from vopd.world.task import read_jsonl

    world = build_world(MICRO, tmp_path / "cache", log=lambda _m: None)
    assert world.data_overrides() == ["data.text_as_chat=true"]
    tok = AutoTokenizer.from_pretrained(world.student)
    chat = ChatOptions(text_as_chat=True)
    rendered = {tuple(render_prompt(tok, r["problem"], chat=chat)) for r in read_jsonl(world.train_data)}
    sampled: list[tuple[list[int], list[int], bool]] = []

    def spy(model, tokenizer, rollout):
        sample = hf_engine(model, tokenizer, rollout)

        def run(prompts):
            out = sample(prompts)
            sampled.extend(zip(prompts, out.completions, out.truncated))
            return out
        return run

    evaluated: list[ChatOptions] = []
    real_render = vopd_eval.render_prompt

    def render_spy(tokenizer, prompt, **kw):
        evaluated.append(kw["chat"])
        return real_render(tokenizer, prompt, **kw)

    monkeypatch.setattr(vopd_eval, "render_prompt", render_spy)
    lines: list[str] = []
    cfg = load_config(None, [
        f"model.student={world.student}", f"model.teacher={world.teacher}", f"data.train={world.train_data}",
        f"data.eval={world.test_data}", f"output_dir={tmp_path / 'run'}", "steps=2", "batch_size=4",
        "micro_batch_size=4", "rollout.max_new_tokens=16", "eval.every=2", "eval.limit=2", "eval.greedy=true",
        "eval.n=1", "eval.max_new_tokens=8", "progress=false", "loss.method=vopd", *world.data_overrides(),
    ])
    train(cfg, log=lines.append, make_sampler=spy)
    assert any("chat template: the generation prompt adds" in line for line in lines)  # the pre-flight's check
    assert len(sampled) == 8
    im_end = tok.convert_tokens_to_ids(IM_END)
    for prompt, completion, truncated in sampled:
        assert tuple(prompt) in rendered and tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert truncated or (completion[-1] == im_end and im_end not in completion[:-1])
    assert evaluated and all(c.text_as_chat for c in evaluated)


def test_the_same_seed_gives_the_same_models_whatever_the_thread_count(tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    worlds = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the caller's setting; the build runs on one thread regardless
        worlds.append(build_world(MICRO, tmp_path / f"t{threads}", log=lambda _m: None))
        assert torch.get_num_threads() == threads  # and gives the caller's setting back
    torch.set_num_threads(1)
    for role in ("teacher", "student"):
        a, b = (load_file(str(w.root / role / "model.safetensors")) for w in worlds)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role


def test_the_student_keeps_the_check_closest_to_its_target(monkeypatch) -> None:
    """Validation accuracy jumps 10% -> 28% -> 42% across checks with target 30%: the 28% weights are kept."""
    import dataclasses

    import torch

    from vopd.world import build

    model = torch.nn.Linear(2, 2)
    script = iter([0.10, 0.28, 0.42])
    monkeypatch.setattr(build, "greedy_accuracy", lambda *a, **k: next(script))
    config = dataclasses.replace(MICRO, student_target_accuracy=0.3, student_check_from=1)
    stop_when = build._accuracy_reached(model, None, [], config, log=lambda _m: None)
    assert stop_when(1) is False
    with torch.no_grad():
        model.weight.add_(1.0)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    assert stop_when(2) is False  # 28%: below the target, remembered
    with torch.no_grad():
        model.weight.add_(1.0)
    assert stop_when(3) is True  # 42%: over it, and farther from 30% than 28% is
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())


def test_cache_dir_from_environment(tmp_path, monkeypatch) -> None:
    from vopd.world.build import default_cache_dir

    monkeypatch.setenv("VOPD_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VOPD_CACHE")
    assert default_cache_dir().name == "vopd"


@pytest.mark.slow
def test_default_world_meets_its_targets(request) -> None:
    """The real tiny world (minutes on a CPU; cached in $VOPD_CACHE): a strong teacher, a weak-but-able student."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("builds the full tiny world (minutes); run with -m slow")  # in case no config deselects it
    world = build_world()
    _check_world(world)
    assert world.teacher_accuracy >= 0.9
    assert 0.2 <= world.student_accuracy <= 0.6
