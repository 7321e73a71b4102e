"""The training loop end to end on the micro world: every method lowers the KL, resume and gradient accumulation
are invariances, and bad input gives one clear error without losing saved work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd import checkpoint as ckpt
from vopd.config import load_config
from vopd.errors import UserError
from vopd.models import load_model, load_tokenizer
from vopd.world.task import read_jsonl
from vopd.teacher.local import InProcessTeacher
from vopd.eval import heldout_kl
from vopd.train import TrainingAborted, OVERWRITE, Start, train


def _quiet(_msg: str) -> None:
    pass


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _heldout(student_dir: Path, world, cfg) -> float:
    tok = load_tokenizer(str(student_dir))
    student = load_model(str(student_dir), role="student", dtype=torch.float32, device=torch.device("cpu"))
    teacher = InProcessTeacher(load_model(str(world.teacher), role="teacher", dtype=torch.float32,
                                          device=torch.device("cpu")), len(tok))
    problems = [r["problem"] for r in read_jsonl(world.test)][:12]
    return heldout_kl(student, teacher, tok, problems, cfg, len(tok), seed=7)


@pytest.mark.parametrize("method", ["opd", "vopd", "vopd-topk", "opd-full", "opd-topk", "vopd-ttopk"])
def test_every_method_lowers_the_kl_to_the_teacher(method, micro_world, train_overrides):
    cfg = load_config(None, train_overrides + [f"loss.method={method}", "steps=6", "batch_size=8",
                                               "micro_batch_size=4", "optim.lr=1e-2"])
    before = _heldout(micro_world.student, micro_world, cfg)
    result = train(cfg, log=_quiet)
    after = _heldout(result.output_dir / "final", micro_world, cfg)
    assert result.steps_done == 6 and result.skipped_steps == 0
    assert after < 0.9 * before, f"{method}: held-out KL {before:.3f} -> {after:.3f}"
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    for key in ("kl_estimate", "grad_norm", "time_generate", "time_teacher", "time_student", "time_optimizer",
                "tokens_per_s", "completion_len_mean", "truncation_rate", "peak_memory_mb", "grad_var",
                "grad_sq_signal"):
        assert key in lines[-1], key
    if method == "vopd-ttopk":  # the baseline's own diagnostics, on the teacher's top-k
        assert 0 < lines[-1]["ttopk_mass_mean"] <= 1 and lines[-1]["kl_ttopk_mean"] >= 0
    # sampler and trainer agree on the log-prob of every sampled token (on-policy)
    assert lines[0]["logprob_diff_max"] < 1e-4
    documented = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    for key in set().union(*lines):
        assert f"`{key}`" in documented, f"metric {key} is not defined in docs/metrics.md"


def test_resume_equals_uninterrupted(micro_world, train_overrides, tmp_path):
    base = train_overrides + ["steps=4", "optim.schedule=cosine", "save_every=0"]
    full = train(load_config(None, base + [f"output_dir={tmp_path / 'full'}"]), log=_quiet)
    cfg = load_config(None, base + [f"output_dir={tmp_path / 'split'}"])
    first = train(cfg, stop_at=2, log=_quiet)
    assert first.steps_done == 2 and not (tmp_path / "split" / "final").exists()
    second = train(cfg, start=Start.resume(), log=_quiet)
    assert second.steps_done == 4
    a, b = _weights(full.output_dir / "final"), _weights(second.output_dir / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_gradient_accumulation_equals_big_batch(micro_world, train_overrides, tmp_path):
    # eps=1 makes Adam's first update ~ lr * g (not lr * sign(g)), so weight equality reflects gradient equality.
    base = train_overrides + ["steps=1", "batch_size=4", "optim.eps=1.0", "optim.grad_clip=0"]
    one = train(load_config(None, base + ["micro_batch_size=4", f"output_dir={tmp_path / 'one'}"]), log=_quiet)
    acc = train(load_config(None, base + ["micro_batch_size=1", f"output_dir={tmp_path / 'acc'}"]), log=_quiet)
    assert one.last_metrics["tokens"] == acc.last_metrics["tokens"]
    assert one.last_metrics["grad_norm"] == pytest.approx(acc.last_metrics["grad_norm"], rel=1e-5)
    a, b = _weights(one.output_dir / "final"), _weights(acc.output_dir / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_variance_proxy_changes_nothing_but_the_metrics(micro_world, train_overrides, tmp_path):
    # With one micro-batch per step the proxy runs the step as two halves: the update must be the same.
    base = train_overrides + ["steps=2", "batch_size=4", "micro_batch_size=4", "optim.eps=1.0"]
    on = train(load_config(None, base + ["grad_noise=true", f"output_dir={tmp_path / 'on'}"]), log=_quiet)
    off = train(load_config(None, base + ["grad_noise=false", f"output_dir={tmp_path / 'off'}"]), log=_quiet)
    assert "grad_var" in on.last_metrics and "grad_var" not in off.last_metrics
    assert on.last_metrics["grad_sq_signal"] != 0.0
    a, b = _weights(on.output_dir / "final"), _weights(off.output_dir / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad input


def test_missing_model_path(train_overrides, tmp_path):
    cfg = load_config(None, train_overrides + [f"model.student={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="student model path .* does not exist"):
        train(cfg, log=_quiet)


@pytest.mark.parametrize("case", ["missing", "empty", "no_field"])
def test_bad_dataset(case, train_overrides, tmp_path):
    path = tmp_path / "train.jsonl"
    if case == "empty":
        path.write_text("")
    elif case == "no_field":
        path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    cfg = load_config(None, train_overrides + [f"data.train={path}"])
    expected = {"missing": "no such file", "empty": "no rows", "no_field": "no text in field 'problem'.*question"}
    with pytest.raises(UserError, match=expected[case]):
        train(cfg, log=_quiet)


def test_long_prompts_skipped_and_counted_or_refused(micro_world, train_overrides, tmp_path):
    from vopd.data import encode_prompt, format_prompt

    rows = read_jsonl(micro_world.train)[:8]
    tok = load_tokenizer(str(micro_world.student))
    limit = max(len(encode_prompt(tok, format_prompt(r["problem"]))) for r in rows)
    rows[0] = {**rows[0], "problem": rows[0]["problem"] + " and then" * 50}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs: list[str] = []
    cfg = load_config(None, train_overrides + [f"data.train={path}", f"data.max_prompt_tokens={limit}", "steps=1"])
    train(cfg, log=logs.append)
    assert any(f"skipped 1 of 8 prompts longer than {limit} tokens" in m for m in logs), logs
    cfg = load_config(None, train_overrides + [f"data.train={path}", f"data.max_prompt_tokens={limit}",
                                               "data.long_prompts=error", f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(UserError, match=f"line 1: prompt has .* tokens > data.max_prompt_tokens={limit}"):
        train(cfg, log=_quiet)


def test_mismatched_tokenizers(micro_world, train_overrides, tmp_path):
    from vopd.world.tiny_models import ModelShape, make_model, train_tokenizer

    other = train_tokenizer(["completely different text for another tokenizer 0123456789"] * 4, vocab_size=280)
    model = make_model(ModelShape(hidden_size=32, num_layers=1, intermediate_size=64), other, seed=0)
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    cfg = load_config(None, train_overrides + [f"model.teacher={tmp_path / 'other'}"])
    with pytest.raises(UserError, match="tokenizers differ: token .* has id"):
        train(cfg, log=_quiet)


def test_biased_sampling_refused_unless_overridden(train_overrides):
    cfg = load_config(None, train_overrides + ["rollout.top_k=20"])
    with pytest.raises(UserError, match="rollout.top_k=20 .* biases every OPD estimator"):
        train(cfg, log=_quiet)
    cfg = load_config(None, train_overrides + ["rollout.top_k=20", "rollout.allow_biased_sampling=true", "steps=1"])
    with pytest.warns(RuntimeWarning, match="biased sampling allowed by override"):
        assert train(cfg, log=_quiet).steps_done == 1


def test_nan_steps_are_skipped_then_abort_keeps_last_checkpoint(micro_world, train_overrides, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(micro_world.teacher, teacher)
    base = train_overrides + [f"model.teacher={teacher}", "steps=8", "save_every=1", "max_bad_steps=2"]
    cfg = load_config(None, base)
    train(cfg, stop_at=2, log=_quiet)
    good = ckpt.latest_valid_checkpoint(cfg.output_dir)
    assert good is not None and good.name.endswith("2")
    # The teacher turns into NaN: every step is non-finite from here on.
    weights = _weights(teacher)
    weights = {k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    logs: list[str] = []
    with pytest.raises(TrainingAborted, match=r"3 consecutive bad steps \(max_bad_steps=2; the last: non-finite "
                                              r"loss .*checkpoints/step-0*2 "):
        train(cfg, start=Start.resume(), log=logs.append)
    assert sum("update skipped" in m for m in logs) == 3
    assert ckpt.latest_valid_checkpoint(cfg.output_dir) == good
    ckpt.verify_checkpoint(good)


def test_corrupt_checkpoint_on_resume_is_named_with_the_last_valid_one(micro_world, train_overrides):
    cfg = load_config(None, train_overrides + ["steps=4", "save_every=1", "keep_last=3"])
    train(cfg, stop_at=2, log=_quiet)
    newest = ckpt.list_checkpoints(cfg.output_dir)[-1]
    weights = newest / "shards" / "__0_0.distcp"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(UserError, match=r"checkpoint .*step-0*2 is corrupt .*shards/__0_0.distcp.* last valid one "
                                        r"is .*step-0*1: resume from it with --resume-from"):
        train(cfg, start=Start.resume(), log=_quiet)
    previous = ckpt.list_checkpoints(cfg.output_dir)[0]
    result = train(cfg, start=Start.resume(str(previous)), log=_quiet)
    assert result.steps_done == 4


def test_output_dir_with_another_run_is_refused(micro_world, train_overrides):
    cfg = load_config(None, train_overrides + ["steps=1"])
    train(cfg, log=_quiet)
    changed = load_config(None, train_overrides + ["steps=1", "loss.method=opd"])
    with pytest.raises(UserError, match="output_dir"):
        train(changed, log=_quiet)
    assert train(changed, start=OVERWRITE, log=_quiet).steps_done == 1


def test_cli_reports_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vopd", "train", f"model.student={tmp_path}/x",
                           f"model.teacher={tmp_path}/y", f"data.train={tmp_path}/z.jsonl", "progress=false",
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("vopd train: error: student model path"), proc.stderr


def test_lora_run_saves_adapter_and_a_merged_model(micro_world, train_overrides):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, train_overrides + ["steps=2", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
                                               "lora.target_modules=[q_proj,v_proj]"])
    result = train(cfg, log=_quiet)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(result.final_checkpoint / "shards").read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights)  # the checkpoint holds the adapters only
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final", local_files_only=True)
    base = _weights(micro_world.student)
    changed = [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_gradient_checkpointing_changes_nothing_but_memory(micro_world, train_overrides, tmp_path):
    base = train_overrides + ["steps=1"]
    plain = train(load_config(None, base + [f"output_dir={tmp_path / 'a'}"]), log=_quiet)
    ckpt_run = train(load_config(None, base + [f"output_dir={tmp_path / 'b'}", "model.gradient_checkpointing=true"]),
                     log=_quiet)
    a, b = _weights(plain.output_dir / "final"), _weights(ckpt_run.output_dir / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_vopd_check_cli(micro_world):
    proc = subprocess.run([sys.executable, "-m", "vopd", "check", f"model.student={micro_world.student}",
                           f"model.teacher={micro_world.teacher}", "rollout.max_new_tokens=12"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) >= 5 and all(line.startswith("ok  ") for line in lines), proc.stdout
    assert "self-check: KL(student||student) max" in proc.stdout
    assert "ok  lengths: prompts up to 244 tokens + rollout.max_new_tokens=12 within the student's position limit 256" \
        in proc.stdout
