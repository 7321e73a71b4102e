"""Data files: training prompts (texts or conversations) and benchmark problems, read from local files.

What it knows: how the rows of a training file become prompt ids through the one rendering of ``vopd.prompts``
(a text field, or a conversation field rendered with the chat template), so that SFT, the trainer and the evaluator
see byte-identical prompts; how to read benchmark problems (MATH-500, AIME, AMC, Minerva, GPQA, the tiny task) from
local files into ``Problem`` rows, with field names defaulted per kind and overridable. What it does not know: how
a file becomes rows (``vopd.records``: local only, never a download), models, grading rules, the task generator.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Literal, TypeAlias

import torch

from vopd.errors import UserError
from vopd.records import one_line as _one_line
from vopd.records import read_rows  # noqa: F401 - re-exported: vopd.data.read_rows is the callers' name
# Prompt rendering lives in vopd.prompts (this module reads the files it renders); the basics are re-exported here
# for existing callers.
from vopd.prompts import (PROMPT_TEMPLATE, ChatOptions, Message, RenderChecks, TeacherPrompts,  # noqa: F401
                          encode_completion, encode_prompt, format_prompt, prompt_messages, row_prompts)

#: A Hugging Face tokenizer: ``vopd.models.Tokenizer``, named again here because vopd.models cannot be imported by
#: this module (it imports vopd.config, which imports this one).
Tokenizer: TypeAlias = Any


# ---------------------------------------------------------------------------------------------------------------
# Benchmark files

#: Prompt for multiple choice. The authors ask for "a JSON object with one letter" but do not publish their wording;
#: this wording is ours. ``{problem}`` is the question followed by its lettered choices.
MCQ_PROMPT_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and give your final answer as a JSON object with one letter, "
    'for example {"answer": "C"}.'
)

#: Field names tried in order when the caller names none. They cover MATH-500 (problem, answer, solution),
#: AIME24 (Problem, Answer, Solution), AIME25 (problem, answer), AMC23 (question, answer), Minerva (problem,
#: solution or answer), the tiny task (problem, solution, answer) and GPQA (question/Question, choices or the
#: original "Correct Answer" + "Incorrect Answer 1-3" columns).
MATH_FIELDS: dict[str, tuple[str, ...]] = {
    "problem": ("problem", "question", "Problem", "Question"),
    "answer": ("answer", "Answer", "final_answer", "expected_answer"),
    "solution": ("solution", "Solution"),
}
MCQ_FIELDS: dict[str, tuple[str, ...]] = {
    "problem": ("question", "Question", "problem", "Problem"),
    "choices": ("choices", "options", "Choices", "Options"),
    "answer": ("answer", "Answer", "label", "correct_answer"),
}
GPQA_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    ``problem`` is the text put into the prompt template (for multiple choice: the question, a blank line and one
    ``A) ...`` line per choice); ``answer`` is the gold (a math expression, or a letter); ``source`` says where the
    row came from (``file.jsonl:line 3``).
    """

    problem: str
    answer: str
    kind: Literal["math", "mcq"]
    source: str
    choices: tuple[str, ...] = ()


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if row.get(n) is not None), None)


def _missing(p: Path, where: str, what: str, names: tuple[str, ...], row: dict[str, Any], option: str) -> UserError:
    looked = ", ".join(repr(n) for n in names)
    has = ", ".join(repr(str(k)) for k in row) or "no fields"
    return UserError(f"{p}: {where}: missing field {what} (looked for {looked}; this row has {has}); "
                     f"name it with --field-{option}")


def _gold_text(value: object, p: Path, where: str, field: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{p}: {where}: field {field!r} should be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # AMC files store 27.0 for the answer 27
    text = str(value).strip()
    if not text:
        raise UserError(f"{p}: {where}: field {field!r} is empty")
    return text


def _math_problem(p: Path, where: str, row: dict[str, Any], fields: dict[str, str | None]) -> Problem:
    from vopd.grading import extract_boxed

    names = (fields["problem"],) if fields["problem"] else MATH_FIELDS["problem"]
    key = _pick(row, names)
    if key is None:
        raise _missing(p, where, "for the problem", names, row, "problem")
    problem = _gold_text(row[key], p, where, key)
    if fields["answer"] or not fields["solution"]:
        names = (fields["answer"],) if fields["answer"] else MATH_FIELDS["answer"]
        key = _pick(row, names)
        if key is not None:
            return Problem(problem, _gold_text(row[key], p, where, key), "math", f"{p.name}:{where}")
        if fields["answer"]:
            raise _missing(p, where, "for the answer", names, row, "answer")
    # No answer field: the gold is the last \boxed{} of the reference solution (how MATH's answers were made).
    sol_names = (fields["solution"],) if fields["solution"] else MATH_FIELDS["solution"]
    key = _pick(row, sol_names)
    if key is None:
        raise _missing(p, where, "for the answer", MATH_FIELDS["answer"] + sol_names, row, "answer")
    gold = extract_boxed(str(row[key]))
    if not gold or not gold.strip():
        raise UserError(f"{p}: {where}: field {key!r} has no \\boxed{{}} answer to use as the gold; "
                        "name an answer field with --field-answer")
    return Problem(problem, gold.strip(), "math", f"{p.name}:{where}")


def _choice_list(value: object, p: Path, where: str, key: str) -> list[str]:
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        value = value["text"]  # {"label": [...], "text": [...]} layout
    elif isinstance(value, dict):
        value = [value[k] for k in sorted(value)]  # {"A": ..., "B": ...}
    if not isinstance(value, (list, tuple)) or not 2 <= len(value) <= len(_LETTERS):
        raise UserError(f"{p}: {where}: field {key!r} should be a list of 2 to 26 choices")
    return [str(c).strip() for c in value]


def _mcq_problem(p: Path, where: str, row: dict[str, Any], fields: dict[str, str | None], choice_seed: int) -> Problem:
    names = (fields["problem"],) if fields["problem"] else MCQ_FIELDS["problem"]
    key = _pick(row, names)
    if key is None:
        raise _missing(p, where, "for the question", names, row, "problem")
    question = _gold_text(row[key], p, where, key)
    names = (fields["choices"],) if fields["choices"] else MCQ_FIELDS["choices"]
    choices_key = _pick(row, names)
    if choices_key is not None:
        choices = _choice_list(row[choices_key], p, where, choices_key)
        names = (fields["answer"],) if fields["answer"] else MCQ_FIELDS["answer"]
        key = _pick(row, names)
        if key is None:
            raise _missing(p, where, "for the answer", names, row, "answer")
        letter = _answer_letter(row[key], choices, p, where, key)
    elif not fields["choices"] and all(row.get(c) is not None for c in GPQA_COLUMNS):
        # GPQA's original layout lists the correct answer first; shuffle with a seed drawn from the question text,
        # so the order is the same whichever rows are loaded and in whatever order.
        choices = [str(row[c]).strip() for c in GPQA_COLUMNS]
        digest = hashlib.sha256(f"{choice_seed}:{question}".encode()).digest()
        order = list(range(len(choices)))
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
        choices = [choices[i] for i in order]
        letter = _LETTERS[order.index(0)]
    else:
        raise _missing(p, where, "for the choices", names + GPQA_COLUMNS, row, "choices")
    text = question + "\n\n" + "\n".join(f"{_LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return Problem(text, letter, "mcq", f"{p.name}:{where}", tuple(choices))


def _answer_letter(value: object, choices: list[str], p: Path, where: str, key: str) -> str:
    last = _LETTERS[len(choices) - 1]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return _LETTERS[value]  # an integer is a 0-based index into the choices
    if isinstance(value, str):
        s = value.strip()
        if len(s) <= 3 and s.strip("().").upper() in _LETTERS[: len(choices)] and len(s.strip("().")) == 1:
            return s.strip("().").upper()
        if s in choices:
            return _LETTERS[choices.index(s)]
    raise UserError(f"{p}: {where}: field {key!r} = {_one_line(value)[:60]!r} is neither a letter A-{last}, "
                    "a 0-based index, nor the text of one of the choices")


def load_problems(
    path: str | Path,
    *,
    kind: Literal["auto", "math", "mcq"] = "auto",
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    choices_field: str | None = None,
    limit: int | None = None,
    choice_seed: int = 0,
) -> list[Problem]:
    """Benchmark problems from a local file (see ``read_rows`` for formats), in file order.

    ``kind="auto"`` is multiple choice when the first row has a choices field (or GPQA's answer columns), else math.
    Unnamed fields are looked up in ``MATH_FIELDS`` / ``MCQ_FIELDS`` order. A math row without an answer field
    takes the last ``\\boxed{}`` of its solution. ``limit`` keeps the first rows. Problems with a bad row raise
    ``UserError`` naming the file, the line and the missing field. A csv row may lack only the solution's cell (it
    is read only for a row without an answer).
    """
    p = Path(path)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    rows = read_rows(p, optional=(solution_field,) if solution_field else MATH_FIELDS["solution"])[:limit]
    if kind == "auto":
        first = rows[0][1]
        mcq = (choices_field and choices_field in first) or _pick(first, MCQ_FIELDS["choices"]) is not None
        kind = "mcq" if mcq or all(c in first for c in GPQA_COLUMNS) else "math"
    if kind not in ("math", "mcq"):
        raise UserError(f"kind must be 'auto', 'math' or 'mcq', got {kind!r}")
    fields = {"problem": problem_field, "answer": answer_field, "solution": solution_field, "choices": choices_field}
    if kind == "math":
        return [_math_problem(p, where, row, fields) for where, row in rows]
    return [_mcq_problem(p, where, row, fields, choice_seed) for where, row in rows]


# ------------------------------------------------------------------------------------- training prompts


class PromptStream:
    """Epoch-wise shuffled prompt order with a resumable position (epoch, index); every rank walks the same order
    and takes its own slice of each global batch."""

    def __init__(self, size: int, *, seed: int, shuffle: bool, epoch: int = 0, index: int = 0) -> None:
        self.size, self.seed, self.shuffle, self.epoch, self.index = size, seed, shuffle, epoch, index
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def load_prompts(path: str | Path, tokenizer: Tokenizer, **kwargs: Any) -> list[list[int]]:
    """The student's prompt ids of a training file: ``load_prompt_pairs`` without teacher prompts."""
    return load_prompt_pairs(path, tokenizer, **kwargs).student


@dataclass(frozen=True)
class PromptSet:
    """The kept rows of a training file: the student's prompt ids, the teacher's own prompt ids (None: the
    student's), and the name of each row's teacher (None: one teacher), all in the same order; ``chat``: whether
    the prompts went through the chat template (``data.text_as_chat``, or a conversation row), which the pre-flight's
    template checks need (the file is read once); ``messages``: each row's first messages, the conversation its
    prompt is rendered from (``vopd.prompts.prompt_messages``), kept for multi-turn episodes (``rollout.env``)."""

    student: list[list[int]]
    teacher: list[list[int]] | None = None
    routes: list[str] | None = None
    chat: bool = False
    messages: list[list[Message]] | None = None


def _route(row: dict[str, Any], field: str, names: Collection[str], where: str) -> str:
    """The row's teacher: the value of ``field``, one of ``names``, or a one-line error."""
    value = row.get(field)
    if value is None or value == "":
        raise UserError(f"{where}: no field {field!r} naming the row's teacher (data.teacher_field); set it to one of "
                        f"{sorted(names)}")
    if not isinstance(value, str) or value not in names:
        raise UserError(f"{where}: {field}={value!r} names no teacher of model.teachers ({sorted(names)}); fix the "
                        "row or add that teacher")
    return value


def training_rows(path: str | Path, messages_field: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a training file (``read_rows``); a csv row may lack only the conversation's cell (a row holds a
    conversation or a text)."""
    return read_rows(path, optional=(messages_field,))


def _text_chars(row: dict[str, Any], field: str, messages_field: str) -> int:
    """The characters of the text a row's prompt is rendered from (its conversation's contents, or its text field);
    0 when the row's shape is for ``vopd.prompts.row_prompts`` to judge."""
    messages = row.get(messages_field)
    if isinstance(messages, list):
        return sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    text = row.get(field)
    return len(text) if isinstance(text, str) else 0


def load_prompt_pairs(path: str | Path, tokenizer: Tokenizer, *, field: str, template: str, max_tokens: int,
                      long_prompts: str, log: Callable[[str], None], limit_name: str = "",
                      messages_field: str = "messages", chat: ChatOptions = ChatOptions(),
                      teacher: TeacherPrompts | None = None, route_field: str = "",
                      teacher_names: Collection[str] = (), keep_messages: bool = False) -> PromptSet:
    """Prompt ids of a training file (config keys ``data.*``), the teacher's own prompt ids per kept row when
    ``teacher`` is given, rendered by ``vopd.prompts.row_prompts`` (a row's conversation in ``messages_field`` or its
    text in ``field``), and with ``route_field`` each row's teacher, which must be one of ``teacher_names`` (checked
    for every row before training starts). Rows with a prompt longer than ``max_tokens`` are skipped (and counted)
    or refused, per ``long_prompts`` ("skip" or "error"). ``limit_name`` says in messages what sets ``max_tokens``
    (default: ``data.max_prompt_tokens=N``); ``keep_messages``: each kept row's first messages too."""
    limit_name = limit_name or f"data.max_prompt_tokens={max_tokens}"
    rows = training_rows(path, messages_field)
    kept: list[list[list[int]]] = []
    routes: list[str] = []
    firsts: list[list[Message]] = []
    skipped, checked = 0, RenderChecks(log)
    chatting = chat.text_as_chat
    # Tokenizing a huge line only to skip it cost 0.8 GB and 11 s for 2.2 MB: a text of more characters than the
    # limit times the longest token's is longer than the limit in any tokenization, so it is never tokenized.
    vocab = getattr(tokenizer, "get_vocab", None)  # every real tokenizer has it; a stand-in may not (no bound then)
    max_chars = max_tokens * max(1, max(map(len, vocab()))) if vocab is not None else float("inf")
    for where, row in rows:
        chatting = chatting or row.get(messages_field) not in (None, "")  # "": an empty csv cell
        route = _route(row, route_field, teacher_names, f"{path} {where}") if route_field else ""
        chars = _text_chars(row, field, messages_field)
        if chars > max_chars:
            if long_prompts == "error":
                raise UserError(f"{path} {where}: prompt of {chars} characters is longer than {limit_name} in any "
                                "tokenization; raise the limit or set data.long_prompts=skip")
            skipped += 1
            continue
        ids = row_prompts(row, tokenizer, field=field, messages_field=messages_field, template=template, chat=chat,
                          teacher=teacher, where=f"{path} {where}", checks=checked)
        if max(map(len, ids)) > max_tokens:
            if long_prompts == "error":
                raise UserError(f"{path} {where}: prompt has {max(map(len, ids))} tokens > {limit_name}; raise the "
                                "limit or set data.long_prompts=skip")
            skipped += 1
            continue
        kept.append(ids)
        routes.append(route)
        if keep_messages:  # the row's conversation, else its text (row_prompts has checked that it holds one)
            prompt = row[messages_field] if isinstance(row.get(messages_field), list) else row[field]
            firsts.append(prompt_messages(tokenizer, prompt, template=template, chat=chat, where=f"{path} {where}"))
    if skipped:
        log(f"skipped {skipped} of {len(rows)} prompts longer than {max_tokens} tokens")
    if not kept:
        raise UserError(f"no usable prompt in {path} (all {len(rows)} longer than {limit_name})")
    return PromptSet([k[0] for k in kept], None if teacher is None else [k[1] for k in kept],
                     routes if route_field else None, chatting, firsts if keep_messages else None)
