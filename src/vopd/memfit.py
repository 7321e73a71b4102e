"""Whether a config fits a GPU, phase by phase, and what to change when it does not: the verdict behind ``vopd plan``
and ``vopd check --gpu-memory-gib`` (docs/scaling.md, "Will it fit?").

What it knows: the traced training step (``vopd.memplan.trace_step``: what is live per rank at its peak, by
category) and, by arithmetic from the same shapes, what the trace leaves out:
- **sampling**: the resident state (weights, masters, optimizer states, an unoffloaded teacher) plus the sampler: a
  colocated vLLM engine takes ``vllm.gpu_memory_utilization`` of the GPU (held during training too unless
  ``vllm.sleep``) and must hold the student's weights and one sequence's KV cache; Hugging Face ``generate`` holds a
  KV cache for ``min(rollout.batch_size, rows per rank)`` rows of prompt + completion tokens, three (rows, V) fp32
  score tensors (logits, processed scores, probabilities) and, under FSDP2, the gathered weights of one forward;
- **DDP**'s gradient buckets (a second copy of the trainable gradients: vopd does not make them bucket views);
- **a margin** for what no operator allocates: 1 GiB (CUDA context, NCCL buffers) + 10% of the phase's peak (the
  caching allocator's fragmentation; a rule of thumb, not a measurement).
``before=True`` emulates the code before docs/scaling.md's memory work for its comparison table: pure bf16 training
(``model.master_dtype=bfloat16``), an unsharded teacher on every rank, and by arithmetic a full unsharded student
copy under FSDP2, ``generate`` keeping every step's fp32 scores, and LoRA pushes building fp32 merged copies of every
targeted weight at once.

What it does not know: evaluation (every rank samples its share as the rollout does), remote teachers' servers, real data
lengths (every row is as long as the config allows), or anything a GPU would show that a trace cannot: the plan is an
estimate to check before launching, not a guarantee.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vopd.config import TrainConfig
from vopd.memplan import GIB, StepTrace, replace, trace_step

MARGIN_FIXED = 1.0 * GIB
MARGIN_SHARE = 0.10


@dataclass(frozen=True)
class Phase:
    """One phase of a step on one rank: bytes by category."""

    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Advice:
    """A change to the config (as the user would write it) and the plan's peak with it."""

    change: str
    peak: int
    fits: bool


@dataclass
class Verdict:
    """The plan of one config on ``world_size`` ranks of ``gpu_bytes`` each."""

    world_size: int
    gpu_bytes: int
    phases: list[Phase]
    margin: int
    problems: list[str]  # reasons besides the total (a vLLM share too small for its model)
    host: dict[str, int]
    notes: list[str]
    before: bool
    advice: list[Advice] = field(default_factory=list)

    @property
    def worst(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        """The worst phase's bytes per rank, margin included."""
        return self.worst.total + self.margin

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes and not self.problems


def plan(cfg: TrainConfig, *, world_size: int, gpu_memory_gib: float, before: bool = False,
         advise: bool = True) -> Verdict:
    """The verdict for ``cfg``; with ``advise``, when it does not fit, each change of ``_candidates`` re-planned (and
    all of them together when none is enough alone)."""
    cache: dict[tuple[str, int], StepTrace] = {}
    verdict = _verdict(cfg, world_size, gpu_memory_gib, before, cache)
    if advise and not verdict.fits:
        verdict.advice = _advise(cfg, world_size, gpu_memory_gib, before, cache)
    return verdict


def _verdict(cfg: TrainConfig, world_size: int, gib: float, before: bool,
             cache: dict[tuple[str, int], StepTrace]) -> Verdict:
    traced = _before(cfg) if before else cfg
    key = (repr(traced), world_size)
    if key not in cache:
        cache[key] = trace_step(traced, world_size)
    trace = cache[key]
    gpu = int(gib * GIB)
    problems: list[str] = []
    notes = list(trace.notes)
    phases = [_training(cfg, trace, gpu, before), _sampling(cfg, trace, gpu, before, problems, notes)]
    worst = max(p.total for p in phases)
    margin = int(MARGIN_FIXED + MARGIN_SHARE * worst)
    notes.append("not planned: evaluation (every rank samples its share as the rollout does) and remote teachers' servers")
    return Verdict(world_size, gpu, phases, margin, problems, dict(trace.host), notes, before)


def _before(cfg: TrainConfig) -> TrainConfig:
    """The config as the code before the memory work ran it: bf16 masters, every teacher whole on every rank."""
    teachers = [dataclasses.replace(e, shard="never", offload=False) for e in cfg.model.teacher_configs]
    changes: dict[str, Any] = {"model.teachers": teachers, "model.teacher": ""}
    if not cfg.lora.enabled:
        changes["model.master_dtype"] = "bfloat16"
    return replace(cfg, **changes)


def _vllm_share(cfg: TrainConfig, gpu: int) -> int:
    return int(cfg.vllm.gpu_memory_utilization * gpu)


def _resident(trace: StepTrace) -> dict[str, int]:
    """What stays on the device between steps (an offloaded teacher's shards are on the host)."""
    return {k: v for k, v in trace.resident.items() if v and k not in trace.host}


def _training(cfg: TrainConfig, trace: StepTrace, gpu: int, before: bool) -> Phase:
    s = trace.shapes
    parts = {k: v for k, v in trace.at_peak.items() if v}
    if "teacher" in trace.host:  # traced on the device, kept on the host: only its gathered blocks are here
        parts["teacher"] = max(0, parts.get("teacher", 0) - trace.host["teacher"])
    if s.strategy == "ddp":
        parts["DDP gradient buckets"] = s.trainable_params * s.precision.master.itemsize
    if cfg.rollout.engine == "vllm" and not cfg.vllm.sleep:
        parts["vLLM (held while training)"] = _vllm_share(cfg, gpu)
    if before and s.strategy == "fsdp2":
        parts["unsharded student copy (before)"] = s.student_params * s.precision.compute.itemsize
    return Phase("training step", parts)


def _sampling(cfg: TrainConfig, trace: StepTrace, gpu: int, before: bool, problems: list[str],
              notes: list[str]) -> Phase:
    s = trace.shapes
    parts = _resident(trace)
    tokens = s.prompt_tokens + s.completion_tokens
    if before and s.strategy == "fsdp2":
        parts["unsharded student copy (before)"] = s.student_params * s.precision.compute.itemsize
    if cfg.rollout.engine == "vllm":
        share = _vllm_share(cfg, gpu)
        parts["vLLM (gpu_memory_utilization)"] = share
        weights = s.student_params * s.precision.compute.itemsize
        need = weights + tokens * s.kv_bytes_per_token
        if need > share:
            problems.append(f"vLLM's share ({share / GIB:.1f} GiB = vllm.gpu_memory_utilization "
                            f"{cfg.vllm.gpu_memory_utilization} of the GPU) cannot hold the student's weights "
                            f"({weights / GIB:.1f} GiB) and one {tokens}-token sequence's KV cache: raise "
                            "vllm.gpu_memory_utilization")
        rows = max(1, cfg.batch_size // s.world_size)
        batch_kv = rows * tokens * s.kv_bytes_per_token
        if share > weights:  # vLLM schedules what its cache holds; the rest waits (slower, never out of memory)
            at_once = min(rows, (share - weights) // max(1, tokens * s.kv_bytes_per_token))
            notes.append(f"vLLM: {share / GIB:.1f} GiB share = student weights {weights / GIB:.1f} GiB + KV cache; "
                         f"this rank's {rows} rows of {tokens} tokens need {batch_kv / GIB:.1f} GiB of KV cache, "
                         f"{at_once} of them fit at once")
        parts["weight push pieces"] = int(cfg.vllm.push_piece_mb * 2**20)
        if before and cfg.lora.enabled:
            parts["fp32 merged LoRA copies (before)"] = s.lora_targeted_params * 4
        return Phase("sampling", parts)
    rows = min(cfg.rollout.batch_size, max(1, cfg.batch_size // s.world_size))
    parts["KV cache (generate)"] = rows * tokens * s.kv_bytes_per_token
    parts["scores (generate)"] = 3 * rows * s.vocab * 4
    if before:  # every step's fp32 (rows, V) scores kept, three copies at the end (docs/scaling.md)
        parts["scores (generate)"] = 3 * rows * s.completion_tokens * s.vocab * 4
    if s.strategy == "fsdp2":
        parts["gathered weights"] = trace.at_peak.get("gathered weights", 0)
    return Phase("sampling", parts)


def _candidates(cfg: TrainConfig, world_size: int) -> list[tuple[str, dict[str, Any], int]]:
    """(what the user changes, the dotted changes, the world size) for each change that could lower the peak."""
    out: list[tuple[str, dict[str, Any], int]] = []
    if not cfg.model.gradient_checkpointing:
        out.append(("model.gradient_checkpointing=true", {"model.gradient_checkpointing": True}, world_size))
    if cfg.micro_batch_size > 1:
        half = cfg.micro_batch_size // 2
        out.append((f"micro_batch_size={half}", {"micro_batch_size": half}, world_size))
    if cfg.rollout.engine == "vllm" and not cfg.vllm.sleep:
        out.append(("vllm.sleep=true", {"vllm.sleep": True}, world_size))
    if world_size > 1 and cfg.distributed.strategy == "ddp":
        out.append(("distributed.strategy=fsdp2", {"distributed.strategy": "fsdp2"}, world_size))
    entries = cfg.model.teacher_configs
    if world_size > 1 and cfg.distributed.strategy == "fsdp2" and any(not e.remote and not e.offload and
                                                                      e.shard != "never" for e in entries):
        offloaded = [e if e.remote else dataclasses.replace(e, offload=True) for e in entries]
        out.append(("model.teachers[].offload=true", {"model.teachers": offloaded, "model.teacher": ""},
                    world_size))
    if not cfg.lora.enabled:
        out.append(("lora.enabled=true", {"lora.enabled": True}, world_size))
    if world_size * 2 <= cfg.batch_size:
        out.append((f"{world_size * 2} GPUs (torchrun --nproc-per-node ...)", {}, world_size * 2))
    return out


def _advise(cfg: TrainConfig, world_size: int, gib: float, before: bool,
            cache: dict[tuple[str, int], StepTrace]) -> list[Advice]:
    advice = []
    together: dict[str, Any] = {}
    for label, changes, world in _candidates(cfg, world_size):
        v = _verdict(replace(cfg, **changes), world, gib, before, cache)
        advice.append(Advice(label, v.peak, v.fits))
        if world == world_size:
            together.update(changes)
    if together and not any(a.fits for a in advice) and len(together) > 1:
        v = _verdict(replace(cfg, **together), world_size, gib, before, cache)
        labels = [a.change for a in advice if not a.change.endswith(")")]
        advice.append(Advice(" and ".join(labels), v.peak, v.fits))
    return advice


def to_json(v: Verdict) -> dict[str, Any]:
    """The verdict as ``vopd plan --json`` prints it (GiB, rounded to 0.01)."""
    def g(b: int) -> float:
        return round(b / GIB, 2)

    return {"fits": v.fits, "per_rank_peak_gib": g(v.peak), "gpu_memory_gib": g(v.gpu_bytes),
            "world_size": v.world_size, "worst_phase": v.worst.name, "margin_gib": g(v.margin),
            "by_category_gib": {k: g(b) for k, b in v.worst.parts.items()},
            "phases": {p.name: {"total_gib": g(p.total), **{k: g(b) for k, b in p.parts.items()}} for p in v.phases},
            "host_gib": {k: g(b) for k, b in v.host.items()}, "problems": v.problems, "notes": v.notes,
            "emulated_before": v.before,
            "advice": [{"change": a.change, "per_rank_peak_gib": g(a.peak), "fits": a.fits} for a in v.advice]}


def verdict_line(v: Verdict) -> str:
    """One line: fits or not, the peak against the GPU, the worst phase."""
    word = "fits" if v.fits else "does NOT fit"
    return (f"{word}: {v.peak / GIB:.1f} GiB per rank at the peak ({v.worst.name}, margin included) of "
            f"{v.gpu_bytes / GIB:.0f} GiB, on {v.world_size} GPU{'s' if v.world_size > 1 else ''}")


def render(v: Verdict) -> list[str]:
    """The verdict as ``vopd plan`` prints it."""
    lines = [verdict_line(v) + (" (emulating the code before the memory work)" if v.before else "")]
    for p in v.phases:
        lines.append(f"  {p.name}: {p.total / GIB:.1f} GiB")
        for k, b in sorted(p.parts.items(), key=lambda kv: -kv[1]):
            if b >= 0.005 * GIB:
                lines.append(f"    {k:34s} {b / GIB:7.2f}")
    lines.append(f"  margin (1 GiB + 10% of the worst phase): {v.margin / GIB:.1f} GiB")
    lines += [f"  host: {k} {b / GIB:.1f} GiB" for k, b in v.host.items()]
    lines += [f"  problem: {p}" for p in v.problems] + [f"  note: {n}" for n in v.notes]
    if v.advice:
        lines.append("  what would fit:" if any(a.fits for a in v.advice) else "  none of these alone fits:")
        lines += [f"    {a.change}: {a.peak / GIB:.1f} GiB{'  fits' if a.fits else ''}" for a in v.advice]
    return lines
