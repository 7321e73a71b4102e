"""FSDP2 (``fully_shard``) for the models of a run: the trained student, frozen in-process teachers, and full weights
read back from the shards one parameter at a time. Nothing here keeps an unsharded copy of a model on the device.

What it knows:
- sharding the student (``shard_student``): one FSDP unit per transformer block (the classes in the model's
  ``_no_split_modules``), the rest (embeddings, final norm, output layer) in the root unit ``StudentForward``, under
  the student's ``MixedPrecisionPolicy``; the root is initialised right away, so the blocks may run before the first
  training forward;
- running the sharded student outside its training forward (``gathered_root``: the root unit all-gathered for the
  duration, each block gathered by its own hooks for its forward and freed after it): ``generate`` and evaluation run
  on the sharded module itself, on every rank in step;
- sharding a frozen teacher for inference (``shard_teacher``, ``TeacherForward``): every unit freed again after its
  forward (``reshard_after_forward=True``), its shards kept in host memory between forwards on request
  (``CPUOffloadPolicy``), and when a teacher is sharded at all (``teacher_is_sharded``, from its
  ``model.teachers[]`` entry and the student's strategy);
- whole tensors from shards (``full_tensor``: the vLLM push gathers one weight at a time with it), the local share
  of a sharded module (``local_numel``), and an unsharded *host* module built from a weightless skeleton of the
  student (``meta_skeleton``, ``host_copy``, ``loaded_into``): for checkpoint files, the final export and a resume.

Every function that reads sharded weights is a collective: every rank calls it, with the same modules, in the same
order (a rank that skipped one would leave the others waiting). What it does not know: the loss, the loop, which
teacher scores which rows (``vopd.teacher.routing``), or file layouts (``vopd.checkpoint``, ``vopd.export``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor, nn

from vopd.errors import UserError
from vopd.teacher_config import SELF

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from vopd.precision import Precision
    from vopd.teacher_config import TeacherConfig


def _world_size() -> int:
    """The ranks of the run (1 without torch.distributed); ``vopd.distributed.world_size``'s rule, read here directly:
    ``vopd.distributed`` imports this module, so this one does not import it back."""
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _mesh(device: torch.device) -> DeviceMesh:
    """One flat mesh over every rank (HSDP, sharding within a node only, is not implemented: scale.md row 11)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():  # the mesh holds real rank ids, also while vopd.memplan traces on fake tensors
        return init_device_mesh(device.type, (_world_size(),))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (Hugging Face names their classes in ``_no_split_modules``): one FSDP unit
    each, so that only one block's parameters are gathered at a time."""
    from vopd.models import base_model

    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


# ------------------------------------------------------------------------------------------------ the student


def shard_student(model: nn.Module, trunk: nn.Module, device: torch.device, precision: Precision) -> None:
    """Shard ``model`` in place under FSDP2 with ``trunk`` (its ``StudentForward``) as the root unit.

    Float32 masters under a half compute dtype: all-gathered and computed in the compute dtype, gradients
    reduce-scattered in float32 (``Precision.fsdp_policy``). The root unit holds the embeddings, final norm and output
    layer: tied input/output embeddings stay one parameter in one unit, and the output weight is whole while the loss
    uses it (vopd.distributed's module docstring)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    policy = precision.fsdp_policy()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(trunk, mesh=mesh, mp_policy=policy)
    # FSDP2 warns that the root returns views (the output weight sliced to the tokenizer, hidden states): an
    # in-place op on them would skip its pre-backward hook. The trainer never modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPStudentForward\) returned a view")
    # FSDP2 makes the unit whose forward runs first the root. Sampling runs the blocks without the root's forward,
    # and it comes before the first training step: one tiny forward through the root now settles it (eval mode, no
    # grad: no dropout draw, no graph), then the root's parameters are freed again.
    training = trunk.training
    trunk.eval()
    with torch.no_grad():
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        trunk(ids, torch.ones_like(ids))
    trunk.train(training)
    trunk.reshard()  # type: ignore[operator]  # an FSDPModule now


@contextlib.contextmanager
def gathered_root(trunk: nn.Module, model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its root unit's parameters (embeddings, final norm, output layer; ``trunk`` is the root)
    all-gathered while the block runs, so that the sharded student's own modules (``generate``, its decoder, its
    output layer) run outside the training forward; each block still gathers and frees itself around its forward.
    A collective."""
    trunk.unshard()  # type: ignore[operator]  # an FSDPModule
    try:
        yield model
    finally:
        trunk.reshard()  # type: ignore[operator]


# ------------------------------------------------------------------------------------------------ teachers


def teacher_is_sharded(entry: TeacherConfig, *, strategy: str, lora: bool) -> bool:
    """Whether the in-process teacher of ``entry`` is sharded in this run: under torchrun, with ``shard=always``, or
    ``shard=auto`` (the default) when the student is sharded (``distributed.strategy=fsdp2``). A teacher server
    holds its own weights; ``self`` with LoRA is the student's own base. One-line errors for an ``offload`` with
    nothing sharded to offload, and for ``shard=always`` on a teacher whose weights are the student's."""
    key = f"teacher {entry.name}: model.teachers[]"
    if entry.remote:
        return False
    own_weights = not (entry.model == SELF and lora)
    if entry.shard == "always" and not own_weights:
        raise UserError(f"{key}.shard=always: model.teacher=self with LoRA scores with the student's own base "
                        "weights, which are not a model of their own to shard; set shard=auto")
    sharded = (_world_size() > 1 and own_weights and
               (entry.shard == "always" or (entry.shard == "auto" and strategy == "fsdp2")))
    if entry.offload and not sharded:
        where = "in one process" if _world_size() == 1 else f"with distributed.strategy={strategy}"
        raise UserError(f"{key}.offload=true keeps a sharded teacher's shards in host memory, but this teacher is "
                        f"not sharded {where} (shard={entry.shard}): run under torchrun with shard=always (or "
                        "auto under fsdp2), or set offload=false")
    return sharded


class TeacherForward(nn.Module):
    """The root unit of a sharded teacher: its decoder and output layer. ``forward`` returns the last hidden states
    (B, L, D) and *copies* of the output weight (V, D) and bias sliced to the tokenizer: the root's gathered
    parameters are freed when the forward returns (``reshard_after_forward``), and the loss reads the weight later.
    The copy costs one output layer per micro-batch, for as long as its loss needs it."""

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        from vopd.models import last_hidden, output_layer

        hidden = last_hidden(self.model, input_ids, attention_mask, position_ids)
        head = output_layer(self.model, self.vocab_size)
        return hidden, head.weight.clone(), None if head.bias is None else head.bias.clone()


def shard_teacher(model: nn.Module, vocab_size: int, device: torch.device, *, offload: bool) -> TeacherForward:
    """Shard the frozen ``model`` in place over every rank for inference; the module to call (every rank calls it,
    as often, in the same order). Its parameters may be anywhere (the host, to keep a large teacher off the GPU until
    it is sharded): FSDP2 moves each unit to ``device`` as it shards it. ``offload``: the shards live in host memory
    and each unit is copied to ``device`` for its forward (``CPUOffloadPolicy``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = _mesh(device)
    # OffloadPolicy() is FSDP2's default (no offload)
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    root = TeacherForward(model, vocab_size)
    fully_shard(root, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    return root


# ------------------------------------------------------------------------------------------------ full weights


def full_tensor(t: Tensor) -> Tensor:
    """A sharded (DTensor) parameter gathered whole (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_numel(module: nn.Module) -> int:
    """The number of parameter elements this rank holds (its shards; whole tensors when nothing is sharded)."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers are on the meta device (no memory): the shape
    of an unsharded student, materialised on the host only while a file is written or read (``host_copy``,
    ``loaded_into``). Made before sharding; tied tensors stay tied."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _retarget(module: nn.Module, device: str, only: Callable[[str], bool] | None = None) -> None:
    """Each parameter (those ``only`` names, when given) and each buffer of ``module`` replaced by an uninitialised
    one on ``device`` ("meta": freed). A tensor several modules share (tied embeddings) stays one tensor."""
    names = {id(p): n for n, p in module.named_parameters()}
    done: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (old, new); the old one is kept so that its id stays unique
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for key, t in list(table.items()):
                if t is None or (only is not None and isinstance(t, nn.Parameter) and not only(names[id(t)])):
                    continue
                if id(t) not in done:
                    empty = torch.empty_like(t, device=device)
                    new = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
                    done[id(t)] = (t, new)
                table[key] = done[id(t)][1]  # type: ignore[assignment]  # a Parameter where one was


@contextlib.contextmanager
def host_copy(model: nn.Module, skeleton: nn.Module, *, keep: bool,
              only: Callable[[str], bool] | None = None) -> Iterator[nn.Module | None]:
    """An unsharded copy of ``model`` in host memory, built in ``skeleton`` (``meta_skeleton``) one gathered parameter
    at a time: the device never holds more than one whole parameter. ``keep``: this rank keeps the copy (rank 0, which
    writes files); the others join every gather and get None. ``only``: the parameter names copied (LoRA: the
    adapters); the others stay weightless. Freed when the block ends. A collective."""
    if keep:
        _retarget(skeleton, "cpu", only)
    try:
        target = dict(skeleton.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():  # tied parameters once, in the same order on every rank
                if only is not None and not only(name):
                    continue
                whole = full_tensor(p.detach())
                if keep:
                    target[name].copy_(whole)
                del whole
            if keep:
                buffers = dict(skeleton.named_buffers())
                for name, b in model.named_buffers():  # never sharded: every rank holds them whole
                    buffers[name].copy_(b)
        yield skeleton if keep else None
    finally:
        if keep:
            _retarget(skeleton, "meta")


@contextlib.contextmanager
def loaded_into(model: nn.Module, skeleton: nn.Module, trainable: list[str]) -> Iterator[nn.Module]:
    """A host module to load saved weights into (a resume); when the block ends its ``trainable`` parameters are
    sharded into ``model`` (``set_model_state_dict`` from full tensors: each rank keeps its shards) and the host
    module is freed. The other parameters stay weightless: they are the frozen ones a checkpoint does not hold."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    wanted = set(trainable)
    _retarget(skeleton, "cpu", wanted.__contains__)
    try:
        yield skeleton
        state: dict[str, Any] = {n: p.detach() for n, p in skeleton.named_parameters() if n in wanted}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    finally:
        _retarget(skeleton, "meta")
