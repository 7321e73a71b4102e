"""The tiny world: tokenizer, model round-trips, and the cached build (with a micro config that builds in seconds)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vopd.data import encode_completion, encode_prompt, format_prompt
from vopd.world.sft import SFTConfig
from vopd.world.task import TaskConfig, generate_problems
from vopd.world.tiny_models import ModelShape, make_model, tokenizer_corpus, train_tokenizer
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


def _check_world(world: World) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (world.teacher, world.student, world.tokenizer):
        assert AutoTokenizer.from_pretrained(path).bos_token_id is not None
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
