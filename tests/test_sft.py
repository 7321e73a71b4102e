"""SFT: the batch layout (loss on completion tokens only), the training loop, greedy accuracy and `vopd sft`."""

from __future__ import annotations

import pytest
import torch

from vopd.cli import main as vopd_main
from vopd.data import encode_completion, encode_prompt, format_prompt
from vopd.errors import UserError
from vopd.world.sft import IGNORE, SFTConfig, _lr_factor, collate, completion_loss, encode_rows, greedy_accuracy, train_sft
from vopd.world.task import TaskConfig, generate_problems, write_jsonl
from vopd.world.tiny_models import ModelShape, make_model, tokenizer_corpus, train_tokenizer

TASK = TaskConfig(n_steps=2, max_start=20, max_value=40)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return generate_problems(200, seed=0, config=TASK)


@pytest.fixture(scope="module")
def tokenizer(rows):
    return train_tokenizer(tokenizer_corpus(rows), 300)


def _model(tokenizer, seed: int = 0):
    return make_model(ModelShape(hidden_size=32, num_layers=2, intermediate_size=64), tokenizer, seed=seed)


def test_rows_are_encoded_with_the_shared_encoders(tokenizer, rows) -> None:
    (prompt, completion), = encode_rows(tokenizer, rows[:1])
    assert prompt == encode_prompt(tokenizer, format_prompt(rows[0]["problem"]))
    assert completion == encode_completion(tokenizer, rows[0]["solution"])
    with pytest.raises(UserError, match="'problem' and 'solution'"):
        encode_rows(tokenizer, [{"problem": "x"}])


def test_collate_puts_labels_on_completion_tokens_only(tokenizer, rows) -> None:
    examples = encode_rows(tokenizer, rows[:4])
    batch = collate(examples, tokenizer.pad_token_id)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        assert batch["input_ids"][i, :n].tolist() == p + c
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][i].tolist()
        assert labels[: len(p)] == [IGNORE] * len(p)
        assert labels[len(p) : n] == c  # EOS included: the model learns to stop
        assert all(x == IGNORE for x in labels[n:])


def test_completion_loss_ignores_prompt_tokens(tokenizer, rows) -> None:
    model = _model(tokenizer)
    examples = encode_rows(tokenizer, rows[:2])
    batch = collate(examples, tokenizer.pad_token_id)
    base = completion_loss(model, batch)
    # Changing a prompt *label* changes nothing (labels there are ignored) ...
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][0, 0] = IGNORE
    assert torch.equal(completion_loss(model, changed), base)
    # ... while dropping a completion label changes the mean.
    changed["labels"][0, len(examples[0][0]) + 1] = IGNORE
    assert not torch.equal(completion_loss(model, changed), base)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = SFTConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [_lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_short_sft_lowers_the_loss_and_is_deterministic(tokenizer, rows) -> None:
    held_out = collate(encode_rows(tokenizer, rows[150:]), tokenizer.pad_token_id)
    model = _model(tokenizer)
    with torch.no_grad():
        before = completion_loss(model, held_out).item()
    config = SFTConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=4)
    result = train_sft(model, tokenizer, rows[:150], config, log=None)
    assert len(result.losses) == 40 and result.seconds > 0
    assert sum(result.losses[-5:]) / 5 < 0.6 * sum(result.losses[:5]) / 5
    with torch.no_grad():
        assert completion_loss(model, held_out).item() < 0.6 * before
    again = train_sft(_model(tokenizer), tokenizer, rows[:150], SFTConfig(steps=3, batch_size=16), log=None)
    assert again.losses == train_sft(_model(tokenizer), tokenizer, rows[:150], SFTConfig(steps=3, batch_size=16),
                                     log=None).losses


def test_stop_when_ends_training_early(tokenizer, rows) -> None:
    seen: list[int] = []

    def stop_when(step: int) -> bool:
        seen.append(step)
        return step >= 6

    result = train_sft(_model(tokenizer), tokenizer, rows, SFTConfig(steps=20, batch_size=4), log=None,
                       stop_when=stop_when, check_every=3)
    assert seen == [3, 6] and result.steps == 6 and result.stopped_early
    full = train_sft(_model(tokenizer), tokenizer, rows, SFTConfig(steps=5, batch_size=4), log=None,
                     stop_when=lambda step: False, check_every=2)
    assert full.steps == 5 and not full.stopped_early


def test_sft_sampling_and_grading_agree_token_for_token(tokenizer, rows) -> None:
    """A model that memorises a few solutions by SFT reproduces them with greedy sampling: SFT, sampling and
    grading encode and decode the same way."""
    few = rows[:4]
    model = _model(tokenizer)
    train_sft(model, tokenizer, few, SFTConfig(steps=120, batch_size=4, lr=1e-2, warmup_steps=5), log=None)
    assert greedy_accuracy(model, tokenizer, few, max_new_tokens=40) == 1.0
    wrong = [dict(r, answer=str(int(r["answer"]) + 1)) for r in few]
    assert greedy_accuracy(model, tokenizer, wrong, max_new_tokens=40) == 0.0


def test_cli_fine_tunes_a_local_model(tokenizer, rows, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    src = tmp_path / "model"
    _model(tokenizer).save_pretrained(src)
    tokenizer.save_pretrained(src)
    data = write_jsonl(rows[:20], tmp_path / "train.jsonl")
    out = tmp_path / "out"
    argv = ["sft", "--model", str(src), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4"]
    assert vopd_main(argv) == 0
    assert "saved" in capsys.readouterr().out
    tuned = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(src)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), before.parameters()))


def test_cli_reports_user_mistakes_in_one_line(tmp_path, capsys) -> None:
    assert vopd_main(["sft", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "--model" in capsys.readouterr().err
    assert vopd_main(["sft", "--model", str(tmp_path), "--data", "d.jsonl", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a Hugging Face model directory" in err and err.count("\n") == 1
