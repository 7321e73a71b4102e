"""Answer grading (placeholder: exact match on the last \\boxed{} answer).

To be replaced by the evaluation work with math-verify grading, a normalised-string fallback and a timeout.
The public functions below keep their names and signatures.
"""

from __future__ import annotations


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def grade_answer(completion: str, gold: str) -> bool:
    """True when the completion's last boxed answer equals ``gold``."""
    pred = extract_boxed(completion)
    return pred is not None and pred.strip() == str(gold).strip()
