"""An output layer as the fused head sees it: weight, bias, the transform from raw to final logits, and how a chunk
of rows' logits is formed (shared by the fused head, the student's top-k ids and the teacher server).

What it knows: a model's final logits are ``transform(h @ W.T + b)``, where the transform is the identity for most
decoders and, for some families, a positive scaling s·z (Granite divides by ``config.logits_scaling``, Cohere
multiplies by ``logit_scale``) followed by final-logit softcapping c·tanh(z/c) (Gemma 2). Both are monotone, so
top-k ids are unchanged in exact arithmetic, and their derivative is elementwise, so the fused head's closed-form
gradient w.r.t. the raw logits is its gradient w.r.t. the final logits times
    d/dz c·tanh(s·z/c) = s·(1 - tanh²(s·z/c)) = s·(1 - (z'/c)²),   z' the final logit,
which needs only the final logits (docs/estimators.md, "Output transforms"). It also sizes chunks of rows from a
memory budget (``chunk_rows``) and forms a chunk's raw logits in the compute dtype (``raw_logits``). What it does not
know: where a transform comes from (``vopd.models.output_layer`` reads a model's config), or any loss math
(``vopd.loss.chunked``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from vopd.loss.estimators import compute_dtype


@dataclass(frozen=True)
class LogitTransform:
    """final = softcap·tanh(scale·raw / softcap), or scale·raw when ``softcap`` is None. The identity by default."""

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"logit scale must be a positive finite number, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"logit softcap must be a positive finite number or None, got {self.softcap}")

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def describe(self) -> str:
        parts = [] if self.scale == 1.0 else [f"logits x {self.scale:g}"]
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}·tanh(z/{self.softcap:g})")
        return ", ".join(parts) or "none"

    def apply_(self, z: Tensor) -> Tensor:
        """The final logits, computed in ``z``'s buffer (raw logits in, final logits out; returns ``z``)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)  # the order transformers' Gemma 2 uses
        return z

    def __call__(self, z: Tensor) -> Tensor:
        """The final logits of raw logits ``z`` (out of place; differentiable, for the dense reference)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def derivative(self, final: Tensor) -> Tensor | float:
        """d final / d raw, elementwise, from the final logits: a (rows, V) tensor under softcapping, else the
        scalar ``scale``."""
        if self.softcap is None:
            return self.scale
        return (final / self.softcap).square_().neg_().add_(1.0).mul_(self.scale)


#: No transform: final logits = h @ W.T + b.
IDENTITY = LogitTransform()


@dataclass(frozen=True)
class OutputHead:
    """A model's output layer sliced to the tokenizer: weight (V, D), bias (V,) or None, and its logit transform."""

    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform = field(default=IDENTITY)

    def logits(self, hidden: Tensor) -> Tensor:
        """The final logits (..., V) of ``hidden`` (..., D), differentiable, in the weight's dtype."""
        z = hidden @ self.weight.t()
        return self.transform(z if self.bias is None else z + self.bias)


# fp32 (rows x V) buffers alive per chunk: student logits/probabilities, teacher logits/difference, and one for
# matmul and top-k temporaries. A softcapped student keeps one more: its transform's derivative.
_BUFFERS_PER_ROW = 3


def buffers_for(transform: LogitTransform) -> int:
    """The (rows x V) buffers a chunk keeps alive for a student with ``transform``."""
    return _BUFFERS_PER_ROW + (transform.softcap is not None)


def chunk_rows(vocab_size: int, memory_budget_mb: float, *, itemsize: int = 4, multiple: int = 8,
               buffers: int = _BUFFERS_PER_ROW) -> int:
    """Rows per chunk so that the chunk's ``buffers`` vocabulary-sized buffers fit in ``memory_budget_mb``.

    Chosen from memory, not from a fixed row rule: bigger chunks mean fewer, larger (faster) matmuls.
    """
    rows = int(memory_budget_mb * 2**20 // (vocab_size * itemsize * buffers))
    return max(multiple, rows // multiple * multiple)


#: Set only by ``vopd.memplan`` (``as_cuda``): it traces a step on fake CPU tensors that stand for CUDA ones (FSDP2
#: cannot run on fake CUDA tensors without a GPU), and the head's CUDA path keeps other buffers than its CPU path.
_AS_CUDA = False


@contextlib.contextmanager
def as_cuda() -> Iterator[None]:
    """Inside the block the head takes its CUDA path on CPU tensors too (``fp32_accumulating``): for the memory
    plan's fake tensors only; on real CPU tensors the half matmul with fp32 output may not exist."""
    global _AS_CUDA
    before, _AS_CUDA = _AS_CUDA, True
    try:
        yield
    finally:
        _AS_CUDA = before


def fp32_accumulating(t: Tensor) -> bool:
    """Whether the head multiplies half ``t`` straight into fp32 (CUDA's path: no fp32 copy of the output layer)
    instead of converting it to fp32 first (elsewhere)."""
    return (t.is_cuda or _AS_CUDA) and t.dtype in (torch.bfloat16, torch.float16)


def raw_logits(h: Tensor, w: Tensor, b: Tensor | None, cd: torch.dtype) -> Tensor:
    """Raw logits h @ w.T (+ b) in ``cd``. On CUDA with half inputs, accumulate the matmul straight into fp32
    (docs/estimators.md, "Pseudocode": rounding logits to bf16 first costs ~1e-2 nats); elsewhere ``w`` already
    arrives in ``cd``."""
    if fp32_accumulating(h) and cd == torch.float32:
        z = torch.mm(h, w.t(), out_dtype=torch.float32)
    else:
        z = h.to(cd) @ w.t()
    return z if b is None else z + b.to(cd)


@torch.no_grad()
def student_topk_ids(student_hidden: Tensor, student_weight: Tensor, mask: Tensor, k: int, *,
                     bias: Tensor | None = None, memory_budget_mb: float = 1024,
                     transform: LogitTransform = IDENTITY) -> Tensor:
    """The student's top-k ids (B, T, k) int64 at masked positions (0 elsewhere), in the head's own chunks (same
    rows per chunk for the same budget), so no (B, T, V) tensor exists and the ids are the ones the head would pick.
    A teacher that sends per-token numbers is asked about these ids (``TeacherNumbers.topk_ids``)."""
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} is outside [1, V={vocab}]")
    cd = compute_dtype(student_hidden.dtype)
    out = torch.zeros(*lead, k, dtype=torch.long, device=student_hidden.device)
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)
    if idx.numel() == 0:
        return out
    half_cuda = fp32_accumulating(student_hidden)
    w = student_weight if half_cuda and cd == torch.float32 else student_weight.to(cd)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    rows = chunk_rows(vocab, memory_budget_mb, buffers=buffers_for(transform))
    flat = out.reshape(-1, k)
    for lo in range(0, idx.numel(), rows):
        hi = min(idx.numel(), lo + rows)
        # of the final logits: softcapping can tie raw logits that differ, and the head ranks final ones
        flat[idx[lo:hi]] = transform.apply_(raw_logits(hs[lo:hi], w, bias, cd)).topk(k, dim=-1).indices
    return out
