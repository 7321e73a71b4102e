"""Config loading, overrides, type checking, validation rules, save/load round trip, generated docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vopd.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    load_config,
    save_config,
)
from vopd.config_rules import resolve_dtype
from vopd.data import PROMPT_TEMPLATE
from vopd.errors import UserError

REQUIRED = ["model.student=/m/student", "model.teacher=/m/teacher", "data.train=/d/train.jsonl"]


def load(*overrides: str, path: Path | None = None) -> TrainConfig:
    return load_config(path, [*REQUIRED, *overrides])


def error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(UserError) as info:
        load(*overrides, path=path)
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


def test_defaults() -> None:
    cfg = load()
    assert cfg == TrainConfig(
        model=ModelConfig(student="/m/student", teacher="/m/teacher"), data=DataConfig(train="/d/train.jsonl")
    )
    assert cfg.loss.method == "vopd" and cfg.loss.top_k == 100 and cfg.loss.ratio_cap == 2.0
    assert cfg.lora.target_modules == ["all-linear"]  # every linear layer of the body, whatever its names
    assert cfg.data.template == PROMPT_TEMPLATE
    assert cfg.optim.schedule == "cosine" and cfg.loggers == [] and cfg.progress is True
    # Each instance has its own list (no shared mutable default).
    assert TrainConfig().lora.target_modules is not TrainConfig().lora.target_modules
    # Derived values are computed, not stored.
    assert cfg.grad_accum_steps == 1 and cfg.eval_max_new_tokens == 2048
    assert load("batch_size=16", "micro_batch_size=4", "eval.max_new_tokens=64").grad_accum_steps == 4
    assert "grad_accum_steps" not in config_to_dict(cfg)
    assert resolve_dtype("auto", "cuda:1") == "bfloat16" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  student: /s\n  teacher: /t\n  dtype: bfloat16\n"
        "data:\n  train: /train.jsonl\n"
        "loss:\n  method: opd-topk\n  top_k: 20\n"
        "optim:\n  lr: 3e-5\n  grad_clip: 2\n"  # YAML 1.1 reads 3e-5 as text and 2 as int: both become floats
        "eval:\n"  # an empty section keeps its defaults
        "steps: 7\n"
    )
    cfg = load_config(path)
    assert (cfg.model.student, cfg.model.dtype, cfg.loss.method, cfg.loss.top_k) == ("/s", "bfloat16", "opd-topk", 20)
    assert cfg.optim.lr == 3e-5 and cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.steps == 7 and cfg.eval.n == 1
    # Overrides apply after the file, in order.
    cfg = load_config(path, ["loss.method=opd", "steps=9", "steps=11", "lora.enabled=true",
                             "lora.target_modules=[q_proj, v_proj]", "progress=false", "optim.lr=1"])
    assert cfg.loss.method == "opd" and cfg.loss.top_k == 20 and cfg.steps == 11
    assert cfg.lora.enabled is True and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.progress is False
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int -> float


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nstudent = "/s"\nteacher = "/t"\n[data]\ntrain = "/d"\n'
        '[lora]\nenabled = true\ntarget_modules = ["q_proj"]\n[optim]\nlr = 3e-5\n'
    )
    cfg = load_config(path, ["loggers=[tensorboard]"])
    assert cfg.lora.enabled and cfg.lora.target_modules == ["q_proj"] and cfg.optim.lr == 3e-5
    assert cfg.loggers == ["tensorboard"]


def test_text_overrides_are_taken_as_written() -> None:
    cfg = load("data.template=Q: {problem} {x}", "output_dir=no", "data.prompt_field=1e3", 'data.eval=""')
    assert cfg.data.template == "Q: {problem} {x}" and cfg.output_dir == "no" and cfg.data.prompt_field == "1e3"
    assert cfg.data.eval == ""
    assert load("data.eval='/e.jsonl'").data.eval == "/e.jsonl"


def test_unknown_keys() -> None:
    message = error("loss.methd=opd")
    assert "loss.methd" in message and "did you mean loss.method?" in message
    assert "method, top_k, chunk_memory_mb, ratio_cap" in message
    assert "did you mean optim.lr?" in error("lr=1e-4")
    assert "did you mean optim?" in error("optimm.lr=1e-4")
    assert "steps is not a section" in error("steps.x=1")


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  temprature: 0.7\n")
    assert "did you mean rollout.temperature?" in error(path=path)


def test_bad_literal_lists_allowed_values() -> None:
    message = error("loss.method=kl")
    assert "loss.method='kl'" in message
    assert "opd, vopd, vopd-topk, opd-full, opd-topk" in message
    assert "float32, bfloat16, float16" in error("model.dtype=fp16")
    assert "tensorboard, wandb" in error("loggers=[tensorboard, mlflow]")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps=1.5", "an integer"),
        ("steps=true", "an integer"),  # bool is not an int
        ("lora.enabled=1", "true or false"),  # bool is strict
        ("progress=maybe", "true or false"),
        ("optim.lr=fast", "a number"),
        ("optim.lr=.nan", "a finite number"),
        ("lora.target_modules=q_proj", "a list"),
        ("lora.target_modules=[1, 2]", "a string"),
        ("loss=3", "a table of keys"),
    ],
)
def test_bad_types(override: str, expected: str) -> None:
    message = error(override)
    assert override.split("=")[0] in message and expected in message


def test_bad_type_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  prompt_field: 123\n")
    assert "data.prompt_field=123" in error(path=path) and "quote it" in error(path=path)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.student="], "model.student is required"),
        (["model.teacher= "], "model.teacher is required"),
        (["data.train="], "data.train is required"),
        (["batch_size=12", "micro_batch_size=8"], "not a multiple of micro_batch_size"),
        (["steps=0"], "steps=0"),
        (["optim.lr=0"], "optim.lr=0.0"),
        (["batch_size=0"], "batch_size=0"),
        (["micro_batch_size=0"], "micro_batch_size=0"),
        (["rollout.batch_size=0"], "rollout.batch_size=0"),
        (["rollout.max_new_tokens=0"], "rollout.max_new_tokens=0"),
        (["rollout.temperature=0"], "rollout.temperature=0.0"),
        (["eval.temperature=0"], "eval.temperature=0.0"),
        (["rollout.top_p=1.5"], "rollout.top_p=1.5"),
        (["rollout.top_p=-0.1"], "rollout.top_p=-0.1"),
        (["eval.top_p=2"], "eval.top_p=2.0"),
        (["rollout.top_k=-1"], "rollout.top_k=-1"),
        (["loss.top_k=0"], "loss.top_k=0"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5"),
        (["optim.min_lr_ratio=-0.5"], "optim.min_lr_ratio=-0.5"),
        (["keep_last=0"], "keep_last=0"),
        (["loggers=[wandb, wandb]"], "without repeats"),
        (["model.device=gpu"], "auto, cpu, cuda or cuda:N"),
        (["loss.ratio_cap=0.5"], "0 (off) or >= 1"),
        (["eval.every=5"], "set data.eval=PATH"),
        (["data.template=no placeholder"], "{problem}"),
    ],
)
def test_validation_rules(overrides: list[str], expected: str) -> None:
    assert expected in error(*overrides)


def test_valid_edge_values() -> None:
    cfg = load("rollout.top_p=0", "rollout.top_k=0", "loss.top_k=1", "optim.min_lr_ratio=1", "keep_last=1",
               "model.device=cuda:3", "loss.ratio_cap=0", "eval.temperature=0", "eval.greedy=true",
               "eval.every=5", "data.eval=/e.jsonl", "loggers=[wandb, tensorboard]")
    assert cfg.model.device == "cuda:3" and cfg.eval.greedy
    # Tools that only inspect a config can skip the required paths.
    assert load_config(require_paths=False).model.student == ""


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(UserError, match="unknown extension"):
        load_config(tmp_path / "c.ini")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="cannot be parsed"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(UserError, match="table of keys"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(UserError, match="not key=value"):
        load("steps")


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load(
        "loss.method=vopd-topk", "optim.lr=3e-5", "optim.eps=1e-12", "lora.enabled=true",
        "lora.target_modules=[q_proj]", "data.template=Solve: {problem}\n\\boxed{} 'x': \"y\" # z",
        "model.student=123", "output_dir=runs/a b", "loggers=[wandb]", "rollout.top_p=0.95", "seed=7",
    )
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # Every field is written, so the file alone reproduces the run.
    assert len(path.read_text().splitlines()) > len(dataclasses.fields(TrainConfig))


def test_docs_are_up_to_date() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text(encoding="utf-8") == config_reference_markdown(), (
        "docs/config.md is stale: regenerate it with `python -m vopd.config > docs/config.md`"
    )
    # Every field of every section is documented.
    text = docs.read_text(encoding="utf-8")
    for section in ("model", "lora", "data", "rollout", "loss", "optim", "eval"):
        for f in dataclasses.fields(getattr(TrainConfig(), section)):
            assert f"`{section}.{f.name}`" in text and f.metadata.get("doc"), f"{section}.{f.name} is undocumented"
