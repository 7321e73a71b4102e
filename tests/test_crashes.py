"""Crashes with real processes: `python -m vopd train` killed with SIGKILL in the middle of a step, of a metrics
line and of a checkpoint, and at random times, then resumed; the run's files must end as an uninterrupted run's
(metrics.jsonl line for line, the final weights bit for bit). A fault is placed by a wrapper that patches one
function and then runs `python -m vopd` itself (runpy); the random kills need no wrapper."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vopd import checkpoint as ckpt
from vopd.config import load_config
from vopd.errors import UserError
from vopd.metrics import read_metrics
from vopd.train import Start, train

pytestmark = pytest.mark.usefixtures("one_thread")

#: Keys that measure the machine, not the run.
_MACHINE = ("time_", "tokens_per_s", "peak_memory_mb")

#: Hang (printing FAULT first) at the Nth call of this process's step, metrics line or checkpoint.
FAULTS = textwrap.dedent("""
    import json, runpy, sys, time
    import torch
    fault, at = sys.argv[1], int(sys.argv[2])
    sys.argv = ["vopd", *sys.argv[3:]]

    def hang():
        print("FAULT", fault, flush=True)
        time.sleep(600)

    if fault == "step":  # after the step's backward passes, before its update
        import vopd.train as tr
        real_gradients, calls = tr.accumulate_gradients, []
        def gradients(*args, **kwargs):
            out = real_gradients(*args, **kwargs)
            calls.append(1)
            if len(calls) == at:
                hang()
            return out
        tr.accumulate_gradients = gradients
    elif fault == "history":  # half of a metrics line on disk
        from vopd.metrics import MetricsWriter
        real_write = MetricsWriter.write
        def write(self, step, metrics):
            if step == at:
                line = json.dumps({"step": step, **metrics}, default=str)
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                hang()
            real_write(self, step, metrics)
        MetricsWriter.write = write
    elif fault == "checkpoint":  # the first tensor of a checkpoint's shard file written, the rest not
        import vopd.checkpoint_sharded as ck
        real_checkpoint, real_torch_save = ck.save_checkpoint, torch.save
        def save_checkpoint(out, step, **kwargs):
            if step == at:
                def save(*args, **kw):
                    real_torch_save(*args, **kw)
                    hang()
                torch.save = save
            return real_checkpoint(out, step, **kwargs)
        ck.save_checkpoint = save_checkpoint
    runpy.run_module("vopd", run_name="__main__", alter_sys=True)
""")


def _env() -> dict[str, str]:
    import vopd

    src = str(Path(vopd.__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _start(args: list[str], fault: tuple[str, int] | None, tmp_path: Path) -> subprocess.Popen:
    if fault is None:
        cmd = [sys.executable, "-m", "vopd", *args]
    else:
        script = tmp_path / "faults.py"
        script.write_text(FAULTS)
        cmd = [sys.executable, str(script), fault[0], str(fault[1]), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _kill_at_fault(args: list[str], fault: tuple[str, int], tmp_path: Path) -> None:
    proc = _start(args, fault, tmp_path)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process does
            if line.startswith("FAULT"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{fault} was never reached: {err[-2000:]}"


def _same_run(reference: Path, out: Path) -> None:
    """The run in ``out`` ended as the uninterrupted ``reference``: one line per step, equal numbers (those that do
    not measure the machine), equal final weights."""
    ref, got = read_metrics(reference / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for a, b in zip(ref, got):
        keys = {k for k in a if not k.startswith(_MACHINE)}
        assert keys == {k for k in b if not k.startswith(_MACHINE)}, a["step"]
        assert {k: b[k] for k in keys} == {k: a[k] for k in keys}, a["step"]
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (reference, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")], "temporary files left"
    ckpt.verify_checkpoint(ckpt.list_checkpoints(out)[-1])


def _reference(overrides: list[str], tmp_path: Path) -> Path:
    return train(load_config(None, overrides + [f"output_dir={tmp_path / 'reference'}"]), log=_quiet).output_dir


def _quiet(_msg: str) -> None:
    pass


def test_killed_mid_step_mid_line_and_mid_checkpoint_then_resumed_equals_uninterrupted(train_overrides, tmp_path):
    base = train_overrides + ["steps=6", "save_every=2", "optim.schedule=cosine"]
    reference = _reference(base, tmp_path)
    out = Path(load_config(None, base).output_dir)
    args = ["train", *base]

    # 1. killed in the middle of step 4 (lines 1-3 written, checkpoint 2 saved)
    _kill_at_fault(args, ("step", 4), tmp_path)
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    # 2. resumed at 2 (line 3 dropped, then recomputed), killed half-way through the line of step 5
    _kill_at_fault([*args, "--resume"], ("history", 5), tmp_path)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable line"):
        assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    # 3. resumed at 4 (the torn line dropped), killed while writing the checkpoint of step 6
    _kill_at_fault([*args, "--resume"], ("checkpoint", 6), tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    [partial] = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step-00000006")]
    assert (partial / "shards").is_dir() and not (partial / "shards" / ".metadata").exists()  # killed inside DCP
    assert not (out / "final").exists()
    # 4. resumed at 4 again: steps 5 and 6 are recomputed, their old lines replaced
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert train(load_config(None, base), start=Start.resume(), log=_quiet).steps_done == 6
    _same_run(reference, out)


def test_a_finished_run_resumed_sweeps_what_a_killed_delete_left(train_overrides, tmp_path):
    """Killed while deleting an old checkpoint after the last step's save (a random kill found it): the resumed run
    has no step left to save, so it is the claim of the directory that must sweep the dead writer's temp dir."""
    base = train_overrides + ["steps=2", "save_every=1", "keep_last=1"]
    out = train(load_config(None, base), log=_quiet).output_dir
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that existed and is gone, as a killed writer's is
    left = out / "checkpoints" / f".tmp-del-step-00000001.{dead.pid}.0a1b2c3d"
    (left / "model").mkdir(parents=True)
    (left / "model" / "model.safetensors").write_bytes(b"half-deleted")
    assert train(load_config(None, base), start=Start.resume(), log=_quiet).steps_done == 2
    assert not left.exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def _kill_at_random_times(base: list[str], kills: int, seed: int, run_s: float, tmp_path: Path) -> list[str]:
    """Start `vopd train` (with --resume after the first start), kill it with SIGKILL at a random time within the
    ``run_s`` seconds that the steps left would take, ``kills`` times; a resume refused for a history without
    checkpoint (a kill before the first checkpoint) is retried with --discard-newer, as its message says. Returns
    what happened, for messages."""
    rng = random.Random(seed)
    cfg = load_config(None, base)
    out = Path(cfg.output_dir)
    events: list[str] = []
    resume: list[str] = []
    while len([e for e in events if e.startswith("killed")]) < kills:
        proc = _start(["train", *base, *resume], None, tmp_path)
        assert proc.stdout is not None
        for line in proc.stdout:
            if "self-check" in line:  # the last pre-flight line: the loop starts now
                break
        saved = ckpt.list_checkpoints(out)
        left = max(1 - (ckpt.checkpoint_step(saved[-1]) if saved else 0) / cfg.steps, 1 / cfg.steps)
        delay = rng.uniform(0.0, run_s * left)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            events.append(f"killed after {delay:.2f}s")
        elif proc.returncode == 2 and "--discard-newer" in err:
            events.append("refused: history without checkpoint")
            resume = ["--resume", "--discard-newer"]
            continue
        else:
            assert proc.returncode == 0, err[-2000:]
            events.append("finished")
            break
        resume = ["--resume"]
    return events


def _finish(cfg: Any) -> None:
    try:
        train(cfg, start=Start.resume(), log=_quiet)
    except UserError as exc:
        assert "--discard-newer" in str(exc)
        train(cfg, start=Start.resume(discard_newer=True), log=_quiet)


@pytest.mark.parametrize("kills,steps", [
    pytest.param(2, 3, id="fast"),
    pytest.param(8, 8, id="long", marks=pytest.mark.slow),
])
def test_killed_at_random_times_then_resumed_equals_uninterrupted(kills, steps, train_overrides, tmp_path):
    base = train_overrides + [f"steps={steps}", "save_every=1", "keep_last=2", "optim.schedule=cosine"]
    reference = _reference(base, tmp_path)
    # the loop's time in a process of its own: the steps, their checkpoints (~50 ms each here) and the final export
    run_s = sum(m["time_step"] for m in read_metrics(reference / "metrics.jsonl")) + 0.08 * (steps + 1)
    events = _kill_at_random_times(base, kills, seed=steps, run_s=run_s, tmp_path=tmp_path)
    assert any(e.startswith("killed") for e in events), events
    cfg = load_config(None, base)
    _finish(cfg)
    try:
        _same_run(reference, Path(cfg.output_dir))
    except AssertionError as exc:
        raise AssertionError(f"{exc} (after {events})") from None

