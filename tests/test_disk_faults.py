"""File-system faults are one line and lose nothing, on the micro world: a full disk (a patched writer raising
``ENOSPC`` partway) while a checkpoint, the final model or the history is written stops the run with one line
naming the path and the last valid checkpoint, which stays the newest; the partial files are removed and a resume
continues exactly; on 2 gloo ranks (FSDP2, the real command line) a full disk on rank 0 while final/ is streamed
from the shards ends both ranks with the same line, hangs none, leaves no final/, and --resume exports it. Paths of a
run that cannot be what the run needs are refused before anything is loaded."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import types
from pathlib import Path
from typing import Any

import pytest

from vopd import checkpoint as ckpt
from vopd import checkpoint_sharded
from vopd.cli import main
from vopd.config import load_config
from vopd.errors import UserError
from vopd.metrics import MetricsWriter, read_metrics
from vopd.train import Start, train

pytestmark = pytest.mark.usefixtures("one_thread")
FULL = os.strerror(errno.ENOSPC)


def _quiet(_msg: str) -> None:
    pass


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out / "metrics.jsonl")]


def _full(path: Any = None) -> OSError:
    return OSError(errno.ENOSPC, FULL, *(() if path is None else (str(path),)))


def _fill_disk(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up in the middle of writing ``where``: a part of it is written, then the write fails."""
    if where == "shards":  # DCP's writer: the first tensor is written, the second half-written
        import torch.distributed.checkpoint.filesystem as dcp_files

        real, calls = dcp_files._write_item, [0]

        def write_item(transforms, stream, data, *args: Any, **kwargs: Any):
            calls[0] += 1
            if calls[0] == 1:
                stream.write(b"\0" * 16)
                raise _full()
            return real(transforms, stream, data, *args, **kwargs)

        monkeypatch.setattr(dcp_files, "_write_item", write_item)
    elif where == "small files":  # rng.pt cut short
        real_bytes = checkpoint_sharded._write_bytes

        def write_bytes(path: Path, data: bytes) -> None:
            if path.name == "rng.pt":
                path.write_bytes(data[: len(data) // 2])
                raise _full(path)
            real_bytes(path, data)

        monkeypatch.setattr(checkpoint_sharded, "_write_bytes", write_bytes)
    elif where == "manifest":  # every file written and hashed; the manifest cut short
        def dump(obj: Any, f: Any, **kwargs: Any) -> None:
            f.write(json.dumps(obj)[:40])
            raise _full()

        monkeypatch.setattr(ckpt, "json", types.SimpleNamespace(dump=dump, loads=json.loads, dumps=json.dumps))
    elif where == "history":  # from the line of step 2 on: part of it reaches the file, flushing it fails, and so
        real_write = MetricsWriter.write  # does the flush when the file is closed

        class FullDisk:
            def __init__(self, file: Any) -> None:
                self.file = file

            def write(self, text: str) -> int:
                return self.file.write(text[:15])

            def flush(self) -> None:
                raise _full()

            def close(self) -> None:
                self.file.close()
                raise _full()

        def write(self: MetricsWriter, step: int, metrics: dict[str, Any]) -> None:
            if step == 2:
                self._file = FullDisk(self._file)
            real_write(self, step, metrics)

        monkeypatch.setattr(MetricsWriter, "write", write)


@pytest.mark.parametrize("where", ["shards", "small files", "manifest", "history"])
def test_a_full_disk_mid_run_stops_it_in_one_line_and_loses_nothing(where, micro_world, train_overrides,
                                                                    monkeypatch):
    cfg = load_config(None, train_overrides + ["steps=3", "save_every=1"])
    out = Path(cfg.output_dir)
    train(cfg, stop_at=1, log=_quiet)
    first = out / "checkpoints" / "step-00000001"
    saved = _snapshot(first)

    _fill_disk(where, monkeypatch)
    with pytest.raises(UserError) as info:
        train(cfg, start=Start.resume(), log=_quiet)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    if where == "history":
        assert re.search(rf"cannot write the history .*metrics.jsonl \(OSError: \[Errno 28\] {FULL}\); the last "
                         rf"valid checkpoint is {re.escape(str(first))}: free disk space .* resume with --resume$",
                         message), message
    else:
        assert re.search(rf"^checkpoint step 2 could not be written to {re.escape(str(out / 'checkpoints'))} \(rank 0: "
                         rf"OSError: \[Errno 28\] {FULL}.*\); the partial checkpoint was removed and the last valid "
                         rf"checkpoint is {re.escape(str(first))}: free disk space .* resume with --resume$",
                         message), message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # nothing partial left
    assert _snapshot(first) == saved and ckpt.latest_valid_checkpoint(out) == first

    monkeypatch.undo()  # space freed: the resume continues from the last valid checkpoint
    again = Start.resume(discard_newer=where == "manifest")
    if where == "history":  # the torn line is dropped when the history is reopened
        with pytest.warns(RuntimeWarning, match=r"dropped 1 unreadable line\(s\) \(line 2\)"):
            assert train(cfg, start=again, log=_quiet).steps_done == 3
    else:
        assert train(cfg, start=again, log=_quiet).steps_done == 3
    assert _steps(out) == [1, 2, 3] and (out / "final").is_dir()


def test_a_full_disk_while_exporting_the_final_model_keeps_the_earlier_one(micro_world, train_overrides,
                                                                           monkeypatch):
    from safetensors import SafetensorError

    import vopd.train

    cfg = load_config(None, train_overrides + ["steps=2"])
    out = Path(cfg.output_dir)
    train(cfg, log=_quiet)
    earlier = _snapshot(out / "final")

    def export_merged(model: Any, tokenizer: Any, path: Path, **kwargs: Any) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"\0" * 100)  # half a file
        raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")

    monkeypatch.setattr(vopd.train, "export_merged", export_merged)
    longer = load_config(None, train_overrides + ["steps=3"])
    with pytest.raises(UserError) as info:
        train(longer, start=Start.resume(), log=_quiet)
    message = str(info.value)
    assert re.search(rf"^the final model could not be written to {re.escape(str(out / 'final'))} \(SafetensorError: "
                     rf"Error while serializing: I/O error: {FULL} \(os error 28\)\); the partial export was removed "
                     r"and the last valid checkpoint is .*step-00000003: free disk space", message), message
    assert _snapshot(out / "final") == earlier and not list(out.glob(".tmp-final*"))

    monkeypatch.undo()
    assert train(longer, start=Start.resume(), log=_quiet).steps_done == 3
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 3


def test_a_full_disk_while_claiming_the_output_dir_is_one_line(micro_world, train_overrides, monkeypatch):
    import vopd.rundir

    cfg = load_config(None, train_overrides + ["steps=2"])
    out = Path(cfg.output_dir)
    train(cfg, stop_at=1, log=_quiet)
    saved = _snapshot(out / "checkpoints")

    def write_marker(output_dir: Path, config: dict[str, Any]) -> None:
        raise _full(output_dir / "vopd_run.yaml")

    monkeypatch.setattr(vopd.rundir, "_write_marker", write_marker)
    with pytest.raises(UserError, match=rf"^cannot claim output_dir {re.escape(str(out))} \(OSError: \[Errno 28\] "
                                        rf"{FULL}: '.*vopd_run.yaml'\); free disk space or fix the cause, and run the "
                                        r"command again \(the checkpoints are untouched\)$"):
        train(cfg, start=Start.resume(), log=_quiet)
    assert _snapshot(out / "checkpoints") == saved


def test_a_resume_passes_over_what_is_not_a_complete_checkpoint_with_a_line(micro_world, train_overrides, caplog):
    cfg = load_config(None, train_overrides + ["steps=3", "save_every=1"])
    out = Path(cfg.output_dir)
    train(cfg, stop_at=2, log=_quiet)
    # step 2 without its manifest (a copy cut short), and a killed writer's temporary directory: neither is loaded
    os.remove(out / "checkpoints" / "step-00000002" / ckpt.MANIFEST)
    killed = out / "checkpoints" / ".tmp-step-00000003.999999.x"
    shutil.copytree(out / "checkpoints" / "step-00000001", killed)
    with caplog.at_level(logging.WARNING, logger="vopd.rundir"):
        result = train(cfg, start=Start.resume(discard_newer=True), log=_quiet)
    assert result.steps_done == 3 and _steps(out) == [1, 2, 3]
    assert any("step-00000002 has no manifest.json (not a complete checkpoint): ignored; resuming from "
               "step-00000001" in r.getMessage() for r in caplog.records), caplog.text
    assert not killed.exists()
    ckpt.verify_checkpoint(out / "checkpoints" / "step-00000002")  # saved again, whole


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    code = main(["train", *argv])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vopd train: error: "), lines
    return lines[0]


def test_paths_that_cannot_be_the_runs_are_refused_before_anything_is_loaded(micro_world, train_overrides,
                                                                             tmp_path, capsys, monkeypatch):
    import vopd.setup

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the student was loaded before the paths were checked")

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = load_config(None, train_overrides + ["steps=2"])
    out = Path(cfg.output_dir)
    train(cfg, stop_at=1, log=_quiet)
    monkeypatch.setattr(vopd.setup, "load_student", no_loading)

    line = _refusal(capsys, [*train_overrides, f"output_dir={blocker / 'run'}"])
    assert re.search(r"output_dir .*a_file/run cannot be created: .*a_file is a file, not a directory: choose another "
                     r"output_dir$", line), line
    line = _refusal(capsys, [*train_overrides, f"output_dir={blocker}"])
    assert re.search(r"output_dir .*a_file is a file, not a directory", line), line

    for name, kind in (("checkpoints", "file"), ("metrics.jsonl", "directory")):
        aside = tmp_path / f"aside-{name}"
        os.rename(out / name, aside)
        if kind == "file":
            (out / name).write_text("")
        else:
            (out / name).mkdir()
        before = _snapshot(out)
        line = _refusal(capsys, [*train_overrides, "steps=2", "--resume"])
        role = {"checkpoints": "its checkpoints (a directory)", "metrics.jsonl": "its history (a file)"}[name]
        assert re.search(rf"output_dir .*: .*/{re.escape(name)} is a {kind}, where the run keeps {re.escape(role)}: "
                         r"move it away, or choose another output_dir$", line), line
        assert _snapshot(out) == before
        (out / name).unlink() if kind == "file" else (out / name).rmdir()
        os.rename(aside, out / name)
    monkeypatch.undo()
    assert train(cfg, start=Start.resume(), log=_quiet).steps_done == 2


# ---------------------------------------------------------------- the 2-rank streamed export of final/ (FSDP2, gloo)


def _fill_disk_on_export(where: str, patch: pytest.MonkeyPatch) -> None:
    """On rank 0, the disk fills while ``final/`` is exported from the FSDP2 shards: at its first weight file (one
    file per layer: written when the first tensor of the next layer is gathered, so the gathers of every later
    tensor, which every rank joins, are still to come), or at the trainer state written last, once every weight is
    on disk."""
    if where == "weights":
        import safetensors.torch
        from safetensors import SafetensorError

        import vopd.export

        real_save, calls = safetensors.torch.save_file, [0]

        def save_file(tensors: dict[str, Any], filename: str, metadata: Any = None) -> None:
            calls[0] += 1
            if calls[0] == 1:
                Path(filename).write_bytes(b"\0" * 100)  # half a file
                raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")
            real_save(tensors, filename, metadata=metadata)

        patch.setattr(vopd.export, "EXPORT_FILE_BYTES", 1)
        patch.setattr(safetensors.torch, "save_file", save_file)
    else:
        real_text = Path.write_text

        def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if self.name == "trainer_state.json" and self.parent.name.startswith(".tmp-final"):
                real_text(self, data[:10])
                raise _full(self)
            return real_text(self, data, *args, **kwargs)

        patch.setattr(Path, "write_text", write_text)


def _export_rank(rank: int, ports: list[int], runs: list[tuple[str | None, list[str]]], root: Path) -> None:
    """One of 2 ranks running ``vopd train`` (the command line) once per run, each in a process group of its own;
    rank 0's disk fills as the run says. Writes root/R-I.json: the exit code and what stderr got; rank 0 adds what
    the output directory holds and its newest valid checkpoint."""
    import contextlib
    import faulthandler
    import io
    import signal

    import torch

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1"})
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a rank is, if it hangs
    for i, ((fault, argv), port) in enumerate(zip(runs, ports)):
        os.environ["MASTER_PORT"] = str(port)
        err = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
            if fault is not None and rank == 0:
                _fill_disk_on_export(fault, patch)
            code = main(["train", *argv])
        report: dict[str, Any] = {"code": code, "stderr": err.getvalue()}
        if rank == 0:
            out = Path(next(a for a in argv if a.startswith("output_dir=")).split("=", 1)[1])
            report.update(left=sorted(p.name for p in out.iterdir()), checkpoints=_snapshot(out / "checkpoints"),
                          latest=str(ckpt.latest_valid_checkpoint(out)))
        (root / f"{rank}-{i}.json").write_text(json.dumps(report))


def _two_export_ranks(runs: list[tuple[str | None, list[str]]], root: Path, limit_s: float) -> None:
    """``_export_rank`` on 2 spawned ranks; a rank still running after ``limit_s`` fails the test (its stack and
    the other's dumped first), both ranks killed."""
    import signal
    import time

    import torch.multiprocessing as mp

    from test_distributed import _free_port

    context = mp.start_processes(_export_rank, args=([_free_port() for _ in runs], runs, root), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for pid in context.pids():
                os.kill(pid, signal.SIGUSR1)
            time.sleep(2)
            for process in context.processes:
                process.kill()
            pytest.fail(f"a rank hung: still running after {limit_s:.0f} s (stacks in the captured stderr)")


def test_a_full_disk_while_two_ranks_export_final_is_one_line_on_each_and_the_resume_exports_it(
        micro_world, train_overrides, tmp_path):
    """2 gloo ranks under FSDP2 stream final/ from the shards (every rank gathers, rank 0 writes). The disk fills on
    rank 0 at a weight file while the gathers go on, then (on --resume) at the trainer state written last: each time
    both ranks exit with the same one line, no rank hangs, nothing named final is left, and the last checkpoint is
    untouched; the --resume after space is freed exports the complete final/ of that checkpoint."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = [*train_overrides, "steps=2", "save_every=1", "distributed.strategy=fsdp2"]
    runs = [("weights", argv), ("trainer state", [*argv, "--resume"]), (None, [*argv, "--resume"])]
    (tmp_path / "reports").mkdir()
    _two_export_ranks(runs, tmp_path / "reports", limit_s=180)
    reports = [[json.loads((tmp_path / "reports" / f"{rank}-{i}.json").read_text()) for i in range(3)]
               for rank in (0, 1)]
    last = out / "checkpoints" / "step-00000002"
    causes = [rf"SafetensorError: Error while serializing: I/O error: {FULL} \(os error 28\)",
              rf"OSError: \[Errno 28\] {FULL}: '.*/\.tmp-final\.\d+/trainer_state\.json'"]
    for i, cause in enumerate(causes):
        lines = [[x for x in reports[rank][i]["stderr"].splitlines() if x.strip()] for rank in (0, 1)]
        assert [reports[rank][i]["code"] for rank in (0, 1)] == [2, 2], lines
        assert lines[0] == lines[1] and len(lines[0]) == 1, lines  # the same one line on both ranks
        assert re.search(rf"^vopd train: error: the final model could not be written to {re.escape(str(out / 'final'))}"
                         rf" \({cause}\); the partial export was removed and the last valid checkpoint is "
                         rf"{re.escape(str(last))}: free disk space \(or fix the cause\) and resume with --resume$",
                         lines[0][0]), lines[0][0]
        assert not any(name.startswith((".tmp-final", "final")) for name in reports[0][i]["left"]), reports[0][i]
        assert reports[0][i]["latest"] == str(last)
    assert [reports[rank][2]["code"] for rank in (0, 1)] == [0, 0], reports
    assert reports[0][0]["checkpoints"] == reports[0][1]["checkpoints"] == reports[0][2]["checkpoints"]
    ckpt.verify_checkpoint(last)
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 2
    assert not list(out.glob(".tmp-final*")) and (out / "final" / "model.safetensors").is_file()
    saved = checkpoint_sharded.saved_tensors(last)
    exported = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert saved.keys() <= exported.keys() and all(exported[k].equal(saved[k]) for k in saved)
