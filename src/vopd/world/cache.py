"""The cache of built worlds: a directory per configuration hash, built atomically, verified on reuse.

A world is built in a temporary sibling directory and renamed into place at the end, with a manifest (``world.json``:
the configuration, the build's metrics, sizes and sha256 of every file) written last, so an interrupted build never
leaves a half-written world where a reader would take it for a complete one; on reuse the manifest is verified and a
partial or corrupt copy rebuilt (docs/tiny_world.md, "Cache").

What it knows: cache locations, manifests, verification, the atomic build and its one-thread rule, saving a model
with its tokenizer. What it does not know: what a world holds or how it is trained (``vopd.world.build`` for the
arithmetic world, ``vopd.world.tool_build`` for the tool world).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer

MANIFEST = "world.json"


def default_cache_dir() -> Path:
    """``$VOPD_CACHE`` or ``~/.cache/vopd``."""
    env = os.environ.get("VOPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vopd"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(root: Path, format_version: int) -> str | None:
    """None when ``root`` holds a complete world of ``format_version`` matching its manifest, else the reason."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST}"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    if manifest.get("format") != format_version:
        return f"format {manifest.get('format')} != {format_version}"
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, manifest says {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def read_metrics(root: Path) -> dict[str, Any]:
    metrics: dict[str, Any] = json.loads((root / MANIFEST).read_text())["metrics"]
    return metrics


def save_pair(model: Model, tokenizer: Tokenizer, path: Path) -> None:
    """``save_pretrained`` model + tokenizer, without transformers' per-shard progress bar in the build log."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _remove_stale_builds(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete temporary build directories left by killed builds. Only old ones: a young one may be another
    process's build in progress."""
    now = time.time()
    for path in root.glob(".world-*.tmp"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def cached_build(final: Path, *, format_version: int, key: str, config: dict[str, Any],
                 build_into: Callable[[Path], dict[str, Any]], force: bool, log: Callable[[str], None],
                 what: str = "tiny world") -> bool:
    """Make ``final`` (named ``world-*``) hold a verified world: reuse it, or call ``build_into(tmp)`` (it writes the
    files and returns the metrics) and rename ``tmp`` into place. Returns whether the cached copy was reused.

    The build always runs on one torch CPU thread (restored afterwards): a CPU matmul's summation order depends on
    the thread count, so a fixed count makes the same seed give the same models whatever the caller set; these
    models are too small to gain much from more, and on a shared CPU extra threads were measured to make SFT up to
    20x slower.
    """
    root = final.parent
    if final.exists() and not force:
        problem = verify(final, format_version)
        if problem is None:
            return True
        log(f"cached {what} {final} is corrupt or incomplete ({problem}); rebuilding it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise UserError(f"cannot write the tiny-world cache at {root} ({exc.strerror}); pass --cache-dir DIR "
                        "or set VOPD_CACHE to a writable directory") from None
    previous_threads = torch.get_num_threads()
    try:
        log(f"building {what} {key} in {root}")
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        metrics = build_into(tmp)
        metrics["build_seconds"] = round(time.perf_counter() - t0, 2)
        manifest = {"format": format_version, "key": key, "config": config, "metrics": metrics,
                    "torch_threads": torch.get_num_threads(), "files": _file_table(tmp)}
        # The manifest is written last: its presence marks a complete build.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            # Move the old (corrupt, or --force'd) copy aside first: rename cannot replace a non-empty directory.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=root))
            os.replace(final, trash / "world")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same world first; keep theirs if it verifies.
            if verify(final, format_version) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)
    log(f"{what} ready in {metrics['build_seconds']:.0f}s: {final}")
    return False
