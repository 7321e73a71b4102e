"""The training configuration: typed dataclasses, their validation rules, loading, saving and the reference docs.

What it knows: every option of a run (its name, type, default, meaning and allowed values), how to check it, how to
load it (defaults, then a YAML/TOML file, then ``key=value`` overrides) and how to write it back so that it loads to
an equal config. The dataclasses are the one source of truth: ``docs/config.md`` is generated from them
(``config_reference_markdown``). What it does NOT know: how text becomes typed values (``vopd.config_io`` parses
files and overrides and checks types, for any dataclass tree); what the options do (models, sampling, losses,
checkpoints live elsewhere), torch, devices; which sampling settings suit which loss method (the trainer checks
that). Derived values (gradient accumulation, the evaluation length, the resolved dtype) are computed by
properties/functions and never written back into a config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

from vopd.config_io import apply_overrides, build, field_types, is_section, read_config_file, type_name
from vopd.data import PROMPT_TEMPLATE
from vopd.errors import UserError
from vopd.loss.methods import Method  # the one definition of the method names

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Logger = Literal["tensorboard", "wandb"]
_T = TypeVar("_T")


def _opt(default: _T, doc: str) -> _T:
    """A field with its documentation attached (the docs table is generated from it). Lists and dicts get a fresh
    copy."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.copy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """[model] The student (trained) and the teacher (frozen), as local Hugging Face model directories."""

    student: str = _opt("", "Required. Local Hugging Face directory of the student (the model that is trained).")
    teacher: str = _opt(
        "", "Required. Local Hugging Face directory of the frozen teacher; same tokenizer as the student. Or the URL of "
        "a `vopd serve-teacher` server (http://host:port; methods opd, vopd-topk, opd-topk, rb-topk, or every method "
        "with model.teacher_head). Or `self`: the student's initial weights (with LoRA: the base model with its adapters "
        "disabled; else a frozen copy)."
    )
    teacher_head: str = _opt(
        "", "Teacher server only: local directory of the checkpoint the server serves (config.json + safetensors). Only "
        "its output layer is loaded here; the server sends hidden states, and every method is exact remotely "
        "(docs/teacher_server.md, \"Protocol 3\").")
    teacher_heads: dict[str, str] = _opt(
        {}, "model.teacher_head for several teachers: {name: checkpoint directory} for the server teachers of "
        "model.teachers that should send hidden states.")
    teacher_hidden_dtype: str = _opt(
        "auto", "Hidden states from a teacher server: auto (bfloat16 when the server's weights are half precision, "
        "else float32), float32 or bfloat16 (half the bytes).")
    dtype: Dtype = _opt("auto", "Student weights dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    teacher_dtype: Dtype = _opt("auto", "Teacher weights dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N; auto = cuda if available, else cpu.")
    gradient_checkpointing: bool = _opt(False, "Recompute student activations in the backward pass to save memory.")
    trust_remote_code: bool = _opt(False, "Allow model code shipped inside the model directories to run.")
    teacher_timeout_s: float = _opt(60.0, "Remote teacher only: seconds to wait for one scoring request.")
    teacher_retries: int = _opt(
        3, "Remote teacher only: retries of a failed request (connection error, timeout, 5xx), with back-off."
    )
    teachers: dict[str, str] = _opt(
        {}, "Several teachers, routed per row: {name: local directory, server URL or self}; data.teacher_field names "
        "each row's teacher. Instead of model.teacher (docs/teacher_server.md, \"Several teachers\").")
    teacher_overlap: bool = _opt(
        True, "Remote teachers: score the next micro-batch on a background thread while the student trains on this "
        "one (the same step's rollouts: identical numbers, less waiting). In-process teachers always score inline.")


@dataclass
class LoraConfig:
    """[lora] Train LoRA adapters on the student instead of all weights."""

    enabled: bool = _opt(False, "Train LoRA adapters instead of the full student.")
    r: int = _opt(64, "LoRA rank.")
    alpha: int = _opt(128, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = _opt(0.0, "Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] = _opt(
        ["all-linear"],
        "Names of the linear modules that get adapters, or [all-linear]: every linear layer of the body, whatever the "
        "architecture calls its projections (q_proj.. in Llama/Qwen, qkv_proj/gate_up_proj in Phi-3). The output layer "
        "is never a target.",
    )


@dataclass
class DataConfig:
    """[data] Problems to sample completions for (local files)."""

    train: str = _opt("", "Required. Local file of training problems.")
    eval: str = _opt("", "Local file of evaluation problems; empty = no evaluation.")
    prompt_field: str = _opt("problem", "Record field holding the problem text.")
    messages_field: str = _opt(
        "messages", "Record field holding a conversation (a list of {role, content} turns, ending with a user turn); a "
        "row that has it is rendered with the tokenizer's chat template, else its prompt_field text is used.")
    answer_field: str = _opt("answer", "Record field holding the reference answer (used by evaluation).")
    template: str = _opt(PROMPT_TEMPLATE, "Prompt template of text prompts; {problem} is replaced by the problem text.")
    system_prompt: str = _opt("", "System turn put first in every conversation that has none (chat template only).")
    chat_template_kwargs: dict[str, Any] = _opt(
        {}, "Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3.")
    text_as_chat: bool = _opt(
        False, "Render text prompts through the chat template too, as one user turn holding the templated text.")
    teacher_prompt_field: str = _opt(
        "", "Record field holding the teacher's own prompt (a text or a conversation, e.g. with the reference "
        "solution): the teacher scores the student's completion after it. Empty: the student's prompt.")
    teacher_system_prompt: str = _opt(
        "", "System turn of the teacher's rendering only (instead of data.system_prompt).")
    teacher_own_template: bool = _opt(
        False, "Render the teacher's prompts with the teacher tokenizer's own chat template (student and teacher "
        "templates may then differ); local teachers only.")
    teacher_field: str = _opt(
        "", "With model.teachers: the record field naming each row's teacher (a key of model.teachers).")
    max_prompt_tokens: int = _opt(1024, "Longest prompt, in tokens, that is used.")
    long_prompts: Literal["skip", "error"] = _opt("skip", "What to do with a prompt longer than max_prompt_tokens.")
    shuffle: bool = _opt(True, "Shuffle the training problems (with the run's seed).")


@dataclass
class RolloutConfig:
    """[rollout] How the student samples the completions it is trained on."""

    max_new_tokens: int = _opt(2048, "Longest completion, in tokens.")
    temperature: float = _opt(1.0, "Sampling temperature (> 0).")
    top_p: float = _opt(1.0, "Nucleus sampling threshold in [0, 1]; 1 = off.")
    top_k: int = _opt(0, "Sample among the k most likely tokens; 0 = off.")
    allow_biased_sampling: bool = _opt(False, "Allow sampling settings that make the loss estimate biased.")
    batch_size: int = _opt(64, "Completions generated per generation call (speed/memory only).")
    cache: Literal["dynamic", "static"] = _opt(
        "dynamic", "KV cache of generate: dynamic (grows with the sequence) or static (preallocated; on CUDA "
        "transformers also compiles the decode step). Speed and memory only: the sampled distribution is the same."
    )
    engine: Literal["hf", "vllm"] = _opt(
        "hf", "Rollout engine: hf (Hugging Face generate) or vllm (a colocated vLLM engine in this process, its "
        "weights pushed from the student before every step; options in [vllm]; docs/scaling.md).")
    check_sync: bool = _opt(
        True, "Fail when the sampler's log-probs of the sampled tokens drift from the trainer's by more than "
        "rollout.sync_tolerance (a stale or half-applied weight sync).")
    sync_tolerance: float = _opt(
        0.0, "Largest allowed logprob_diff_mean (mean |log p_trainer - log p_sampler| per token) when "
        "rollout.check_sync; 0 = auto: 1e-3 with float32 weights, 5e-2 with bfloat16/float16.")


@dataclass
class LossConfig:
    """[loss] The per-token reverse-KL estimator."""

    method: Method = _opt("vopd", "Estimator of the reverse-KL gradient.")
    top_k: int = _opt(100, "Tokens per position for the top-k methods (vopd-topk, opd-topk, rb-topk); >= 1.")
    chunk_memory_mb: int = _opt(1024, "Memory budget for one chunk of vocabulary-sized activations, in MiB.")
    ratio_cap: float = _opt(
        2.0, "Cap on the detached importance ratio against the sampler's log-probs; 0 disables the ratio, else >= 1."
    )
    ratio_mode: Literal["truncate", "mask"] = _opt(
        "truncate", "What a ratio above loss.ratio_cap does: truncate (weight min(ratio, cap): truncated importance "
        "sampling) or mask (the token gets weight 0: masked importance sampling).")


@dataclass
class OptimConfig:
    """[optim] AdamW and the learning-rate schedule."""

    lr: float = _opt(1e-5, "Peak learning rate (> 0).")
    weight_decay: float = _opt(0.0, "AdamW weight decay (>= 0).")
    beta1: float = _opt(0.9, "AdamW beta1, in [0, 1).")
    beta2: float = _opt(0.999, "AdamW beta2, in [0, 1).")
    eps: float = _opt(1e-8, "AdamW epsilon (> 0).")
    schedule: Literal["constant", "cosine"] = _opt("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = _opt(0, "Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = _opt(0.0, "Final learning rate of the cosine schedule, as a fraction of lr, in [0, 1].")
    grad_clip: float = _opt(1.0, "Clip the gradient norm to this value; 0 disables clipping.")
    max_update_ratio: float = _opt(
        1.0, "A step whose update would move the trainable weights by more than this times their norm "
        "(||update|| / ||weights||, logged as update_ratio) is a bad step: skipped, like one with a non-finite loss; "
        "0 = no limit (non-finite weights are always refused).")


@dataclass
class EvalConfig:
    """[eval] Periodic evaluation on data.eval."""

    every: int = _opt(0, "Evaluate every this many steps; 0 = only at the end (if data.eval is set).")
    n: int = _opt(1, "Samples per problem (Avg@n, Pass@n, Maj@n).")
    temperature: float = _opt(0.6, "Sampling temperature (> 0 unless greedy).")
    top_p: float = _opt(1.0, "Nucleus sampling threshold in [0, 1].")
    max_new_tokens: int = _opt(0, "Longest completion; 0 = rollout.max_new_tokens.")
    limit: int = _opt(0, "Evaluate on the first this many problems; 0 = all.")
    greedy: bool = _opt(False, "Greedy decoding (ignores temperature and top_p).")


@dataclass
class VllmConfig:
    """[vllm] The colocated vLLM engine (rollout.engine=vllm; docs/scaling.md)."""

    gpu_memory_utilization: float = _opt(
        0.3, "GPU only: fraction of the GPU's memory vLLM may take (weights + KV cache); the trainer keeps the rest.")
    max_model_len: int = _opt(0, "Longest prompt + completion the engine serves; 0 = data.max_prompt_tokens + "
                              "rollout.max_new_tokens.")
    enforce_eager: bool = _opt(False, "GPU only: no CUDA-graph capture (less memory, slower decoding); always "
                               "eager on the CPU.")
    sleep: bool = _opt(False, "GPU only: release vLLM's memory while the trainer runs (sleep/wake around "
                       "every sampling phase).")
    cpu_kv_cache_gb: float = _opt(1.0, "CPU only: KV-cache size in GiB.")


@dataclass
class DistributedConfig:
    """[distributed] Data parallelism under torchrun; the world size comes from torchrun (docs/scaling.md)."""

    strategy: Literal["ddp", "fsdp2"] = _opt(
        "ddp", "ddp: every rank holds the whole student; fsdp2: parameters, gradients and optimizer states are "
        "sharded over the ranks. Ignored in a single process."
    )
    timeout_min: float = _opt(60.0, "Minutes a rank waits in a collective (e.g. while rank 0 evaluates or saves).")


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
    micro_batch_size: int = _opt(8, "Sequences per forward/backward pass; must divide batch_size.")
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
        """Cross-field and range rules; raises ``UserError`` naming the first broken one.

        ``require_paths=False`` skips the required-path checks (for tools that only inspect a config)."""
        _validate(self, require_paths)


def resolve_dtype(dtype: str, device: str) -> str:
    """The concrete dtype name for ``dtype`` on ``device`` (a resolved device string, e.g. "cuda:0" or "cpu")."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


# ---------------------------------------------------------------------------------------------- validation rules

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _check(ok: bool, key: str, value: object, rule: str) -> None:
    if not ok:
        raise UserError(f"config key {key}={value!r} is invalid: it must be {rule}")


_TEACHER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _validate_heads(m: ModelConfig) -> None:
    """model.teacher_head(s) name the checkpoints of teacher servers (their output layers project hidden states)."""
    _check(m.teacher_hidden_dtype in ("auto", "float32", "bfloat16"), "model.teacher_hidden_dtype",
           m.teacher_hidden_dtype, "auto, float32 or bfloat16")
    remote = ("http://", "https://")
    if m.teacher_head:
        if m.teachers:
            raise UserError("config key model.teacher_head is for model.teacher; with model.teachers set "
                            "model.teacher_heads={name: DIR} for each server teacher")
        if not m.teacher.startswith(remote):
            raise UserError(f"config key model.teacher_head is for a teacher server, but model.teacher={m.teacher!r} "
                            "is loaded here whole (every method works already): remove model.teacher_head")
    for name in m.teacher_heads:
        if name not in m.teachers:
            raise UserError(f"model.teacher_heads names {name!r}, which is not a teacher of model.teachers "
                            f"({sorted(m.teachers)}); fix the name")
        if not m.teachers[name].startswith(remote):
            raise UserError(f"model.teacher_heads.{name} is for a teacher server, but model.teachers.{name}="
                            f"{m.teachers[name]!r} is loaded here whole: remove it from model.teacher_heads")


def _validate_teachers(c: TrainConfig) -> None:
    """model.teacher or model.teachers (several, routed by data.teacher_field), never both."""
    m, d = c.model, c.data
    _validate_heads(m)
    if not m.teachers:
        if d.teacher_field:
            raise UserError(f"config key data.teacher_field={d.teacher_field!r} routes rows to teachers, but "
                            "model.teachers is empty: set model.teachers={name: PATH, ...} or data.teacher_field=''")
        return
    if m.teacher:
        raise UserError(f"config keys model.teacher={m.teacher!r} and model.teachers are both set: keep one "
                        "(model.teachers routes rows to several teachers by data.teacher_field)")
    for name, where in m.teachers.items():
        _check(bool(_TEACHER_NAME_RE.match(name)), "model.teachers", name,
               "keyed by names of letters, digits, '_', '.' or '-' (they appear in metric names)")
        _check(isinstance(where, str) and bool(where.strip()), f"model.teachers.{name}", where,
               "a local model directory, a server URL or self")
    if not d.teacher_field:
        raise UserError("config key data.teacher_field is required with model.teachers: set it to the record field "
                        f"that names each row's teacher (one of {sorted(m.teachers)})")
    if d.teacher_own_template:
        raise UserError("data.teacher_own_template=true is not supported with model.teachers (each teacher would "
                        "render with its own template): render with the student's template (false)")


def _validate(c: TrainConfig, require_paths: bool) -> None:
    if require_paths:
        for key, value, what in (
            ("model.student", c.model.student, "the student's local model directory"),
            ("model.teacher", c.model.teacher or ",".join(c.model.teachers), "the teacher's local model directory"),
            ("data.train", c.data.train, "the training problems file"),
        ):
            if not value.strip():
                raise UserError(f"config key {key} is required: set it to {what} (e.g. {key}=PATH)")
    _validate_teachers(c)
    _check(bool(_DEVICE_RE.match(c.model.device)), "model.device", c.model.device, "auto, cpu, cuda or cuda:N")
    _check(c.model.teacher_timeout_s > 0, "model.teacher_timeout_s", c.model.teacher_timeout_s, "> 0")
    _check(c.model.teacher_retries >= 0, "model.teacher_retries", c.model.teacher_retries, ">= 0")
    _check(c.distributed.timeout_min > 0, "distributed.timeout_min", c.distributed.timeout_min, "> 0")
    _check(c.lora.r >= 1, "lora.r", c.lora.r, ">= 1")
    _check(c.lora.alpha > 0, "lora.alpha", c.lora.alpha, "> 0")
    _check(0.0 <= c.lora.dropout < 1.0, "lora.dropout", c.lora.dropout, "in [0, 1)")
    _check(not c.lora.enabled or bool(c.lora.target_modules), "lora.target_modules", c.lora.target_modules,
           "non-empty when lora.enabled")
    _check(bool(c.data.prompt_field), "data.prompt_field", c.data.prompt_field, "non-empty")
    _check(bool(c.data.messages_field), "data.messages_field", c.data.messages_field, "non-empty")
    _check("{problem}" in c.data.template, "data.template", c.data.template, "a text containing {problem}")
    _check(c.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", c.data.max_prompt_tokens, ">= 1")
    r = c.rollout
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, ">= 1")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "> 0")
    _check(0.0 <= r.top_p <= 1.0, "rollout.top_p", r.top_p, "in [0, 1]")
    _check(r.top_k >= 0, "rollout.top_k", r.top_k, ">= 0 (0 = off)")
    _check(r.batch_size >= 1, "rollout.batch_size", r.batch_size, ">= 1")
    _check(r.sync_tolerance >= 0, "rollout.sync_tolerance", r.sync_tolerance, ">= 0 (0 = auto)")
    v = c.vllm
    _check(0.0 < v.gpu_memory_utilization <= 1.0, "vllm.gpu_memory_utilization", v.gpu_memory_utilization, "in (0, 1]")
    _check(v.max_model_len >= 0, "vllm.max_model_len", v.max_model_len, ">= 0 (0 = auto)")
    _check(v.cpu_kv_cache_gb > 0, "vllm.cpu_kv_cache_gb", v.cpu_kv_cache_gb, "> 0")
    _check(c.loss.top_k >= 1, "loss.top_k", c.loss.top_k, ">= 1")
    _check(c.loss.chunk_memory_mb >= 1, "loss.chunk_memory_mb", c.loss.chunk_memory_mb, ">= 1")
    # A cap below 1 would clip every ratio under its unbiased value 1; 0 is the documented "off".
    _check(c.loss.ratio_cap == 0 or c.loss.ratio_cap >= 1, "loss.ratio_cap", c.loss.ratio_cap, "0 (off) or >= 1")
    o = c.optim
    _check(o.lr > 0, "optim.lr", o.lr, "> 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(0.0 <= o.beta1 < 1.0, "optim.beta1", o.beta1, "in [0, 1)")
    _check(0.0 <= o.beta2 < 1.0, "optim.beta2", o.beta2, "in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "> 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0 (0 = off)")
    _check(o.max_update_ratio >= 0, "optim.max_update_ratio", o.max_update_ratio, ">= 0 (0 = no limit)")
    e = c.eval
    _check(e.every >= 0, "eval.every", e.every, ">= 0")
    _check(e.n >= 1, "eval.n", e.n, ">= 1")
    _check(e.greedy or e.temperature > 0, "eval.temperature", e.temperature, "> 0 (or set eval.greedy=true)")
    _check(not e.greedy or e.n == 1, "eval.n", e.n, "1 when eval.greedy=true (greedy samples are all the same)")
    _check(0.0 <= e.top_p <= 1.0, "eval.top_p", e.top_p, "in [0, 1]")
    _check(e.max_new_tokens >= 0, "eval.max_new_tokens", e.max_new_tokens, ">= 0 (0 = rollout.max_new_tokens)")
    _check(e.limit >= 0, "eval.limit", e.limit, ">= 0 (0 = all)")
    if e.every > 0 and not c.data.eval:
        raise UserError(f"config key eval.every={e.every} needs evaluation data: set data.eval=PATH or eval.every=0")
    _check(c.steps >= 1, "steps", c.steps, ">= 1")
    _check(c.batch_size >= 1, "batch_size", c.batch_size, ">= 1")
    _check(c.micro_batch_size >= 1, "micro_batch_size", c.micro_batch_size, ">= 1")
    if c.batch_size % c.micro_batch_size:
        raise UserError(f"config key batch_size={c.batch_size} is not a multiple of micro_batch_size="
                        f"{c.micro_batch_size}: make micro_batch_size divide batch_size")
    _check(c.seed >= 0, "seed", c.seed, ">= 0")
    _check(bool(c.output_dir), "output_dir", c.output_dir, "non-empty")
    _check(c.log_every >= 1, "log_every", c.log_every, ">= 1")
    _check(c.save_every >= 0, "save_every", c.save_every, ">= 0 (0 = only at the end)")
    _check(c.keep_last >= 1, "keep_last", c.keep_last, ">= 1")
    _check(c.max_bad_steps >= 0, "max_bad_steps", c.max_bad_steps, ">= 0")
    _check(len(set(c.loggers)) == len(c.loggers), "loggers", c.loggers, "a list without repeats")


# -------------------------------------------------------------------------------------------------- public API


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A plain nested dict (only str/int/float/bool/list/dict) of every key."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], *, require_paths: bool = True) -> TrainConfig:
    """A checked, validated ``TrainConfig`` from a (possibly partial) nested dict; missing keys take defaults."""
    if not isinstance(d, dict):
        raise UserError(f"a config must be a table of keys, got {type(d).__name__}: write `key: value` lines")
    cfg = build(TrainConfig, d)
    cfg.validate(require_paths=require_paths)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, require_paths: bool = True
) -> TrainConfig:
    """Defaults, updated by the YAML/TOML file at ``path`` (if any), then by ``key=value`` overrides (dotted keys,
    values read as YAML: ``lora.target_modules=[q_proj,v_proj]``, ``lora.enabled=true``); checked and validated."""
    data = read_config_file(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides, TrainConfig), require_paths=require_paths)


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
    ]
    hints = field_types(TrainConfig)
    top = [(n, t) for n, t in hints.items() if not is_section(t)]
    sections = [(n, t) for n, t in hints.items() if is_section(t)]
    for title, cls, prefix, names in [("Top level", TrainConfig, "", [n for n, _ in top])] + [
        (f"`{n}`", t, n + ".", [f.name for f in dataclasses.fields(t)]) for n, t in sections
    ]:
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(config_reference_markdown())
