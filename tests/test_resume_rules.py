"""A resume is exactly what was asked or a one-line refusal, on the micro world: ``--resume-from`` a path that is not
a checkpoint of a compatible run is refused before anything is written (a fresh ``output_dir`` is not even
created), and a resume on training data other than the checkpoint's is refused, naming the file, unless
``--allow-data-change`` (then said once in the log). Checkpoints written before the data fingerprint resume with one
logged line."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from vopd.checkpoint import MANIFEST
from vopd.cli import main
from vopd.config import load_config
from vopd.errors import UserError
from vopd.metrics import read_metrics
from vopd.train import Start, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(_msg: str) -> None:
    pass


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: a refused resume changes none of them."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out / "metrics.jsonl")]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """``vopd train ARGV``'s error: exit code 2 and one line on stderr."""
    capsys.readouterr()  # what earlier calls printed
    code = main(["train", *argv])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vopd train: error: "), lines
    return lines[0]


def _trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_resume_from_a_path_that_is_not_a_checkpoint_of_this_run_writes_nothing(micro_world, train_overrides,
                                                                               tmp_path, capsys):
    cfg = load_config(None, train_overrides + ["steps=2", "save_every=1"])
    run = Path(cfg.output_dir)
    train(cfg, log=_quiet)
    other = load_config(None, train_overrides + ["steps=2", "loss.method=opd", f"output_dir={tmp_path / 'other'}"])
    train(other, log=_quiet)
    unfinished = run / "checkpoints" / ".tmp-step-00000003.999999.x"  # what a killed save leaves
    (unfinished / "shards").mkdir(parents=True)
    (unfinished / "shards" / "__0_0.distcp").write_bytes(b"\0" * 64)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run / "checkpoints" / "step-00000001", corrupt)
    shard = corrupt / "shards" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    saved = _snapshot(run)

    fresh = tmp_path / "fresh"
    argv = [*train_overrides, "steps=2", f"output_dir={fresh}", "--resume-from"]
    cases = [
        (tmp_path / "nowhere", r"--resume-from .*nowhere does not exist: pass a checkpoint directory "
                               r"\(OUTPUT_DIR/checkpoints/step-NNNNNNNN\), or --resume"),
        (run / "config.yaml", r"--resume-from .*config.yaml is a file, not a checkpoint"),
        (run, r"--resume-from .*run is a run's output_dir, not one of its checkpoints: pass one of its checkpoints "
              r"\(the newest: .*step-00000002\), or set output_dir=.*run and pass --resume"),
        (unfinished, r"is not a checkpoint \(no manifest.json: another directory, or a checkpoint whose save did not "
                     r"complete\)"),
        (corrupt, r"checkpoint .*corrupt is corrupt \(file shards/__0_0.distcp: 100 bytes"),
        (tmp_path / "other" / "checkpoints" / "step-00000002",
         r"checkpoint .*other/checkpoints/step-00000002 is not from this run: its config differs in loss.method "
         r"\('opd' -> 'vopd'\)"),
    ]
    for path, message in cases:
        line = _one_line_error(capsys, [*argv, str(path)])
        assert re.search(message, line), line
        assert not fresh.exists(), f"{path}: the refused resume created output_dir"
    # A checkpoint of this run whose state cannot continue this config (its step is past steps=1): refused too.
    line = _one_line_error(capsys, [*train_overrides, "steps=1", f"output_dir={fresh}", "--resume-from",
                                    str(run / "checkpoints" / "step-00000002")])
    assert "is at step 2, past this run's steps=1: set steps>=2" in line and not fresh.exists()
    assert _snapshot(run) == saved


def test_resume_from_a_checkpoint_of_this_run_into_a_fresh_output_dir_continues_it(micro_world, train_overrides,
                                                                                   tmp_path, caplog):
    cfg = load_config(None, train_overrides + ["steps=3"])
    train(cfg, stop_at=2, log=_quiet)
    checkpoint = Path(cfg.output_dir) / "checkpoints" / "step-00000002"
    fresh = load_config(None, train_overrides + ["steps=3", f"output_dir={tmp_path / 'fresh'}"])
    with caplog.at_level(logging.WARNING, logger="vopd.rundir"):
        result = train(fresh, start=Start.resume(checkpoint), log=_quiet)
    assert result.steps_done == 3 and _steps(tmp_path / "fresh") == [3]
    assert any(f"held no run: it continues the run of {checkpoint} from step 2" in r.getMessage()
               for r in caplog.records)


def test_a_resume_on_other_training_data_is_refused_unless_allowed(micro_world, train_overrides, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(micro_world.train, data)
    overrides = train_overrides + [f"data.train={data}", "save_every=1", "keep_last=10"]
    cfg = load_config(None, overrides + ["steps=4"])
    out = Path(cfg.output_dir)
    train(cfg, stop_at=2, log=_quiet)
    before = _trainer_state(out / "checkpoints" / "step-00000002")["data_fingerprint"]
    assert before["rows"] == 64 and re.fullmatch(r"[0-9a-f]{64}", before["sha256"])
    rows = data.read_text().splitlines()
    saved = _snapshot(out)

    # The same rows in another order: the same count, the same data position, other prompts at each step.
    rows[5], rows[6] = rows[6], rows[5]
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=rf"checkpoint .*step-00000002 was trained on other data: data.train "
                                        rf"{re.escape(str(data))} now gives 64 prompts, sha256 [0-9a-f]{{12}}, the "
                                        r"checkpoint's run streamed 64 prompts, sha256 [0-9a-f]{12}; restore that "
                                        r"file, start a new run \(--overwrite or another output_dir\), or pass "
                                        r"--allow-data-change to continue on the new data"):
        train(cfg, start=Start.resume(), log=_quiet)
    assert _snapshot(out) == saved, "a refused resume changed the run's files"

    # Allowed (the CLI flag): it continues, says so once, and the new checkpoints record the new data.
    assert main(["train", *overrides, "steps=4", "--resume", "--allow-data-change"]) == 0
    err = capsys.readouterr()
    said = [x for x in (err.out + err.err).splitlines() if "--allow-data-change" in x]
    assert len(said) == 1 and "the training data changed since checkpoint" in said[0] and "anyway" in said[0], said
    after = _trainer_state(out / "checkpoints" / "step-00000004")["data_fingerprint"]
    assert after["rows"] == 64 and after["sha256"] != before["sha256"] and _steps(out) == [1, 2, 3, 4]

    # Fewer rows: refused by the fingerprint (before the data position), allowed with the position recomputed.
    data.write_text("\n".join(rows[:54]) + "\n")
    longer = load_config(None, overrides + ["steps=6"])
    with pytest.raises(UserError, match=r"now gives 54 prompts, .* the checkpoint's run streamed 64 prompts"):
        train(longer, start=Start.resume(), log=_quiet)
    assert train(longer, start=Start.resume(allow_data_change=True), log=_quiet).steps_done == 6
    last = _trainer_state(out / "checkpoints" / "step-00000006")
    assert last["data"] == {"epoch": 0, "index": 24} and last["data_fingerprint"]["rows"] == 54  # 6 steps x 4

    line = _one_line_error(capsys, [*overrides, "steps=6", "--overwrite", "--allow-data-change"])
    assert "--allow-data-change only applies to a resume: pass it with --resume or --resume-from" in line


def test_a_checkpoint_without_a_data_fingerprint_resumes_with_one_line(micro_world, train_overrides):
    cfg = load_config(None, train_overrides + ["steps=3"])
    train(cfg, stop_at=2, log=_quiet)
    checkpoint = Path(cfg.output_dir) / "checkpoints" / "step-00000002"
    # As an older vopd wrote it: no fingerprint in trainer_state.json (the manifest vouching for the file as it is).
    state = _trainer_state(checkpoint)
    del state["data_fingerprint"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for entry in manifest["files"]:
        if entry["path"] == "trainer_state.json":
            blob = (checkpoint / "trainer_state.json").read_bytes()
            entry["size"], entry["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
    (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=1))

    logs: list[str] = []
    assert train(cfg, start=Start.resume(), log=logs.append).steps_done == 3
    said = [m for m in logs if "records no fingerprint of its training data" in m]
    assert len(said) == 1 and "is not checked on this resume" in said[0], logs
    # A fingerprint that is not one is refused like any other inconsistent trainer state.
    state["data_fingerprint"] = {"rows": "64", "sha256": "x"}
    from vopd.fingerprint import DataFingerprint, judge_resume

    with pytest.raises(UserError, match=r"trainer_state data_fingerprint=.* is not a data fingerprint"):
        judge_resume(state["data_fingerprint"], DataFingerprint(64, "0" * 64), where=checkpoint, data_file="f",
                     allow_change=True)


def test_the_data_fingerprint_sees_every_change_to_what_the_run_streams():
    from vopd.data import PromptSet
    from vopd.fingerprint import data_fingerprint

    base = PromptSet([[1, 2], [3]], teacher=[[7, 1, 2], [7, 3]], routes=["a", "b"])
    same = PromptSet([[1, 2], [3]], teacher=[[7, 1, 2], [7, 3]], routes=["a", "b"])
    assert data_fingerprint(base) == data_fingerprint(same) and data_fingerprint(base).rows == 2
    others = [PromptSet([[3], [1, 2]], teacher=[[7, 3], [7, 1, 2]], routes=["b", "a"]),  # reordered
              PromptSet([[1], [2, 3]], teacher=[[7, 1, 2], [7, 3]], routes=["a", "b"]),  # the same ids, other rows
              PromptSet([[1, 2], [3]], teacher=[[8, 1, 2], [7, 3]], routes=["a", "b"]),  # a teacher's own prompt
              PromptSet([[1, 2], [3]], teacher=[[7, 1, 2], [7, 3]], routes=["a", "a"]),  # a row's teacher
              PromptSet([[1, 2], [3]], routes=["a", "b"])]  # the teacher reads the student's prompt
    prints = {data_fingerprint(p).sha256 for p in [base, *others]}
    assert len(prints) == 1 + len(others)
