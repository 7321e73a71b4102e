"""Checkpoints of a run: atomic writes, verification, pruning and loading back (weights, optimizer, RNG).

Layout: ``OUTPUT_DIR/checkpoints/step-NNNNNNNN/`` holds ``model/`` (``save_pretrained`` output: full weights, or the
adapter of a PEFT model; plus tokenizer files), ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``,
``rng.pt``, ``config.yaml`` and, written last, ``manifest.json`` (size and sha256 of every other file). A checkpoint
is built in a temporary directory next to the others and renamed into place, so a killed writer leaves either the
complete checkpoint or nothing that counts as one. A checkpoint is whole only when every file in it is listed in its
manifest with that size and hash, and the manifest's step is the directory's; nothing is loaded before that holds.

What it knows: files, hashes, the RNGs of python/numpy/torch, how to put saved weights back into a live model (plain
Hugging Face or PEFT). What it does NOT know: the config's schema (it sees a plain dict), the training loop, what
the trainer keeps in ``trainer_state``, the run directory around the checkpoints (claiming it, the run marker,
resume rules: ``vopd.rundir``), or the final merged export (``vopd.export``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import yaml

from vopd.errors import UserError
from vopd.models import Model, Tokenizer, is_peft

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("trainer_state.json", "rng.pt", "config.yaml")
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TMP_PID_RE = re.compile(r"^\.tmp-.*\.(\d+)\.[^.]+$")  # .tmp-<what>.<pid>.<random>


class HasStateDict(Protocol):
    """What a checkpoint saves an optimizer's or a scheduler's state from: a ``torch.optim`` optimizer or LR scheduler,
    or the gathered state of ``vopd.distributed.WrappedStudent.optimizer_state``."""

    def state_dict(self) -> dict[str, Any]: ...


class LoadsStateDict(Protocol):
    """What a checkpoint loads an optimizer's or a scheduler's state into: a ``torch.optim`` optimizer or LR scheduler,
    or ``vopd.distributed.WrappedStudent.optimizer_loader``'s sharding loader."""

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None: ...


# ------------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The state of python's ``random``, numpy's global RNG (if numpy is installed), torch CPU and every CUDA device
    (if available), in a form ``torch.load(weights_only=True)`` reads back."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None  # type: ignore[assignment]  # numpy is optional here: its generator state is saved when present
    if np is not None:
        legacy = np.random.get_state(legacy=True)  # the (name, keys, pos, has_gauss, cached) tuple form
        assert isinstance(legacy, tuple)
        name, keys, pos, has_gauss, cached = legacy
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured. CUDA states are restored for the devices present (none on CPU)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ------------------------------------------------------------------------------------------------ file helpers


def _fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _hash_file(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:  # the writers (save_pretrained, torch.save) do not fsync; do it before the manifest vouches for it
            os.fsync(f.fileno())
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only; PermissionError means it exists (another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temps(output_dir: str | Path) -> None:
    """Delete what writers that died (their pid is gone) left mid-save or mid-delete in ``output_dir/checkpoints``:
    at every save, and when a run claims the directory (a resumed run with no step left to save never saves)."""
    for p in (Path(output_dir) / CHECKPOINTS).glob(_TMP_PREFIX + "*"):
        m = _TMP_PID_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _remove_dir(path: Path) -> None:
    """Rename out of the ``step-*`` namespace first, so a crash mid-delete leaves only a stale temp directory."""
    doomed = path.with_name(f"{_TMP_PREFIX}del-{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: Model,
    tokenizer: Tokenizer | None = None,
    optimizer: HasStateDict | None = None,
    scheduler: HasStateDict | None = None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``output_dir/checkpoints/step-{step:08d}/`` atomically (replacing one of the same step), then keep only
    the ``keep_last`` newest valid checkpoints. Captures the RNG state as it is at the call. Returns the path."""
    if keep_last < 1:
        raise UserError(f"keep_last={keep_last} is invalid: keep at least 1 checkpoint")
    ckdir = Path(output_dir) / CHECKPOINTS
    ckdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output_dir)
    rng = rng_state()
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}.{os.getpid()}.", dir=ckdir))
    final = ckdir / name
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); a checkpoint gets the usual permissions
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, width=4096), encoding="utf-8")
        _write_manifest(tmp, step)
        if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one out of the way first
            _remove_dir(final)
        os.rename(tmp, final)
        _fsync_dir(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(ckdir, final, keep_last)
    return final


def _write_manifest(root: Path, step: int) -> None:
    files = []
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        files.append({"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": _hash_file(p, True)})
    for d in [root, *(x for x in root.rglob("*") if x.is_dir())]:
        _fsync_dir(d)
    manifest = {"format": "vopd-checkpoint", "version": 1, "step": step, "files": files}
    with (root / MANIFEST).open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(root)


def _prune(ckdir: Path, keep: Path, keep_last: int) -> None:
    """Keep ``keep`` and the ``keep_last - 1`` newest valid checkpoints before it; delete older ones and corrupt ones.
    Newer valid checkpoints (only possible if the caller resumed from an older one on purpose) are left alone."""
    kept = 1
    for path in reversed(_complete(ckdir)):
        if path == keep:
            continue
        # Sizes only: hashing every old checkpoint on each save is slow.
        valid = checkpoint_problem(path, hashes=False) is None
        if _step_of(path) > _step_of(keep):
            if not valid:
                _remove_dir(path)
        elif valid and kept < keep_last:
            kept += 1
        else:
            _remove_dir(path)


# -------------------------------------------------------------------------------------------- verification


def _complete(ckdir: Path) -> list[Path]:
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if _STEP_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def checkpoint_problem(path: Path, *, hashes: bool) -> tuple[str, str] | None:
    """(file, what is wrong) for the first problem of checkpoint ``path``; None if it is intact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        entries = {str(e["path"]): (int(e["size"]), str(e["sha256"])) for e in manifest["files"]}
        step = manifest["step"]
    except FileNotFoundError:
        return MANIFEST, "missing (the checkpoint was not completed)"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return MANIFEST, f"unreadable ({type(exc).__name__})"
    if type(step) is not int or (_STEP_RE.match(path.name) and step != _step_of(path)):
        return MANIFEST, f"its step {step!r} is not the directory's ({path.name})"
    escaping = [name for name in entries if name.startswith("/") or ".." in Path(name).parts]
    if escaping:
        return escaping[0], "a path outside the checkpoint in the manifest"
    on_disk = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    unlisted = sorted(name for name in on_disk if name not in entries and name != MANIFEST)
    if unlisted:
        return unlisted[0], "not listed in the manifest (added after the checkpoint was written)"
    for required in REQUIRED_FILES:
        if required not in entries:
            return required, "not listed in the manifest"
    if not any(name.startswith("model/") for name in entries):
        return "model/", "no model files listed in the manifest"
    for name, (expected_size, sha256) in entries.items():
        file = path / name
        if not file.is_file():
            return name, "missing"
        size = file.stat().st_size
        if size != expected_size:
            return name, f"{size} bytes, the manifest says {expected_size}"
        if hashes and _hash_file(file) != sha256:
            return name, "sha256 differs from the manifest"
    return None


def checkpoint_step(path: str | Path) -> int:
    """The step checkpoint ``path`` was written at (its manifest's; the directory's name when that is unreadable)."""
    try:
        step = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))["step"]
        if type(step) is int:
            return step
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _step_of(Path(path))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest) of the run in ``output_dir``, oldest first. Not verified."""
    return _complete(Path(output_dir) / CHECKPOINTS)


def latest_valid_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files all match the manifest (sha256); None if there is none."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path, hashes=True) is None:
            return path
    return None


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``UserError`` naming the first missing or mismatched file of checkpoint ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist: pass a checkpoints/step-NNNNNNNN directory")
    problem = checkpoint_problem(path, hashes=True)
    if problem is None:
        return
    file, detail = problem
    output_dir = path.parent.parent
    others = [p for p in reversed(list_checkpoints(output_dir)) if p.resolve() != path.resolve()]
    fallback = next((p for p in others if checkpoint_problem(p, hashes=True) is None), None)
    hint = (f"the last valid one is {fallback}: resume from it instead (--resume picks the newest valid one)"
            if fallback is not None else f"no valid checkpoint is left in {output_dir / CHECKPOINTS}: start the run "
            "again (--overwrite)")
    raise UserError(f"checkpoint {path} is corrupt (file {file}: {detail}); {hint}")


# ---------------------------------------------------------------------------------------------------- loading


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file, device="cpu"))
    return state


def _load_weights(model_dir: Path, model: Model, where: Path) -> None:
    if is_peft(model) != (model_dir / "adapter_config.json").is_file():
        kinds = ("a LoRA adapter", "a full model") if is_peft(model) else ("a full model", "a LoRA adapter")
        raise UserError(f"checkpoint {where} holds {kinds[1]} but the model to resume is {kinds[0]}: "
                        "resume with the same lora.enabled setting")
    state = _read_safetensors(model_dir)
    if is_peft(model):
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state, adapter_name=getattr(model, "active_adapter", "default"))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            bad = (list(result.unexpected_keys) + missing)[:3]
            raise UserError(f"checkpoint {where} adapter does not fit the model (e.g. {bad}): "
                            "resume with the same lora settings")
        return
    own = model.state_dict()
    # A missing key is fine if it is tied to a loaded one (lm_head.weight shares the embedding's storage).
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs]
    if not missing and all(k in own and own[k].shape == v.shape for k, v in state.items()):
        model.load_state_dict(state, strict=False)
        return
    # Saved names differ from the live ones: transformers converts some architectures' weights (e.g. fused MoE
    # experts) between file and memory. Let transformers load the files, then copy into the live model.
    fresh, info = type(model).from_pretrained(
        model_dir, dtype=next(model.parameters()).dtype, output_loading_info=True
    )
    bad = [k for name in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(name, [])]
    if bad:
        raise UserError(f"checkpoint {where} model does not fit the model to resume (e.g. {bad[:3]}): "
                        "resume with the same model.student")
    model.load_state_dict(fresh.state_dict())
    del fresh


def load_checkpoint(
    path: str | Path, *, model: Model, optimizer: LoadsStateDict | None = None,
    scheduler: LoadsStateDict | None = None, restore_rng: bool = True,
    check_state: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Verify checkpoint ``path``, load its weights into ``model`` (the adapter for a PEFT model), the optimizer and
    scheduler states (when given), and restore the global RNGs (``restore_rng``; call this last in the set-up, so
    the draws that follow equal those that followed the save). ``check_state(trainer_state)`` runs after the
    verification and before anything is loaded (the caller's consistency rules; raise to refuse). Returns the
    ``trainer_state`` dict as saved."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"checkpoint {path} trainer_state.json is not JSON: resume from another checkpoint") from None
    if not isinstance(trainer_state, dict):
        raise UserError(f"checkpoint {path} trainer_state.json is not a table: resume from another checkpoint")
    if check_state is not None:
        check_state(trainer_state)
    _load_weights(path / "model", model, path)
    for obj, file in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        if not (path / file).is_file():
            raise UserError(f"checkpoint {path} has no {file}: it was saved without one; resume without it")
        try:
            obj.load_state_dict(torch.load(path / file, map_location="cpu", weights_only=True))
        except (ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {path} {file} does not fit ({exc}): resume with the same settings") from None
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return trainer_state
