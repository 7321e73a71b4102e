"""`vopd train`: on-policy distillation in one readable loop.

    for step:  sample -> score (teacher) -> advantages + loss (student) -> step -> log -> eval -> checkpoint

What it knows: the order of work of a step and everything around it (set-up, pre-flight, resume, NaN handling,
metrics, checkpoints), and which work is global under torchrun (token counts, the loss, the skip decision) and which
is rank 0's (logs, evaluation, files). It leaves the math to ``vopd.chunked``/``vopd.estimators`` (in-process
teacher) and ``vopd.remote`` (teacher server), sampling to ``vopd.rollout``, the teacher to ``vopd.teacher``, ranks
and the DDP/FSDP2 wrapping to ``vopd.distributed`` (no-ops on one process) and files to ``vopd.checkpoint``,
``vopd.rundir`` (the output directory) and ``vopd.export`` (the merged final model). What it does not know: which
method is used beyond passing its name (a ``Literal`` resolved by the estimators), or where the models came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vopd import checkpoint as ckpt
from vopd import distributed as dist
from vopd.chunked import chunked_distillation_loss
from vopd.config import TrainConfig, config_to_dict, load_config, save_config
from vopd.data import PromptStream, encode_prompt, format_prompt, load_problems, load_prompts
from vopd.errors import UserError
from vopd.estimators import TOPK_METHODS, LossOutput
from vopd.export import export_merged
from vopd.metrics import MetricsWriter, PhaseTimer, TokenStats, gradient_noise, peak_memory_mb, rollout_metrics
from vopd.models import (apply_lora, enable_gradient_checkpointing, load_model, load_tokenizer, resolve_device,
                         resolve_dtype)
from vopd.remote import REMOTE_METHODS, RemoteTeacher, remote_distillation_loss, student_topk_ids
from vopd.rollout import Rollout, Sampler, hf_sampler, pack
from vopd.rundir import prepare_output_dir
from vopd.teacher import InProcessTeacher, is_remote, open_teacher, rollout_kl


class TrainingAborted(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    steps_done: int
    skipped_steps: int
    final_checkpoint: Path | None
    last_metrics: dict[str, Any]


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
          sampler: Sampler | None = None,
          make_sampler: Callable[[Any, Any, dict[str, Any]], Sampler] | None = None) -> TrainResult:
    """Distil ``cfg.model.teacher`` (a model directory, or the URL of a teacher server) into ``cfg.model.student``.

    ``resume`` continues from the newest checkpoint in ``output_dir`` (refusing a damaged one), ``resume_from`` from
    a given checkpoint; ``stop_at`` ends after that step as if interrupted (no final export), which is how resume
    is tested; ``sampler`` replaces Hugging Face generate, or ``make_sampler(model, tokenizer, settings)`` builds
    one from the live student (``model`` is updated in place every step) and the rollout settings of the config.
    Under torchrun every rank calls this; rank 0 logs, evaluates and writes files (docs/scaling.md)."""
    remote = is_remote(cfg.model.teacher)
    if remote and cfg.loss.method not in REMOTE_METHODS:
        raise UserError(f"loss.method={cfg.loss.method} needs the teacher's full distribution at every position, "
                        f"which a teacher server ({cfg.model.teacher}) does not send; use loss.method=vopd-topk (the "
                        "same unbiased gradient with a top-k baseline) or a local teacher directory")
    device = dist.init(resolve_device(cfg.model.device), timeout_min=cfg.distributed.timeout_min)
    # The same seed on every rank: anything random before step 0 (LoRA init) must be identical across ranks.
    torch.manual_seed(cfg.seed)
    info = log if dist.is_main() else (lambda _msg: None)

    # ---- models, data and pre-flight first: a run that cannot start leaves output_dir untouched
    tok = load_tokenizer(cfg.model.student, role="student", trust_remote_code=cfg.model.trust_remote_code)
    student = load_model(cfg.model.student, role="student", dtype=resolve_dtype(cfg.model.dtype, device),
                         device=device, trust_remote_code=cfg.model.trust_remote_code)
    vocab = len(tok)
    teacher = open_teacher(cfg, student, tok, device, info)
    if cfg.lora.enabled:
        student = apply_lora(student, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                             target_modules=cfg.lora.target_modules)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    prompts = load_prompts(cfg.data.train, tok, field=cfg.data.prompt_field, template=cfg.data.template,
                           max_tokens=cfg.data.max_prompt_tokens, long_prompts=cfg.data.long_prompts, log=info)
    per_rank = cfg.batch_size // dist.world_size()
    if per_rank * dist.world_size() != cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by the world size {dist.world_size()}")

    out_dir = Path(cfg.output_dir)
    config_dict = config_to_dict(cfg)

    def claim_output_dir() -> Path | None:
        found = prepare_output_dir(out_dir, config_dict, resume=resume or resume_from is not None,
                                   overwrite=overwrite, resume_from=resume_from)
        save_config(cfg, out_dir / "config.yaml")
        return found

    start_from = dist.on_main(claim_output_dir)  # rank 0 decides; every rank resumes from the same checkpoint
    if resume and start_from is None:
        info(f"resume: no checkpoint in {out_dir} yet; starting from step 0")

    # ---- the student under DDP/FSDP2 (one process: unwrapped), the optimizer over what is trained, the resume
    engine = dist.wrap(student, vocab, cfg.distributed.strategy, device)
    params = engine.trainable()
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    state: dict[str, Any] = {"step": 0, "data": {"epoch": 0, "index": 0}, "skipped_steps": 0, "bad_in_a_row": 0}
    if start_from is not None:
        if not Path(start_from).is_dir():
            raise UserError(f"rank {dist.rank()} cannot see checkpoint {start_from}: with several nodes, output_dir "
                            "must be on a filesystem every node shares")
        # Every rank reads the same full checkpoint (any world size and strategy wrote the same files).
        state = ckpt.load_checkpoint(start_from, model=engine.full, optimizer=engine.optimizer_loader(optimizer),
                                     scheduler=scheduler)
        engine.load_full_weights()
        info(f"resumed from {start_from} at step {state['step']}")
        saved_world = state.get("world_size", 1)
        if saved_world != dist.world_size():
            info(f"resume: world size {dist.world_size()} (the checkpoint was written at {saved_world}); the global "
                 "batch and its token mean are unchanged, but rollouts are sampled on other ranks with other seeds")
    state["world_size"] = dist.world_size()
    stream = PromptStream(len(prompts), seed=cfg.seed, shuffle=cfg.data.shuffle, **state["data"])
    settings = dict(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                    top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, batch_size=cfg.rollout.batch_size,
                    cache=cfg.rollout.cache)
    sample = sampler or (make_sampler or _hf_sampler)(engine.full, tok, settings)
    writer = MetricsWriter(out_dir, cfg.loggers, config_dict) if dist.is_main() else None
    bar = _progress(cfg, state["step"]) if dist.is_main() else None
    last_ckpt: Path | None = start_from
    metrics: dict[str, Any] = {}

    try:
        for step in range(state["step"], cfg.steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # Seeded per (step, rank), not carried from step to step: a resumed run samples what the uninterrupted
            # one would have, whatever the world size was when the checkpoint was written.
            torch.manual_seed(_step_seed(cfg.seed, step, dist.rank()))
            timer = PhaseTimer(device)

            # 1. sample: this rank's slice of the global batch, completions from the current student
            with timer("generate"):
                batch_ids = stream.take(cfg.batch_size)[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]
                batch_prompts = [prompts[i] for i in batch_ids]
                rollout = pack(batch_prompts, sample(batch_prompts), tok.pad_token_id)
            # The variance proxy needs the gradient of a part of the batch: a one-micro-batch step runs as two.
            mbs = cfg.micro_batch_size
            if cfg.grad_noise and mbs >= rollout.size >= 2:
                mbs = (rollout.size + 1) // 2
            micro = [rollout.select(lo, lo + mbs).to(device) for lo in range(0, rollout.size, mbs)]
            half = len(micro) // 2 if cfg.grad_noise else 0
            # The token mean is over the whole global batch (spec: "dapo" reduction): every micro-batch and rank
            # divides by N_global / world_size, and DDP/FSDP2 average the gradients over ranks, so the update is
            # (1/W) sum_r grad(sum_r / (N/W)) = grad(sum over all tokens) / N: the exact global token mean.
            total_tokens = dist.all_reduce_sum(torch.tensor(float(rollout.num_tokens))).item()
            normalizer = max(total_tokens, 1.0) / dist.world_size()

            # 2-4. per micro-batch: teacher scores + student forward + chunked loss + backward (gradients are
            # reduced over ranks on the last micro-batch)
            stats = TokenStats()
            loss_sum = 0.0
            half_probe: tuple[float, int] | None = None
            with timer("student"):
                for i, mb in enumerate(micro):
                    with engine.sync(last=i == len(micro) - 1):
                        out = micro_batch_loss(cfg, engine, teacher, mb, normalizer, timer)
                        out.loss.backward()
                    loss_sum += float(out.loss.detach())
                    stats.add(out, mb.completion_mask, mb.sampler_logprobs)
                    if i + 1 == half:
                        half_probe = _half_batch_probe(engine, micro[:half], total_tokens, normalizer)
            # Each rank's loss is its share of the global mean times W; any rank's NaN makes every rank skip.
            loss_sum = float(dist.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64))) / dist.world_size()

            # 5. step: skip (and count) non-finite updates; abort after max_bad_steps in a row
            with timer("optimizer"):
                grad_norm = engine.clip_grad_norm(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    state["bad_in_a_row"] = 0
                else:
                    state["skipped_steps"] += 1
                    state["bad_in_a_row"] += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                engine.after_step()  # FSDP2: the unsharded copy used by generate/eval/checkpoints catches up
            state["step"] = step + 1
            state["data"] = stream.state()

            # 6. log
            metrics = {**stats.reduce(), "loss": loss_sum, "grad_norm": grad_norm,
                       "lr": scheduler.get_last_lr()[0], "skipped_steps": state["skipped_steps"],
                       "step_skipped": not finite, **rollout_metrics(rollout), **timer.metrics(),
                       "peak_memory_mb": peak_memory_mb(device)}
            metrics["tokens_per_s"] = total_tokens / max(timer.total, 1e-9)
            if half_probe is not None:
                metrics.update(gradient_noise(*half_probe, grad_norm**2, cfg.batch_size))
            if not finite:
                info(f"step {step + 1}: non-finite loss ({loss_sum}) or gradient norm ({grad_norm}): update skipped "
                     f"({state['bad_in_a_row']} in a row)")
            if state["bad_in_a_row"] > cfg.max_bad_steps:
                hint = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                raise TrainingAborted(f"{state['bad_in_a_row']} consecutive steps with non-finite loss or gradients "
                                      f"(max_bad_steps={cfg.max_bad_steps}); {hint}; lower optim.lr or check the "
                                      "models for NaN weights")

            # 7. evaluate (rank 0; the others wait)
            last = step + 1 == cfg.steps
            if cfg.data.eval and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0) or last):
                metrics.update(dist.on_main(lambda: evaluate_student(engine.full, teacher, tok, cfg, vocab)) or {})
            if writer is not None and ((step + 1) % cfg.log_every == 0 or last):
                writer.write(step + 1, metrics)
            if bar is not None:
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("kl_estimate", "grad_norm") if k in metrics})
                bar.update(1)

            # 8. checkpoint (rank 0 writes full weights and optimizer states; the others wait); never in the middle
            # of a run of non-finite steps, so the newest checkpoint is always the last good state
            due = (cfg.save_every and (step + 1) % cfg.save_every == 0) or last or step + 1 == stop_at
            if due and state["bad_in_a_row"] == 0:
                optimizer_state = engine.optimizer_state(optimizer)  # FSDP2: gathered by every rank, kept on rank 0
                last_ckpt = dist.on_main(lambda: ckpt.save_checkpoint(
                    out_dir, step + 1, model=engine.full, tokenizer=tok, optimizer=optimizer_state,
                    scheduler=scheduler, trainer_state=state, config=config_dict, keep_last=cfg.keep_last))
            if stop_at is not None and step + 1 >= stop_at:
                break
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
        if remote:
            teacher.close()

    if state["step"] == cfg.steps:
        final = out_dir / "final"
        dist.on_main(lambda: export_merged(engine.full, tok, final) if cfg.lora.enabled
                     else _save_final(engine.full, tok, final))
        info(f"final model: {final}")
    return TrainResult(out_dir, state["step"], state["skipped_steps"], last_ckpt, metrics)


def micro_batch_loss(cfg: TrainConfig, engine: dist.Engine, teacher: InProcessTeacher | RemoteTeacher,
                     mb: Rollout, normalizer: float, timer: PhaseTimer) -> LossOutput:
    """One micro-batch's loss, its graph ready for ``backward``. The teacher's time is charged to the teacher phase.

    In process the teacher runs first (only its last hidden states stay alive during the student's forward); a
    remote teacher runs after the student's forward, because for the top-k methods it is asked about the student's
    top-k ids."""
    t_scores = None
    if isinstance(teacher, InProcessTeacher):
        with timer("teacher"):
            t_scores = teacher.score(mb, mb.input_ids.device)
    hidden, weight, bias = engine.forward(mb.input_ids, mb.attention_mask)
    hidden = hidden[:, :-1]
    use_ratio = cfg.loss.ratio_cap > 0
    common: dict[str, Any] = dict(
        method=cfg.loss.method, student_bias=bias, normalizer=normalizer, memory_budget_mb=cfg.loss.chunk_memory_mb,
        sampler_logprobs=mb.sampler_logprobs if use_ratio else None,
        ratio_cap=cfg.loss.ratio_cap if use_ratio else None)
    if t_scores is not None:
        out = chunked_distillation_loss(hidden, weight, t_scores.hidden, t_scores.weight, mb.targets,
                                        mb.completion_mask, top_k=cfg.loss.top_k, teacher_bias=t_scores.bias, **common)
    else:
        ids = None
        if cfg.loss.method in TOPK_METHODS:
            ids = student_topk_ids(hidden.detach(), weight.detach(), mb.completion_mask, cfg.loss.top_k,
                                   bias=None if bias is None else bias.detach(),
                                   memory_budget_mb=cfg.loss.chunk_memory_mb)  # the same chunks, so the same ids
        with timer("teacher"):
            r_scores = teacher.score(mb, ids, lse=cfg.loss.method == "rb-topk")  # rb-topk: the teacher's lse too
        out = remote_distillation_loss(hidden, weight, mb.targets, mb.completion_mask, teacher_logq=r_scores.logq,
                                       teacher_topk_logits=r_scores.topk_logits, topk_ids=ids,
                                       teacher_lse=r_scores.lse, **common)
    if mb.num_tokens == 0:
        # Without completion tokens the loss only touches the hidden states; DDP expects a gradient for every
        # parameter in every backward, so the output layer gets an explicit zero one.
        zero = weight.sum() * 0.0 + (0.0 if bias is None else bias.sum() * 0.0)
        out = dataclasses.replace(out, loss=out.loss + zero)
    return out


def _half_batch_probe(engine: dist.Engine, first: list[Rollout], total_tokens: float,
                      normalizer: float) -> tuple[float, int] | None:
    """(|G_a|^2, a): the squared norm of the token-mean gradient of the first micro-batches' ``a`` rollouts, for
    ``metrics.gradient_noise``. Each micro-batch's loss is divided by ``normalizer`` = N/W, so the accumulated
    gradient is sum_a grad / normalizer; under DDP (``no_sync``) it is this rank's part alone, under FSDP2 already
    the mean over ranks (sum over all ranks' first halves / N)."""
    tokens = float(sum(mb.num_tokens for mb in first))
    units = sum(mb.size for mb in first)
    sq = engine.grad_sq_norm()
    scale = normalizer
    if engine.strategy == "fsdp2":
        counts = dist.all_reduce_sum(torch.tensor([tokens, float(units)], dtype=torch.float64))
        tokens, units, scale = float(counts[0]), int(counts[1]), total_tokens
    if tokens == 0:
        return None
    return sq * (scale / tokens) ** 2, units


def _hf_sampler(model: Any, tok: Any, settings: dict[str, Any]) -> Sampler:
    return hf_sampler(model, tok, **settings)


def _save_final(model: Any, tokenizer: Any, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def evaluate_student(student: Any, teacher: InProcessTeacher | RemoteTeacher, tok: Any, cfg: TrainConfig,
                     vocab: int) -> dict[str, float]:
    """Accuracy on ``data.eval`` (Avg/Pass/Maj@n) and the exact held-out KL on fresh temperature-1 samples. The KL
    needs the teacher's full distribution: with a teacher server ``eval_kl`` is left out."""
    from vopd.eval import evaluate

    problems = load_problems(cfg.data.eval, kind="math", problem_field=cfg.data.prompt_field,
                             answer_field=cfg.data.answer_field, limit=cfg.eval.limit or None)
    result = evaluate(student, tok, problems, n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                      max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.rollout.batch_size, seed=cfg.seed,
                      greedy=cfg.eval.greedy, template=cfg.data.template)
    m = result.metrics
    out = {"eval_avg_at_n": m.avg_at_n, "eval_pass_at_n": m.pass_at_n, "eval_maj_at_n": m.maj_at_n}
    if isinstance(teacher, InProcessTeacher):
        out["eval_kl"] = heldout_kl(student, teacher, tok, [p.problem for p in problems], cfg, vocab)
    return out


def heldout_kl(student: Any, teacher: InProcessTeacher, tok: Any, problems: list[str], cfg: TrainConfig,
               vocab: int, seed: int | None = None) -> float:
    """Mean exact KL_t(student || teacher) on one temperature-1 completion per problem; RNG state is restored."""
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 12345 if seed is None else seed)
    try:
        ids = [encode_prompt(tok, format_prompt(p, cfg.data.template)) for p in problems]
        sampler = hf_sampler(student, tok, max_new_tokens=cfg.eval_max_new_tokens, temperature=1.0, top_p=1.0,
                             top_k=0, batch_size=cfg.rollout.batch_size)
        rollout = pack(ids, sampler(ids), tok.pad_token_id)
        kl, _ = rollout_kl(student, teacher, rollout, vocab_size=vocab, micro_batch_size=cfg.micro_batch_size)
    finally:
        torch.set_rng_state(rng)
    return kl


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of ``step`` on ``rank``: distinct per step and rank, the same in a resumed run."""
    return (seed * 1_000_003 + step * 4_099 + rank) % 2**63


def _progress(cfg: TrainConfig, start: int) -> Any:
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
    parser.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (resume later)")


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, resume_from=args.resume_from,
                       stop_at=args.stop_at)
        main = dist.is_main()  # read before shutdown: afterwards every process looks like rank 0
    finally:
        dist.shutdown()
    if main:
        m = result.last_metrics
        print(f"done: {result.steps_done} steps ({result.skipped_steps} skipped) in {result.output_dir}; "
              + ", ".join(f"{k}={m[k]:.4g}" for k in ("kl_estimate", "kl_mean", "eval_avg_at_n", "eval_kl") if k in m))
    return 0
