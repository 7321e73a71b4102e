"""Reliability of a run, in process, on the micro world: a checkpoint is used only when it is this run's and its
state fits; resuming never replaces newer work unless asked; a diverging update is skipped and never saved; a
student too broken to sample from ends the run with one line; everything knowable before step 1 is checked before
it (the output directory is not even created). Crashes with real processes: test_crashes.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd import checkpoint as ckpt
from vopd.cli import main
from vopd.config import load_config
from vopd.data import encode_prompt, format_prompt
from vopd.errors import UserError
from vopd.guard import sampling_failures
from vopd.metrics import read_metrics
from vopd.models import load_tokenizer
from vopd.rollout import hf_engine
from vopd.train import TrainerState, TrainingAborted, Start, train
from vopd.world.task import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(_msg: str) -> None:
    pass


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: saved work must not change when a resume is refused."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out / "metrics.jsonl")]


# ------------------------------------------------------------------------ whose checkpoint, what it replaces


def test_a_checkpoint_of_another_run_or_older_than_saved_work_is_refused(micro_world, train_overrides, tmp_path):
    other = train(load_config(None, train_overrides + ["steps=2", "loss.method=opd", "optim.lr=1e-2",
                                                       f"output_dir={tmp_path / 'other'}"]), log=_quiet)
    cfg = load_config(None, train_overrides + ["steps=3", "save_every=1", "keep_last=3"])
    out = Path(cfg.output_dir)
    train(cfg, log=_quiet)
    saved = _snapshot(out)

    # --resume-from a checkpoint of another run (other method and learning rate): refused, naming the keys
    with pytest.raises(UserError, match=r"checkpoint .*other/checkpoints/step-00000002 is not from this run: its config "
                                        r"differs in loss.method \('opd' -> 'vopd'\), optim.lr \(0.01 -> 0.003\);"):
        train(cfg, start=Start.resume(str(other.final_checkpoint)), log=_quiet)
    # --resume-from an older checkpoint of this run: it would replace step 3 and final/
    older = out / "checkpoints" / "step-00000001"
    with pytest.raises(UserError, match=r"from checkpoint step-00000001: it would replace newer work "
                                        r"\(step-00000002, step-00000003, final\);.*--discard-newer"):
        train(cfg, start=Start.resume(str(older)), log=_quiet)
    assert _snapshot(out) == saved, "a refused resume changed the run's files"

    # Asked to: the newer work is moved aside, never deleted, and the run redoes it exactly.
    again = train(cfg, start=Start.resume(str(older), discard_newer=True), log=_quiet)
    assert again.steps_done == 3 and _steps(out) == [1, 2, 3]
    [aside] = out.glob("discarded-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert _steps(aside) == [1, 2, 3]
    a, b = load_file(str(aside / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 3

    # Resuming a finished run is a no-op that leaves final/ as it is (same step: nothing newer to protect).
    before = _snapshot(out / "final")
    assert train(cfg, start=Start.resume(), log=_quiet).steps_done == 3
    assert _snapshot(out / "final") == before and _steps(out) == [1, 2, 3]


def test_a_checkpoint_past_the_runs_steps_or_off_its_data_is_refused(micro_world, train_overrides, tmp_path):
    cfg = load_config(None, train_overrides + ["steps=4"])
    train(cfg, stop_at=3, log=_quiet)
    shorter = load_config(None, train_overrides + ["steps=2"])  # steps may change on resume, but not below the step
    with pytest.raises(UserError, match=r"step-00000003 is at step 3, past this run's steps=2: set steps>=3"):
        train(shorter, start=Start.resume(), log=_quiet)

    where = Path("ck")
    ok = {"manifest_step": 3, "steps": 4, "batch_size": 4, "prompts": 64}
    TrainerState(step=3, data={"epoch": 0, "index": 12}).check(where, **ok)
    TrainerState(step=3, data={"epoch": 1, "index": 2}).check(where, **{**ok, "prompts": 10})  # 12 = 10 + 2
    bad = [
        (TrainerState(step=3, data={"epoch": 0, "index": 11}), "data position .* the prompts changed"),
        (TrainerState(step=2, data={"epoch": 0, "index": 8}), "step=2, .* for a checkpoint of step 3"),
        (TrainerState(step=3, skipped_steps=4, data={"epoch": 0, "index": 12}), "skipped_steps=4"),
        (TrainerState(step=3, data={"epoch": 0, "index": -12}), r"data.index=-12 is not a count"),
        (TrainerState(step=3, data={"epoch": 0}), "is not a data position"),
        (TrainerState.from_dict({"step": "3"}), "step='3' is not a count"),
    ]
    for state, message in bad:
        with pytest.raises(UserError, match=message):
            state.check(where, **ok)


# ------------------------------------------------------------------------------------------------ divergence


def test_a_diverging_update_is_skipped_counted_reported_and_never_saved(micro_world, train_overrides):
    # lr=1e30: the loss and gradient of step 1 are finite; the update would make the weights ~1e30.
    cfg = load_config(None, train_overrides + ["optim.lr=1e30", "steps=4", "save_every=1", "max_bad_steps=2"])
    logs: list[str] = []
    with pytest.raises(TrainingAborted, match=r"3 consecutive bad steps \(max_bad_steps=2; the last: the update would "
                                              r"move the weights by .* times their norm \(optim.max_update_ratio=1\)\); "
                                              r"no checkpoint was written"):
        train(cfg, log=logs.append)
    assert sum("update skipped: the update would move the weights" in m for m in logs) == 3
    lines = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3]  # the aborted step has its line
    assert all(m["step_skipped"] and m["update_ratio"] > 1e20 for m in lines)
    assert [m["skipped_steps"] for m in lines] == [1, 2, 3]
    assert "abort" not in lines[1] and "3 consecutive bad steps" in lines[-1]["abort"]
    assert ckpt.list_checkpoints(cfg.output_dir) == [] and not (Path(cfg.output_dir) / "final").exists()


def test_a_student_too_broken_to_sample_from_ends_the_run_naming_the_last_good_checkpoint(micro_world,
                                                                                         train_overrides):
    # With the update limit off, lr=1e30 is applied at step 1 (its weights are still finite: the checkpoint of
    # step 1 is written); step 2 samples from it and torch.multinomial meets inf/nan.
    cfg = load_config(None, train_overrides + ["optim.lr=1e30", "optim.max_update_ratio=0", "steps=4",
                                               "save_every=1"])
    with pytest.raises(TrainingAborted, match=r"step 2: sampling from the student failed \(probability tensor "
                                              r"contains .*inf.*nan.*\): its weights have diverged; the last good "
                                              r"checkpoint is .*step-00000001 \(--resume-from"):
        train(cfg, log=_quiet)
    lines = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2] and lines[0]["update_ratio"] > 1e20
    assert lines[1]["step_skipped"] and "sampling from the student failed" in lines[1]["abort"]


def test_only_a_broken_distribution_becomes_an_abort(tmp_path):
    with pytest.raises(TrainingAborted, match=r"step 7: .*the last good checkpoint is .*step-00000005"):
        with sampling_failures(7, tmp_path / "step-00000005"):
            torch.multinomial(torch.tensor([float("nan"), 1.0]), 1)
    with pytest.raises(RuntimeError, match="something else"):  # any other failure is left alone
        with sampling_failures(7, None):
            raise RuntimeError("something else went wrong")


def test_a_sampling_failure_mid_run_still_writes_the_aborted_steps_line(micro_world, train_overrides, tmp_path):
    # A sampler that fails once in the middle of a run shows the wiring: the abort names the checkpoint before it.
    calls = {"n": 0}

    def flaky(model, tok, rollout):
        sample = hf_engine(model, tok, rollout)

        def wrapped(prompts):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            return sample(prompts)
        return wrapped

    cfg = load_config(None, train_overrides + ["steps=4", "save_every=2", "optim.lr=1e-2"])
    with pytest.raises(TrainingAborted, match=r"step 3: .*last good checkpoint is .*step-00000002"):
        train(cfg, make_sampler=flaky, log=_quiet)
    lines = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert not any(m["step_skipped"] for m in lines[:2]) and 0 < lines[0]["update_ratio"] < 1


# ---------------------------------------------------------------------------------------- before step 1


def test_what_can_be_known_before_step_1_is_refused_before_it(micro_world, train_overrides, tmp_path, capsys):
    out = tmp_path / "run"  # train_overrides' output_dir: a refused run must not even create it
    cases = [
        (["loss.method=vopd-topk", "loss.top_k=100000"],
         r"loss.top_k=100000 exceeds the vocabulary of 259 tokens \(vopd-topk takes the top k of it\): set "
         r"loss.top_k <= 259"),
        (["rollout.max_new_tokens=300"],
         r"rollout.max_new_tokens=300 leaves no room for a prompt within the student's position limit "
         r"\(max_position_embeddings=256\)"),
        (["rollout.max_new_tokens=200", "data.long_prompts=error"],
         r"prompt has \d+ tokens > 56 tokens \(the student's max_position_embeddings=256 minus "
         r"rollout.max_new_tokens=200\)"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            train(load_config(None, train_overrides + extra), log=_quiet)
        assert not out.exists()
    with pytest.raises(UserError, match=r"--stop-at 0 is invalid: it must be >= 1"):
        train(load_config(None, train_overrides), stop_at=0, log=_quiet)
    # vopd check refuses the same, as one line
    model = [f"model.student={micro_world.student}", f"model.teacher={micro_world.teacher}"]
    capsys.readouterr()
    assert main(["check", *model, "loss.method=vopd-topk", "loss.top_k=100000", "rollout.max_new_tokens=12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vopd check: error: loss.top_k=100000 exceeds the vocabulary of 259" in err[0]
    assert main(["train", *train_overrides, "--stop-at", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vopd train: error: --stop-at 0 is invalid: it must be >= 1 (the step after which to stop)"]
    assert not out.exists()


def test_prompts_past_the_position_limit_are_skipped_and_counted(micro_world, train_overrides, tmp_path, capsys):
    tok = load_tokenizer(str(micro_world.student))
    lengths = sorted(len(encode_prompt(tok, format_prompt(r["problem"]))) for r in read_jsonl(micro_world.train))
    budget = lengths[0]  # the shortest prompts fit exactly
    skipped = sum(n > budget for n in lengths)
    assert 0 < skipped < len(lengths)
    logs: list[str] = []
    overrides = train_overrides + [f"rollout.max_new_tokens={256 - budget}", "steps=1"]
    assert train(load_config(None, overrides), log=logs.append).steps_done == 1
    assert any(f"skipped {skipped} of {len(lengths)} prompts longer than {budget} tokens" in m for m in logs), logs
    # vopd check reports the same before any run
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    capsys.readouterr()
    assert main(["check", *overrides]) == 0
    assert (f"ok  data: {len(lengths) - skipped} prompts of {micro_world.train} fit; skipped {skipped} of "
            f"{len(lengths)} prompts longer than {budget} tokens") in capsys.readouterr().out


def test_a_student_with_nan_weights_is_refused_before_step_1(micro_world, train_overrides, tmp_path):
    import shutil

    from safetensors.torch import save_file

    student = tmp_path / "student"
    shutil.copytree(micro_world.student, student)
    weights = load_file(str(student / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in weights.items()}
    save_file(weights, str(student / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"self-check failed: the student's log-probs are not finite"):
        train(load_config(None, train_overrides + [f"model.student={student}"]), log=_quiet)
    assert not (tmp_path / "run").exists()
