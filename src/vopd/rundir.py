"""A run's output directory: claiming it for a new run, refusing to clobber one, moving one aside, resuming one.

``OUTPUT_DIR/vopd_run.yaml`` marks a directory as holding a vopd run and keeps the config it was started with, so
that resuming with a config that changes what is trained is refused (only ``RESUME_MUTABLE_KEYS`` may differ). The
same rule (``config_differences``) applies to the config saved inside the checkpoint a run resumes from: a
checkpoint of another run is refused, naming the first keys that differ. Resuming never replaces saved work that is
newer than the checkpoint it resumes from (later valid checkpoints, ``final/`` written at a later step, or a history
in ``metrics.jsonl`` with no checkpoint at all) unless asked to (``discard_newer``: that work is moved to
``OUTPUT_DIR/discarded-<time>/``, never deleted). Every refusal comes before anything is written: paths of the wrong
kind (``RUN_PATHS``, an ``output_dir`` under a file) and a ``resume_from`` that is not a checkpoint directory are
refused even before anything is loaded (``check_output_paths``), and the checkpoint a resume starts from is verified,
its config compared and the caller's check of its trainer state run before the directory is created or changed.

What it knows: the marker file, which config keys may change on resume, the rules for an existing directory (empty,
a vopd run, anything else), where a run keeps its checkpoints, ``final/`` (whose ``trainer_state.json`` records
the step it was exported at) and history. What it does NOT know: the config's schema (it sees plain dicts), the
checkpoint layout beyond ``vopd.checkpoint``'s listing and verification, the metrics' contents, or the loop.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from vopd.checkpoint import (CHECKPOINTS, MANIFEST, checkpoint_problem, checkpoint_step, latest_valid_checkpoint,
                             list_checkpoints, verify_checkpoint)
from vopd.config import TrainConfig, config_to_dict
from vopd.errors import UserError
from vopd.fsfaults import DIRECTORY, FILE, check_can_be_directory, check_kinds
from vopd.metrics import METRICS_FILE, read_metrics
from vopd.teacher_config import canonical

log = logging.getLogger(__name__)

RUN_MARKER = "vopd_run.yaml"
FINAL = "final"
#: In ``final/``: the trainer state the final model was exported at (its ``step``).
FINAL_STATE = "trainer_state.json"
#: Config keys (and sections) that may change when a run is resumed: they do not change what is being trained.
RESUME_MUTABLE_KEYS = (
    "steps", "output_dir", "loggers", "progress", "log_every", "save_every", "keep_last", "max_bad_steps",
    "eval", "data.eval", "model.device", "model.gradient_checkpointing", "rollout.batch_size", "loss.chunk_memory_mb",
    "distributed", "model.teachers.*.timeout_s", "model.teachers.*.retries", "optim.max_update_ratio",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys; a list of named tables (``model.teachers``) by name: ``model.teachers.NAME.dtype``."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for entry in value:
                flat.update(_flatten(entry, f"{prefix}{key}.{entry['name']}."))
        else:
            flat[prefix + key] = value
    return flat


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    """``key`` is one of ``ignore`` or under one (``*`` stands for one name, e.g. a teacher's)."""
    return any(fnmatch.fnmatchcase(key, i) or fnmatch.fnmatchcase(key, i + ".*") for i in ignore)


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RESUME_MUTABLE_KEYS
                       ) -> list[str]:
    """Dotted keys whose values differ between two config dicts, except keys under ``ignore``. A key the older
    config lacks (one a later vopd added) counts as holding its default: runs saved before an upgrade that added
    keys still resume, unless the new key is set to something else. Both are compared in today's spelling
    (``vopd.teacher_config.canonical``): a run saved with the old teacher keys resumes under the new ones."""
    a, b = _flatten(canonical(old)), _flatten(canonical(new))
    defaults = _flatten(config_to_dict(TrainConfig()))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k, defaults.get(k, "<unset>")) != b.get(k, "<unset>") and not _ignored(k, ignore)]


def _refuse_differences(what: str, old: dict[str, Any], new: dict[str, Any], fix: str) -> None:
    """The one resume rule, for the run's marker and for a checkpoint's own config alike."""
    diffs = config_differences(old, new)
    if diffs:
        flat_old, flat_new = _flatten(canonical(old)), _flatten(canonical(new))
        shown = ", ".join(f"{k} ({flat_old.get(k, '<unset>')!r} -> {flat_new.get(k, '<unset>')!r})" for k in diffs)
        raise UserError(f"{what}: its config differs in {shown}; {fix}")


def check_checkpoint_config(checkpoint: Path, config: dict[str, Any]) -> None:
    """The checkpoint's own ``config.yaml`` matches ``config`` on every key that is not ``RESUME_MUTABLE_KEYS``."""
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {checkpoint} has no readable config.yaml: resume from another checkpoint")
    _refuse_differences(f"checkpoint {checkpoint} is not from this run", saved, config,
                        "resume from a checkpoint of this run, or start a new run (another output_dir)")


def final_step(output_dir: Path) -> int | None:
    """The step ``final/`` was exported at; None without a final model, -1 when it does not say (an older run)."""
    final = output_dir / FINAL
    if not final.exists():
        return None
    try:
        step = json.loads((final / FINAL_STATE).read_text(encoding="utf-8"))["step"]
        return step if type(step) is int else -1
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _newer_work(out: Path, step: int) -> list[Path]:
    """What a run resumed at ``step`` would replace: valid (by size) checkpoints after it, a ``final/`` exported at a
    later or unknown step, and, when it starts from scratch, a history."""
    newer = [p for p in list_checkpoints(out)
             if checkpoint_step(p) > step and checkpoint_problem(p, hashes=False) is None]
    exported = final_step(out)
    if exported is not None and (exported > step or exported < 0):
        newer.append(out / FINAL)
    history = out / METRICS_FILE
    if step == 0 and history.is_file() and read_metrics(history):
        newer.append(history)
    return newer


def _discard(out: Path, newer: list[Path]) -> Path:
    """Move ``newer`` into ``out/discarded-<time>/`` (the history is copied: the writer truncates it in place)."""
    aside = out / f"discarded-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        aside, n = out / f"discarded-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    (aside / CHECKPOINTS).mkdir(parents=True)
    if (out / METRICS_FILE).is_file():
        shutil.copy2(out / METRICS_FILE, aside / METRICS_FILE)
    for path in newer:
        if path.name != METRICS_FILE:
            os.rename(path, aside / (path.name if path.name == FINAL else f"{CHECKPOINTS}/{path.name}"))
    log.warning("moved the newer work of %s (%s) to %s", out, ", ".join(p.name for p in newer), aside)
    return aside


def _write_marker(output_dir: Path, config: dict[str, Any]) -> None:
    text = yaml.safe_dump({"vopd_run": 1, "config": config}, sort_keys=False, width=4096)
    tmp = output_dir / f"{RUN_MARKER}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output_dir / RUN_MARKER)


#: What a run keeps in its ``output_dir`` (besides its marker), by kind: a path of another kind is refused before the
#: run starts.
RUN_PATHS = {CHECKPOINTS: (DIRECTORY, "its checkpoints"), FINAL: (DIRECTORY, "its final model"),
             METRICS_FILE: (FILE, "its history"), "config.yaml": (FILE, "its config")}


def check_output_paths(output_dir: str | Path, resume_from: str | Path | None = None) -> None:
    """What can be refused about the paths of a run before anything is loaded (nothing is hashed or written): an
    ``output_dir`` that cannot be a directory, an entry of the run it holds of the wrong kind (``RUN_PATHS``; a
    directory holding no run is refused as such when the run claims it), a ``resume_from`` that is not a checkpoint
    directory."""
    out = Path(output_dir)
    check_can_be_directory(out, "output_dir")
    if (out / RUN_MARKER).is_file():
        check_kinds(out, RUN_PATHS, "output_dir")
    if resume_from is None:
        return
    path = Path(resume_from)
    where = "pass a checkpoint directory (OUTPUT_DIR/checkpoints/step-NNNNNNNN), or --resume for output_dir's newest"
    if not path.exists():
        raise UserError(f"--resume-from {path} does not exist: {where}")
    if not path.is_dir():
        raise UserError(f"--resume-from {path} is a file, not a checkpoint: {where}")
    if (path / RUN_MARKER).is_file() or (path / CHECKPOINTS).is_dir():
        saved = list_checkpoints(path)
        which = f"pass one of its checkpoints (the newest: {saved[-1]})" if saved else "it has no checkpoint yet"
        raise UserError(f"--resume-from {path} is a run's output_dir, not one of its checkpoints: {which}, or set "
                        f"output_dir={path} and pass --resume")
    if not (path / MANIFEST).is_file():
        raise UserError(f"--resume-from {path} is not a checkpoint (no {MANIFEST}: another directory, or a checkpoint "
                        f"whose save did not complete): {where}")


def _checked(checkpoint: Path, config: dict[str, Any], check: Callable[[Path], None] | None) -> Path:
    """``checkpoint`` (already verified), once its config is this run's and the caller's ``check`` passed."""
    check_checkpoint_config(checkpoint, config)
    if check is not None:
        check(checkpoint)
    return checkpoint


def _newest_valid(out: Path) -> Path | None:
    """The checkpoint ``--resume`` starts from: the newest, which must be valid (never skipped silently)."""
    # The shard files of a sharded checkpoint are hashed by the ranks that read them (vopd.checkpoint_sharded),
    # not here: rank 0 alone would otherwise hash the whole checkpoint before every rank hashes its part again.
    saved = list_checkpoints(out)
    chosen = latest_valid_checkpoint(out, shards=())
    if chosen is None and saved:
        raise UserError(f"cannot resume the run in {out}: none of its checkpoints is valid; start again with "
                        "overwrite (--overwrite)")
    if saved and chosen != saved[-1]:
        # Never skip silently past a damaged newest checkpoint: name it and the one that would be used.
        problem = checkpoint_problem(saved[-1], hashes=True, shards=()) or ("unknown", "no detail")
        raise UserError(f"checkpoint {saved[-1]} is corrupt ({problem[0]}: {problem[1]}); the last valid one "
                        f"is {chosen}: resume from it with --resume-from {chosen}")
    unfinished = sorted(p.name for p in (out / CHECKPOINTS).glob("step-*")
                        if p.is_dir() and not (p / MANIFEST).exists())
    if unfinished:  # not a checkpoint (no manifest): never loaded, but not passed over without a word
        log.warning("%s: %s has no %s (not a complete checkpoint): ignored; resuming from %s", out / CHECKPOINTS,
                    ", ".join(unfinished), MANIFEST, chosen.name if chosen is not None else "scratch")
    return chosen


@dataclass(frozen=True)
class Claim:
    """What claiming ``out`` will do, decided read-only by ``judge_output_dir``: ``new`` (create it and write the
    marker; ``checkpoint`` set when another run's checkpoint is continued here), ``overwrite`` (move the old run
    aside), ``resume`` (move ``newer`` aside when ``discard_newer``, rewrite the marker)."""
    out: Path
    config: dict[str, Any]
    action: Literal["new", "overwrite", "resume"]
    checkpoint: Path | None = None
    newer: tuple[Path, ...] = ()


def judge_output_dir(output_dir: str | Path, config: dict[str, Any], *, resume: bool, overwrite: bool,
                     resume_from: str | Path | None = None, discard_newer: bool = False,
                     check: Callable[[Path], None] | None = None) -> Claim:
    """Every refusal of claiming ``output_dir`` for a run with ``config``, with nothing written: what the claim will
    do (``claim_output_dir`` does it).

    Empty or absent directory: a new run, or with ``resume_from`` (a valid checkpoint of a run with this config)
    that run continued here. A directory holding a vopd run: refused unless ``resume`` (the config must match except
    ``RESUME_MUTABLE_KEYS``; resumes from ``resume_from`` or the newest valid checkpoint, whose own config must match
    too; from scratch if none was saved yet and the run has no history) or ``overwrite`` (the old run is renamed to
    ``<dir>.old-<time>``, never deleted). Work newer than the chosen checkpoint is refused unless ``discard_newer``
    (then moved aside). A non-empty directory that is not a vopd run is never touched. ``check(checkpoint)``: the
    caller's rules for the checkpoint it resumes from (its trainer state), run once its files and config are
    verified."""
    out = Path(output_dir)
    if resume and overwrite:
        raise UserError("resume and overwrite exclude each other: pass only one")
    check_output_paths(out, resume_from)
    chosen: Path | None = None
    if resume_from is not None:  # the checkpoint asked for, wherever it is, before anything is written
        verify_checkpoint(Path(resume_from), shards=())
        chosen = _checked(Path(resume_from), config, check)
    if not out.is_dir() or not any(out.iterdir()):
        return Claim(out, config, "new", chosen)
    marker = out / RUN_MARKER
    if not marker.is_file():
        raise UserError(f"output_dir {out} is not empty and holds no vopd run ({RUN_MARKER} is missing): "
                        "choose another output_dir")
    if overwrite:
        return Claim(out, config, "overwrite")
    if not resume:
        raise UserError(f"output_dir {out} already holds a vopd run: continue it with resume (--resume), move it "
                        "aside with overwrite (--overwrite), or choose another output_dir")
    try:
        old = yaml.safe_load(marker.read_text(encoding="utf-8"))["config"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise UserError(f"{marker} is unreadable: restore it or start a new run in another output_dir") from None
    _refuse_differences(f"cannot resume the run in {out}", old, config,
                        "undo these changes, or start a new run (overwrite or another output_dir)")
    if resume_from is None:
        newest = _newest_valid(out)
        chosen = None if newest is None else _checked(newest, config, check)
    step = checkpoint_step(chosen) if chosen is not None else 0
    newer = _newer_work(out, step)
    if newer and not discard_newer:
        names = ", ".join(p.name for p in newer)
        start = f"checkpoint {chosen.name}" if chosen is not None else "scratch (no checkpoint was saved)"
        raise UserError(f"cannot resume the run in {out} from {start}: it would replace newer work ({names}); resume "
                        "from the newest checkpoint (--resume), or pass --discard-newer to move that work to "
                        f"{out}/discarded-<time>/ and continue from {start.split(' (')[0]}")
    return Claim(out, config, "resume", chosen, tuple(newer))


def claim_output_dir(claim: Claim) -> Path | None:
    """Do what ``claim`` (``judge_output_dir``'s) says; the checkpoint to resume from, or None to start fresh. A
    directory another process filled since the judgement is refused, nothing written."""
    out = claim.out
    if claim.action == "new":
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"output_dir {out} was filled by something else while this run started: run the "
                            "command again")
        out.mkdir(parents=True, exist_ok=True)
        _write_marker(out, claim.config)
        if claim.checkpoint is not None:
            log.warning("resume: output_dir %s held no run: it continues the run of %s from step %d (the history "
                        "of the steps before is that run's)", out, claim.checkpoint, checkpoint_step(claim.checkpoint))
        return claim.checkpoint
    if claim.action == "overwrite":
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        os.rename(out, aside)
        log.warning("moved the previous run in %s to %s", out, aside)
        out.mkdir(parents=True)
        _write_marker(out, claim.config)
        return None
    if claim.newer:
        _discard(out, list(claim.newer))
    _write_marker(out, claim.config)
    return claim.checkpoint


def prepare_output_dir(output_dir: str | Path, config: dict[str, Any], *, resume: bool, overwrite: bool,
                       resume_from: str | Path | None = None, discard_newer: bool = False,
                       check: Callable[[Path], None] | None = None) -> Path | None:
    """Claim ``output_dir`` for a run with ``config`` (``judge_output_dir``, then ``claim_output_dir``): the
    checkpoint to resume from, or None to start fresh. Every refusal comes before anything is written."""
    return claim_output_dir(judge_output_dir(output_dir, config, resume=resume, overwrite=overwrite,
                                             resume_from=resume_from, discard_newer=discard_newer, check=check))
