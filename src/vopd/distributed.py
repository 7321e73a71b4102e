"""Rank helpers and the data-parallel wrapping of the student: one code path from one CPU process to many GPUs.

What it knows:
- whether torch.distributed is initialised (by ``torchrun``), this process's rank, world size and device, sum/max
  reductions, and running a rank-0-only action (writing files, evaluating) so that its result *or its error* reaches
  every rank (a rank-0 failure must not leave the others waiting in a collective forever);
- ``wrap``: turning the student into a ``WrappedStudent`` under DistributedDataParallel or FSDP2 (``fully_shard``), with
  the pieces the trainer needs around PyTorch's own wrappers: gradients reduced over ranks only on the last
  micro-batch, the gradient norm of sharded gradients, where sampling and evaluation run (the student itself; under
  FSDP2 the sharded module, on every rank in step), a whole module to write files from (under FSDP2 a host copy
  gathered one parameter at a time: no unsharded copy stays on the device; ``vopd.sharding`` does the FSDP2 work;
  checkpoints are written and read shard by shard instead, ``vopd.checkpoint_sharded``), and the loader that shards
  a whole optimizer state read from an older, full-layout checkpoint (``vopd.checkpoint_legacy``);
- where the student's precision (``vopd.precision``) acts: autocast inside ``StudentForward`` (one process, DDP) or
  FSDP2's ``MixedPrecisionPolicy``, over float32 masters either way.

At world size 1 every helper is a no-op returning its input and ``wrap`` returns the plain model, so the trainer
never branches on "distributed or not". What it does not know: the loss, sampling, the training loop, or the
checkpoint layout (``vopd.checkpoint`` writes what it is given).

The output layer (see ``StudentForward``): the chunked loss needs the student's output weight itself, outside any
``forward``. Both wrappers only manage what happens inside the forward of the module they wrap, so the wrapped module
returns the weight *from its forward*: under DDP its gradient then arrives in the same backward as every other
parameter's and is all-reduced with them; under FSDP2 the output layer belongs to the root unit, whose parameters
are unsharded (plain tensors) during that forward and stay unsharded until the backward has reduce-scattered their
gradients. No gradient is ever all-reduced by hand.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vopd.errors import UserError
from vopd.precision import Precision

if TYPE_CHECKING:
    from vopd.checkpoint import LoadsStateDict

Strategy = Literal["ddp", "fsdp2"]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ ranks


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 logs, evaluates and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device, *, timeout_min: float = 60.0) -> torch.device:
    """Initialise the process group when started by torchrun with WORLD_SIZE > 1 (gloo on CPU; nccl + gloo on
    CUDA) and return this rank's device (``cuda:LOCAL_RANK`` on CUDA; ``device`` unchanged otherwise).

    ``timeout_min`` bounds how long a rank waits in a collective; rank 0 evaluating or writing a checkpoint while the
    others wait must fit in it."""
    if not launched_by_torchrun():
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"model.device={device} names one GPU, but torchrun starts one process per GPU: use "
                            "model.device=auto or cuda (each rank takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not is_initialized():
        # On GPUs, NCCL carries the model's collectives and gloo the small CPU ones (token counts, metric sums, the
        # rank-0 decisions): NCCL alone cannot reduce CPU tensors.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min), **kwargs)
    return device


#: Work to do before the process group goes (e.g. a colocated vLLM engine whose groups live inside it).
_before_shutdown: list[Callable[[], None]] = []


def before_shutdown(fn: Callable[[], None]) -> None:
    """Run ``fn`` in ``shutdown``, before the process group is destroyed (once; the latest registered first)."""
    _before_shutdown.append(fn)


def shutdown(*, clean: bool = False) -> None:
    """Tear the process group down. ``clean``: every rank got here without an error, so one last barrier is safe
    (after an error on one rank it could pair with another rank's pending collective). The barrier matters: a gloo
    worker thread can still hold the last collective's tensors when this thread returns from it, and if it lets go
    of them while the interpreter exits it aborts the process ('terminate called without an active exception'); the
    barrier waits, without the GIL, until every earlier collective is released."""
    while _before_shutdown:
        _before_shutdown.pop()()
    if is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks (a copy; the input is untouched)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: Tensor) -> Tensor:
    """Maximum over ranks (a copy; the input is untouched)."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def _all_reduce(x: Tensor, op: "dist.ReduceOp.RedOpType") -> Tensor:
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=op)
    return y


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def on_main(action: Callable[[], T]) -> T | None:
    """Run ``action`` on rank 0 only; every rank returns its (picklable) result, or raises its ``UserError``.

    Other exceptions on rank 0 are re-raised there and reported to the other ranks as a ``UserError``, so no rank is
    left blocked in the next collective. The other ranks wait here meanwhile."""
    if not is_initialized():
        return action()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            box[0] = ("ok", action())
        except BaseException as exc:  # noqa: BLE001 - reported to every rank, then re-raised below
            error = exc
            box[0] = ("error", str(exc) if isinstance(exc, UserError) else f"rank 0 failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: T) -> list[T]:
    """Every rank's (picklable) ``value``, in rank order, on every rank."""
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# ------------------------------------------------------------------------------------------------ the student


class StudentForward(nn.Module):
    """The module the data-parallel wrapper wraps: the student's decoder *and* its output layer.

    ``forward`` returns (last hidden states (B, L, D), output weight (V, D) sliced to the tokenizer, bias or None).
    The chunked loss forms logits from the weight chunk by chunk, so the output layer's own ``forward`` never runs;
    returning the weight here is what puts it under the wrapper (see the module docstring). ``autocast``: the
    compute dtype of float32 masters (one process, DDP): the forward runs under autocast and returns the three in
    that dtype (``vopd.models.student_states``); the backward runs outside autocast, as the AMP docs advise."""

    def __init__(self, model: nn.Module, vocab_size: int, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.autocast = autocast

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        from vopd.models import student_states

        hidden, head = student_states(self.model, input_ids, attention_mask, self.vocab_size, autocast=self.autocast,
                                      position_ids=position_ids)
        return hidden, head.weight, head.bias


@dataclass
class WrappedStudent:
    """The student as trained (one process, DDP or FSDP2), and the handles the loop needs. Not an "engine": that
    word is the rollout engine's (``rollout.engine``).

    strategy: "single" (one process), "ddp" or "fsdp2".
    model:    the student (under FSDP2 its parameters are sharded DTensors, in place). Sampling, evaluation and the
              weight push to an inference engine read it, inside ``inference()``; checkpoints save and load its own
              (sharded) parameters.
    forward:  ``StudentForward`` over ``model``, wrapped by DDP or made the FSDP2 root; call it for training.
    precision: the dtypes it computes in and is trained in (``model`` is in ``precision.load``: full fine-tuning,
              the masters).
    skeleton: FSDP2 only: a weightless (meta-device) copy of the unsharded student, materialised on the host while a
              file is written or read (``vopd.sharding.host_copy``).
    """

    strategy: str
    model: nn.Module
    forward: nn.Module
    precision: Precision
    skeleton: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        """FSDP2: every forward of the student is a collective, so every rank samples and evaluates in step."""
        return self.strategy == "fsdp2"

    @property
    def autocast(self) -> torch.dtype | None:
        """``precision.autocast`` for forwards outside training; None under FSDP2: its policy casts, as in training."""
        return None if self.sharded else self.precision.autocast

    def inference(self) -> contextlib.AbstractContextManager[nn.Module]:
        """``model``, ready for forwards outside training (``generate``, evaluation, a weight push): under FSDP2 the
        root unit gathered for the block (``vopd.sharding.gathered_root``; a collective), else as it is."""
        from vopd.sharding import gathered_root

        return gathered_root(self.forward, self.model) if self.sharded else contextlib.nullcontext(self.model)

    def inferring(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` (a sampler) run inside ``inference()`` at each call; ``fn`` itself when nothing needs gathering."""
        def gathered(*args: Any, **kwargs: Any) -> T:
            with self.inference():
                return fn(*args, **kwargs)

        return gathered if self.sharded else fn

    def unsharded(self, *, trainable_only: bool = False) -> contextlib.AbstractContextManager[nn.Module | None]:
        """The student as one unsharded module to write files from on rank 0 (the final export in one process or
        under DDP): the model itself, except under FSDP2, where rank 0 gets a host copy gathered one parameter at a
        time and the other ranks, which join every gather (a collective), get None (``vopd.sharding.host_copy``).
        ``trainable_only``: only the trained parameters are copied (LoRA: the adapters; the base stays weightless)."""
        from vopd.sharding import host_copy

        if not self.sharded or self.skeleton is None:
            return contextlib.nullcontext(self.model)
        only = set(self._trainable_names()).__contains__ if trainable_only else None
        return host_copy(self.model, self.skeleton, keep=is_main(), only=only)

    def loading(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The module to load a full-layout checkpoint's weights into (every rank reads it whole): the model itself,
        except under FSDP2, where a host module takes them and its trained parameters are sharded into the model when
        the block ends (``vopd.sharding.loaded_into``)."""
        from vopd.sharding import loaded_into

        if not self.sharded or self.skeleton is None:
            return contextlib.nullcontext(self.model)
        return loaded_into(self.model, self.skeleton, self._trainable_names())

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def grad_reduction(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-batch's forward + backward. DDP: gradients are all-reduced only on the last
        micro-batch (``no_sync`` before it; the sum accumulates locally, and the last backward reduces it).
        FSDP2 reduce-scatters every micro-batch: skipping it would keep unsharded gradients alive between
        micro-batches, which is the memory FSDP2 is chosen to save."""
        if self.strategy == "ddp" and not last:
            return self.forward.no_sync()  # type: ignore[operator]  # forward is the DDP module here
        return contextlib.nullcontext()

    def _grad_norm(self) -> tuple[list[nn.Parameter], Tensor | None]:
        """(parameters with a gradient, their total gradient norm), the norm combined over FSDP2 shards: a partial
        norm over this rank's shards becomes the full one by ``full_tensor`` (a collective every rank joins)."""
        params = [p for p in self.trainable() if p.grad is not None]
        if not params:
            return params, None
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], norm_type=2.0)
        from torch.distributed.tensor import DTensor

        if isinstance(total, DTensor):
            total = total.full_tensor()
        return params, total

    def clip_grad_norm(self, max_norm: float) -> float:
        """Total gradient norm over all ranks' shards (before clipping), then clip to ``max_norm`` in place."""
        params, total = self._grad_norm()
        if total is None:
            return 0.0
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def grad_sq_norm(self) -> float:
        """Squared norm of the gradients accumulated so far, unclipped (the online variance proxy). Under DDP
        before the last micro-batch it is this rank's own sum (``no_sync``); under FSDP2 gradients are already
        reduced over ranks, and every rank must call it."""
        _, total = self._grad_norm()
        return 0.0 if total is None else float(total) ** 2

    def optimizer_loader(self, optimizer: torch.optim.Optimizer) -> LoadsStateDict:
        """Something with ``load_state_dict(full_state)`` that puts a full optimizer state (``torch.optim``'s own
        layout, keyed by parameter index: an older checkpoint's ``optimizer.pt``) into ``optimizer``, sharding it
        under FSDP2. Every rank calls it with the same state."""
        if self.strategy != "fsdp2":
            return optimizer
        wrapped = self

        class _Loader:
            def load_state_dict(self, state: dict[str, Any]) -> None:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                by_name = _indices_to_names(state, wrapped._trainable_names())
                set_optimizer_state_dict(wrapped.model, optimizer, by_name,
                                         options=StateDictOptions(full_state_dict=True))

        return _Loader()

    def _trainable_names(self) -> list[str]:
        # The optimizer is built from ``trainable()``, in ``parameters()`` order: index i <-> the i-th name.
        return [n for n, p in self.model.named_parameters() if p.requires_grad]


def _indices_to_names(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    if any(int(i) >= len(names) for g in state["param_groups"] for i in g["params"]):
        raise UserError(f"the saved optimizer state has more parameters than the {len(names)} trainable ones of the "
                        "student: resume with the same model and lora settings")
    return {"state": {names[int(k)]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def wrap(model: nn.Module, vocab_size: int, strategy: Strategy, device: torch.device,
         precision: Precision | None = None) -> WrappedStudent:
    """The student under ``strategy`` at the current world size (one process: no wrapping at all), computing and
    trained at ``precision`` (None: in the dtype it is stored in; the trainer's is ``vopd.precision.resolve_precision``,
    and the student must be loaded in its ``load`` dtype).

    Call it after the weights are final for step 0 (a resume loads into the wrapped student afterwards:
    ``vopd.checkpoint_sharded.resume``) and before building the optimizer (FSDP2 replaces the parameters by sharded
    ones)."""
    precision = precision or Precision.native(next(model.parameters()).dtype)
    sharded = world_size() > 1 and strategy == "fsdp2"
    # One process and DDP compute under autocast over the float32 masters (why: vopd.precision); FSDP2 casts by itself.
    trunk = StudentForward(model, vocab_size, autocast=None if sharded else precision.autocast)
    if world_size() == 1:
        return WrappedStudent("single", model, trunk, precision)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters stays off (it costs a graph walk per step): every trainable parameter gets a
        # gradient in every backward, the trainer adds a zero term for a micro-batch without completion tokens.
        # Buffers (rotary frequencies) are constants, identical on every rank: no broadcast per forward.
        ddp_args = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync: dict[str, Any] = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_args
                                          else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(trunk, device_ids=[device.index] if device.type == "cuda" else None,
                                      **no_buffer_sync)
        return WrappedStudent("ddp", model, ddp, precision)
    if strategy == "fsdp2":
        from vopd.sharding import meta_skeleton, shard_student

        skeleton = meta_skeleton(model)  # the unsharded shape, without weights, taken while the weights are whole
        shard_student(model, trunk, device, precision)
        return WrappedStudent("fsdp2", model, trunk, precision, skeleton)
    raise UserError(f"distributed.strategy={strategy!r} is not one of ddp, fsdp2")
