"""Checkpoints in the full layout (manifest version 1), written file for file as vopd wrote them before sharded
checkpoints (``vopd.checkpoint.save_checkpoint`` at commit f0a8922; its temporary directory and pruning are left
out, since a reader never sees them). Nothing in vopd writes this layout any more; the tests that check that such
checkpoints still resume write them with this."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from vopd.checkpoint import CHECKPOINTS, MANIFEST, rng_state


def write_full_checkpoint(output_dir: str | Path, step: int, *, model: Any, tokenizer: Any = None,
                          optimizer_state: dict[str, Any] | None = None, scheduler: Any = None,
                          trainer_state: dict[str, Any], config: dict[str, Any],
                          rng: dict[str, Any] | None = None) -> Path:
    """``OUTPUT_DIR/checkpoints/step-N/`` as the old writer left it. ``optimizer_state`` is ``torch.optim``'s own
    (keyed by parameter index: ``optimizer.state_dict()`` in one process); ``rng`` defaults to the RNGs now."""
    path = Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"
    model.save_pretrained(path / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "model")
    if optimizer_state is not None:
        torch.save(optimizer_state, path / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
    torch.save(rng_state() if rng is None else rng, path / "rng.pt")
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, width=4096), encoding="utf-8")
    files = [{"path": p.relative_to(path).as_posix(), "size": p.stat().st_size,
              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sorted(path.rglob("*")) if p.is_file()]
    manifest = {"format": "vopd-checkpoint", "version": 1, "step": step, "files": files}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return path
