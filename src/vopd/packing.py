"""Packed rollouts: a micro-batch's sequences concatenated into one row, without padding (``packing: true``).

A packed ``Rollout`` has one row of the sequences back to back, ``position_ids`` restarting at 0 for each and
``starts`` saying where each begins. The model runs it through transformers' own packed-sequence support (the
attention mask left out, the positions given: ``vopd.models.last_hidden``), so attention never crosses a sequence
boundary. The targets grid is the row's own (``targets[0, t] = input_ids[0, t + 1]``): every completion target of a
sequence keeps its place relative to the sequence's start, and the one position per boundary that predicts the next
sequence's first token is never in ``loss_mask``. Every estimator is a sum over masked positions divided by the
global token count (docs/estimators.md), so packed and padded give the same loss and gradients up to float order.

What it knows: building the packed form of a padded rollout and back (``Rollout.take`` takes some of a packed
rollout's sequences, ``Rollout.pick`` their positions of a tensor on its grid), and moving
per-position tensors between the two grids by completion positions (``regrid``: a teacher that only reads padded
rows, a server or one with a prompt of its own, scores the padded form and its answer is moved onto the packed grid).
What it does not know: models, attention implementations (``vopd.models.check_packing`` proves a family packs), the
loss, or which sequences share a micro-batch (``vopd.batching``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from vopd.rollout import Rollout


def pack_rows(r: Rollout) -> Rollout:
    """The padded rollout ``r``'s sequences, in order, packed into one row."""
    if r.packed:
        return r
    spans = r.spans()
    ids = torch.cat([r.input_ids[i, :n] for i, _s, n in spans])
    pos = torch.cat([torch.arange(n, device=r.input_ids.device) for _i, _s, n in spans])
    starts = tuple(int(x) for x in torch.tensor([0] + [n for _i, _s, n in spans[:-1]]).cumsum(0))
    grid = ids.shape[0] - 1
    loss_mask = torch.zeros(grid, dtype=r.loss_mask.dtype, device=r.loss_mask.device)
    logprobs = torch.zeros(grid, dtype=r.sampler_logprobs.dtype, device=r.sampler_logprobs.device)
    for (i, _s, n), start in zip(spans, starts):
        width = min(n - 1, grid - start)  # a sequence's targets: its own positions 0..n-2
        loss_mask[start:start + width] = r.loss_mask[i, :width]
        logprobs[start:start + width] = r.sampler_logprobs[i, :width]
    return dataclasses.replace(
        r, input_ids=ids.unsqueeze(0), attention_mask=torch.ones_like(ids).unsqueeze(0), targets=ids[1:].unsqueeze(0),
        loss_mask=loss_mask.unsqueeze(0), sampler_logprobs=logprobs.unsqueeze(0), position_ids=pos.unsqueeze(0),
        starts=starts)


def unpack(r: Rollout, pad_id: int) -> Rollout:
    """The packed rollout ``r`` as right-padded rows (one per sequence, width: the longest)."""
    if not r.packed:
        return r
    spans = r.spans()
    width = max(2, max(n for _r, _s, n in spans))
    b = len(spans)
    device = r.input_ids.device
    input_ids = torch.full((b, width), pad_id, dtype=r.input_ids.dtype, device=device)
    attention = torch.zeros((b, width), dtype=r.attention_mask.dtype, device=device)
    loss_mask = torch.zeros((b, width - 1), dtype=r.loss_mask.dtype, device=device)
    logprobs = torch.zeros((b, width - 1), dtype=r.sampler_logprobs.dtype, device=device)
    grid = r.targets.shape[1]
    for i, (_row, s, n) in enumerate(spans):
        input_ids[i, :n] = r.input_ids[0, s:s + n]
        attention[i, :n] = 1
        w = min(n - 1, grid - s)
        loss_mask[i, :w] = r.loss_mask[0, s:s + w]
        logprobs[i, :w] = r.sampler_logprobs[0, s:s + w]
    return dataclasses.replace(r, input_ids=input_ids, attention_mask=attention, targets=input_ids[:, 1:].clone(),
                               loss_mask=loss_mask, sampler_logprobs=logprobs, position_ids=None, starts=None)


def regrid(x: Tensor, src: tuple[Tensor, Tensor], dst: tuple[Tensor, Tensor], lead: tuple[int, ...]) -> Tensor:
    """A (B, T_src, ...) tensor's values at positions ``src`` (rows, positions) copied to ``dst`` of a zero
    (*lead, ...) tensor: per-position scores moved between two grids of the same completion tokens."""
    out = torch.zeros(lead + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    out[dst[0].to(x.device), dst[1].to(x.device)] = x[src[0].to(x.device), src[1].to(x.device)]
    return out
