"""`vopd train`: on-policy distillation in one readable loop.

    for step:  sample -> score (teacher) + loss (student) + backward -> step -> log -> evaluate -> checkpoint

What it knows: the order of work of a step, each phase one call, and which work is global under torchrun (the skip
decision; evaluation, each rank its share; the gathering of weights for files when a model is sharded, so that its
collectives run on every rank) and which is rank 0's (logs, files). The run it loops over is set up once by
``vopd.setup.set_up`` (models, teachers, data, pre-flight, the wrapped student, the rollout source, the output
directory, optimizer and resume state; how a run starts is one ``Start`` value). Whether a step is bad (and the
aborts) is ``vopd.guard``'s call; one step's gradient (micro-batches, teacher scores, the loss, backward, the
variance probe) is ``vopd.step``'s; rollouts come from the run's ``vopd.rollout.RolloutSource``; evaluation is
``vopd.eval_student``'s and files are ``vopd.checkpoint_sharded``'s, ``vopd.rundir``'s and ``vopd.export``'s; a full disk
while writing the history or ``final/`` is one line naming the last valid checkpoint (``vopd.fsfaults``). What it
does not know: the loss math, or which teacher placement it talks to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vopd import checkpoint_sharded as sharded
from vopd import distributed as dist
from vopd import guard
from vopd.config import TrainConfig, load_config
from vopd.errors import UserError
from vopd.eval_student import evaluate_run
from vopd.export import ExportFailed, export_merged, export_streamed
from vopd.fsfaults import describe, is_fault, one_line
from vopd.guard import TrainingAborted  # re-exported: the error a run that stops on purpose raises
from vopd.metrics import PhaseTimer, gradient_noise, peak_memory_mb, rollout_metrics
from vopd.rollout import Rollout, SamplerFactory, check_weight_sync
from vopd.rundir import FINAL, FINAL_STATE, final_step
from vopd.setup import NEW, OVERWRITE, Run, Start, TrainerState, make_scheduler, set_up
from vopd.step import StepGradient, accumulate_gradients

__all__ = ["NEW", "OVERWRITE", "Start", "TrainResult", "TrainerState", "TrainingAborted", "make_scheduler", "train"]


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    steps_done: int
    skipped_steps: int
    final_checkpoint: Path | None
    last_metrics: dict[str, Any]


def train(cfg: TrainConfig, *, start: Start = NEW, stop_at: int | None = None, log: Callable[[str], None] = print,
          make_sampler: SamplerFactory | None = None) -> TrainResult:
    """Distil the configured teacher(s) into ``cfg.model.student``.

    ``start``: a new run (default), an overwrite, or a resume (``Start.resume()``: the newest checkpoint in
    ``output_dir``, refusing a damaged one; ``Start.resume(path)``: that checkpoint; ``discard_newer=True`` lets it
    replace newer work; ``allow_data_change=True`` lets it continue on other training data); ``stop_at`` ends after
    that step as if interrupted (no final export), which is how resume is tested; ``make_sampler(model, tokenizer,
    rollout_config)`` replaces Hugging Face generate with a sampler built from the live student (``model`` is updated
    in place every step) and the ``rollout`` section of the config.
    Under torchrun every rank calls this; every rank evaluates its share; rank 0 logs and writes files
    (docs/scaling.md)."""
    if stop_at is not None and stop_at < 1:
        raise UserError(f"--stop-at {stop_at} is invalid: it must be >= 1 (the step after which to stop)")
    with set_up(cfg, start, log=log, make_sampler=make_sampler) as run:
        metrics = _loop(run, stop_at)
        final = run.out_dir / FINAL
        state = run.state
        if state.step == cfg.steps and dist.on_main(lambda: final_step(run.out_dir)) != state.step:
            _export_final(run, final)
            run.info(f"final model: {final}")
        return TrainResult(run.out_dir, state.step, state.skipped_steps, run.last_checkpoint, metrics)


def _loop(run: Run, stop_at: int | None) -> dict[str, Any]:
    """The algorithm, one step after another: sample -> score + loss + backward -> step -> log -> evaluate ->
    checkpoint. Returns the last step's metrics."""
    cfg, state = run.cfg, run.state
    metrics: dict[str, Any] = {}
    step = state.step
    try:
        for step in range(state.step, cfg.steps):
            timer = _begin_step(run, step)
            # 1. sample: this rank's slice of the global batch, completions from the current student (a student too
            # broken to sample from ends the run with one line naming the last good checkpoint)
            with timer("generate"), guard.sampling_failures(step + 1, run.last_checkpoint):
                rollout = _on_policy(run.source.rollouts(step), step)
            # 2-4. per micro-batch: teacher scores, student forward, advantages + loss, backward (vopd.step)
            with timer("student"):
                grad = accumulate_gradients(cfg, run.student, run.teachers, rollout, run.device, timer, run.plan)
            # the sampler must have drawn from these very weights: a stale or half-applied weight sync shows here
            check_weight_sync(cfg.rollout, grad.token_metrics, run.student.precision.compute)
            # 5. step (or skip a bad one: vopd.guard)
            verdict, grad_norm = _optimizer_step(run, grad, timer)
            state.step, state.data = step + 1, run.source.position()
            # 6. log
            metrics = _step_metrics(run, rollout, grad, verdict, grad_norm, timer)
            if not verdict.ok:
                run.info(f"step {step + 1}: update skipped: {verdict.reason} ({state.bad_in_a_row} in a row)")
            if state.bad_in_a_row > cfg.max_bad_steps:
                raise guard.bad_steps_abort(state.bad_in_a_row, cfg.max_bad_steps, verdict.reason, run.last_checkpoint)
            # 7. evaluate (every rank its share)
            metrics.update(_evaluate(run, step))
            _write_log(run, step, metrics)
            # 8. checkpoint
            _checkpoint(run, step, stop_at)
            if stop_at is not None and step + 1 >= stop_at:
                break
    except TrainingAborted as exc:
        if run.writer is not None:  # the aborted step has its line too, saying why the run stopped
            run.writer.write(step + 1, {**metrics, "step_skipped": True, "skipped_steps": state.skipped_steps,
                                        "abort": str(exc)})
        raise
    return metrics


def _begin_step(run: Run, step: int) -> PhaseTimer:
    """Reset the peak-memory counter and seed the step; the step's phase timer."""
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    # Seeded per (step, rank), not carried from step to step: a resumed run samples what the uninterrupted one
    # would have, whatever the world size was when the checkpoint was written.
    torch.manual_seed(_step_seed(run.cfg.seed, step, dist.rank()))
    return PhaseTimer(run.device)


def _on_policy(rollout: Rollout, step: int) -> Rollout:
    """The estimators are on-policy (docs/estimators.md; the importance ratio corrects only the sampler's
    numerics): step k trains on rollouts of weights version k."""
    if rollout.weights_version != step:
        raise UserError(f"the rollout source gave rollouts of weights version {rollout.weights_version} at step "
                        f"{step}: vopd trains on-policy only; use a source that samples from the current weights")
    return rollout


def _optimizer_step(run: Run, grad: StepGradient, timer: PhaseTimer) -> tuple[guard.StepVerdict, float]:
    """Clip, judge (a non-finite loss or gradient, or an update that would leave the weights non-finite or exploding,
    is skipped and counted: ``vopd.guard``, judged before it is applied), step, schedule. Returns the verdict and the
    gradient norm before clipping."""
    cfg, state, student = run.cfg, run.state, run.student
    with timer("optimizer"):
        grad_norm = student.clip_grad_norm(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        verdict = guard.judge_step(grad.loss, grad_norm, run.optimizer, strategy=student.strategy,
                                   max_update_ratio=cfg.optim.max_update_ratio)
        if verdict.ok:
            run.optimizer.step()
            state.bad_in_a_row = 0
        else:
            state.skipped_steps += 1
            state.bad_in_a_row += 1
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
    return verdict, grad_norm


def _step_metrics(run: Run, rollout: Rollout, grad: StepGradient, verdict: guard.StepVerdict, grad_norm: float,
                  timer: PhaseTimer) -> dict[str, Any]:
    """The step's line of ``metrics.jsonl`` (docs/metrics.md), before evaluation."""
    metrics = {**grad.token_metrics, "loss": grad.loss, "grad_norm": grad_norm,
               "update_ratio": verdict.update_ratio, "lr": run.scheduler.get_last_lr()[0],
               "skipped_steps": run.state.skipped_steps, "step_skipped": not verdict.ok,
               **rollout_metrics(rollout), **timer.metrics(), "peak_memory_mb": peak_memory_mb(run.device)}
    metrics["tokens_per_s"] = grad.total_tokens / max(timer.total, 1e-9)
    if grad.scored_ahead_s is not None:  # overlapped scoring: what the student did not wait for
        metrics["teacher_hidden_s"] = max(0.0, grad.scored_ahead_s - timer.metrics().get("time_teacher", 0.0))
    for name, teacher in run.teachers:  # a placement with servers of its own counts per server (stock vLLM)
        counts = getattr(teacher, "server_metrics", None)
        if callable(counts):
            metrics.update({f"teacher_server/{name}/{key}": value for key, value in counts().items()})
    if grad.half_probe is not None:
        metrics.update(gradient_noise(*grad.half_probe, grad_norm**2, run.cfg.batch_size))
    return metrics


def _evaluate(run: Run, step: int) -> dict[str, Any]:
    """Evaluation metrics when due (every ``eval.every`` steps and at the last): every rank samples, grades and
    scores its share of the problems through the run's engine, and every rank gets the numbers one process
    computes (``vopd.eval_student.evaluate_run``; docs/scaling.md)."""
    cfg = run.cfg
    last = step + 1 == cfg.steps
    if not cfg.data.eval or not ((cfg.eval.every and (step + 1) % cfg.eval.every == 0) or last):
        return {}
    return evaluate_run(run.student, run.sampler, run.teachers.single, run.tok, cfg, run.vocab)


def _write_log(run: Run, step: int, metrics: dict[str, Any]) -> None:
    last = step + 1 == run.cfg.steps
    if run.writer is not None and ((step + 1) % run.cfg.log_every == 0 or last):
        with _history_faults(run):
            run.writer.write(step + 1, metrics)
    if run.bar is not None:
        run.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("kl_estimate", "grad_norm") if k in metrics})
        run.bar.update(1)


def _checkpoint(run: Run, step: int, stop_at: int | None) -> None:
    """Every rank writes its own shards of the weights and optimizer states when due (``vopd.checkpoint_sharded``;
    rank 0 also the small files); never in the middle of a run of non-finite steps, so the newest checkpoint is
    always the last good state."""
    cfg, state = run.cfg, run.state
    due = (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps or step + 1 == stop_at
    if not due or state.bad_in_a_row != 0:
        return
    if run.writer is not None:
        with _history_faults(run):
            run.writer.flush()  # the history up to this step is on disk before a checkpoint vouches for it
    run.last_checkpoint = sharded.save_checkpoint(
        run.out_dir, step + 1, model=run.student.model, optimizer=run.optimizer, scheduler=run.scheduler,
        trainer_state=state.to_dict(), config=run.config_dict, keep_last=cfg.keep_last)


def _history_faults(run: Run) -> contextlib.AbstractContextManager[None]:
    """A full disk (or another file-system fault) while writing ``metrics.jsonl``, as one line: a resume drops the
    lines after its checkpoint and a torn one, so the history stays exact."""
    assert run.writer is not None
    return one_line(f"cannot write the history {run.writer.path}", lambda: _resume_advice(run))


def _resume_advice(run: Run) -> str:
    """What to do after a file-system fault mid-run: what is safe, and the command that continues."""
    if run.last_checkpoint is None:
        return "no checkpoint was saved yet: free disk space (or fix the cause) and start the run again (--overwrite)"
    return (f"the last valid checkpoint is {run.last_checkpoint}: free disk space (or fix the cause) and resume with "
            "--resume")


def _export_final(run: Run, final: Path) -> None:
    """Write ``final/`` atomically (a temporary directory renamed into place by rank 0; a previous one is replaced
    only then), LoRA merged, in the compute dtype (a model that trained over float32 masters is saved as the half
    model Hugging Face users load), with the trainer state it was exported at (``vopd.rundir.final_step``). Under
    FSDP2 the weights are streamed from the shards, one tensor at a time (every rank gathers, rank 0 writes:
    ``export_streamed``), so that no rank ever holds the whole model; otherwise rank 0 writes its whole student."""
    tmp, old = (final.with_name(f".tmp-{final.name}{suffix}.{os.getpid()}") for suffix in ("", "-old"))
    tmp = dist.broadcast_object(tmp)  # rank 0's, named by its pid: rank 0 writes it
    dtype = run.student.precision.compute

    def clear() -> None:
        for stale in final.parent.glob(f".tmp-{final.name}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def publish() -> None:
        (tmp / FINAL_STATE).write_text(json.dumps(run.state.to_dict(), indent=2) + "\n", encoding="utf-8")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def undo() -> None:
        """After a failed export: the partial one removed, a final/ of an earlier step kept (or put back, when
        ``publish`` failed between its renames)."""
        if old.exists() and not final.exists():
            os.rename(old, final)
        clear()

    dist.on_main(clear)
    try:
        if run.student.sharded:
            export_streamed(run.student.model, run.tok, tmp, dtype=dtype)
        else:
            dist.on_main(lambda: export_merged(run.student.model, run.tok, tmp, dtype=dtype))
        dist.on_main(publish)
    except Exception as exc:  # every rank is here: rank 0's failure reaches the others as on_main's UserError
        dist.on_main(undo)  # on every path (a collective; a failure of its own ends every rank there)
        mine = _export_cause(exc)
        cause = dist.broadcast_object(mine) or mine  # rank 0's words on every rank: the same line everywhere
        if mine is None:
            raise
        raise UserError(f"the final model could not be written to {final} ({cause}); the partial export was removed "
                        f"and {_resume_advice(run)}") from None


def _export_cause(exc: Exception) -> str | None:
    """Why ``final/`` could not be written, in one line; None for a bug (neither a ``UserError`` nor a file-system
    fault), which is raised as it is."""
    if isinstance(exc, ExportFailed):
        return exc.cause
    if isinstance(exc, UserError):
        return str(exc)
    return describe(exc) if is_fault(exc) else None


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of ``step`` on ``rank``: distinct per step and rank, the same in a resumed run."""
    return (seed * 1_000_003 + step * 4_099 + rank) % 2**63


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
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume/--resume-from: continue even though the training prompts differ from "
                             "those the checkpoint's run streamed (refused otherwise); the run logs that it did")


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    clean = False
    try:
        start = Start.from_flags(resume=args.resume, overwrite=args.overwrite, resume_from=args.resume_from,
                                 discard_newer=args.discard_newer, allow_data_change=args.allow_data_change)
        result = train(cfg, start=start, stop_at=args.stop_at)
        main = dist.is_main()  # read before shutdown: afterwards every process looks like rank 0
        clean = True
    finally:
        dist.shutdown(clean=clean)
    if main:
        m = result.last_metrics
        print(f"done: {result.steps_done} steps ({result.skipped_steps} skipped) in {result.output_dir}; "
              + ", ".join(f"{k}={m[k]:.4g}" for k in ("kl_estimate", "kl_mean", "eval_avg_at_n", "eval_kl") if k in m))
    return 0
