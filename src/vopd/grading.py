"""Answer extraction and grading for math answers (last ``\\boxed{}``) and multiple choice (a JSON letter).

What it knows: how to find the answer in a completion, how to decide whether two math answers are the same (the
symbolic verifier math-verify first, then a normalised-string comparison), how to bound the verifier's time per
answer from any thread, and how to read ``{"answer": "C"}`` out of free text. What it does not know: models,
sampling, datasets, or how grades are aggregated into Avg@n / Pass@n / Maj@n (``vopd.eval``).

Timeouts. math-verify's own timeouts use ``signal.alarm``, which only works in the main thread; called from any
other thread it raises. So: in the main thread (POSIX) we pass our timeout to math-verify; elsewhere we run
math-verify with its timeouts off inside a helper daemon thread and wait at most ``timeout_s`` for it. A helper that
overruns is abandoned (Python cannot kill a thread), it finishes in the background, and that comparison falls back
to the normalised-string result. Either way a grade never takes much longer than the timeout.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Literal

logger = logging.getLogger(__name__)

#: Seconds allowed to each symbolic comparison (parsing both answers and verifying).
DEFAULT_TIMEOUT_S = 5.0
#: Answers longer than this skip the symbolic verifier (sympy can take minutes on huge expressions).
MAX_SYMBOLIC_CHARS = 1000

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


# ---------------------------------------------------------------------------------------------------------------
# extraction


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or None.

    Braces are balanced, so ``\\boxed{\\frac{1}{\\sqrt{2}}}`` gives ``\\frac{1}{\\sqrt{2}}``. An unclosed last box
    (a truncated completion) is skipped in favour of the last closed one.
    """
    best: str | None = None
    for match in _BOXED.finditer(text):
        depth, i = 1, match.end()
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    best = text[i:j]  # later starts win: the last box is the answer
                    break
    return best


def extract_choice(text: str) -> str | None:
    """The letter of the last JSON object in ``text`` that has an ``"answer"`` key, upper-cased, or None.

    The object must be valid JSON (``{'answer': 'C'}`` is not) and its answer a single letter A-Z (``"c"`` counts as
    C). Nested objects and braces inside strings are handled by decoding with ``json`` from each ``{``.
    """
    decoder = json.JSONDecoder()
    pos = len(text)
    while True:
        pos = text.rfind("{", 0, pos)
        if pos < 0:
            return None
        try:
            obj, _ = decoder.raw_decode(text, pos)
        except ValueError:
            continue
        if isinstance(obj, dict):
            key = next((k for k in obj if isinstance(k, str) and k.strip().lower() == "answer"), None)
            if key is not None:
                value = obj[key]
                if isinstance(value, str) and re.fullmatch(r"\s*[A-Za-z]\s*", value):
                    return value.strip().upper()
                return None  # the last answer object is the answer, even when its value is not a letter


def extract_answer(text: str, kind: Literal["math", "mcq"] = "math") -> str | None:
    """The answer a completion gives: the last boxed expression (math) or the JSON letter (mcq)."""
    return extract_boxed(text) if kind == "math" else extract_choice(text)


# ---------------------------------------------------------------------------------------------------------------
# normalised-string fallback

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DROP = [r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\qquad", r"\quad", "\\ "]


def normalize_answer(answer: str) -> str:
    """A canonical string for comparing answers when the symbolic verifier cannot decide.

    Removes what does not change the value: ``$``, whitespace, ``\\left``/``\\right``, spacing commands,
    ``\\displaystyle``, degree signs, ``%``, a trailing ``.``, thousands separators, a leading ``x=``; maps
    ``\\dfrac``/``\\tfrac`` to ``\\frac``, ``\\frac12`` to ``\\frac{1}{2}``, U+2212 to ``-``, ``(C)`` to ``C``;
    drops ``\\text{...}`` units after a value and unwraps ``\\text{...}`` elsewhere; writes decimals canonically
    (``2.50`` -> ``2.5``, ``.5`` -> ``0.5``, ``3.0`` -> ``3``). Case is kept.
    """
    s = str(answer).strip().replace("\u2212", "-").replace("\\$", "").replace("$", "")
    for token in _DROP:
        s = re.sub(re.escape(token) + (r"(?![A-Za-z])" if token[-1].isalpha() else ""), "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\%|%", "", s)

    def text_cmd(m: re.Match[str]) -> str:
        # "10\text{ cm}": a word after a value is a unit; "\text{Evelyn}" alone is the answer itself.
        before = s[: m.start()].strip()
        return "" if before and re.fullmatch(r"[A-Za-z\s.]*", m.group(1)) else m.group(1)

    while (m := _TEXT_CMD.search(s)) is not None:
        s = s[: m.start()] + text_cmd(m) + s[m.end() :]
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"[A-Za-z]=[^=]+", s):
        s = s[2:]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"\([A-Za-z]\)", s):
        s = s[1:-1]
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        try:
            d = Decimal(s)
            s = "0" if d == 0 else format(d.normalize(), "f")
        except InvalidOperation:
            pass
    return s


# ---------------------------------------------------------------------------------------------------------------
# symbolic comparison with a timeout from any thread


def _in_main_thread() -> bool:
    return os.name == "posix" and threading.current_thread() is threading.main_thread()


def _as_latex(answer: str) -> str:
    # math-verify extracts from LaTeX environments; a bare "\frac{1}{2}" or "-7" is wrapped as inline math.
    return "$" + str(answer).strip().strip("$") + "$"


@functools.lru_cache(maxsize=8192)
def _parse(answer: str, timeout: int | None) -> tuple[Any, ...]:
    # Cached: the gold is graded n times per problem, and Maj@n compares the same answers pairwise.
    from math_verify import parse

    return tuple(parse(_as_latex(answer), parsing_timeout=timeout))


def _symbolic_equal_now(gold: str, pred: str, timeout: int | None) -> bool:
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold, timeout), _parse(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout))


def _run_with_deadline(fn: Callable[[], bool], timeout_s: float) -> bool | None:
    """``fn()`` in a daemon thread, or None if it has not finished after ``timeout_s`` (or raised)."""
    box: list[bool] = []

    def target() -> None:
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001 - a verifier crash is a failed comparison, never a crashed evaluation
            logger.debug("math-verify raised", exc_info=True)

    helper = threading.Thread(target=target, name="vopd-grading", daemon=True)
    helper.start()
    helper.join(timeout_s)
    if helper.is_alive():
        logger.warning("math-verify took over %.1fs; using the string comparison for this answer", timeout_s)
        return None
    return box[0] if box else None


def symbolic_equal(gold: str, pred: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """math-verify's verdict on ``pred`` against ``gold`` (False on parse failure, error or timeout).

    ``timeout_s=None`` disables the timeout. Safe to call from any thread (see the module docstring).
    """
    if not gold.strip() or not pred.strip() or max(len(gold), len(pred)) > MAX_SYMBOLIC_CHARS:
        return False
    if timeout_s is not None and not _in_main_thread():
        return bool(_run_with_deadline(lambda: _symbolic_equal_now(gold, pred, None), timeout_s))
    seconds = None if timeout_s is None else max(1, math.ceil(timeout_s))  # signal.alarm counts whole seconds
    try:
        return _symbolic_equal_now(gold, pred, seconds)
    except Exception:  # noqa: BLE001 - see _run_with_deadline
        logger.debug("math-verify raised", exc_info=True)
        return False


def answers_match(pred: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """True when two extracted math answers are the same: normalised strings equal, or math-verify agrees."""
    pred, gold = str(pred), str(gold)
    norm_pred = normalize_answer(pred)
    if not norm_pred:
        return False
    # The cheap check first: equal strings need no sympy (and cannot time out).
    if norm_pred == normalize_answer(gold):
        return True
    return symbolic_equal(gold, pred, timeout_s=timeout_s)


# ---------------------------------------------------------------------------------------------------------------
# grading a completion


def grade_answer(completion: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """True when the completion's last ``\\boxed{}`` answer equals ``gold`` (math-verify or normalised string).

    No ``\\boxed{}`` -> False. Never raises on odd completions.
    """
    pred = extract_boxed(completion)
    return pred is not None and answers_match(pred, str(gold), timeout_s=timeout_s)


def grade_choice(completion: str, gold: str) -> bool:
    """True when the completion's JSON answer letter equals the gold letter (case-insensitive).

    Malformed JSON, a missing ``answer`` key or a value that is not one letter -> False, never an exception.
    """
    letter = extract_choice(completion)
    return letter is not None and letter == str(gold).strip().strip("()").upper()


def grade(
    completion: str, gold: str, kind: Literal["math", "mcq"] = "math", *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> bool:
    """``grade_answer`` for ``kind="math"``, ``grade_choice`` for ``kind="mcq"``."""
    if kind == "math":
        return grade_answer(completion, gold, timeout_s=timeout_s)
    if kind == "mcq":
        return grade_choice(completion, gold)
    raise ValueError(f"kind must be 'math' or 'mcq', got {kind!r}")
