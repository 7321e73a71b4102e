"""Packed attention without the quadratic mask: SDPA run per sequence of a packed row.

transformers' own packed-sequence support (``position_ids`` without an attention mask, ``use_cache=False``) keeps
packed sequences apart with a block-diagonal causal mask: correct, but SDPA then attends over the whole row (N^2 for
a row of N tokens, where padded rows cost the sum of each row's square) and can use none of its fused causal
kernels. flash-attention's variable-length path avoids that where it is installed; where it is not, a model loaded
with ``sdpa`` is given ``vopd_packed`` (``use_packed_attention``): for a packed forward (``segment_bounds`` passed
by ``vopd.models.last_hidden``) it runs SDPA causally on each sequence's own queries, keys and values; every other
call (padded rows, generation with a cache, a layer with a sliding window or logit softcapping, which need the
mask) is plain SDPA with the mask transformers built. The pre-flight checks the result against padded rows on the
real models (``vopd.models.packing_error``).

What it knows: transformers' attention and mask interfaces, sequence boundaries from packed positions. What it does
not know: rollouts, the loss, or which models a run packs (``vopd.check.batching_checks`` decides).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch
from torch import Tensor, nn

NAME = "vopd_packed"
_REGISTERED = False


def segment_bounds(position_ids: Tensor) -> list[int]:
    """[0, start of sequence 2, ..., N] of a packed row (1, N) whose positions restart at 0 for each sequence."""
    starts = (position_ids[0] == 0).nonzero().squeeze(-1).tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, int(position_ids.shape[1])]


def _packed_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 *, vopd_segments: list[int] | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (vopd_segments is None or len(vopd_segments) <= 2 or query.shape[0] != 1
             or query.shape[2] != key.shape[2] or kwargs.get("sliding_window") is not None
             or kwargs.get("softcap") is not None)
    if plain or vopd_segments is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out, None
    # Sequences of one length run as one batch (one kernel call); the stacked copies are contiguous, which CPU SDPA
    # with grouped KV heads needs (it misreads strided views: measured, wrong outputs).
    spans = list(zip(vopd_segments[:-1], vopd_segments[1:]))
    by_length: dict[int, list[tuple[int, int]]] = {}
    for s, e in spans:
        by_length.setdefault(e - s, []).append((s, e))
    pieces: dict[int, Tensor] = {}
    for same in by_length.values():
        q, k, v = (torch.cat([x[:, :, s:e] for s, e in same]) for x in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)  # (n, L, H, D)
        for j, (s, _e) in enumerate(same):
            pieces[s] = out[j:j + 1]
    return torch.cat([pieces[s] for s, _e in spans], dim=1), None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, _packed_sdpa)
    AttentionMaskInterface.register(NAME, _mask)  # SDPA's mask, for a plain call and a layer that delegates
    _REGISTERED = True


def implementation(model: nn.Module) -> str:
    """The attention implementation ``model`` runs (transformers' name; eager when it does not say)."""
    return str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "eager")


def use_packed_attention(model: nn.Module) -> bool:
    """Give a model that runs ``sdpa`` the per-sequence packed attention (the same as SDPA for every call that is
    not a packed forward); whether it now runs it (another implementation is left as it is: flash-attention packs by
    itself, eager through the mask)."""
    if implementation(model) == NAME:
        return True
    if implementation(model) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    getattr(model, "set_attn_implementation")(NAME)  # a transformers model's method (nn.Module's stubs lack it)
    return True


#: Set while a packed forward of a model without sliding windows runs: its (block-diagonal, N^2) mask is not built.
_NO_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar("vopd_packed_no_mask", default=False)


def _windowed(config: Any) -> bool:
    """Whether some layer of the model ``config`` describes attends within a sliding window (it needs the mask)."""
    if config is None:
        return True
    layers = getattr(config, "layer_types", None) or ()
    return any("sliding" in str(t) for t in layers) or (getattr(config, "sliding_window", None) is not None and
                                                        getattr(config, "use_sliding_window", True))


def _mask(*args: Any, **kwargs: Any) -> Tensor | None:
    from transformers.masking_utils import sdpa_mask

    if _NO_MASK.get():
        return None  # every layer attends per sequence (``_packed_sdpa``): nothing reads a mask
    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def packed_forward(model: nn.Module, position_ids: Tensor) -> Iterator[dict[str, Any]]:
    """Around a packed forward of ``model``: what it passes down to the attention (the sequence bounds when the model
    runs ``vopd_packed``; nothing otherwise: another implementation reads the positions), and no mask built when no
    layer needs one."""
    if implementation(model) != NAME:
        yield {}
        return
    token = _NO_MASK.set(not _windowed(getattr(model, "config", None)))
    try:
        yield {"vopd_segments": segment_bounds(position_ids)}
    finally:
        _NO_MASK.reset(token)
