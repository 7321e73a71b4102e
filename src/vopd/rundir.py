"""A run's output directory: claiming it for a new run, refusing to clobber one, moving one aside, resuming one.

``OUTPUT_DIR/vopd_run.yaml`` marks a directory as holding a vopd run and keeps the config it was started with, so
that resuming with a config that changes what is trained is refused (only ``RESUME_MUTABLE_KEYS`` may differ).
What it knows: the marker file, which config keys may change on resume, and the rules for an existing directory
(empty, a vopd run, anything else). What it does NOT know: the config's schema (it sees plain dicts), the
checkpoint layout beyond ``vopd.checkpoint``'s listing and verification, or the training loop.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from vopd.checkpoint import checkpoint_problem, latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from vopd.errors import UserError

log = logging.getLogger(__name__)

RUN_MARKER = "vopd_run.yaml"
#: Config keys (and sections) that may change when a run is resumed: they do not change what is being trained.
RESUME_MUTABLE_KEYS = (
    "steps", "output_dir", "loggers", "progress", "log_every", "save_every", "keep_last", "max_bad_steps",
    "eval", "data.eval", "model.device", "model.gradient_checkpointing", "rollout.batch_size", "loss.chunk_memory_mb",
    "distributed", "model.teacher_timeout_s", "model.teacher_retries",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RESUME_MUTABLE_KEYS
                       ) -> list[str]:
    """Dotted keys whose values differ between two config dicts, except keys under ``ignore``."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys
            if a.get(k, "<unset>") != b.get(k, "<unset>") and not any(k == i or k.startswith(i + ".") for i in ignore)]


def _write_marker(output_dir: Path, config: dict[str, Any]) -> None:
    text = yaml.safe_dump({"vopd_run": 1, "config": config}, sort_keys=False, width=4096)
    tmp = output_dir / f"{RUN_MARKER}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output_dir / RUN_MARKER)


def prepare_output_dir(output_dir: str | Path, config: dict[str, Any], *, resume: bool, overwrite: bool,
                       resume_from: str | Path | None = None) -> Path | None:
    """Claim ``output_dir`` for a run with ``config``. Returns the checkpoint to resume from, or None to start fresh.

    Empty or absent directory: a new run. A directory holding a vopd run: refused unless ``resume`` (the config must
    match except ``RESUME_MUTABLE_KEYS``; returns the newest valid checkpoint, None if none was saved yet) or
    ``overwrite`` (the old run is renamed to ``<dir>.old-<time>``, never deleted). A non-empty directory that is not
    a vopd run is never touched."""
    out = Path(output_dir)
    if resume and overwrite:
        raise UserError("resume and overwrite exclude each other: pass only one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a directory")
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        _write_marker(out, config)
        return None
    marker = out / RUN_MARKER
    if not marker.is_file():
        raise UserError(f"output_dir {out} is not empty and holds no vopd run ({RUN_MARKER} is missing): "
                        "choose another output_dir")
    if overwrite:
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        os.rename(out, aside)
        log.warning("moved the previous run in %s to %s", out, aside)
        out.mkdir(parents=True)
        _write_marker(out, config)
        return None
    if not resume:
        raise UserError(f"output_dir {out} already holds a vopd run: continue it with resume (--resume), move it "
                        "aside with overwrite (--overwrite), or choose another output_dir")
    try:
        old = yaml.safe_load(marker.read_text(encoding="utf-8"))["config"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise UserError(f"{marker} is unreadable: restore it or start a new run in another output_dir") from None
    diffs = config_differences(old, config)
    if diffs:
        flat_old, flat_new = _flatten(old), _flatten(config)
        shown = ", ".join(f"{k} ({flat_old.get(k, '<unset>')!r} -> {flat_new.get(k, '<unset>')!r})" for k in diffs)
        raise UserError(f"cannot resume the run in {out}: its config differs in {shown}; undo these changes, or "
                        "start a new run (overwrite or another output_dir)")
    if resume_from is not None:
        chosen = Path(resume_from)
        verify_checkpoint(chosen)
        _write_marker(out, config)
        return chosen
    saved = list_checkpoints(out)
    latest = latest_valid_checkpoint(out)
    if latest is None and saved:
        raise UserError(f"cannot resume the run in {out}: none of its checkpoints is valid; start again with "
                        "overwrite (--overwrite)")
    if saved and latest != saved[-1]:
        # Never skip silently past a damaged newest checkpoint: name it and the one that would be used.
        problem = checkpoint_problem(saved[-1], hashes=True) or ("unknown", "no detail")
        raise UserError(f"checkpoint {saved[-1]} is corrupt ({problem[0]}: {problem[1]}); the last valid one is "
                        f"{latest}: resume from it with --resume-from {latest}")
    _write_marker(out, config)
    return latest
