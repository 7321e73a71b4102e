"""The tiny world's reasoning task: seeded multi-step integer arithmetic with a worked chain of thought.

A problem defines a chain of variables, each from the previous one by one operation
("Let a = 33. Let b = a + 7. Let c = b * 2. What is c?"); the worked solution computes one variable per sentence
("b = 33 + 7 = 40. c = 40 * 2 = 80.") and ends with the answer in ``\\boxed{}``, so the grader that serves real math
benchmarks (last boxed answer) serves this task too. The variable names index the steps, so a small transformer can
find the operation of step k by matching its name instead of counting. Rows use MATH-500's field names
(``problem``, ``solution``, ``answer``).

What it knows: how to generate, write and read problems, and how to recompute an answer from a problem's text.
What it does not know: tokenizers, models, prompts (``vopd.data.format_prompt`` wraps a problem), grading, or how
files are parsed (``read_jsonl`` leaves that, and its error messages, to ``vopd.data.read_rows``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vopd.data import read_rows
from vopd.errors import UserError

_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
_NAMES = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs. Accuracy of a model decays roughly as (per-step accuracy) ** ``n_steps``, which is what
    separates a weak student from a strong teacher on the same task."""

    n_steps: int = 3  # operations per problem (each is one step of the worked solution)
    max_start: int = 50  # the starting number is drawn from [1, max_start]
    max_operand: int = 9  # add/subtract operands are drawn from [1, max_operand]
    max_multiplier: int = 4  # multiplication uses a factor in [2, max_multiplier]; < 2 disables multiplication
    max_value: int = 99  # every intermediate value stays within [0, max_value]

    def __post_init__(self) -> None:
        if not 1 <= self.n_steps < len(_NAMES):
            raise UserError(f"TaskConfig.n_steps={self.n_steps} must lie in [1, {len(_NAMES) - 1}]")
        if not 1 <= self.max_start <= self.max_value:
            raise UserError(f"TaskConfig.max_start={self.max_start} must lie in [1, max_value={self.max_value}]")
        if self.max_operand < 1:
            raise UserError(f"TaskConfig.max_operand={self.max_operand} must be >= 1")


def _apply(op: str, value: int, x: int) -> int:
    if op == "add":
        return value + x
    if op == "sub":
        return value - x
    return value * x


def _choices(value: int, config: TaskConfig) -> list[tuple[str, int]]:
    """Every (operation, operand) that keeps the running value inside [0, max_value]."""
    out = [("add", x) for x in range(1, config.max_operand + 1) if value + x <= config.max_value]
    out += [("sub", x) for x in range(1, config.max_operand + 1) if value - x >= 0]
    out += [("mul", x) for x in range(2, config.max_multiplier + 1) if value * x <= config.max_value]
    return out


def make_problem(rng: random.Random, config: TaskConfig) -> dict[str, str]:
    """One problem drawn with ``rng``."""
    value = rng.randint(1, config.max_start)
    definitions = [f"Let a = {value}."]
    lines: list[str] = []
    for k in range(1, config.n_steps + 1):
        options = _choices(value, config)
        # Draw the operation first, then its operand, so each operation is equally likely whatever its operand range.
        op = rng.choice(sorted({o for o, _ in options}))
        x = rng.choice([x for o, x in options if o == op])
        new = _apply(op, value, x)
        prev, name = _NAMES[k - 1], _NAMES[k]
        definitions.append(f"Let {name} = {prev} {_SYMBOL[op]} {x}.")
        lines.append(f"{name} = {value} {_SYMBOL[op]} {x} = {new}.")
        value = new
    problem = " ".join(definitions) + f" What is {_NAMES[config.n_steps]}?"
    solution = " ".join(lines) + f" The answer is \\boxed{{{value}}}."
    return {"problem": problem, "solution": solution, "answer": str(value)}


def generate_problems(
    n: int, *, seed: int, config: TaskConfig = TaskConfig(), exclude: Iterable[str] = ()
) -> list[dict[str, str]]:
    """``n`` distinct problems, a pure function of (``n``, ``seed``, ``config``, ``exclude``).

    Problems whose text is in ``exclude`` are skipped (that is how the train split avoids the test split).
    Raises ``UserError`` when the configuration cannot produce ``n`` distinct problems.
    """
    rng = random.Random(f"vopd-task:{seed}")  # a string seed is hashed stably across Python versions
    banned = set(exclude)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    misses = 0
    while len(rows) < n:
        row = make_problem(rng, config)
        if row["problem"] in seen or row["problem"] in banned:
            misses += 1
            if misses > 20 * n + 1000:
                raise UserError(
                    f"cannot draw {n} distinct problems with {config}; raise n_steps or the operand ranges"
                )
            continue
        seen.add(row["problem"])
        rows.append(row)
    return rows


_DEFINITION = re.compile(r"Let ([a-z]) = (?:(\d+)|([a-z]) ([-+*]) (\d+))\.")
_QUESTION = re.compile(r"What is ([a-z])\?$")


def solve(problem: str) -> int:
    """Recompute a problem's answer from its text alone (independent of the generator's bookkeeping)."""
    values: dict[str, int] = {}
    for m in _DEFINITION.finditer(problem):
        name, number, ref, symbol, operand = m.groups()
        if number is not None:
            values[name] = int(number)
        else:
            a, b = values[ref], int(operand)
            values[name] = a + b if symbol == "+" else a - b if symbol == "-" else a * b
    q = _QUESTION.search(problem)
    if q is None or q.group(1) not in values:
        raise ValueError(f"not a tiny-world problem: {problem!r}")
    return values[q.group(1)]


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a jsonl file, read by ``vopd.data.read_rows`` (one-line ``UserError`` naming the file and line
    for a missing, empty or malformed file)."""
    return [row for _, row in read_rows(path)]


def write_splits(
    out_dir: str | Path, *, n_train: int, n_test: int, seed: int = 0, config: TaskConfig = TaskConfig()
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; no test problem's text appears in train.

    The test split is drawn first (its own seed stream) so that it does not change when ``n_train`` changes.
    """
    test = generate_problems(n_test, seed=2 * seed + 1, config=config)
    train = generate_problems(n_train, seed=2 * seed, config=config, exclude=(r["problem"] for r in test))
    out = Path(out_dir)
    return write_jsonl(train, out / "train.jsonl"), write_jsonl(test, out / "test.jsonl")
