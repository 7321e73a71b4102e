"""Answer extraction and grading: equivalent forms, wrong answers, missing answers, JSON letters, threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vopd import grading
from vopd.grading import (
    answers_match,
    extract_boxed,
    extract_choice,
    grade,
    grade_answer,
    grade_choice,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"first \boxed{3}, then \boxed{4}", "4"),  # the last box is the answer
        (r"\boxed{5} and a truncated \boxed{\frac{1", "5"),  # an unclosed last box is skipped
        (r"\fbox{7}", "7"),
        ("the answer is 42", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{0.5}", "1/2"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{1/2}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{1}{2}}", r"$\frac12$"),
        (r"\boxed{42}", "42"),
        (r"\boxed{42}", 42),  # int gold from a json file
        (r"\boxed{-7}", "-7"),
        ("\\boxed{\u22127}", "-7"),  # decided: U+2212 MINUS SIGN is a minus
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{10\text{ cm}}", "10"),
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{x = 3}", "3"),
        (r"\boxed{\left(1, 2\right)}", "(1,2)"),
        (r"\boxed{\text{(C)}}", "C"),
    ],
)
def test_equivalent_forms_match(completion: str, gold: str) -> None:
    assert grade_answer(completion, gold)


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{7}", "-7"),
        (r"\boxed{0.6}", "1/2"),
        (r"\boxed{43}", "42"),
        (r"\boxed{2x}", "2"),
        ("the answer is 42", "42"),  # no \boxed{}
        (r"\boxed{}", "42"),
        (r"\boxed{42} ... on reflection \boxed{41}", "42"),  # the last box counts
    ],
)
def test_wrong_or_missing_answers_fail(completion: str, gold: str) -> None:
    assert not grade_answer(completion, gold)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"10\text{ cm}", "10"),
        (r"\text{Evelyn}", "Evelyn"),
        ("1,000", "1000"),
        ("2.50", "2.5"),
        (".5", "0.5"),
        ("3.0", "3"),
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"90^\circ", "90"),
        (r"50\%", "50"),
        ("\u22127.", "-7"),
        (r"$\$5$", "5"),
        (r"\rightarrow", r"\rightarrow"),  # \right is dropped only as a delimiter, never inside a longer command
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_string_fallback_decides_when_the_verifier_says_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "symbolic_equal", lambda *a, **k: False)
    assert answers_match(r"\left(1,2\right)", "(1, 2)")
    assert answers_match(r"\dfrac{3}{4}", r"\frac34")
    assert not answers_match("0.5", "1/2")  # only the verifier knows these are equal


def test_verifier_errors_are_a_failed_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> bool:
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(grading, "_symbolic_equal_now", boom)
    assert not grade_answer(r"\boxed{0.5}", "1/2")
    assert grade_answer(r"\boxed{0.50}", "0.5")  # the string fallback still works


def test_grading_from_worker_threads_agrees_with_main_thread() -> None:
    cases = [(r"\boxed{0.5}", "1/2"), (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"), (r"\boxed{3}", "4")]
    grading._parse.cache_clear()  # parse again inside the threads (math-verify's signals would raise there)
    with ThreadPoolExecutor(max_workers=2) as pool:
        in_threads = list(pool.map(lambda c: grade_answer(*c), cases))
    assert in_threads == [True, True, False]
    assert [grade_answer(*c) for c in cases] == in_threads


def test_worker_thread_timeout_bounds_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(gold: str, pred: str, timeout: int | None) -> bool:
        time.sleep(2.0)
        return True

    monkeypatch.setattr(grading, "_symbolic_equal_now", slow)
    out: list[tuple[bool, float]] = []

    def worker() -> None:
        t0 = time.perf_counter()
        out.append((grade_answer(r"\boxed{0.5}", "1/2", timeout_s=0.2), time.perf_counter() - t0))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    correct, elapsed = out[0]
    assert not correct and elapsed < 1.5


@pytest.mark.parametrize(
    ("completion", "letter"),
    [
        ('Reasoning... {"answer": "C"}', "C"),
        ('```json\n{"answer": "b"}\n```', "B"),
        ('{"answer": "A"} no wait {"answer": "D"}', "D"),
        ('{"answer": "B", "why": {"note": "}"}}', "B"),  # nested object, a brace inside a string
        ("{'answer': 'C'}", None),  # not JSON
        ('{"answer": "C"', None),  # unclosed
        ('{"answer": "CD"}', None),
        ('{"answer": 3}', None),
        ('{"choice": "C"}', None),
        ("{{{ }}} {", None),
        ("the answer is C", None),
    ],
)
def test_extract_choice(completion: str, letter: str | None) -> None:
    assert extract_choice(completion) == letter


def test_grade_choice() -> None:
    assert grade_choice('{"answer": "C"}', "C")
    assert grade_choice('{"answer": "c"}', "(C)")
    assert not grade_choice('{"answer": "B"}', "C")
    assert not grade_choice("{answer: C}", "C")  # malformed JSON is wrong, never an exception
    assert grade('{"answer": "A"}', "A", "mcq") and grade(r"\boxed{2}", "2", "math")
    with pytest.raises(ValueError):
        grade("x", "y", "essay")  # type: ignore[arg-type]
