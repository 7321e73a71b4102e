"""Sharded checkpoints, the layout vopd writes: every rank writes, and reads back, only its own shards of the
student's trained weights and optimizer states, in parallel, with ``torch.distributed.checkpoint`` (DCP), inside the
atomic protocol of ``vopd.checkpoint`` (temporary directory, manifest, rename).

Layout (manifest version 2, ``"layout": "sharded"``, with the ``world_size`` that wrote it):

    shards/.metadata       DCP's index: each tensor's global shape, and the file, offset and length of each chunk
    shards/__R_0.distcp    rank R's chunks of every trainable parameter (``model.<name>``) and optimizer tensor
                           (``optim.state.<name>.exp_avg``, ...): under FSDP2 its own shards; under DDP and in one
                           process whole tensors, each written once (DCP spreads the replicated ones over the ranks)
    optimizer_scalars.pt   the rest of the optimizer state, the same on every rank: per-parameter step counts and the
                           param groups (hyper-parameters), by parameter name (rank 0)
    scheduler.pt, trainer_state.json, rng.pt, config.yaml, manifest.json   as in every layout (rank 0)

Only trainable parameters are saved (a LoRA run: the adapters). Frozen weights and buffers come from the model the
run loads at start, as they did in the run that saved. The scalars stay out of DCP so that reads are per rank: DCP
would store a replicated scalar in one rank's file, and every rank would then read (and hash) that file. Under FSDP2
at the same world size, rank R's load plan reads only ``__R_0.distcp`` plus the index and the small files, so those
are the only files rank R hashes. At another world size, or under DDP, a rank reads and hashes the files that hold
its chunks, whoever wrote them. DCP reshards on load, so any world size and strategy resumes any checkpoint of this
layout (``resume`` also reads the older full layout: ``vopd.checkpoint_legacy``).

A save is a collective. Rank 0 creates the temporary directory. Every rank writes its shard file (fsync'ed by DCP)
and hashes it, while rank 0 writes the index and the small files. The outcomes are all-gathered, and only when every
rank succeeded does rank 0 write the manifest and rename. A crash on any rank before the rename leaves a temporary
directory with no manifest outside the ``step-*`` names: it is ignored, and swept by the next save or claim. After
the rename the checkpoint is whole. A rank's failure (a full disk), and rank 0's in creating the temporary directory
or writing the manifest, reaches every rank as the same one-line ``UserError`` naming the last valid checkpoint
(``save_failed``): the temporary directory is removed, and the checkpoints saved before are untouched. The small
files are serialized in memory first, so that a full disk shows as the ``OSError`` it is. ``saved_tensors`` reads a
checkpoint's whole tensors in one process, for inspection.

What it knows: DCP, which state is sharded and which is small, and the student's handles (``vopd.distributed.
WrappedStudent``: the model as trained, the host module an older checkpoint is read into). What it does NOT know:
the protocol's details (``vopd.checkpoint``), the full layout (``vopd.checkpoint_legacy``), the run directory or the
loop.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch
import yaml
from torch import Tensor, nn

from vopd import checkpoint as ckpt
from vopd import checkpoint_legacy
from vopd import distributed as dist
from vopd.errors import UserError
from vopd.fsfaults import describe, is_fault, space_note

if TYPE_CHECKING:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

#: The optimizer state DCP does not hold (see the module docstring).
SCALARS = "optimizer_scalars.pt"
T = TypeVar("T")


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the tensors DCP saves, or loads into in place: ``model.<parameter>`` and ``optim.<flat key>``; the rest of the
    optimizer state, as ``optimizer_scalars.pt`` holds it). For a fresh optimizer, DCP first creates its states with
    one step at lr 0 on zero gradients (nothing moves), so that there is something to load into."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # a tied weight under one name
    weights = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    tensors = {f"model.{k}": v for k, v in weights.items() if k in trainable and isinstance(v, Tensor)}
    scalars: dict[str, Any] = {}
    if optimizer is not None:
        flat = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
        for key, value in flat.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                tensors[f"optim.{key}"] = value
            else:
                scalars[key] = value
    return tensors, scalars


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _dcp(action: Callable[[], object]) -> None:
    """Run a DCP save or load. A failure on any rank reaches every rank as DCP's ``CheckpointException`` (a
    ``BaseException`` holding each failed rank's exception); it is re-raised as that rank's ``UserError`` when there
    is one (a shard that failed its hash), else as one line naming the rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # one process without a process group is a case vopd means, not a mistake
            warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
            action()
    except CheckpointException as exc:
        failures = sorted(exc.failures.items())
        for _rank, (error, _trace) in failures:
            if isinstance(error, UserError):
                raise UserError(str(error)) from None
        rank, (error, _trace) = failures[0]
        raise _RankFailed(f"rank {rank}: {_one_line(error)}") from None


class _RankFailed(RuntimeError):
    """A phase of a save (or a DCP load) failed on some rank; the message names the first, as ``rank R: error``."""


def _in_step(action: Callable[[], T]) -> T:
    """Run ``action`` on every rank, then all-gather whether it failed anywhere: if it did, every rank raises
    ``_RankFailed`` naming the first failure, so no rank enters the next collective while another has given up."""
    result: T | None = None
    failure: str | None = None
    try:
        result = action()
    except _RankFailed as exc:  # DCP's: it names its rank already
        failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to every rank just below
        failure = f"rank {dist.rank()}: {_one_line(exc)}"
    failures = [f for f in dist.all_gather_object(failure) if f is not None]
    if failures:
        raise _RankFailed(failures[0])
    return result  # type: ignore[return-value]  # action returned on this rank


def save_checkpoint(output_dir: str | Path, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: ckpt.HasStateDict | None = None, trainer_state: dict[str, Any],
                    config: dict[str, Any], keep_last: int) -> Path:
    """Write ``output_dir/checkpoints/step-{step:08d}/`` in the sharded layout, atomically (replacing one of the same
    step), then keep only the ``keep_last`` newest valid checkpoints. A collective: every rank passes its own
    ``model`` (sharded or not) and ``optimizer``. Rank 0's ``scheduler``, ``trainer_state``, ``config`` and RNG state
    (as at the call) are saved. Returns the checkpoint's path on every rank."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    if keep_last < 1:
        raise UserError(f"keep_last={keep_last} is invalid: keep at least 1 checkpoint")
    rng = ckpt.rng_state()

    def begin() -> Path:
        with _save_faults(output_dir, step):  # as one UserError, which on_main hands to every rank
            return ckpt.begin_checkpoint(output_dir, step)

    tmp = dist.on_main(begin)
    assert tmp is not None

    def own_files() -> list[dict[str, Any]]:
        if dist.is_main():
            _write_small_files(tmp, scalars if optimizer is not None else None, scheduler, trainer_state, rng, config)
        mine = [f"{ckpt.SHARDS}/{p.name}" for p in (tmp / ckpt.SHARDS).glob(f"__{dist.rank()}_*.distcp")]
        return ckpt.hash_entries(tmp, mine, rank=dist.rank())

    try:
        tensors, scalars = _in_step(lambda: _states(model, optimizer))
        writer = FileSystemWriter(tmp / ckpt.SHARDS, overwrite=False)
        _in_step(lambda: _dcp(lambda: save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())))
        own = _in_step(own_files)
    except _RankFailed as exc:
        if dist.is_main():
            ckpt.discard_checkpoint(tmp)
        raise save_failed(output_dir, step, str(exc)) from None
    shards = [entry for entries in dist.all_gather_object(own) for entry in entries]

    def commit() -> Path:
        with _save_faults(output_dir, step):  # the manifest, the rename (tmp is removed when they fail)
            return ckpt.commit_checkpoint(tmp, step, keep_last=keep_last, shards=shards, world_size=dist.world_size())

    final = dist.on_main(commit)
    assert final is not None
    return final


def save_failed(output_dir: str | Path, step: int, cause: str) -> UserError:
    """The one line of a save of ``step`` that failed (``cause``: ``rank R: error``) once its partial checkpoint is
    removed: the path, the cause, and the last valid checkpoint (its files' sizes checked), which is still the
    newest."""
    ckdir = Path(output_dir) / ckpt.CHECKPOINTS
    last = next((p for p in reversed(ckpt.list_checkpoints(output_dir)) if ckpt.checkpoint_problem(p, hashes=False)
                 is None), None)
    then = (f"the last valid checkpoint is {last}: free disk space (or fix the cause) and resume with --resume"
            if last is not None else "no checkpoint was saved before it: free disk space (or fix the cause) and start "
            "the run again (--overwrite)")
    needed = sum(int(e["size"]) for e in ckpt.read_manifest(last)["files"]) if last is not None else 0
    return UserError(f"checkpoint step {step} could not be written to {ckdir} ({cause}"
                     f"{space_note(ckdir if ckdir.is_dir() else Path(output_dir), needed)}); the partial checkpoint "
                     f"was removed and {then}")


@contextlib.contextmanager
def _save_faults(output_dir: str | Path, step: int) -> Iterator[None]:
    """Rank 0's file-system faults in the steps of a save outside the per-rank writes (creating the temporary
    directory, the manifest, the rename) as ``save_failed``."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError) or not is_fault(exc):
            raise
        raise save_failed(output_dir, step, f"rank {dist.rank()}: {describe(exc)}") from None


def _write_small_files(tmp: Path, scalars: dict[str, Any] | None, scheduler: ckpt.HasStateDict | None,
                       trainer_state: dict[str, Any], rng: dict[str, Any], config: dict[str, Any]) -> None:
    if scalars is not None:
        _write_bytes(tmp / SCALARS, _torch_bytes(scalars))
    if scheduler is not None:
        _write_bytes(tmp / "scheduler.pt", _torch_bytes(scheduler.state_dict()))
    _write_bytes(tmp / "trainer_state.json", (json.dumps(trainer_state, indent=2) + "\n").encode("utf-8"))
    _write_bytes(tmp / "rng.pt", _torch_bytes(rng))
    _write_bytes(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False, width=4096).encode("utf-8"))


def _torch_bytes(obj: object) -> bytes:
    """``torch.save`` of ``obj``, in memory: written to a file directly, a full disk would surface as the zip
    writer's ``RuntimeError`` ("unexpected pos ..."), which hides the OS error a user can act on."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write one small file of a checkpoint (its fault is a plain ``OSError`` naming it)."""
    with path.open("wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------------- loading


def _verifying_reader(path: Path) -> FileSystemReader:
    """DCP's file reader over checkpoint ``path``, hashing first the shard files this rank's load plan reads, and
    only those. DCP gathers every rank's plan before any rank reads, so a refusal reaches every rank before a byte of
    a shard is read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadPlan

    class VerifyingReader(FileSystemReader):
        def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
            files = {f"{ckpt.SHARDS}/{self.storage_data[item.storage_index].relative_path}" for item in plan.items}
            ckpt.verify_checkpoint(path, shards=files)
            return super().prepare_local_plan(plan)

    return VerifyingReader(path / ckpt.SHARDS)


def _check_fits(path: Path, tensors: dict[str, Tensor], metadata: Metadata, optimizer: bool) -> None:
    """Refuse, in one line, a checkpoint whose tensors are not the run's: LoRA against full weights, other names or
    shapes, or no optimizer state. DCP itself would fail later, and less clearly."""
    saved = metadata.state_dict_metadata
    lora = [any("lora_" in k for k in keys if k.startswith("model.")) for keys in (saved, tensors)]
    if lora[0] != lora[1]:
        kinds = ["a LoRA adapter" if x else "a full model" for x in lora]
        raise UserError(f"checkpoint {path} holds {kinds[0]} but the model to resume is {kinds[1]}: resume with the "
                        "same lora.enabled setting")
    if optimizer and not any(k.startswith("optim.") for k in saved):
        raise UserError(f"checkpoint {path} has no optimizer state: it was saved without one, and a resume needs it: "
                        "resume from another checkpoint (--resume-from), or start a new run (--overwrite or another "
                        "output_dir)")
    theirs = {k for k in saved if k.startswith("model.")}
    extra = sorted(theirs - set(tensors))
    for key, value in tensors.items():
        size = getattr(saved.get(key), "size", None)
        if size is None or tuple(size) != tuple(value.shape):
            found = "missing" if size is None else f"{tuple(size)} saved, {tuple(value.shape)} here"
            raise UserError(f"checkpoint {path} does not fit the run's model or optimizer ({key}: {found}): resume "
                            "with the same model.student and lora settings")
    if extra:
        raise UserError(f"checkpoint {path} holds weights the model to resume does not have (e.g. {extra[0]}): "
                        "resume with the same model.student and lora settings")


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: ckpt.LoadsStateDict | None = None, restore_rng: bool = True,
                    check_state: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Load sharded checkpoint ``path`` into ``model`` (its trainable parameters, sharded or not, at this world size)
    and ``optimizer`` (when given), the scheduler state, and the RNGs (``restore_rng``). A collective. Before
    anything is loaded, every rank checks the manifest, every file's size and the hashes of the files all ranks read,
    then ``check_state(trainer_state)``. Each shard file is hashed by the ranks whose load plan reads it. Returns the
    ``trainer_state`` dict as saved."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    ckpt.verify_checkpoint(path, shards=())
    if ckpt.checkpoint_layout(path) != "sharded":
        raise UserError(f"checkpoint {path} is in the older full layout: resume it with vopd train, which reads "
                        "both layouts (vopd.checkpoint_sharded.resume)")
    trainer_state = ckpt.read_trainer_state(path, check_state)
    tensors, _ = _states(model, optimizer)
    reader = _verifying_reader(path)
    _check_fits(path, tensors, reader.read_metadata(), optimizer is not None)
    _dcp(lambda: load(tensors, storage_reader=reader, no_dist=not dist.is_initialized()))
    weights: dict[str, Any] = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))  # frozen weights stay as loaded
    if optimizer is not None:
        scalars = torch.load(path / SCALARS, map_location="cpu", weights_only=True)
        flat = {**scalars, **{k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")}}
        try:
            set_optimizer_state_dict(model, optimizer, flat,
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
        except (KeyError, ValueError) as exc:
            raise UserError(f"checkpoint {path} optimizer state does not fit ({_one_line(exc)}): resume with the "
                            "same optim settings") from None
    ckpt.load_state_file(path, "scheduler.pt", scheduler)
    if restore_rng:
        ckpt.restore_rng(path)
    return trainer_state


def saved_tensors(path: str | Path, part: str = "model") -> dict[str, Tensor]:
    """The whole tensors of sharded checkpoint ``path`` under ``part`` (``model``: the trainable parameters by name;
    ``optim``: the optimizer tensors by flat key, e.g. ``state.<name>.exp_avg``), read and verified by this process
    alone, in the saved dtypes: for inspecting a checkpoint, not how a run resumes (that reads only its shards)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    ckpt.verify_checkpoint(path, shards=())
    reader = _verifying_reader(path)
    tensors = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if key.startswith(f"{part}.") and isinstance(meta, TensorStorageMetadata)}
    _dcp(lambda: load(tensors, storage_reader=reader, no_dist=True))
    return {key.removeprefix(f"{part}."): value for key, value in tensors.items()}


def resume(path: str | Path, student: dist.WrappedStudent, optimizer: torch.optim.Optimizer,
           scheduler: ckpt.LoadsStateDict, *, check_state: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Load checkpoint ``path``, in either layout, into the student as trained (any strategy, any world size), its
    optimizer and scheduler, and restore the RNGs. A collective. Returns the ``trainer_state`` dict as saved."""
    path = Path(path)
    if ckpt.checkpoint_layout(path) == "full":  # written before sharded checkpoints: every rank reads it whole
        with student.loading() as target:  # FSDP2: a host module, sharded into the student when the block ends
            return checkpoint_legacy.load_checkpoint(path, model=target, optimizer=student.optimizer_loader(
                optimizer), scheduler=scheduler, check_state=check_state)
    return load_checkpoint(path, model=student.model, optimizer=optimizer, scheduler=scheduler,
                           check_state=check_state)
