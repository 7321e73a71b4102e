"""Checkpoints of a run: the protocol every layout shares (atomic writes, the manifest, verification, pruning, RNG).

Layout: ``OUTPUT_DIR/checkpoints/step-NNNNNNNN/`` holds what the layout writes (today ``vopd.checkpoint_sharded``:
``shards/`` with every rank's own shards of weights and optimizer states; before it ``vopd.checkpoint_legacy``'s full
layout: ``model/`` and ``optimizer.pt``), ``scheduler.pt``, ``trainer_state.json``, ``rng.pt``, ``config.yaml`` and,
written last, ``manifest.json`` (size and sha256 of every other file; a shard file also names the rank that wrote
and hashed it). A checkpoint is built in a temporary directory next to the others (``begin_checkpoint``, rank 0) and
renamed into place once every rank's files are in it and fsync'ed (``commit_checkpoint``, rank 0), so a killed
writer, on any rank, leaves either the complete checkpoint or nothing that counts as one. A checkpoint is whole
only when every file in it is listed in its manifest with that size and hash, and the manifest's step is the
directory's. Nothing is loaded from a file before its own hash is checked: the files every reader reads (all but
the shards) by every reader, and a shard file by the rank that reads it (``shards=``), never by all.

What it knows: files, hashes, the manifest's layouts, the RNGs of python/numpy/torch, the trainer-state and
scheduler/RNG files both layouts share. What it does NOT know: how weights or optimizer states are laid out in
files (the two layout modules), ranks (its callers run it on rank 0, or pass a rank's own files), the config's
schema (it sees a plain dict), the training loop, what the trainer keeps in ``trainer_state``, the run directory
around the checkpoints (claiming it, the run marker, resume rules: ``vopd.rundir``), or the final export
(``vopd.export``).
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
from typing import Any, Callable, Collection, Literal, Protocol

import torch

from vopd.errors import UserError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("trainer_state.json", "rng.pt", "config.yaml")
#: The layouts a manifest names: ``sharded`` (version 2, written today) and ``full`` (version 1, read only).
Layout = Literal["full", "sharded"]
#: The sharded layout's directory of DCP files, and its index (every reader reads it).
SHARDS = "shards"
SHARD_INDEX = f"{SHARDS}/.metadata"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TMP_PID_RE = re.compile(r"^\.tmp-.*\.(\d+)\.[^.]+$")  # .tmp-<what>.<pid>.<random>


class HasStateDict(Protocol):
    """What a checkpoint saves a scheduler's state from: a ``torch.optim`` LR scheduler."""

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
    try:  # a zombie is dead, only not yet reaped (a killed rank whose launcher was killed too waits for init)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
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


def begin_checkpoint(output_dir: str | Path, step: int) -> Path:
    """Rank 0's first act of a save: sweep what dead writers left, then create the temporary directory (next to the
    checkpoints, so the final rename stays on one filesystem) that every rank writes its files of ``step`` into."""
    ckdir = Path(output_dir) / CHECKPOINTS
    ckdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{step:08d}.{os.getpid()}.", dir=ckdir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); a checkpoint gets the usual permissions
    return tmp


def hash_entries(root: Path, names: Collection[str], rank: int | None = None) -> list[dict[str, Any]]:
    """Manifest entries (path, size, sha256; ``rank`` for a rank's own shard files) of the files ``names`` under
    ``root``, each fsync'ed first: the writers (``torch.save``, ``save_pretrained``) do not, and the manifest must
    not vouch for bytes that are still only in the page cache."""
    entries: list[dict[str, Any]] = []
    for name in sorted(names):
        entry = {"path": name, "size": (root / name).stat().st_size, "sha256": _hash_file(root / name, sync=True)}
        entries.append(entry if rank is None else {**entry, "rank": rank})
    return entries


def commit_checkpoint(tmp: Path, step: int, *, keep_last: int, shards: Collection[dict[str, Any]] = (),
                      world_size: int = 1) -> Path:
    """Rank 0's last act of a save, once every rank has written (and hashed, ``shards``) its files in ``tmp``: the
    manifest (the files not in ``shards`` are hashed here), the rename that makes ``tmp`` the checkpoint of ``step``
    (replacing one of the same step), then pruning to the ``keep_last`` newest valid ones. ``tmp`` is removed if
    this fails. Returns the checkpoint's path."""
    ckdir = tmp.parent
    final = ckdir / f"step-{step:08d}"
    try:
        listed = {e["path"] for e in shards}
        rest = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        files = sorted([*shards, *hash_entries(tmp, [n for n in rest if n not in listed])], key=lambda e: e["path"])
        for d in [tmp, *(x for x in tmp.rglob("*") if x.is_dir())]:
            _fsync_dir(d)
        manifest = {"format": "vopd-checkpoint", "version": 2, "layout": "sharded", "step": step,
                    "world_size": world_size, "files": files}
        with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one out of the way first
            _remove_dir(final)
        os.rename(tmp, final)
        _fsync_dir(ckdir)
    except BaseException:
        discard_checkpoint(tmp)
        raise
    _prune(ckdir, final, keep_last)
    return final


def discard_checkpoint(tmp: Path) -> None:
    """Remove a temporary checkpoint directory that will not be committed (a rank failed while writing)."""
    shutil.rmtree(tmp, ignore_errors=True)


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


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` as written (unchecked: ``checkpoint_problem`` checks it)."""
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError("not a table")
    return manifest


def checkpoint_layout(path: str | Path) -> Layout:
    """``sharded`` or ``full`` (a manifest without a layout was written before sharded checkpoints existed). An
    unreadable manifest says ``sharded``: the loader's verification then names what is wrong."""
    try:
        return "full" if read_manifest(Path(path)).get("layout") != "sharded" else "sharded"
    except (OSError, ValueError):
        return "sharded"


def _is_shard(entry: dict[str, Any]) -> bool:
    """A rank's own shard file: hashed by the ranks that read it, not by every check."""
    path = str(entry["path"])
    return "rank" in entry and path.startswith(f"{SHARDS}/") and path != SHARD_INDEX


def checkpoint_problem(path: Path, *, hashes: bool, shards: Collection[str] | None = None) -> tuple[str, str] | None:
    """(file, what is wrong) for the first problem of checkpoint ``path``; None if it is intact. Every listed file
    must exist with its size; with ``hashes`` the sha256 of the files every reader reads is checked too, and of the
    shard files in ``shards`` (None: all of them; a rank passes the ones it reads, so no rank hashes every shard)."""
    try:
        manifest = read_manifest(path)
        entries = {str(e["path"]): (int(e["size"]), str(e["sha256"]), _is_shard(e)) for e in manifest["files"]}
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
    sharded = manifest.get("layout") == "sharded"
    for required in (*REQUIRED_FILES, SHARD_INDEX) if sharded else REQUIRED_FILES:
        if required not in entries:
            return required, "not listed in the manifest"
    if not sharded and not any(name.startswith("model/") for name in entries):
        return "model/", "no model files listed in the manifest"
    for name, (expected_size, sha256, is_shard) in entries.items():
        file = path / name
        if not file.is_file():
            return name, "missing"
        size = file.stat().st_size
        if size != expected_size:
            return name, f"{size} bytes, the manifest says {expected_size}"
        if hashes and (not is_shard or shards is None or name in shards) and _hash_file(file) != sha256:
            return name, "sha256 differs from the manifest"
    return None


def checkpoint_step(path: str | Path) -> int:
    """The step checkpoint ``path`` was written at (its manifest's; the directory's name when that is unreadable)."""
    try:
        step = read_manifest(Path(path))["step"]
        if type(step) is int:
            return step
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _step_of(Path(path))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest) of the run in ``output_dir``, oldest first. Not verified."""
    return _complete(Path(output_dir) / CHECKPOINTS)


def latest_valid_checkpoint(output_dir: str | Path, *, shards: Collection[str] | None = None) -> Path | None:
    """The newest checkpoint whose files all match the manifest (sha256; of the shard files, ``shards``: None for
    all); None if there is none."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path, hashes=True, shards=shards) is None:
            return path
    return None


def verify_checkpoint(path: str | Path, *, shards: Collection[str] | None = None) -> None:
    """Raise ``UserError`` naming the first missing or mismatched file of checkpoint ``path`` (sha256 of every file
    but the shard files not in ``shards``; None: all), and the newest valid checkpoint to use instead (checked the
    same way, except that no shard of it is hashed)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist: pass a checkpoints/step-NNNNNNNN directory")
    problem = checkpoint_problem(path, hashes=True, shards=shards)
    if problem is None:
        return
    file, detail = problem
    output_dir = path.parent.parent
    others = [p for p in reversed(list_checkpoints(output_dir)) if p.resolve() != path.resolve()]
    fallback = next((p for p in others if checkpoint_problem(p, hashes=True, shards=()) is None), None)
    hint = (f"the last valid one is {fallback}: resume from it instead (--resume picks the newest valid one)"
            if fallback is not None else f"no valid checkpoint is left in {output_dir / CHECKPOINTS}: start the run "
            "again (--overwrite)")
    raise UserError(f"checkpoint {path} is corrupt (file {file}: {detail}); {hint}")


# ------------------------------------------------------------------------------------ what both layouts share


def read_trainer_state(path: Path, check_state: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Checkpoint ``path``'s (verified) ``trainer_state.json``, refused by ``check_state`` (the caller's consistency
    rules) before anything else is loaded."""
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"checkpoint {path} trainer_state.json is not JSON: resume from another checkpoint") from None
    if not isinstance(trainer_state, dict):
        raise UserError(f"checkpoint {path} trainer_state.json is not a table: resume from another checkpoint")
    if check_state is not None:
        check_state(trainer_state)
    return trainer_state


def load_state_file(path: Path, file: str, into: LoadsStateDict | None) -> None:
    """Load ``path/file`` (``torch.save`` of a ``state_dict()``) into ``into``, when given."""
    if into is None:
        return
    if not (path / file).is_file():
        raise UserError(f"checkpoint {path} has no {file}: it was saved without one, and a resume needs it: resume "
                        "from another checkpoint (--resume-from), or start a new run (--overwrite or another "
                        "output_dir)")
    try:
        into.load_state_dict(torch.load(path / file, map_location="cpu", weights_only=True))
    except (ValueError, KeyError) as exc:
        raise UserError(f"checkpoint {path} {file} does not fit ({exc}): resume with the same settings") from None


def restore_rng(path: Path) -> None:
    """Restore the global RNGs saved in checkpoint ``path`` (rank 0's, on every rank). Call it last in the set-up,
    so the draws that follow equal those that followed the save."""
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
