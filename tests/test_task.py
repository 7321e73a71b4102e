"""The arithmetic task generator: determinism, correct answers, disjoint splits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vopd.errors import UserError
from vopd.grading import extract_boxed, grade_answer
from vopd.world.task import TaskConfig, generate_problems, read_jsonl, solve, write_splits


def test_same_seed_same_problems_different_seed_different() -> None:
    a = generate_problems(50, seed=3)
    assert a == generate_problems(50, seed=3)
    b = generate_problems(50, seed=4)
    assert a != b
    assert len({r["problem"] for r in a} & {r["problem"] for r in b}) < 5


def test_rows_have_math500_fields_and_distinct_problems() -> None:
    rows = generate_problems(200, seed=0)
    assert all(set(r) == {"problem", "solution", "answer"} for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert len({r["problem"] for r in rows}) == 200


CONFIGS = [TaskConfig(), TaskConfig(n_steps=1, max_multiplier=1), TaskConfig(n_steps=7, max_value=999, max_operand=30)]


@pytest.mark.parametrize("config", CONFIGS)
def test_answers_are_correct(config: TaskConfig) -> None:
    for row in generate_problems(300, seed=1, config=config):
        # Independent recomputation from the problem text alone.
        assert int(row["answer"]) == solve(row["problem"])
        assert 0 <= int(row["answer"]) <= config.max_value
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}.")
        assert extract_boxed(row["solution"]) == row["answer"]
        assert grade_answer(row["solution"], row["answer"])
        assert row["solution"].count("=") == 2 * config.n_steps
        # A corrupted answer must not grade correct.
        wrong = str(int(row["answer"]) + 1)
        assert not grade_answer(row["solution"], wrong)
        assert not grade_answer(row["solution"].replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{wrong}}}"),
                                row["answer"])


def test_worked_steps_are_each_right() -> None:
    config = TaskConfig()
    for row in generate_problems(100, seed=2, config=config):
        sentences = row["solution"].split(". ")
        assert len(sentences) == config.n_steps + 1
        for k, sentence in enumerate(sentences[:-1], 1):
            name, lhs, rhs = sentence.rstrip(".").split(" = ")
            assert name == "abcdefghijklmnopqrstuvwxyz"[k]
            a, op, b = lhs.split(" ")
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(rhs)
            assert f"Let {name} = " in row["problem"]


def test_difficulty_knobs_change_problems() -> None:
    easy = generate_problems(20, seed=0, config=TaskConfig(n_steps=2))
    hard = generate_problems(20, seed=0, config=TaskConfig(n_steps=6))
    assert all(r["solution"].count("=") == 4 for r in easy)
    assert all(r["solution"].count("=") == 12 for r in hard)
    with pytest.raises(UserError):
        TaskConfig(n_steps=0)
    with pytest.raises(UserError):  # too few distinct problems exist
        generate_problems(100, seed=0, config=TaskConfig(n_steps=1, max_start=2, max_operand=1, max_multiplier=1))


def test_splits_are_disjoint_and_stable(tmp_path) -> None:
    train_path, test_path = write_splits(tmp_path, n_train=3000, n_test=300, seed=5)
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    assert (len(train), len(test)) == (3000, 300)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    # The test split does not depend on the size of the train split.
    _, test2 = write_splits(tmp_path / "b", n_train=10, n_test=300, seed=5)
    assert read_jsonl(test2) == test
    # Files are plain jsonl rows.
    first = json.loads(train_path.read_text().splitlines()[0])
    assert first == train[0]


def test_exclude_is_honoured() -> None:
    config = dataclasses.replace(TaskConfig(), n_steps=1, max_multiplier=1, max_start=5, max_operand=3)
    everything = generate_problems(20, seed=0, config=config)  # 20 of the 27 distinct problems
    rest = generate_problems(5, seed=1, config=config, exclude=[r["problem"] for r in everything])
    assert not {r["problem"] for r in rest} & {r["problem"] for r in everything}


def test_read_jsonl_reports_bad_lines(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "x", "solution": "y"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
