"""`vopd train`: on-policy distillation in one readable loop.

    for step:  sample -> score (teacher) -> advantages + loss (student) -> step -> log -> eval -> checkpoint

What it knows: the order of work of a step and everything around it (set-up, pre-flight, resume, NaN handling,
metrics, checkpoints), and which work is global under torchrun (the skip decision) and which is rank 0's (logs,
evaluation, files). Whether a step is bad (and the aborts) is ``vopd.guard``'s call; the checks that can be made
before step 1 are ``vopd.check``'s; the history's exactness across resumes is ``vopd.metrics``' and the rules for
resuming (whose checkpoint, what newer work it would replace) ``vopd.rundir``'s. It leaves one step's gradient (micro-batches, teacher scores, the loss, backward, the variance
probe) to ``vopd.step``, sampling to ``vopd.rollout``, the teachers to ``vopd.teacher.routing.open_teachers`` (one
``Teacher`` protocol, one teacher or several routed by a data field), evaluation to ``vopd.eval``, ranks and the DDP/FSDP2 wrapping to
``vopd.distributed`` (no-ops on one process) and files to ``vopd.checkpoint``, ``vopd.rundir`` (the output directory)
and ``vopd.export`` (the merged final model). What it does not know: the loss math, or which teacher placement
it talks to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from vopd import checkpoint as ckpt
from vopd import distributed as dist
from vopd import guard
from vopd.check import preflight, prompt_budget
from vopd.config import TrainConfig, config_to_dict, load_config, save_config
from vopd.data import PromptStream, load_prompt_pairs
from vopd.prompts import chat_options, teacher_prompts as teacher_prompt_options
from vopd.errors import UserError
from vopd.eval import evaluate_student
from vopd.export import export_merged
from vopd.metrics import MetricsWriter, PhaseTimer, gradient_noise, peak_memory_mb, rollout_metrics
from vopd.models import Model, Tokenizer, apply_lora, enable_gradient_checkpointing, load_student, resolve_device
from vopd.rollout import SamplerFactory, check_sync, engine_factory, pack
from vopd.guard import TrainingAborted  # re-exported: the error a run that stops on purpose raises
from vopd.rundir import FINAL, FINAL_STATE, final_step, prepare_output_dir
from vopd.step import accumulate_gradients
from vopd.teacher.base import SELF
from vopd.teacher.reprompt import OwnPromptTeacher
from vopd.teacher.routing import Teachers, open_teachers

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    steps_done: int
    skipped_steps: int
    final_checkpoint: Path | None
    last_metrics: dict[str, Any]


@dataclass
class TrainerState:
    """What a checkpoint's ``trainer_state.json`` holds besides weights and optimizer: the next step, the data
    position (``PromptStream.state()``), the skipped-step counters and the world size that wrote it."""

    step: int = 0
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    world_size: int = 1

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, where: Path, *, manifest_step: int, steps: int, batch_size: int, prompts: int) -> None:
        """Refuse a checkpoint whose state cannot be this run's: counts that are not counts, a step that is not its
        manifest's or lies past ``steps``, or a data position that is not where ``step`` batches end (the prompts
        changed). One-line ``UserError`` naming the key."""
        counts = {"step": self.step, "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                  "world_size": self.world_size, **{f"data.{k}": v for k, v in self.data.items()}}
        for key, value in counts.items():
            if type(value) is not int or value < 0:
                raise UserError(f"checkpoint {where} is inconsistent: trainer_state {key}={value!r} is not a count; "
                                "resume from another checkpoint")
        if set(self.data) != {"epoch", "index"}:
            raise UserError(f"checkpoint {where} is inconsistent: trainer_state data={self.data!r} is not a data "
                            "position (epoch, index); resume from another checkpoint")
        if self.step != manifest_step or self.skipped_steps > self.step or self.world_size < 1:
            raise UserError(f"checkpoint {where} is inconsistent: trainer_state step={self.step}, skipped_steps="
                            f"{self.skipped_steps}, world_size={self.world_size} for a checkpoint of step "
                            f"{manifest_step}; resume from another checkpoint")
        if not 1 <= self.step <= steps:
            raise UserError(f"checkpoint {where} is at step {self.step}, past this run's steps={steps}: set "
                            f"steps>={self.step} to continue it")
        if self.data["epoch"] * prompts + self.data["index"] != self.step * batch_size:
            raise UserError(f"checkpoint {where} does not fit the training data: its data position (epoch "
                            f"{self.data['epoch']}, index {self.data['index']}) is not where {self.step} steps of "
                            f"batch_size={batch_size} over {prompts} prompts end; the prompts changed since (data.train "
                            "file, data.max_prompt_tokens or rollout.max_new_tokens): restore them or start a new run")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at the last step."""
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, resume_from: str | None = None,
          stop_at: int | None = None, log: Callable[[str], None] = print,
          make_sampler: SamplerFactory | None = None, discard_newer: bool = False) -> TrainResult:
    """Distil ``cfg.model.teacher`` (a model directory, or the URL of a teacher server) into ``cfg.model.student``.

    ``resume`` continues from the newest checkpoint in ``output_dir`` (refusing a damaged one), ``resume_from`` from
    a given checkpoint; ``stop_at`` ends after that step as if interrupted (no final export), which is how resume
    is tested; ``make_sampler(model, tokenizer, rollout_config)`` replaces Hugging Face generate with a sampler built
    from the live student (``model`` is updated in place every step) and the ``rollout`` section of the config.
    ``discard_newer`` lets a resume replace work newer than its checkpoint (moved aside: ``vopd.rundir``).
    Under torchrun every rank calls this; rank 0 logs, evaluates and writes files (docs/scaling.md)."""
    if stop_at is not None and stop_at < 1:
        raise UserError(f"--stop-at {stop_at} is invalid: it must be >= 1 (the step after which to stop)")
    if discard_newer and not (resume or resume_from):
        raise UserError("--discard-newer only applies to a resume: pass it with --resume or --resume-from")
    device = dist.init(resolve_device(cfg.model.device), timeout_min=cfg.distributed.timeout_min)
    # The same seed on every rank: anything random before step 0 (LoRA init) must be identical across ranks.
    torch.manual_seed(cfg.seed)
    info = log if dist.is_main() else (lambda _msg: None)

    # ---- models, data and pre-flight first: a run that cannot start leaves output_dir untouched
    tok, student = load_student(cfg.model, device)
    vocab = len(tok)
    if cfg.model.teacher == SELF and cfg.lora.enabled and dist.world_size() > 1 and \
            cfg.distributed.strategy == "fsdp2":
        raise UserError("model.teacher=self with LoRA scores with the student's own sharded weights, which FSDP2 does "
                        "not allow outside its forward; use distributed.strategy=ddp, or lora.enabled=false")
    teachers = open_teachers(cfg, vocab_size=vocab, device=device, student=student, student_tok=tok)
    try:
        for line in preflight(student, tok, teachers, cfg):  # each teacher's placement and method first
            info(f"pre-flight ok: {line}")
        return _run(cfg, student, tok, teachers, device, info, resume=resume, overwrite=overwrite,
                    resume_from=resume_from, stop_at=stop_at, make_sampler=make_sampler or engine_factory(cfg),
                    discard_newer=discard_newer)
    finally:
        teachers.close()


def _run(cfg: TrainConfig, student: Model, tok: Tokenizer, teachers: Teachers, device: torch.device,
         info: Callable[[str], None], *, resume: bool, overwrite: bool, resume_from: str | None,
         stop_at: int | None, make_sampler: SamplerFactory, discard_newer: bool) -> TrainResult:
    """The run after the pre-flight: LoRA, data, the output directory, resume, then the loop."""
    vocab = len(tok)
    if cfg.lora.enabled:
        student = apply_lora(student, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                             target_modules=cfg.lora.target_modules)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    max_prompt, limit_name = prompt_budget(cfg, student)  # data.max_prompt_tokens, or less: the position limit
    single = teachers.single
    found = load_prompt_pairs(
        cfg.data.train, tok, field=cfg.data.prompt_field, template=cfg.data.template, max_tokens=max_prompt,
        long_prompts=cfg.data.long_prompts, log=info, limit_name=limit_name, messages_field=cfg.data.messages_field,
        chat=chat_options(cfg.data), route_field=cfg.data.teacher_field, teacher_names=teachers.names,
        teacher=teacher_prompt_options(cfg.data, tok, None if single is None else single.tokenizer))
    prompts, teacher_prompts, routes = found.student, found.teacher, found.routes
    if teacher_prompts is not None:  # the teacher reads each completion after its own prompt (docs/real_models.md)
        teachers = teachers.map(lambda t: OwnPromptTeacher(t, tok.pad_token_id))
    per_rank = cfg.batch_size // dist.world_size()
    if per_rank * dist.world_size() != cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by the world size {dist.world_size()}")

    # The student under DDP/FSDP2 (one process: unwrapped) and the rollout engine on its full weights, before the
    # output directory is claimed: an engine that cannot start leaves no run behind.
    engine = dist.wrap(student, vocab, cfg.distributed.strategy, device)
    sample = make_sampler(engine.full, tok, cfg.rollout)
    out_dir = Path(cfg.output_dir)
    config_dict = config_to_dict(cfg)

    def claim_output_dir() -> Path | None:
        found = prepare_output_dir(out_dir, config_dict, resume=resume or resume_from is not None,
                                   overwrite=overwrite, resume_from=resume_from, discard_newer=discard_newer)
        save_config(cfg, out_dir / "config.yaml")
        return found

    start_from = dist.on_main(claim_output_dir)  # rank 0 decides; every rank resumes from the same checkpoint
    if resume and start_from is None:
        info(f"resume: no checkpoint in {out_dir} yet; starting from step 0")

    # ---- the optimizer over what is trained, the resume
    optimizer = torch.optim.AdamW(engine.trainable(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    state = TrainerState()
    if start_from is not None:
        state = _resume(start_from, engine, optimizer, scheduler, info, cfg, len(prompts))
    state.world_size = dist.world_size()
    stream = PromptStream(len(prompts), seed=cfg.seed, shuffle=cfg.data.shuffle, **state.data)
    # The history continues at the resumed step: later lines (about to be recomputed) and torn ones are dropped.
    writer = MetricsWriter(out_dir, cfg.loggers, config_dict, resume_step=state.step) if dist.is_main() else None
    bar = _progress(cfg, state.step) if dist.is_main() else None
    last_ckpt: Path | None = start_from
    metrics: dict[str, Any] = {}
    step = state.step

    try:
        for step in range(state.step, cfg.steps):
            metrics = {}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # Seeded per (step, rank), not carried from step to step: a resumed run samples what the uninterrupted
            # one would have, whatever the world size was when the checkpoint was written.
            torch.manual_seed(_step_seed(cfg.seed, step, dist.rank()))
            timer = PhaseTimer(device)

            # 1. sample: this rank's slice of the global batch, completions from the current student (a student too
            # broken to sample from ends the run with one line naming the last good checkpoint)
            with timer("generate"), guard.sampling_failures(step + 1, last_ckpt):
                batch_ids = stream.take(cfg.batch_size)[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]
                batch_prompts = [prompts[i] for i in batch_ids]
                own = None if teacher_prompts is None else [teacher_prompts[i] for i in batch_ids]
                route = None if routes is None else [routes[i] for i in batch_ids]
                rollout = pack(batch_prompts, sample(batch_prompts), tok.pad_token_id, teacher_prompts=own,
                               routes=route)

            # 2-4. per micro-batch: teacher scores, student forward, advantages + loss, backward (vopd.step)
            with timer("student"):
                grad = accumulate_gradients(cfg, engine, teachers, rollout, device, timer)
            # the sampler must have drawn from these very weights: a stale or half-applied sync shows here
            check_sync(cfg.rollout, grad.token_metrics, next(engine.full.parameters()).dtype)

            # 5. step: a bad step (non-finite loss or gradient, or an update that would leave the weights non-finite
            # or exploding: vopd.guard, judged before it is applied) is skipped and counted; too many in a row abort
            with timer("optimizer"):
                grad_norm = engine.clip_grad_norm(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                verdict = guard.judge_step(grad.loss, grad_norm, optimizer, strategy=engine.strategy,
                                           max_update_ratio=cfg.optim.max_update_ratio)
                if verdict.ok:
                    optimizer.step()
                    state.bad_in_a_row = 0
                else:
                    state.skipped_steps += 1
                    state.bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                engine.after_step()  # FSDP2: the unsharded copy used by generate/eval/checkpoints catches up
            state.step = step + 1
            state.data = stream.state()

            # 6. log
            metrics = {**grad.token_metrics, "loss": grad.loss, "grad_norm": grad_norm,
                       "update_ratio": verdict.update_ratio, "lr": scheduler.get_last_lr()[0],
                       "skipped_steps": state.skipped_steps, "step_skipped": not verdict.ok,
                       **rollout_metrics(rollout), **timer.metrics(), "peak_memory_mb": peak_memory_mb(device)}
            metrics["tokens_per_s"] = grad.total_tokens / max(timer.total, 1e-9)
            if grad.scored_ahead_s is not None:  # overlapped scoring: what the student did not wait for
                metrics["teacher_hidden_s"] = max(0.0, grad.scored_ahead_s - timer.metrics().get("time_teacher", 0.0))
            if grad.half_probe is not None:
                metrics.update(gradient_noise(*grad.half_probe, grad_norm**2, cfg.batch_size))
            if not verdict.ok:
                info(f"step {step + 1}: update skipped: {verdict.reason} ({state.bad_in_a_row} in a row)")
            if state.bad_in_a_row > cfg.max_bad_steps:
                raise guard.bad_steps_abort(state.bad_in_a_row, cfg.max_bad_steps, verdict.reason, last_ckpt)

            # 7. evaluate (rank 0; the others wait)
            last = step + 1 == cfg.steps
            if cfg.data.eval and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0) or last):
                metrics.update(dist.on_main(lambda: evaluate_student(engine.full, teachers.single, tok, cfg, vocab))
                               or {})
            if writer is not None and ((step + 1) % cfg.log_every == 0 or last):
                writer.write(step + 1, metrics)
            if bar is not None:
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("kl_estimate", "grad_norm") if k in metrics})
                bar.update(1)

            # 8. checkpoint (rank 0 writes full weights and optimizer states; the others wait); never in the middle
            # of a run of non-finite steps, so the newest checkpoint is always the last good state
            due = (cfg.save_every and (step + 1) % cfg.save_every == 0) or last or step + 1 == stop_at
            if due and state.bad_in_a_row == 0:
                optimizer_state = engine.optimizer_state(optimizer)  # FSDP2: gathered by every rank, kept on rank 0
                if writer is not None:
                    writer.sync()  # the history up to this step is on disk before a checkpoint vouches for it
                last_ckpt = dist.on_main(lambda: ckpt.save_checkpoint(
                    out_dir, step + 1, model=engine.full, tokenizer=tok, optimizer=optimizer_state,
                    scheduler=scheduler, trainer_state=state.to_dict(), config=config_dict, keep_last=cfg.keep_last))
            if stop_at is not None and step + 1 >= stop_at:
                break
    except TrainingAborted as exc:
        if writer is not None:  # the aborted step has its line too, saying why the run stopped
            writer.write(step + 1, {**metrics, "step_skipped": True, "skipped_steps": state.skipped_steps,
                                    "abort": str(exc)})
        raise
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()

    final = out_dir / FINAL
    if state.step == cfg.steps and dist.on_main(lambda: final_step(out_dir)) != state.step:
        dist.on_main(lambda: _export_final(engine.full, tok, final, state, merge=cfg.lora.enabled))
        info(f"final model: {final}")
    return TrainResult(out_dir, state.step, state.skipped_steps, last_ckpt, metrics)


def _resume(start_from: Path, engine: dist.Engine, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, info: Callable[[str], None], cfg: TrainConfig,
            prompts: int) -> TrainerState:
    """Every rank reads the same full checkpoint (any world size and strategy wrote the same files), after checking
    that its trainer state can be this run's (``TrainerState.check``), before anything is loaded."""
    if not Path(start_from).is_dir():
        raise UserError(f"rank {dist.rank()} cannot see checkpoint {start_from}: with several nodes, output_dir "
                        "must be on a filesystem every node shares")

    def check(saved: dict[str, Any]) -> None:
        TrainerState.from_dict(saved).check(start_from, manifest_step=ckpt.checkpoint_step(start_from),
                                            steps=cfg.steps, batch_size=cfg.batch_size, prompts=prompts)

    state = TrainerState.from_dict(ckpt.load_checkpoint(
        start_from, model=engine.full, optimizer=engine.optimizer_loader(optimizer), scheduler=scheduler,
        check_state=check))
    if scheduler.last_epoch != state.step:
        raise UserError(f"checkpoint {start_from} is inconsistent: scheduler.pt is at step {scheduler.last_epoch}, "
                        f"trainer_state at step {state.step}; resume from another checkpoint")
    engine.load_full_weights()
    info(f"resumed from {start_from} at step {state.step}")
    if state.world_size != dist.world_size():
        info(f"resume: world size {dist.world_size()} (the checkpoint was written at {state.world_size}); the global "
             "batch and its token mean are unchanged, but rollouts are sampled on other ranks with other seeds")
    return state


def _export_final(model: Model, tokenizer: Tokenizer, final: Path, state: TrainerState, *, merge: bool) -> None:
    """Write ``final/`` atomically (a temporary directory renamed into place; a previous one is replaced only then),
    with the trainer state it was exported at (``vopd.rundir.final_step``)."""
    for stale in final.parent.glob(f".tmp-{final.name}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = (final.with_name(f".tmp-{final.name}{suffix}.{os.getpid()}") for suffix in ("", "-old"))
    if merge:
        export_merged(model, tokenizer, tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    (tmp / FINAL_STATE).write_text(json.dumps(state.to_dict(), indent=2) + "\n", encoding="utf-8")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of ``step`` on ``rank``: distinct per step and rank, the same in a resumed run."""
    return (seed * 1_000_003 + step * 4_099 + rank) % 2**63


def _progress(cfg: TrainConfig, start: int) -> tqdm | None:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"vopd {cfg.loss.method}", unit="step", dynamic_ncols=True)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or TOML config file (see docs/config.md)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.method=vopd optim.lr=1e-5")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="move an existing run in output_dir aside and start")
    group.add_argument("--resume-from", metavar="CHECKPOINT", help="continue the run from this checkpoint directory")
    parser.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (resume later); >= 1")
    parser.add_argument("--discard-newer", action="store_true",
                        help="with --resume/--resume-from: let the run replace work newer than the checkpoint it "
                             "resumes from (later checkpoints, final/, a history without checkpoint), which is moved "
                             "to OUTPUT_DIR/discarded-TIME/ first")


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, resume_from=args.resume_from,
                       stop_at=args.stop_at, discard_newer=args.discard_newer)
        main = dist.is_main()  # read before shutdown: afterwards every process looks like rank 0
    finally:
        dist.shutdown()
    if main:
        m = result.last_metrics
        print(f"done: {result.steps_done} steps ({result.skipped_steps} skipped) in {result.output_dir}; "
              + ", ".join(f"{k}={m[k]:.4g}" for k in ("kl_estimate", "kl_mean", "eval_avg_at_n", "eval_kl") if k in m))
    return 0
