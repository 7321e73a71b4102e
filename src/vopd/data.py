"""Prompt formatting and tokenisation shared by SFT, rollouts and evaluation.

What it knows: the paper's prompt template (no chat template) and how a prompt and a completion become token ids,
so that SFT, the trainer and the evaluator see byte-identical prompts. What it does not know: models, grading,
the task generator. (Dataset loaders for local files are added here by the evaluation work.)
"""

from __future__ import annotations

from typing import Any

#: The authors' prompt, spec "training setup". ``{problem}`` is replaced literally (no str.format, so LaTeX braces
#: in problems and in ``\boxed{}`` need no escaping).
PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def format_prompt(problem: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt text for one problem."""
    return template.replace("{problem}", problem)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids: the tokenizer's special prefix (BOS) + the prompt's tokens. Completions are encoded separately
    (``encode_completion``) so no merge crosses the prompt/completion boundary: what SFT trains on is what the
    sampler continues from."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_completion(tokenizer: Any, completion: str, *, add_eos: bool = True) -> list[int]:
    """Completion ids, followed by EOS when ``add_eos``."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set one (tokenizer.eos_token = ...) and save it again")
        ids.append(tokenizer.eos_token_id)
    return ids
