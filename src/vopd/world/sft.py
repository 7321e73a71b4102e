"""Supervised fine-tuning (SFT) of a causal LM on worked solutions, greedy evaluation, and the `vopd sft` command.

What it knows: turning ``{"problem", "solution"}`` rows (or ``messages`` conversations) into token ids with exactly
the rendering the sampler and the evaluator use (``vopd.prompts.encode_example`` with the run's ``ChatOptions``: with
``text_as_chat`` a problem is a user turn rendered by the chat template and its solution ends with the end-of-turn
token), a plain AdamW + cosine training loop with the loss on completion tokens only, and greedy accuracy with the
same rendering, ``vopd.sampling.generate`` and ``vopd.grading.grade_answer``.
What it does not know: how the tiny world is assembled or cached (``vopd.world.build``), distillation, or the estimators.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from vopd.prompts import ChatOptions, encode_example, render_prompt
from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer

IGNORE = -100  # label id ignored by the loss (prompt and padding positions)


@dataclass(frozen=True)
class SFTConfig:
    """One SFT run. The schedule is linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class SFTResult:
    """Per-step training losses, the wall-clock seconds spent in the loop (checks included), and whether
    ``stop_when`` ended it before ``config.steps``."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)


def encode_rows(tokenizer: Tokenizer, rows: Sequence[dict[str, Any]],
                chat: ChatOptions = ChatOptions()) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids ending in a stop token) per row, rendered exactly as sampling and evaluation
    render prompts with the same ``chat`` options (``vopd.prompts.encode_example``): a ``problem`` text and its
    ``solution`` (with ``chat.text_as_chat``: a user turn and the assistant's answer + the end-of-turn token), or a
    ``messages`` conversation whose final assistant turn is the completion (its earlier turns are context, never
    trained)."""
    out = []
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str):
            out.append(encode_example(tokenizer, messages[:-1], messages[-1]["content"], chat=chat, where=f"row {i}"))
            continue
        if not isinstance(row.get("problem"), str) or not isinstance(row.get("solution"), str):
            raise UserError(f"row {i}: needs string fields 'problem' and 'solution', or a 'messages' conversation "
                            "ending with the assistant turn to learn; fix the data file")
        out.append(encode_example(tokenizer, row["problem"], row["solution"], chat=chat, where=f"row {i}"))
    return out


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are the completion ids only (prompt and padding are ``IGNORE``)."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(model: Model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens (fp32 log-softmax)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1.
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
    )


def _lr_factor(step: int, config: SFTConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def train_sft(
    model: Model,
    tokenizer: Tokenizer,
    rows: Sequence[dict[str, Any]],
    config: SFTConfig = SFTConfig(),
    *,
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
    stop_when: Callable[[int], bool] | None = None,
    check_every: int = 25,
    chat: ChatOptions = ChatOptions(),
    examples: Sequence[Any] | None = None,
    collate_fn: Callable[[Sequence[Any], int], dict[str, torch.Tensor]] = collate,
) -> SFTResult:
    """Train ``model`` in place on ``rows`` (AdamW, cosine schedule, loss on completion tokens only).

    Batches are drawn by shuffling the rows epoch by epoch with ``config.seed``; results are deterministic for a
    given seed and thread count. ``stop_when(step)``, called every ``check_every`` steps (model in eval mode),
    ends training early when it returns True; the schedule stays the one planned for ``config.steps``. ``chat``:
    how rows are rendered (``encode_rows``), as the runs that sample from the model will render them.
    ``examples``: encoded examples to train on instead of ``rows`` (e.g. the tool world's multi-turn episodes,
    ``vopd.world.tool_sft``), batched by ``collate_fn`` into ``input_ids``, ``attention_mask`` and ``labels``.
    """
    if config.steps < 1 or config.batch_size < 1:
        raise UserError(f"SFT needs steps >= 1 and batch_size >= 1 (got {config.steps}, {config.batch_size})")
    if examples is None:
        examples = encode_rows(tokenizer, rows, chat)
    if not examples:
        raise UserError("SFT data is empty; pass a jsonl file with 'problem' and 'solution' rows")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    # Decay only matrices (not norms/biases), the usual convention.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    order: list[int] = []
    result = SFTResult()
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        batch_idx: list[int] = []
        while len(batch_idx) < config.batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch_idx.append(order.pop())
        batch = {k: v.to(device) for k, v in collate_fn([examples[i] for i in batch_idx], pad_id).items()}
        loss = completion_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        result.losses.append(loss.item())
        if log is not None and (step + 1) % log_every == 0:
            recent = result.losses[-log_every:]
            log(f"  sft step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.4f}"
                f"  ({time.perf_counter() - start:.0f}s)")
        if stop_when is not None and (step + 1) % check_every == 0 and step + 1 < config.steps:
            model.eval()
            stop = stop_when(step + 1)
            model.train()
            if stop:
                result.stopped_early = True
                break
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def greedy_accuracy(
    model: Model,
    tokenizer: Tokenizer,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 128,
    chat: ChatOptions = ChatOptions(),
) -> float:
    """Fraction of ``rows`` whose greedy completion's last ``\\boxed{}`` grades equal to ``row["answer"]``, the
    problems rendered with ``chat`` (``vopd.prompts.render_prompt``, as ``vopd eval`` renders them)."""
    from vopd.grading import grade_answer
    from vopd.sampling import generate

    if not rows:
        return float("nan")
    prompts = [render_prompt(tokenizer, r["problem"], chat=chat) for r in rows]
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    correct = sum(
        grade_answer(tokenizer.decode(ids, skip_special_tokens=True), str(r["answer"]))
        for ids, r in zip(samples.completions, rows)
    )
    return correct / len(rows)
