"""The training configuration: the top-level keys (``TrainConfig``), the rules that span sections, loading, saving
and the reference docs.

What it knows: the top-level options of a run and the sections it holds (their classes are in
``vopd.config_sections``, and importable from here), how to check a whole config, how to load it (defaults, then a
YAML/TOML file, then ``key=value`` overrides) and how to write it back so that it loads to an equal config. The
dataclasses are the one source of truth: ``docs/config.md`` is generated from them (``config_reference_markdown``).
Each section class checks its own fields in its ``validate``; ``TrainConfig.validate`` adds the rules that span
sections. The check primitive lives in ``vopd.config_rules``, the teacher rules in ``vopd.teacher_config``. What it
does NOT know: each section's own options and rules (``vopd.config_sections``); how text becomes typed values
(``vopd.config_io`` parses files and overrides and checks types, for any dataclass tree); what the options do
(models, sampling, losses, checkpoints live elsewhere), torch, devices; which sampling settings suit which loss
method (the trainer checks that). Derived values (gradient accumulation, the evaluation length, the resolved dtype)
are computed by properties/functions and never written back into a config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from vopd.config_io import apply_overrides, build, field_types, is_section, read_config_file, type_name
from vopd.config_io import option as _opt
from vopd.config_rules import check
# The sections, importable from here too: vopd.config is where the rest of vopd takes every config class from.
from vopd.config_sections import (DataConfig, DistributedConfig, EvalConfig, LoraConfig, LossConfig, ModelConfig,
                                  OptimConfig, RolloutConfig, VllmConfig)
from vopd.errors import UserError
from vopd.teacher_config import OLD_KEYS, SHORTHANDS, TeacherConfig, check_teachers, migrate, notice, respell

Logger = Literal["tensorboard", "wandb"]
log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Top-level keys of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    steps: int = _opt(100, "Optimizer steps.")
    batch_size: int = _opt(8, "Sequences (prompt + sampled completion) per optimizer step.")
    micro_batch_size: int = _opt(8, "Sequences per forward/backward pass; must divide batch_size (unless "
                                 "micro_batch_tokens is set).")
    micro_batch_tokens: int = _opt(
        0, "Token slots per forward/backward pass (0 = micro_batch_size rows): sequences are sorted and balanced so "
        "that micro-batches (and ranks) carry near-equal tokens; at least one sequence (prompt + "
        "rollout.max_new_tokens). docs/scaling.md, 'Tokens, not rows'.")
    packing: bool = _opt(
        False, "Run each micro-batch as one row of concatenated sequences (no padding; attention never crosses a "
        "sequence boundary): transformers' packed-sequence support, checked on the student and in-process teachers "
        "before step 1.")
    seed: int = _opt(0, "Seed of every random number generator (>= 0).")
    output_dir: str = _opt("runs/vopd", "Directory for checkpoints, logs and the final model.")
    log_every: int = _opt(1, "Log metrics every this many steps.")
    save_every: int = _opt(0, "Save a checkpoint every this many steps; 0 = only at the end.")
    keep_last: int = _opt(2, "Checkpoints kept on disk (the newest ones); >= 1.")
    max_bad_steps: int = _opt(3, "Consecutive bad steps (non-finite loss or gradient, or an update over "
                              "optim.max_update_ratio) tolerated before stopping.")
    loggers: list[Logger] = _opt([], "Metric loggers besides the console: tensorboard, wandb.")
    progress: bool = _opt(True, "Show a progress bar.")
    grad_noise: bool = _opt(
        True, "Log the online gradient-variance proxy (grad_var, grad_sq_signal; docs/metrics.md): one extra "
        "gradient norm per step, measured after the first half of the micro-batches (a one-micro-batch step is "
        "split in two).")

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    @property
    def eval_max_new_tokens(self) -> int:
        """The evaluation completion length (eval.max_new_tokens, or the rollout's when 0)."""
        return self.eval.max_new_tokens or self.rollout.max_new_tokens

    def validate(self, *, require_paths: bool = True) -> None:
        """Every rule; raises ``UserError`` naming the first broken one. Each section checks its own fields
        (``ModelConfig.validate``, ...); the rules here are those that span sections, and the top-level keys.

        ``require_paths=False`` skips the required-path checks (for tools that only inspect a config)."""
        m, d, e = self.model, self.data, self.eval
        if require_paths:
            for key, value, what in (
                ("model.student", m.student, "the student's local model directory"),
                *([(f"model.teachers[{i}].model", t.model, "the teacher's local model directory")
                   for i, t in enumerate(m.teachers)] or [("model.teacher", m.teacher,
                                                           "the teacher's local model directory")]),
                ("data.train", d.train, "the training problems file"),
            ):
                if not value.strip():
                    raise UserError(f"config key {key} is required: set it to {what} (e.g. {key}=PATH)")
        m.validate()
        check_teachers(m.teacher, m.teachers, d.teacher_field)  # each teacher's rules, and routing rows to them
        for section in (self.distributed, self.lora, d, self.rollout, self.vllm, self.loss, self.optim, e):
            section.validate()
        if e.every > 0 and not d.eval:
            raise UserError(f"config key eval.every={e.every} needs evaluation data: set data.eval=PATH or "
                            "eval.every=0")
        check(self.steps >= 1, "steps", self.steps, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, ">= 1")
        check(self.micro_batch_tokens >= 0, "micro_batch_tokens", self.micro_batch_tokens,
              ">= 0 (0 = micro_batch_size rows)")
        if self.batch_size % self.micro_batch_size and not self.micro_batch_tokens:
            raise UserError(f"config key batch_size={self.batch_size} is not a multiple of micro_batch_size="
                            f"{self.micro_batch_size}: make micro_batch_size divide batch_size")
        check(self.seed >= 0, "seed", self.seed, ">= 0")
        check(bool(self.output_dir), "output_dir", self.output_dir, "non-empty")
        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        check(self.save_every >= 0, "save_every", self.save_every, ">= 0 (0 = only at the end)")
        check(self.keep_last >= 1, "keep_last", self.keep_last, ">= 1")
        check(self.max_bad_steps >= 0, "max_bad_steps", self.max_bad_steps, ">= 0")
        check(len(set(self.loggers)) == len(self.loggers), "loggers", self.loggers, "a list without repeats")


# -------------------------------------------------------------------------------------------------- public API


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A plain nested dict (only str/int/float/bool/list/dict) of every key."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], *, require_paths: bool = True) -> TrainConfig:
    """A checked, validated ``TrainConfig`` from a (possibly partial) nested dict; missing keys take defaults."""
    if not isinstance(d, dict):
        raise UserError(f"a config must be a table of keys, got {type(d).__name__}: write `key: value` lines")
    d, old, spelled = migrate(d)  # the teacher keys of earlier versions, onto model.teachers
    for key in old:
        _notice(notice(key))
    try:
        cfg = build(TrainConfig, d)
        cfg.validate(require_paths=require_paths)
    except UserError as exc:  # name a moved key as it was written
        raise UserError(respell(str(exc), spelled)) from None
    return cfg


_NOTICED: set[str] = set()


def _notice(text: str) -> None:
    """Log ``text`` (a warning) once per process."""
    if text not in _NOTICED:
        _NOTICED.add(text)
        log.warning(text)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, require_paths: bool = True
) -> TrainConfig:
    """Defaults, updated by the YAML/TOML file at ``path`` (if any), then by ``key=value`` overrides (dotted keys,
    values read as YAML: ``lora.target_modules=[q_proj,v_proj]``, ``lora.enabled=true``); checked and validated."""
    data = read_config_file(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides, TrainConfig, aliases=OLD_KEYS),
                            require_paths=require_paths)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write every key of ``cfg`` as YAML; ``load_config(path)`` returns an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, width=4096)
    Path(path).write_text("# vopd training config (every key; see docs/config.md)\n" + text, encoding="utf-8")


# ------------------------------------------------------------------------------------------- reference docs


def _md_code(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, bool) else str(value).lower()
    return "`" + text.replace("|", "\\|") + "`"


def config_reference_markdown() -> str:
    """The reference of every key (``docs/config.md``), generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from src/vopd/config.py by `python -m vopd.config > docs/config.md`; do not edit. -->",
        "",
        "A run is configured by a YAML (`.yaml`/`.yml`) or TOML (`.toml`) file and/or `key=value` overrides with",
        "dotted keys, applied in order after the file: `loss.method=opd optim.lr=3e-5 lora.enabled=true",
        "lora.target_modules=[q_proj,v_proj]`. Override values are read as YAML, except for text keys, which take",
        "the text as written (quote it, e.g. `data.eval=\"\"`, to have it read as YAML). Unknown keys, wrong types and",
        "values outside the allowed ranges are refused with a message naming the key.",
        "",
        "Derived values are computed, never stored: gradient accumulation steps = `batch_size / micro_batch_size`;",
        "evaluation length = `eval.max_new_tokens`, or `rollout.max_new_tokens` when 0; dtype `auto` = bfloat16 on",
        "CUDA, float32 on CPU. Which sampling settings suit which `loss.method` is checked by the trainer.",
        "",
        "Teachers: `model.teacher=PATH` is one teacher with every option at its default; `model.teachers` is the list",
        "of teachers, each a table of the `model.teachers[].*` keys (options of its own; several are routed per row",
        "by `data.teacher_field`): `model.teachers=[{name: math, model: http://host:8000, head: /ckpt}]` on the",
        "command line, `[[model.teachers]]` tables in TOML. The keys of earlier versions are read too (at the end).",
        "",
    ]
    hints = field_types(TrainConfig)
    top = [(n, t) for n, t in hints.items() if not is_section(t)]
    sections = [(n, t) for n, t in hints.items() if is_section(t)]
    tables: list[tuple[str, type, str, list[str]]] = [("Top level", TrainConfig, "", [n for n, _ in top])]
    for n, t in sections:
        tables.append((f"`{n}`", t, n + ".", [f.name for f in dataclasses.fields(t)]))
        if t is ModelConfig:  # the keys of each entry of model.teachers
            tables.append(("`model.teachers[]`: each teacher", TeacherConfig, "model.teachers[].",
                           [f.name for f in dataclasses.fields(TeacherConfig)]))
    for title, cls, prefix, names in tables:
        doc = (cls.__doc__ or "").strip()
        lines += [f"## {title}", "", doc.split("] ", 1)[-1] if doc.startswith("[") else doc, ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        instance = cls()
        cls_hints = field_types(cls)
        for name in names:
            f = fields[name]
            lines.append(
                f"| `{prefix}{name}` | {type_name(cls_hints[name]).replace('|', chr(92) + '|')} "
                f"| {_md_code(getattr(instance, name))} | {f.metadata.get('doc', '')} |"
            )
        lines.append("")
    return "\n".join(lines + _old_spellings())


def _old_spellings() -> list[str]:
    """The docs' section on the teacher keys of earlier versions (still read, with a notice)."""
    lines = ["## Old spellings of the teacher keys", "",
             "Still read, each with a one-line notice naming its new spelling; a run saved with them resumes (its",
             "saved config is compared in the new spelling). `model.teachers` as a table `{name: PATH}` (with",
             "`data.teacher_field`) becomes the list `[{name: NAME, model: PATH}]`; a key below applies to every",
             "teacher, except `model.teacher_heads` (`{name: DIR}`: by name).", "",
             "| old key | new key |", "| --- | --- |"]
    lines += [f"| `{old}` | `{notice(old).split(' it now reads ', 1)[1].split(' (', 1)[0]}` |" for old in OLD_KEYS
              if old not in SHORTHANDS]
    lines += ["", "`model.teacher_server` is the shorthand of `model.teachers[].server` beside `model.teacher` (no notice)."]
    return [*lines, ""]


if __name__ == "__main__":
    sys.stdout.write(config_reference_markdown())
