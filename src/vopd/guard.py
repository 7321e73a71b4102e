"""The divergence guard: what makes a training step bad, decided before its update is applied, and the aborts.

A step is bad when its loss or gradient norm is non-finite, or when the update AdamW *would* apply leaves
non-finite weights or moves them by more than ``optim.max_update_ratio`` times their norm (‖Δθ‖ / ‖θ‖ over every
trainable weight: an exploding update, e.g. from a learning rate orders of magnitude too large, whose loss and
gradient were still finite). The update is predicted, not applied and undone: AdamW's rule is evaluated from the
gradients and the optimizer's moments in chunks, without writing anything, so a bad step costs no copy of the
weights or optimizer states and a good one is applied by ``optimizer.step()`` exactly as before. A bad step is
skipped by the caller (no update), counted and reported; checkpoints are never written after one.

What it knows: AdamW's update rule (torch.optim.AdamW, incl. ``amsgrad``/``maximize``) and the optimizer's state
layout, FSDP2 shards (local shards, sums all-reduced), and how torch's samplers fail on a broken distribution
(``torch.multinomial``: "probability tensor contains either inf, nan or element < 0"), which it turns into a
one-line ``TrainingAborted`` naming the last good checkpoint. What it does not know: the loop, metrics, files.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from vopd import distributed as dist
from vopd.errors import UserError

#: Elements per chunk of the predicted update: bounds its temporaries (a few fp32 copies of 16 MiB).
_CHUNK = 1 << 22
#: What a sampler raises on a distribution with inf/nan (torch.multinomial; vLLM and others say nan/inf too).
_BROKEN_DISTRIBUTION = re.compile(r"\b(inf|nan)\b|`(inf|nan)`", re.IGNORECASE)


class TrainingAborted(UserError):
    """The run stopped on purpose: too many bad steps in a row, or a student too broken to sample from."""


@dataclass(frozen=True)
class StepVerdict:
    """Whether a step's update may be applied; ``reason`` says why not. ``update_ratio`` is ‖Δθ‖ / ‖θ‖ of the
    update AdamW would apply (NaN when it was not predicted: a non-finite loss or gradient)."""

    ok: bool
    update_ratio: float
    reason: str = ""


def judge_step(loss: float, grad_norm: float, optimizer: torch.optim.Optimizer, *, strategy: str,
               max_update_ratio: float) -> StepVerdict:
    """The verdict on a step whose (clipped) gradients sit in the parameters, before ``optimizer.step()``.
    ``max_update_ratio`` 0 turns the ratio limit off (non-finite weights are still refused). Every rank calls it
    and gets the same verdict (under FSDP2 the sums are all-reduced)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return StepVerdict(False, math.nan, f"non-finite loss ({loss}) or gradient norm ({grad_norm})")
    update_sq, weight_sq, new_sq = predicted_update_norms(optimizer, strategy=strategy)
    ratio = math.sqrt(update_sq / weight_sq) if weight_sq > 0 else (0.0 if update_sq == 0 else math.inf)
    if not (math.isfinite(new_sq) and math.isfinite(update_sq)):
        return StepVerdict(False, ratio, "the update would make the weights non-finite")
    if max_update_ratio > 0 and ratio > max_update_ratio:
        return StepVerdict(False, ratio, f"the update would move the weights by {ratio:.3g} times their norm "
                                         f"(optim.max_update_ratio={max_update_ratio:g})")
    return StepVerdict(True, ratio)


@torch.no_grad()
def predicted_update_norms(optimizer: torch.optim.Optimizer, *, strategy: str = "single") -> tuple[float, float, float]:
    """(‖Δθ‖², ‖θ‖², ‖θ + Δθ‖²) of the update ``optimizer.step()`` would apply now, over every parameter with a
    gradient, summed in float64 (a non-finite new weight makes the last one non-finite). The optimizer must be
    ``torch.optim.AdamW`` (or ``Adam``: weight decay then acts through the gradient). Nothing is modified."""
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
        raise TypeError(f"the update of {type(optimizer).__name__} cannot be predicted; use torch.optim.AdamW")
    sums: torch.Tensor | None = None
    for group in optimizer.param_groups:
        lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            t = float(state["step"]) + 1 if "step" in state else 1.0
            step_size, bc2_sqrt = lr / (1 - beta1**t), math.sqrt(1 - beta2**t)
            weights = _flat(p)
            parts = [weights, _flat(p.grad)] + [_flat(state[k]) if k in state else None
                                                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
            for lo in range(0, weights.numel(), _CHUNK):
                w, g, m, v, v_max = (x[lo:lo + _CHUNK].float() if x is not None else None for x in parts)
                assert w is not None and g is not None
                if group.get("maximize", False):
                    g = -g
                if wd and not decoupled:
                    g = g + wd * w
                m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
                v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
                if group.get("amsgrad", False) and v_max is not None:
                    v = torch.maximum(v_max, v)
                delta = -step_size * m / (v.sqrt() / bc2_sqrt + eps)
                if wd and decoupled:
                    delta = delta - lr * wd * w
                new = w + delta
                chunk = torch.stack([delta.double().square().sum(), w.double().square().sum(),
                                     new.double().square().sum()])
                sums = chunk if sums is None else sums + chunk
    if sums is None:
        return 0.0, 0.0, 0.0
    if strategy == "fsdp2":  # each rank saw its shards only
        sums = dist.all_reduce_sum(sums)
    update_sq, weight_sq, new_sq = (float(x) for x in sums.cpu())
    return update_sq, weight_sq, new_sq


def _flat(x: torch.Tensor) -> torch.Tensor:
    """The local values of a tensor (an FSDP2 DTensor's own shard), flattened."""
    local = x.to_local() if hasattr(x, "to_local") else x
    return local.detach().reshape(-1)


def bad_steps_abort(bad_in_a_row: int, max_bad_steps: int, reason: str, last_checkpoint: Path | None
                    ) -> TrainingAborted:
    """The error that ends a run after more than ``max_bad_steps`` bad steps in a row."""
    return TrainingAborted(f"{bad_in_a_row} consecutive bad steps (max_bad_steps={max_bad_steps}; the last: "
                           f"{reason}); {_last_good(last_checkpoint)}; lower optim.lr or check the models for NaN "
                           "weights")


@contextlib.contextmanager
def sampling_failures(step: int, last_checkpoint: Path | None) -> Iterator[None]:
    """Turn a sampler's failure on a broken student (its distribution holds inf/nan) into a one-line abort."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if not _BROKEN_DISTRIBUTION.search(first):
            raise
        raise TrainingAborted(f"step {step}: sampling from the student failed ({first[:120]}): its weights have "
                              f"diverged; {_last_good(last_checkpoint)}; lower optim.lr (or optim.max_update_ratio) "
                              "and resume from it") from None


def _last_good(last_checkpoint: Path | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written"
    return f"the last good checkpoint is {last_checkpoint} (--resume-from {last_checkpoint})"
