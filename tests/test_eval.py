"""Evaluation: Avg/Pass/Maj on hand-made records, `evaluate` with a scripted model and a tiny random Qwen3, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vopd.data import Problem
from vopd.errors import UserError
from vopd.eval import SampleRecord, compute_metrics, evaluate, majority_vote
from vopd.grading import answers_match

# ---------------------------------------------------------------------------------------------------------------
# metrics on hand-made graded records


def records(problem: int, answers: list[str | None], correct: list[bool]) -> list[SampleRecord]:
    return [SampleRecord(problem, j, a, c) for j, (a, c) in enumerate(zip(answers, correct))]


HAND_MADE = (
    # gold 1/2: "1/2" and "0.5" are one vote (2) tied with "3" (2); the tie goes to the first seen -> correct
    records(0, ["1/2", "0.5", "3", "3"], [True, True, False, False])
    # gold 4: no correct sample; None answers do not vote, so "5" wins -> wrong
    + records(1, [None, None, "5", None], [False, False, False, False])
    # gold 7: one correct sample, but "8" has two votes -> wrong
    + records(2, ["7", "8", "8", None], [True, False, False, False])
)


def test_metrics_hand_derived() -> None:
    m = compute_metrics(HAND_MADE[::-1], same_answer=lambda a, b: answers_match(b, a))  # order must not matter
    assert m.num_problems == 3 and m.num_samples == 12
    assert m.avg_at_n == pytest.approx(3 / 12)  # 2 + 0 + 1 correct samples out of 12
    assert m.pass_at_n == pytest.approx(2 / 3)  # problems 0 and 2 have a correct sample
    assert m.maj_at_n == pytest.approx(1 / 3)  # only problem 0's majority is right


def test_maj_without_equivalence_splits_votes() -> None:
    # As plain strings "1/2" and "0.5" get one vote each and "3" (two votes) wins problem 0.
    assert compute_metrics(HAND_MADE).maj_at_n == 0.0


def test_majority_vote_ties_and_empty() -> None:
    assert majority_vote(["b", "a", "a", "b"]) == 0  # 2-2 tie: the answer seen first
    assert majority_vote(["a", "b", "b"]) == 1
    assert majority_vote([None, None]) is None
    assert compute_metrics(records(0, [None], [False])).maj_at_n == 0.0
    with pytest.raises(ValueError):
        compute_metrics([])


# ---------------------------------------------------------------------------------------------------------------
# a tiny char-level world


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in "0123456789+-*/=()[]{}\\.,:;!?'\"$ \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen3ForCausalLM(config).eval()


class ScriptedModel(torch.nn.Module):
    """Answers the k-th request for a prompt with ``script[prompt][k]``: grading is tested without a real model."""

    def __init__(self, tokenizer, script: dict[str, list[str]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.script, self.calls = tokenizer, script, {}

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=None):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            problem = next(p for p in self.script if prompt.startswith(p))
            k = self.calls[problem] = self.calls.get(problem, -1) + 1
            rows.append(self.tokenizer(self.script[problem][k], add_special_tokens=False)["input_ids"] + [2])
        width = max(map(len, rows))
        new = torch.tensor([r + [2] * (width - len(r)) for r in rows])
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), scores=None)


def test_evaluate_grades_scripted_samples(tokenizer) -> None:
    script = {
        "half?": [r"\boxed{0.5}", r"\boxed{3}", r"so \boxed{\frac{1}{2}}", "I give up"],
        "neg?": [r"\boxed{-7}", r"\boxed{7}", r"\boxed{7}", r"\boxed{7}"],
    }
    problems = [Problem("half?", "1/2", "math", "t:1"), {"problem": "neg?", "solution": "...", "answer": "-7"}]
    result = evaluate(ScriptedModel(tokenizer, script), tokenizer, problems, n=4, max_new_tokens=32, batch_size=3)
    assert [(r.problem_index, r.sample_index, r.answer, r.correct) for r in result.records] == [
        (0, 0, "0.5", True), (0, 1, "3", False), (0, 2, r"\frac{1}{2}", True), (0, 3, None, False),
        (1, 0, "-7", True), (1, 1, "7", False), (1, 2, "7", False), (1, 3, "7", False),
    ]
    m = result.metrics
    assert (m.avg_at_n, m.pass_at_n, m.maj_at_n) == (3 / 8, 1.0, 0.5)  # "0.5" ~ "\frac12" win problem 0; "7" wins 1
    assert result.summary()["no_answer_rate"] == 1 / 8


def test_evaluate_multiple_choice(tokenizer) -> None:
    script = {"Q?": ['{"answer": "B"}', '{"answer": "b"}', "{'answer': 'B'}"]}
    result = evaluate(ScriptedModel(tokenizer, script), tokenizer, [Problem("Q?\n\nA) x\nB) y", "B", "mcq", "t:1")],
                      n=3, kind="mcq", max_new_tokens=32)
    assert [r.correct for r in result.records] == [True, True, False]  # malformed JSON is wrong
    assert result.metrics.maj_at_n == 1.0 and '{"answer": "C"}' in result.settings["template"]


def test_evaluate_tiny_qwen3_is_deterministic_under_a_seed(tiny_model, tokenizer) -> None:
    problems = [{"problem": "3+4", "answer": "7"}, {"problem": "9-2", "answer": "7"}]
    kwargs = dict(n=3, temperature=1.0, max_new_tokens=6, batch_size=4)
    rng_before = torch.get_rng_state()
    a = evaluate(tiny_model, tokenizer, problems, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    b = evaluate(tiny_model, tokenizer, problems, seed=0, **kwargs)
    c = evaluate(tiny_model, tokenizer, problems, seed=1, **kwargs)
    assert [(r.problem_index, r.sample_index) for r in a.records] == [(i, j) for i in range(2) for j in range(3)]
    assert [r.completion for r in a.records] == [r.completion for r in b.records]
    assert [r.completion for r in a.records] != [r.completion for r in c.records]
    greedy = evaluate(tiny_model, tokenizer, problems, n=1, temperature=0, max_new_tokens=6)
    assert greedy.settings["greedy"] and len(greedy.records) == 2
    with pytest.raises(UserError, match="identical samples"):
        evaluate(tiny_model, tokenizer, problems, n=2, greedy=True, max_new_tokens=6)


def test_sampling_ignores_the_checkpoint_generation_config(tiny_model, tokenizer) -> None:
    from vopd.sampling import generate

    prompts = [tokenizer("1+1=")["input_ids"]] * 3
    torch.manual_seed(0)
    plain = generate(tiny_model, tokenizer, prompts, max_new_tokens=5, return_logprobs=True)
    # A generation_config.json with min_p / suppress_tokens must not change what the sampler draws from.
    saved = tiny_model.generation_config
    tiny_model.generation_config = type(saved)(min_p=0.9, suppress_tokens=[5, 6, 7], top_k=3)
    try:
        torch.manual_seed(0)
        configured = generate(tiny_model, tokenizer, prompts, max_new_tokens=5, return_logprobs=True)
        assert tiny_model.generation_config.min_p == 0.9  # restored after the call
    finally:
        tiny_model.generation_config = saved
    assert configured.completions == plain.completions and configured.logprobs == plain.logprobs


# ---------------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_writes_summary_and_samples(tiny_model, tokenizer, tmp_path: Path, capsys) -> None:
    from vopd.cli import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+1", "solution": "", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    args = ["eval", str(model_dir), "--data", str(data), "--n", "2", "--max-new-tokens", "5", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "Avg@2" in printed and "Pass@2" in printed and "Maj@2" in printed
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["num_problems"] == 3 and summary["num_samples"] == 6 and summary["seed"] == 3
    assert {"avg_at_n", "pass_at_n", "maj_at_n", "temperature", "model", "data"} <= set(summary)
    lines = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [(r["problem_index"], r["sample_index"]) for r in lines] == [(i, j) for i in range(3) for j in range(2)]
    again = (tmp_path / "b" / "samples.jsonl").read_text().splitlines()
    assert again == (tmp_path / "a" / "samples.jsonl").read_text().splitlines()  # same seed, same samples

    # Earlier results are never overwritten without --overwrite; a file is not a directory. Both are refused before
    # the model is loaded, as one line.
    summary_text = (tmp_path / "a" / "summary.json").read_text()
    (tmp_path / "file").write_text("mine")
    for out, message in ((tmp_path / "a", "already holds results (summary.json, samples.jsonl): pass --overwrite"),
                         (tmp_path / "file", "is a file: pass a directory")):
        assert main(args + ["--seed", "4", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert (tmp_path / "a" / "summary.json").read_text() == summary_text and (tmp_path / "file").read_text() == "mine"
    assert main(args + ["--seed", "4", "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["seed"] == 4


def test_cli_mcq_uses_the_protocol_sampling_defaults(tiny_model, tokenizer, tmp_path: Path, capsys) -> None:
    from vopd.cli import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "gpqa.jsonl"
    data.write_text(json.dumps({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": "B"}) + "\n")
    assert main(["eval", str(model_dir), "--data", str(data), "--n", "2", "--max-new-tokens", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (summary["kind"], summary["top_p"], summary["top_k"], summary["temperature"]) == ("mcq", 0.95, 20, 0.6)


def test_cli_unknown_model_path_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    from vopd.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "p", "answer": "1"}\n')
    missing = tmp_path / "no-such-model"
    assert main(["eval", str(missing), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "\n" not in err
