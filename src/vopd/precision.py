"""The student's precision: the dtype it computes in, the dtype its trained weights and AdamW states are kept in
(the *masters*), and the dtype it is loaded in.

What it knows: the dtype names of the config (``torch_dtype``), ``model.dtype`` (compute) and ``model.master_dtype``
resolved on a device (``resolve_precision``; masters are float32 or the compute dtype itself), and what a half
compute dtype over float32 masters means for each way of training the student:

- one process and DDP: the module's parameters *are* the float32 masters, and its forwards run under
  ``torch.autocast`` to the compute dtype (``Precision.autocast``, ``autocast_to``);
- FSDP2: float32 shards, ``MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=float32)`` (``fsdp_policy``):
  FSDP2 casts the all-gathered parameters for the forward and backward and reduce-scatters the gradients in float32;
- LoRA: the frozen base is loaded in the compute dtype (it never gets an update), the adapters, the only trained
  weights, in the master dtype.

Why autocast and not float32 masters beside half copies (one process and DDP): with autocast the module's parameters
are the masters, so the optimizer, the divergence guard (``vopd.guard``: its ``update_ratio`` is then the update of
the masters), gradient clipping, the accumulation over micro-batches, DDP's all-reduce (float32 gradients: a float32
reduction) and checkpoints all see float32 tensors with no code of their own. Half copies would need the gradients
copied into the masters before every step, the weights copied back after it, and a DDP communication hook to reduce
in float32. Autocast is PyTorch's own mixed-precision recipe (https://pytorch.org/docs/stable/amp.html): matmuls in
the compute dtype, numerically sensitive ops in float32, gradients flowing back to the float32 leaves. bfloat16 needs
no gradient scaler (its exponent range is float32's); float16 would (same page, "Gradient Scaling") and vopd has
none, as it had none for pure float16 training before: prefer bfloat16.

What it does not know: models, wrapping (``vopd.distributed``), the loop, files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch

from vopd.config_rules import resolve_dtype
from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config dtype name on ``device``; 'auto' is resolved by ``vopd.config_rules.resolve_dtype``
    (the one place of that rule), this only looks the resolved name up."""
    return _DTYPES[resolve_dtype(name, str(device))]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype ("bfloat16" for ``torch.bfloat16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    """compute: the dtype of the student's forward and backward. master: the dtype of its trained weights and their
    optimizer states. lora: only adapters are trained (the frozen base is stored in ``compute``)."""

    compute: torch.dtype
    master: torch.dtype
    lora: bool = False

    @classmethod
    def native(cls, dtype: torch.dtype) -> "Precision":
        """A model trained in the dtype it is stored in (no mixed precision)."""
        return cls(dtype, dtype)

    @property
    def load(self) -> torch.dtype:
        """The dtype the student is loaded in: the masters for full fine-tuning (its parameters are the masters); the
        compute dtype with LoRA (the base never changes; ``adapters_float32`` says which dtype the adapters get)."""
        return self.compute if self.lora else self.master

    @property
    def adapters_float32(self) -> bool:
        """LoRA adapters in float32 (PEFT's ``autocast_adapter_dtype``) unless the masters are half."""
        return self.master == torch.float32

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype a forward of the student *as loaded* runs under ``torch.autocast`` to: the compute dtype when its
        weights are stored wider (full fine-tuning over float32 masters), else None (its own dtype). FSDP2's sharded
        forward casts by itself instead (``fsdp_policy``), in training and in sampling alike."""
        return self.compute if self.load != self.compute else None

    def fsdp_policy(self) -> Any:
        """FSDP2's ``MixedPrecisionPolicy``: for float32 masters under a half compute dtype, parameters all-gathered
        and computed in ``compute`` and gradients reduce-scattered in float32 (with LoRA it also gives a unit whose
        base is half and whose adapters are float32 one all-gather dtype); else FSDP2's default (no cast)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.master == self.compute:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)

    def warning(self) -> str | None:
        """The one line a run with half masters logs (None otherwise)."""
        if self.master == torch.float32:
            return None
        name = dtype_name(self.master)
        bits = _MANTISSA[self.master]  # half a step of w is |w| * 2^-(bits+2) .. 2^-(bits+1)
        return (f"warning: model.master_dtype={name}: the trained weights and their AdamW states are {name}, so an "
                f"update below {2.0 ** -(bits + 2):.2%}-{2.0 ** -(bits + 1):.2%} of a weight is rounded away; "
                "model.master_dtype=float32 (the default) keeps it")


#: Explicit mantissa bits of the half dtypes (a step between neighbours is |w| * 2^-(bits+1) .. 2^-bits).
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def resolve_precision(model: ModelConfig, *, lora: bool, device: torch.device) -> Precision:
    """The run's ``Precision`` from ``model.dtype`` and ``model.master_dtype`` on ``device``. Masters narrower than
    the compute dtype are refused (``ModelConfig.validate`` refuses the pairs it can see without the device)."""
    compute = torch_dtype(model.dtype, device)
    master = torch_dtype(model.master_dtype, device)
    if master != torch.float32 and master != compute:
        raise UserError(f"model.master_dtype={model.master_dtype} needs model.dtype={model.master_dtype}, but "
                        f"model.dtype={model.dtype} computes in {dtype_name(compute)} on {device}: set "
                        f"model.dtype={model.master_dtype}, or model.master_dtype=float32")
    return Precision(compute, master, lora)


def autocast_to(dtype: torch.dtype | None, device: torch.device) -> ContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type (CPU autocast runs bfloat16 too), or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
