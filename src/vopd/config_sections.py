"""The sections of a run's configuration: one typed dataclass per table of keys, each with its own rules.

What it knows: every option of the sections ``[model]``, ``[lora]``, ``[data]``, ``[rollout]``, ``[loss]``,
``[optim]``, ``[eval]``, ``[vllm]`` and ``[distributed]`` (its name, type, default, meaning and allowed values), and
each section's ``validate``: the rules of its own fields. What it does NOT know: the top-level keys, the rules that
span sections, loading, saving and the reference docs (``vopd.config``, whose ``TrainConfig`` holds these sections;
import them from there); one teacher's options (``vopd.teacher_config``); how text becomes typed values
(``vopd.config_io``); what the options do (models, sampling, losses, checkpoints live elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vopd.config_io import option as _opt
from vopd.config_rules import DEVICE_RE, Dtype, MasterDtype, check
from vopd.env import check_spec
from vopd.loss.methods import Method  # the one definition of the method names
from vopd.prompts import PROMPT_TEMPLATE
from vopd.teacher_config import TeacherConfig, entries


@dataclass
class ModelConfig:
    """[model] The student (trained) and its teachers (frozen): local Hugging Face model directories, or servers."""

    student: str = _opt("", "Required. Local Hugging Face directory of the student (the model that is trained).")
    teacher: str = _opt(
        "", "The one teacher, by place: shorthand of model.teachers=[{name: teacher, model: PATH}] (a local "
        "directory, a teacher server's URL, or self; every option at its default). Required unless model.teachers.")
    teachers: list[TeacherConfig] = _opt(
        [], "The teachers, each a table of the keys below (model.teachers[].*); several are routed per row by "
        "data.teacher_field (docs/teacher_server.md, \"Several teachers\"). Instead of model.teacher.")
    dtype: Dtype = _opt(
        "auto", "Student compute dtype (forward and backward); auto = bfloat16 on CUDA, float32 on CPU.")
    master_dtype: MasterDtype = _opt(
        "float32", "Dtype of the trained weights and their AdamW states: float32 (master weights; a half model.dtype "
        "then computes in half precision under autocast or FSDP2's MixedPrecisionPolicy, docs/scaling.md), or "
        "model.dtype itself (pure half-precision training: updates below its resolution are lost). The final model is "
        "saved in model.dtype; checkpoints hold the masters.")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N; auto = cuda if available, else cpu.")
    gradient_checkpointing: bool = _opt(False, "Recompute student activations in the backward pass to save memory.")
    trust_remote_code: bool = _opt(False, "Allow model code shipped inside the model directories to run.")

    @property
    def teacher_configs(self) -> list[TeacherConfig]:
        """The run's teachers: ``teachers``, or the shorthand ``teacher`` as its one entry."""
        return entries(self.teacher, self.teachers)

    def validate(self) -> None:
        """The [model] rules of its own fields (each teacher's are ``TeacherConfig.validate``, called with the
        routing rules by ``TrainConfig.validate``)."""
        check(bool(DEVICE_RE.match(self.device)), "model.device", self.device, "auto, cpu, cuda or cuda:N")
        # Masters narrower than the compute dtype would round every update to the compute dtype and back: refused.
        # With model.dtype=auto the pair is checked once the device is known (vopd.precision.resolve_precision).
        check(self.master_dtype == "float32" or self.dtype in ("auto", self.master_dtype), "model.master_dtype",
              self.master_dtype, f"float32 or model.dtype ({self.dtype})")


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

    def validate(self) -> None:
        """The [lora] ranges."""
        check(self.r >= 1, "lora.r", self.r, ">= 1")
        check(self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        check(not self.enabled or bool(self.target_modules), "lora.target_modules", self.target_modules,
              "non-empty when lora.enabled")


@dataclass
class DataConfig:
    """[data] Problems to sample completions for (local files), and which field of a row names its teacher."""

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
    teacher_field: str = _opt(
        "", "The record field naming each row's teacher (a name of model.teachers); empty = no routing (one teacher).")
    max_prompt_tokens: int = _opt(1024, "Longest prompt, in tokens, that is used.")
    long_prompts: Literal["skip", "error"] = _opt("skip", "What to do with a prompt longer than max_prompt_tokens.")
    shuffle: bool = _opt(True, "Shuffle the training problems (with the run's seed).")

    def validate(self) -> None:
        """The [data] rules (the routing to several teachers is a cross-section rule of ``TrainConfig``)."""
        check(bool(self.prompt_field), "data.prompt_field", self.prompt_field, "non-empty")
        check(bool(self.messages_field), "data.messages_field", self.messages_field, "non-empty")
        check("{problem}" in self.template, "data.template", self.template, "a text containing {problem}")
        check(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", self.max_prompt_tokens, ">= 1")


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
        "rollout.check_sync; 0 = auto: 1e-3 when the student computes in float32 (model.dtype), 5e-2 in "
        "bfloat16/float16.")
    env: str = _opt(
        "", "Multi-turn rollouts: the environment that answers each assistant turn (tool results, a user turn) until "
        "it says done. Empty = single turn; calculator (a safe arithmetic tool); or a user class by import path "
        "package.module:Name (vopd.env.Env). Its tools are declared to the chat template, every row goes through the "
        "template, and only the student's own tokens are trained on.")
    max_turns: int = _opt(8, "With rollout.env: assistant turns per episode, at most (an episode cut there is "
                          "truncated).")
    max_total_tokens: int = _opt(
        0, "With rollout.env: completion tokens per episode, the student's and the environment's together (each "
        "turn samples at most rollout.max_new_tokens of them); an episode cut there is truncated. 0 = "
        "rollout.max_new_tokens.")
    env_timeout_s: float = _opt(30.0, "With rollout.env: seconds one environment call may take; a longer one stops "
                                "the run with an error naming the row.")
    env_max_chars: int = _opt(20000, "With rollout.env: characters kept of each message the environment returns (a "
                              "longer one is cut, marked so).")

    @property
    def completion_tokens(self) -> tuple[int, str]:
        """The longest completion (a whole episode with rollout.env) and the key that sets it."""
        if self.env and self.max_total_tokens:
            return self.max_total_tokens, "rollout.max_total_tokens"
        return self.max_new_tokens, "rollout.max_new_tokens"

    def validate(self) -> None:
        """The [rollout] ranges (which sampling settings suit which loss method is the trainer's check)."""
        check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.temperature > 0, "rollout.temperature", self.temperature, "> 0")
        check(0.0 <= self.top_p <= 1.0, "rollout.top_p", self.top_p, "in [0, 1]")
        check(self.top_k >= 0, "rollout.top_k", self.top_k, ">= 0 (0 = off)")
        check(self.batch_size >= 1, "rollout.batch_size", self.batch_size, ">= 1")
        check(self.sync_tolerance >= 0, "rollout.sync_tolerance", self.sync_tolerance, ">= 0 (0 = auto)")
        check_spec(self.env)
        check(self.max_turns >= 1, "rollout.max_turns", self.max_turns, ">= 1")
        check(self.max_total_tokens >= 0, "rollout.max_total_tokens", self.max_total_tokens,
              ">= 0 (0 = rollout.max_new_tokens)")
        check(self.env_timeout_s > 0, "rollout.env_timeout_s", self.env_timeout_s, "> 0")
        check(self.env_max_chars >= 1, "rollout.env_max_chars", self.env_max_chars, ">= 1")


@dataclass
class LossConfig:
    """[loss] The per-token reverse-KL estimator."""

    method: Method = _opt("vopd", "Estimator of the reverse-KL gradient.")
    top_k: int = _opt(100, "Tokens per position for the top-k methods (vopd-topk, opd-topk, rb-topk; vopd-ttopk: the "
                      "teacher's own top-k, which a teacher server must send at this width); >= 1.")
    chunk_memory_mb: int = _opt(1024, "Memory budget for one chunk of vocabulary-sized activations, in MiB.")
    ratio_cap: float = _opt(
        2.0, "Cap on the detached importance ratio against the sampler's log-probs; 0 disables the ratio, else >= 1."
    )
    ratio_mode: Literal["truncate", "mask"] = _opt(
        "truncate", "What a ratio above loss.ratio_cap does: truncate (weight min(ratio, cap): truncated importance "
        "sampling) or mask (the token gets weight 0: masked importance sampling).")

    def validate(self) -> None:
        """The [loss] ranges."""
        check(self.top_k >= 1, "loss.top_k", self.top_k, ">= 1")
        check(self.chunk_memory_mb >= 1, "loss.chunk_memory_mb", self.chunk_memory_mb, ">= 1")
        # A cap below 1 would clip every ratio under its unbiased value 1; 0 is the documented "off".
        check(self.ratio_cap == 0 or self.ratio_cap >= 1, "loss.ratio_cap", self.ratio_cap, "0 (off) or >= 1")


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

    def validate(self) -> None:
        """The [optim] ranges."""
        check(self.lr > 0, "optim.lr", self.lr, "> 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        check(0.0 <= self.beta1 < 1.0, "optim.beta1", self.beta1, "in [0, 1)")
        check(0.0 <= self.beta2 < 1.0, "optim.beta2", self.beta2, "in [0, 1)")
        check(self.eps > 0, "optim.eps", self.eps, "> 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        check(self.max_update_ratio >= 0, "optim.max_update_ratio", self.max_update_ratio, ">= 0 (0 = no limit)")


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

    def validate(self) -> None:
        """The [eval] rules (that eval.every needs data.eval is a cross-section rule of ``TrainConfig``)."""
        check(self.every >= 0, "eval.every", self.every, ">= 0")
        check(self.n >= 1, "eval.n", self.n, ">= 1")
        check(self.greedy or self.temperature > 0, "eval.temperature", self.temperature,
              "> 0 (or set eval.greedy=true)")
        check(not self.greedy or self.n == 1, "eval.n", self.n,
              "1 when eval.greedy=true (greedy samples are all the same)")
        check(0.0 <= self.top_p <= 1.0, "eval.top_p", self.top_p, "in [0, 1]")
        check(self.max_new_tokens >= 0, "eval.max_new_tokens", self.max_new_tokens, ">= 0 (0 = rollout.max_new_tokens)")
        check(self.limit >= 0, "eval.limit", self.limit, ">= 0 (0 = all)")


@dataclass
class VllmConfig:
    """[vllm] The colocated vLLM engine (rollout.engine=vllm; docs/scaling.md)."""

    gpu_memory_utilization: float = _opt(
        0.3, "GPU only: fraction of the GPU's memory vLLM may take (weights + KV cache); the trainer keeps the rest.")
    max_model_len: int = _opt(0, "Longest prompt + completion the engine serves; 0 = the longest prompt "
                              "(data.max_prompt_tokens, or less under the student's position limit) + "
                              "rollout.max_new_tokens; a set value below that, or above the position limit, is "
                              "refused.")
    enforce_eager: bool = _opt(False, "GPU only: no CUDA-graph capture (less memory, slower decoding); always "
                               "eager on the CPU.")
    sleep: bool = _opt(False, "GPU only: release vLLM's memory (weights and KV cache: sleep level 2) while the "
                       "trainer runs, woken around every weight push (untested until run on a GPU).")
    cpu_kv_cache_gb: float = _opt(1.0, "CPU only: KV-cache size in GiB.")
    push_piece_mb: float = _opt(
        256.0, "Weight push: MiB of whole (gathered, LoRA-merged) weights handed to the engine per piece; one "
        "weight when it alone is larger. Bounds the push's extra memory; any size gives the same weights.")

    def validate(self) -> None:
        """The [vllm] ranges."""
        check(0.0 < self.gpu_memory_utilization <= 1.0, "vllm.gpu_memory_utilization", self.gpu_memory_utilization,
              "in (0, 1]")
        check(self.max_model_len >= 0, "vllm.max_model_len", self.max_model_len, ">= 0 (0 = auto)")
        check(self.cpu_kv_cache_gb > 0, "vllm.cpu_kv_cache_gb", self.cpu_kv_cache_gb, "> 0")
        check(self.push_piece_mb > 0, "vllm.push_piece_mb", self.push_piece_mb, "> 0")


@dataclass
class DistributedConfig:
    """[distributed] Data parallelism under torchrun; the world size comes from torchrun (docs/scaling.md)."""

    strategy: Literal["ddp", "fsdp2"] = _opt(
        "ddp", "ddp: every rank holds the whole student; fsdp2: parameters, gradients and optimizer states are "
        "sharded over the ranks. Ignored in a single process."
    )
    timeout_min: float = _opt(60.0, "Minutes a rank waits in a collective (e.g. while rank 0 evaluates or saves).")

    def validate(self) -> None:
        """The [distributed] ranges."""
        check(self.timeout_min > 0, "distributed.timeout_min", self.timeout_min, "> 0")
