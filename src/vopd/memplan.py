"""One training step of a config, traced at its real shapes without weights or a GPU: the measurement behind ``vopd
plan`` (the verdict and advice: ``vopd.memfit``; docs/scaling.md, "Will it fit?").

What it knows: how to build the run's models from their ``config.json`` alone (``vopd.models.model_from_config`` on
the meta device, LoRA and gradient checkpointing as the trainer applies them, then fake tensors: shapes and dtypes,
no memory), at the precision the run gets on its target (``vopd.precision``: bf16 over float32 masters on a GPU), at
a target world size under a fake process group (every collective returns at once; this process plays rank 0),
wrapped the way ``vopd.setup`` wraps them (``vopd.distributed.wrap``: FSDP2 units; a sharded in-process teacher,
``vopd.sharding``); and two steps the way ``vopd.step`` and ``vopd.train`` run them (``traced_steps``). The data is
real (the rollout's ids and masks, and every op on them alone, run for real: ``_Trace``), so data-dependent code
finds values; everything that touches a weight is fake. ``vopd.memtrace`` counts what is live, by category.

Three things stand in for what needs a GPU: the fake tensors are CPU tensors, so the head is told to take its CUDA
path (``vopd.loss.head.as_cuda``) and AdamW its multi-tensor one (its CUDA default); DDP is traced as one process (a
DDP rank runs the one-process step) and its gradient buckets are added by arithmetic; a teacher's host-offloaded
shards are traced on the device and reported as host memory. What it does not know: sampling and the inference
engine (arithmetic, in ``vopd.memfit``), remote teachers (not on this GPU), an allocator's overheads or the CUDA
kernels' own workspaces (a margin, in ``vopd.memfit``; attention is traced as PyTorch's CPU kernels allocate it), or
data: every row is as long as the config allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from vopd import distributed as dist
from vopd.config import TrainConfig
from vopd.errors import UserError
from vopd.loss.head import as_cuda
from vopd.memtrace import MemTrace
from vopd.metrics import PhaseTimer
from vopd.models import apply_lora, enable_gradient_checkpointing, logit_transform, model_from_config
from vopd.precision import Precision, resolve_precision, torch_dtype
from vopd.rollout import Rollout
from vopd.sharding import teacher_is_sharded
from vopd.packing import pack_rows
from vopd.step import loss_plan, make_optimizer, micro_batch_loss, micro_batch_rows
from vopd.teacher.base import SELF
from vopd.teacher.local import InProcessTeacher, SelfTeacher
from vopd.teacher.routing import Teachers

GIB = 2.0**30
#: Where the fake tensors live (FSDP2 cannot run on fake CUDA tensors without a GPU).
HOST = torch.device("cpu")


@dataclass(frozen=True)
class Shapes:
    """What one micro-batch of the run is: rows and tokens, the vocabulary, and what the student is."""

    rows: int
    prompt_tokens: int
    completion_tokens: int
    vocab: int
    student_params: int  # whole model
    trainable_params: int  # whole model
    precision: Precision
    world_size: int
    strategy: str  # "single", "ddp" or "fsdp2" as traced
    kv_bytes_per_token: int  # the student's KV cache per token, in the compute dtype (all layers, keys and values)
    lora_targeted_params: int  # elements of the weights LoRA adapts (0 without LoRA)


@dataclass
class StepTrace:
    """The traced step: ``peak`` bytes per rank, ``at_peak`` by category, ``resident`` (what stays between steps:
    weights, masters, optimizer states, teacher) by category, host-resident bytes and the shapes."""

    peak: int
    at_peak: dict[str, int]
    resident: dict[str, int]
    host: dict[str, int]
    shapes: Shapes
    notes: list[str]


def trace_step(cfg: TrainConfig, world_size: int, *, target: str = "cuda") -> StepTrace:
    """Trace one step of ``cfg`` at ``world_size`` ranks (see the module docstring). ``target``: the device the plan
    stands for, "cuda" (a GPU run) or "cpu" (the run as it goes on this CPU: float32, the head's CPU path; what the
    tests compare with the same tracker around a real step)."""
    import torch.distributed as tdist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if tdist.is_initialized():
        raise RuntimeError("vopd plan traces under a fake process group of its own: run it outside torchrun")
    if world_size > 1:
        tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        device = torch.device(target)
        precision = resolve_precision(cfg.model, lora=cfg.lora.enabled, device=device)
        student = _build(cfg, precision)  # on the meta device: PEFT cannot convert fake parameters' dtypes
        with FakeTensorMode(allow_non_fake_inputs=True), (as_cuda() if target == "cuda" else contextlib.nullcontext()):
            return _trace(cfg, world_size, device, precision, _fake(student, HOST))
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def _fake(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (meta parameters) with fake parameters and buffers on ``device``; tied parameters stay tied."""
    memo: dict[int, Tensor] = {}
    for module in model.modules():
        for table, as_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in memo:
                    empty = torch.empty_like(t, device=device)
                    memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if as_param else empty
                table[name] = memo[id(t)]  # type: ignore[assignment]
    return model


def _build(cfg: TrainConfig, precision: Precision) -> nn.Module:
    """The student as ``vopd.setup`` makes it, on the meta device: loaded in ``precision.load``, LoRA, gradient
    checkpointing, train()."""
    model = model_from_config(cfg.model.student, role="student", dtype=precision.load,
                              trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules, float32_adapters=precision.adapters_float32)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def _teachers(cfg: TrainConfig, student: nn.Module, vocab: int, precision: Precision, target: torch.device,
              notes: list[str]) -> tuple[Teachers | None, dict[str, bool]]:
    """The in-process teachers (remote ones hold no memory here: noted), sharded where the run shards them; and for
    each, whether its shards are offloaded to the host."""
    by_name: dict[str, Any] = {}
    offload: dict[str, bool] = {}
    for entry in cfg.model.teacher_configs:
        if entry.remote:
            notes.append(f"teacher {entry.name} is a server ({entry.model}): its memory is not on this GPU")
            continue
        if entry.model == SELF:
            if cfg.lora.enabled:
                by_name[entry.name] = SelfTeacher(student, vocab)
                continue
            copy = _fake(model_from_config(cfg.model.student, role="teacher", dtype=precision.compute), HOST)
            by_name[entry.name] = InProcessTeacher(copy, vocab)
        else:
            model = _fake(model_from_config(entry.model, role="teacher", dtype=torch_dtype(entry.dtype, target),
                                            trust_remote_code=cfg.model.trust_remote_code), HOST)
            by_name[entry.name] = InProcessTeacher(model, vocab)
        if teacher_is_sharded(entry, strategy=cfg.distributed.strategy, lora=cfg.lora.enabled):
            by_name[entry.name].shard(HOST, offload=False)  # offloaded shards: counted, then reported on the host
            offload[entry.name] = entry.offload
    if not by_name:
        return None, offload
    return Teachers(by_name, routed=len(cfg.model.teacher_configs) > 1), offload


def _rollout(rows: int, prompt: int, completion: int, vocab: int) -> Rollout:
    """``rows`` sequences of ``prompt`` + ``completion`` tokens (real tensors: the loss reads the mask's values),
    every completion token sampled."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _real_rollout(rows, prompt, completion, vocab)


def _real_rollout(rows: int, prompt: int, completion: int, vocab: int) -> Rollout:
    length = prompt + completion
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(rows, length - 1, dtype=torch.bool)
    mask[:, prompt - 1:] = True
    return Rollout(ids, torch.ones(rows, length, dtype=torch.long), ids[:, 1:], mask,
                   torch.where(mask, -1.0, 0.0), [prompt] * rows, [completion] * rows, [True] * rows)


class _Trace(MemTrace):
    """The tracker, also keeping the data real: an operator whose tensor inputs are all real tensors (the rollout's
    ids and masks, and what is computed from them) runs on them for real, outside the fake mode, so that the step's
    data-dependent code (the completion tokens' indices, the token count) finds values. The model's weights are fake,
    so everything that touches them (every large tensor) stays fake."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if inputs and not any(is_fake(t) for t in inputs):
            with unset_fake_temporarily():
                return super().__torch_dispatch__(func, types, args, kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


class TracingTimer(PhaseTimer):
    """The trainer's phase timer, also telling the trace which phase it is in (the teacher's forward)."""

    def __init__(self, trace: MemTrace) -> None:
        super().__init__(HOST)
        self.trace = trace

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with super().__call__(name), self.trace.phase(name):
            yield


def _trace(cfg: TrainConfig, world_size: int, target: torch.device, precision: Precision,
           student: nn.Module) -> StepTrace:
    notes: list[str] = []
    # The output layer's rows (no tokenizer here: a real run slices them to the tokenizer, at most a few hundred less)
    vocab = int(getattr(student, "get_output_embeddings")().weight.shape[0])
    teachers, offload = _teachers(cfg, student, vocab, precision, target, notes)
    if teachers is None:
        raise UserError("vopd plan: no teacher in the config (model.teacher or model.teachers)")
    strategy = cfg.distributed.strategy if world_size > 1 else "single"
    if strategy == "ddp":  # a DDP rank runs the one-process step; its buckets are added by arithmetic (vopd.memfit)
        wrapped = dist.WrappedStudent("single", student, dist.StudentForward(student, vocab, precision.autocast),
                                      precision)
    else:
        wrapped = dist.wrap(student, vocab, "fsdp2", HOST, precision)
    params = wrapped.trainable()
    # The multi-tensor AdamW is PyTorch's default on CUDA only; these CPU tensors stand for CUDA ones.
    optimizer = make_optimizer(cfg, params, foreach=True if target.type == "cuda" else None)
    trace = _Trace(_classifier(vocab))
    master = "master weights" if precision.master != precision.compute and not cfg.lora.enabled else "parameters"
    track_resident(trace, wrapped, teachers, master_tag=master)
    # A rank's rows as the trainer splits them (vopd.step.micro_batch_rows); two micro-batches are the steady state.
    per_rank = max(1, cfg.batch_size // world_size)
    prompt, completion = cfg.data.max_prompt_tokens, cfg.rollout.completion_tokens[0]
    rows = _planned_rows(cfg, per_rank, prompt + completion)
    mb = planned_rollout(min(per_rank, 2 * rows), prompt, completion, vocab, teachers)
    with trace:
        traced_steps(trace, cfg, wrapped, teachers, mb, optimizer, loss_plan(cfg.loss, logit_transform(student)))
    resident = {k: v for k, v in trace.by_tag.items() if k in (master, "parameters", "optimizer states", "teacher")}
    host = {}
    if any(offload.values()):
        host["teacher"] = resident.get("teacher", 0)
        notes.append("teacher shards offloaded to host memory (model.teachers[].offload): not counted on the GPU")
    shapes = Shapes(rows, prompt, completion, vocab, sum(p.numel() for p in student.parameters()),
                    sum(p.numel() for p in params), precision, world_size, strategy,  # a DTensor's numel: all of it
                    _kv_bytes_per_token(student.config, precision.compute), _lora_targeted(student))
    return StepTrace(trace.peak, dict(trace.at_peak), resident, host, shapes, notes)


def track_resident(trace: MemTrace, student: dist.WrappedStudent, teachers: Teachers, *, master_tag: str) -> None:
    """Count the student's weights (trainable ones under ``master_tag``) and the teachers' from now on."""
    trainable = {id(p) for p in student.trainable()}
    for p in [*student.model.parameters(), *student.model.buffers()]:
        trace.add([p], master_tag if id(p) in trainable else "parameters")
    for _name, teacher in teachers:
        trace.add([t for t in _tensors(teacher) if id(t) not in trainable], "teacher")


def planned_rollout(rows: int, prompt: int, completion: int, vocab: int, teachers: Teachers) -> Rollout:
    """``rows`` sequences as long as the config allows (several teachers: the rows dealt out in turn)."""
    mb = _rollout(rows, prompt, completion, vocab)
    if teachers.routed:
        mb = dataclasses.replace(mb, routes=[teachers.names[i % len(teachers.names)] for i in range(rows)])
    return mb


def _planned_rows(cfg: TrainConfig, rows: int, length: int) -> int:
    """Rows per micro-batch as the trainer splits ``rows`` sequences of the worst case, all of ``length`` tokens
    (``vopd.step.micro_batches``: ``micro_batch_tokens`` slots hold that many whole sequences, padded or packed)."""
    if cfg.micro_batch_tokens:
        return max(1, min(rows, cfg.micro_batch_tokens // length))
    return micro_batch_rows(cfg, rows)


def traced_steps(trace: MemTrace, cfg: TrainConfig, student: dist.WrappedStudent, teachers: Teachers, rollout: Rollout,
                 optimizer: torch.optim.Optimizer, plan: Any) -> None:
    """Two steps of ``rollout`` (two micro-batches each) as ``vopd.step.accumulate_gradients`` and ``vopd.train``
    run them, minus the metrics (they read values, which fake tensors do not have): per micro-batch the loss
    (``micro_batch_loss``) and its backward, then the optimizer step and ``zero_grad(set_to_none=True)``. The second
    step is the steady state: its second backward runs with the first one's gradients and the optimizer states live.
    Gradients and optimizer states are retagged as they appear (their category is not their phase)."""
    timer = TracingTimer(trace)
    mbs = _planned_rows(cfg, rollout.size, rollout.input_ids.shape[1])
    normalizer = float(rollout.num_tokens)
    params = student.trainable()
    for _ in range(2):
        for lo in range(0, rollout.size, mbs):
            with trace.phase("activations"), student.grad_reduction(last=lo + mbs >= rollout.size):
                mb = rollout.select(lo, lo + mbs)
                if cfg.packing:  # the packed row's masks are data: built real, outside the fake mode
                    from torch._subclasses.fake_tensor import unset_fake_temporarily

                    with unset_fake_temporarily():
                        mb = pack_rows(mb)
                parts = micro_batch_loss(plan, student, teachers, mb, normalizer, timer)
                torch.stack([p.out.loss for p in parts]).sum().backward()
                del parts
            trace.retag([p.grad for p in params if p.grad is not None], "gradients")
        with trace.phase("optimizer step"):
            optimizer.step()
        trace.retag([t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor) and t.dim() > 0],
                    "optimizer states")
        optimizer.zero_grad(set_to_none=True)


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer (a decoder's ``config.json``: layers, KV heads, head size)."""
    config = getattr(config, "text_config", config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return int(config.num_hidden_layers * 2 * kv_heads * head_dim * dtype.itemsize)


def _lora_targeted(model: nn.Module) -> int:
    """Elements of the base weights that LoRA adapts (PEFT's ``base_layer`` of each adapted module)."""
    total = 0
    for m in model.modules():
        base = getattr(m, "base_layer", None)
        if hasattr(m, "lora_A") and isinstance(getattr(base, "weight", None), Tensor):
            total += int(base.weight.numel())  # type: ignore[union-attr]
    return total


def _tensors(teacher: Any) -> list[Tensor]:
    """A teacher's weights (a self teacher's are the student's: nothing of its own)."""
    if isinstance(teacher, SelfTeacher):
        return []
    module: nn.Module = teacher.model
    return [*module.parameters(), *module.buffers()]


def _classifier(vocab: int) -> Any:
    def classify(t: Tensor | None, phase: str) -> str:
        if t is None:  # FSDP2 gathering a unit's parameters for its forward or backward
            return "teacher" if phase == "teacher" else "gathered weights"
        if phase in ("teacher", "optimizer step"):
            return phase
        if t.dim() == 2 and t.shape[-1] == vocab:  # a (rows, V) chunk of the fused head
            return "head chunks"
        if t.dim() == 2 and t.shape[0] == vocab:  # the output layer's gradient or the head's copy of it
            return "output layer (grad, copies)"
        return phase

    return classify


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """``cfg`` with dotted-key ``changes`` (``{"model.gradient_checkpointing": True}``), for the advice's re-plans."""
    out = cfg
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        if section:
            out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **{name: value})})
        else:
            out = dataclasses.replace(out, **{name: value})
    return out
