"""The tool world's task: the tiny world's labelled arithmetic chain ending in a step that needs the calculator (a
2-digit value times a 3-digit number), its multi-turn traces, its episode rows and its grader (docs/tiny_world.md,
"The tool world").

A problem reads like the arithmetic world's ("Let a = 33. Let b = a + 7. Let c = b * 2. Let d = c - 8. Let e = d * 456.
What is e?"). A trace is the assistant's side of an episode after the prompt, in Hugging Face chat messages:

- ``tool`` (the teacher's): the steps before the product in its head, then a calculator call
  (``b = 33 + 7 = 40. c = 40 * 2 = 80. d = 80 - 8 = 72.\\n<tool_call>...72*456...</tool_call>``); the tool message
  ("32832"); then the product written out with the tool's result and the steps after it (none by default), ending
  in ``\\boxed{}`` (``e = 72 * 456 = 32832. The answer is \\boxed{32832}.``);
- ``skip``: one turn that writes the product as if computed in its head (a model this small cannot: it guesses);
- ``malformed``: the call with its JSON cut short, the tool's ``error: malformed tool call``, then a guess.

What it knows: problems, answers, traces, episode rows (the prompt as a user turn and the answer) and grading a
finished episode's final answer (``vopd.grading.grade_answer``). What it does not know: tokens, templates, models.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

from vopd.errors import UserError
from vopd.grading import grade_answer
from vopd.prompts import format_prompt
from vopd.env.calculator import NAME as TOOL_NAME
from vopd.env.calculator import answer_call, render_call
from vopd.env.toolcalls import CLOSE as CALL_CLOSE
from vopd.env.toolcalls import parse_tool_calls as parse_calls
from vopd.world.task import TaskConfig

Kind = Literal["tool", "skip", "malformed"]
KINDS: tuple[Kind, ...] = ("tool", "skip", "malformed")
_NAMES = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class ToolTaskConfig:
    """Difficulty knobs: ``n_steps`` operations, the ``product_step``-th a product of the running value (at least
    ``min_factor``) and a multiplier in [``min_multiplier``, ``max_multiplier``]; the steps before it are the
    arithmetic world's (``small``: values within [0, ``small.max_value``]), the steps after it add or subtract an
    operand in [1, ``small.max_operand``]."""

    n_steps: int = 4
    product_step: int = 4
    min_factor: int = 10
    min_multiplier: int = 100
    max_multiplier: int = 999
    small: TaskConfig = TaskConfig()

    def __post_init__(self) -> None:
        if not 1 <= self.product_step <= self.n_steps < len(_NAMES):
            raise UserError(f"ToolTaskConfig: product_step={self.product_step} must lie in [1, n_steps={self.n_steps}]"
                            f" and n_steps below {len(_NAMES)}")
        if not 10 <= self.min_multiplier <= self.max_multiplier:
            raise UserError(f"ToolTaskConfig: multipliers [{self.min_multiplier}, {self.max_multiplier}] must be an "
                            "interval of numbers >= 10 (a product the model cannot do in its head)")
        if not 1 <= self.min_factor <= self.small.max_value:
            raise UserError(f"ToolTaskConfig.min_factor={self.min_factor} must lie in [1, {self.small.max_value}]")


def _small_step(rng: random.Random, value: int, small: TaskConfig) -> tuple[str, int]:
    """An operation of the arithmetic world that keeps the value inside [0, max_value] (operation first, then operand,
    as ``vopd.world.task.make_problem`` draws them)."""
    options = [("+", x) for x in range(1, small.max_operand + 1) if value + x <= small.max_value]
    options += [("-", x) for x in range(1, small.max_operand + 1) if value - x >= 0]
    options += [("*", x) for x in range(2, small.max_multiplier + 1) if value * x <= small.max_value]
    op = rng.choice(sorted({o for o, _ in options}))
    return op, rng.choice([x for o, x in options if o == op])


def make_problem(rng: random.Random, config: ToolTaskConfig) -> str | None:
    """One problem's text drawn with ``rng``, or None when the value before the product came out below
    ``min_factor`` (the caller draws again)."""
    value = rng.randint(1, config.small.max_start)
    definitions = [f"Let a = {value}."]
    for k in range(1, config.n_steps + 1):
        if k < config.product_step:
            op, x = _small_step(rng, value, config.small)
        elif k == config.product_step:
            if value < config.min_factor:
                return None
            op, x = "*", rng.randint(config.min_multiplier, config.max_multiplier)
        else:
            op, x = rng.choice("+-"), rng.randint(1, config.small.max_operand)
        value = value + x if op == "+" else value - x if op == "-" else value * x
        definitions.append(f"Let {_NAMES[k]} = {_NAMES[k - 1]} {op} {x}.")
    return " ".join(definitions) + f" What is {_NAMES[config.n_steps]}?"


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: ``name = left symbol operand = value``."""

    name: str
    left: int
    symbol: str
    operand: int
    value: int

    def line(self) -> str:
        return f"{self.name} = {self.left} {self.symbol} {self.operand} = {self.value}."

    @property
    def needs_tool(self) -> bool:
        return self.symbol == "*" and self.operand >= 10


_DEFINITION = re.compile(r"Let ([a-z]) = (?:(\d+)|([a-z]) ([-+*]) (\d+))\.")
_QUESTION = re.compile(r"What is ([a-z])\?$")


def solve_steps(problem: str) -> list[Step]:
    """The worked steps of a problem, recomputed from its text alone."""
    values: dict[str, int] = {}
    steps = []
    for m in _DEFINITION.finditer(problem):
        name, number, ref, symbol, operand = m.groups()
        if number is not None:
            values[name] = int(number)
            continue
        a, b = values[ref], int(operand)
        values[name] = a + b if symbol == "+" else a - b if symbol == "-" else a * b
        steps.append(Step(name, a, symbol, b, values[name]))
    q = _QUESTION.search(problem)
    if q is None or not steps or steps[-1].name != q.group(1):
        raise ValueError(f"not a tool-world problem: {problem!r}")
    return steps


def generate_problems(n: int, *, seed: int, config: ToolTaskConfig = ToolTaskConfig(),
                      exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct problem texts, a pure function of the arguments; texts in ``exclude`` are skipped."""
    rng = random.Random(f"vopd-tool-task:{seed}")
    banned, seen, misses = set(exclude), set(), 0
    out: list[str] = []
    while len(out) < n:
        problem = make_problem(rng, config)
        if problem is None or problem in seen or problem in banned:
            misses += 1
            if misses > 20 * n + 1000:
                raise UserError(f"cannot draw {n} distinct tool-world problems with {config}; widen the ranges")
            continue
        seen.add(problem)
        out.append(problem)
    return out


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def broken_call(expression: str) -> str:
    """A calculator call whose JSON lacks its closing brace (what a model that half-learned the format writes)."""
    call = render_call(expression)
    return call[: -len("}\n" + CALL_CLOSE)] + "\n" + CALL_CLOSE


def trace(problem: str, kind: Kind = "tool") -> list[dict[str, str]]:
    """The messages after the prompt of one episode of ``kind`` (module docstring), tool messages answered by the
    calculator environment itself (``vopd.env.calculator``)."""
    steps = solve_steps(problem)
    k = next((i for i, s in enumerate(steps) if s.needs_tool), None)
    answer = f" The answer is \\boxed{{{steps[-1].value}}}."
    if k is None or kind == "skip":
        return [_assistant(" ".join(s.line() for s in steps) + answer)]
    product = steps[k]
    call = (render_call if kind == "tool" else broken_call)(f"{product.left}*{product.operand}")
    before = " ".join(s.line() for s in steps[:k])
    first = f"{before}\n{call}" if before else call
    (parsed,) = parse_calls(first)
    tool = {"role": "tool", "name": TOOL_NAME, "content": answer_call(parsed)}
    return [_assistant(first), tool, _assistant(" ".join(s.line() for s in steps[k:]) + answer)]


def prompt_messages(problem: str) -> list[dict[str, str]]:
    """The prompt of an episode: the problem in the paper's template (``vopd.prompts.format_prompt``) as a user turn."""
    return [{"role": "user", "content": format_prompt(problem)}]


def episode_row(problem: str) -> dict[str, Any]:
    """A data row of the tool world: ``problem``, ``messages`` (the prompt conversation, what a run's
    ``data.messages_field`` reads), ``answer`` and the teacher's ``trace``."""
    return {"problem": problem, "messages": prompt_messages(problem), "answer": str(solve_steps(problem)[-1].value),
            "trace": trace(problem, "tool")}


def final_answer(episode: str | Sequence[Mapping[str, Any]]) -> str:
    """The final answer's text of a finished episode: the last assistant turn's content (or ``episode`` itself)."""
    if isinstance(episode, str):
        return episode
    turns = [m for m in episode if m.get("role") == "assistant"]
    return str(turns[-1].get("content") or "") if turns else ""


def grade_episode(episode: str | Sequence[Mapping[str, Any]], answer: str) -> bool:
    """Whether a finished episode's final answer (its last ``\\boxed{}``, outside any tool call) equals ``answer``;
    an episode that ended on a tool call (out of turns) has no final answer and fails."""
    text = final_answer(episode)
    if parse_calls(text) or "<tool_call>" in text:
        return False
    return grade_answer(text, answer)
