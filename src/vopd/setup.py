"""A training run, set up once: everything the loop reads, built in the order that leaves nothing behind when a run
cannot start.

What it knows: how a run starts (``Start``: a new run, an overwrite, or a resume from the newest or a given
checkpoint, with or without discarding newer work: one value where four flags used to be), and the order of set-up
(``set_up``): the precision (``vopd.precision``: the dtypes the student is loaded, trained and computed in), the
student, the teachers, the training prompts (read once), the pre-flight on the very teacher objects that train (then
the sharding of the in-process teachers the run shards, ``vopd.sharding``), LoRA and gradient checkpointing, the
loss plan (``vopd.loss.plan``, resolved once), the wrapped student and the rollout source; only then the output
directory (so a run that cannot start leaves it untouched; paths that cannot be the run's are refused before
anything is loaded), the optimizer, the scheduler and the resume state (``TrainerState``, what a checkpoint holds
besides weights and optimizer, judged by ``ResumeRules`` before the directory is claimed: its consistency and the
fingerprint of the training data, ``vopd.fingerprint``). What it does not know: the loop
(``vopd.train``), the loss math (``vopd.loss``), which teacher placement it talks to (``vopd.teacher``), the rules
of the output directory (``vopd.rundir``) or the checkpoint layout (``vopd.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import torch

from vopd import checkpoint as ckpt
from vopd import checkpoint_sharded as sharded
from vopd import distributed as dist
from vopd import fingerprint
from vopd.check import preflight, training_prompts
from vopd.config import TrainConfig, config_to_dict, save_config
from vopd.data import PromptSet, PromptStream
from vopd.engines import engine_factory, turn_sampler
from vopd.episodes import EpisodeRows
from vopd.errors import UserError
from vopd.fsfaults import one_line
from vopd.loss.plan import LossPlan
from vopd.metrics import METRICS_FILE, MetricsWriter
from vopd.models import (Tokenizer, apply_lora, enable_gradient_checkpointing, load_student, logit_transform,
                         resolve_device)
from vopd.precision import resolve_precision
from vopd.prompts import chat_options
from vopd.rollout import OnPolicyRollouts, RolloutSource, Sampler, SamplerFactory
from vopd.rundir import Claim, check_output_paths, claim_output_dir, judge_output_dir
from vopd.sharding import teacher_is_sharded
from vopd.step import loss_plan, make_optimizer
from vopd.teacher.base import SELF, prepare_for
from vopd.teacher.local import in_process
from vopd.teacher.reprompt import OwnPromptTeacher
from vopd.teacher.routing import Teachers, open_teachers

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass(frozen=True)
class Start:
    """How a run starts: ``new`` (an empty or absent ``output_dir``), ``overwrite`` (an earlier run there is moved
    aside first) or ``resume`` (from ``checkpoint``, or the newest valid one when None; ``discard_newer`` lets it
    replace work newer than that checkpoint, moved aside: ``vopd.rundir``; ``allow_data_change`` lets it continue
    on training data other than the checkpoint's: ``vopd.fingerprint``)."""

    how: Literal["new", "overwrite", "resume"] = "new"
    checkpoint: str | None = None
    discard_newer: bool = False
    allow_data_change: bool = False

    def __post_init__(self) -> None:
        if self.how not in ("new", "overwrite", "resume"):
            raise UserError(f"a run starts new, overwrite or resume, not {self.how!r}")
        for flag, given in (("--discard-newer", self.discard_newer or self.checkpoint is not None),
                            ("--allow-data-change", self.allow_data_change)):
            if self.how != "resume" and given:
                raise UserError(f"{flag} only applies to a resume: pass it with --resume or --resume-from")

    @classmethod
    def resume(cls, checkpoint: str | Path | None = None, *, discard_newer: bool = False,
               allow_data_change: bool = False) -> "Start":
        return cls("resume", None if checkpoint is None else str(checkpoint), discard_newer, allow_data_change)

    @classmethod
    def from_flags(cls, *, resume: bool = False, overwrite: bool = False, resume_from: str | None = None,
                   discard_newer: bool = False, allow_data_change: bool = False) -> "Start":
        """The ``vopd train`` flags (``--resume``, ``--overwrite``, ``--resume-from``, ``--discard-newer``,
        ``--allow-data-change``) as one value; contradictory flags are a one-line error."""
        if overwrite and (resume or resume_from):
            raise UserError("--overwrite and --resume/--resume-from exclude each other: pass only one")
        if resume or resume_from:
            return cls.resume(resume_from, discard_newer=discard_newer, allow_data_change=allow_data_change)
        return cls("overwrite" if overwrite else "new", None, discard_newer, allow_data_change)


NEW = Start()
OVERWRITE = Start("overwrite")


@dataclass
class TrainerState:
    """What a checkpoint's ``trainer_state.json`` holds besides weights and optimizer: the next step, the data
    position (``PromptStream.state()``), the skipped-step counters, the world size that wrote it and the
    fingerprint of the prompts the run streams (``vopd.fingerprint``; None in checkpoints written before it)."""

    step: int = 0
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    world_size: int = 1
    data_fingerprint: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, where: Path, *, manifest_step: int, steps: int, batch_size: int, prompts: int,
              data_changed: bool = False) -> None:
        """Refuse a checkpoint whose state cannot be this run's: counts that are not counts, a step that is not its
        manifest's or lies past ``steps``, or a data position that is not where ``step`` batches end (the prompts
        changed; not checked when ``data_changed``: the user allowed it, and the position is recomputed). One-line
        ``UserError`` naming the key."""
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
        if not data_changed and self.data["epoch"] * prompts + self.data["index"] != self.step * batch_size:
            raise UserError(f"checkpoint {where} does not fit the training data: its data position (epoch "
                            f"{self.data['epoch']}, index {self.data['index']}) is not where {self.step} steps of "
                            f"batch_size={batch_size} over {prompts} prompts end; the prompts changed since (data.train "
                            "file, data.max_prompt_tokens or rollout.max_new_tokens): restore them, start a new run, "
                            "or pass --allow-data-change to continue on them")


@dataclass(frozen=True)
class ResumeRules:
    """What the trainer state of the checkpoint a run resumes from must be (``TrainerState.check``, and the data
    rule of ``vopd.fingerprint``), judged before the run claims its directory and again by every rank that loads."""

    steps: int
    batch_size: int
    prompts: int
    data: fingerprint.DataFingerprint
    data_file: str
    allow_data_change: bool

    def judge(self, where: Path, saved: dict[str, Any]) -> fingerprint.DataVerdict:
        """Refuse (one-line ``UserError``) a trainer state that cannot continue this run; what to do about its data."""
        verdict = fingerprint.judge_resume(saved.get(fingerprint.KEY), self.data, where=where,
                                           data_file=self.data_file, allow_change=self.allow_data_change)
        TrainerState.from_dict(saved).check(where, manifest_step=ckpt.checkpoint_step(where), steps=self.steps,
                                            batch_size=self.batch_size, prompts=self.prompts,
                                            data_changed=verdict.changed)
        return verdict


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


@dataclass
class Run:
    """Everything the loop reads, built once by ``set_up``. ``state`` and ``last_checkpoint`` change as it runs."""

    cfg: TrainConfig
    device: torch.device
    info: Callable[[str], None]  # rank 0's log; a no-op on the other ranks
    tok: Tokenizer
    student: dist.WrappedStudent
    teachers: Teachers  # the objects the pre-flight passed
    plan: LossPlan  # the loss, resolved once (vopd.loss.plan)
    prompts: PromptSet
    source: RolloutSource
    out_dir: Path
    config_dict: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainerState
    writer: MetricsWriter | None  # rank 0 only
    bar: tqdm | None  # rank 0 only, with cfg.progress
    last_checkpoint: Path | None
    sampler: Sampler | None = None  # the rollout sampler (evaluation samples through its engine: vopd.eval_student)

    @property
    def vocab(self) -> int:
        return len(self.tok)


@contextlib.contextmanager
def set_up(cfg: TrainConfig, start: Start, *, log: Callable[[str], None],
           make_sampler: SamplerFactory | None) -> Iterator[Run]:
    """The run ``cfg`` describes, started as ``start``; teachers, the metrics writer and the progress bar are closed
    when the block ends. Under torchrun every rank calls this (rank 0 claims the directory, docs/scaling.md)."""
    device = dist.init(resolve_device(cfg.model.device), timeout_min=cfg.distributed.timeout_min)
    # Paths that cannot be the run's, refused before anything is loaded (they are checked again when it claims them).
    dist.on_main(lambda: check_output_paths(cfg.output_dir, start.checkpoint))
    # The same seed on every rank: anything random before step 0 (LoRA init) must be identical across ranks.
    torch.manual_seed(cfg.seed)
    info = log if dist.is_main() else (lambda _msg: None)
    precision = resolve_precision(cfg.model, lora=cfg.lora.enabled, device=device)
    if (warning := precision.warning()) is not None:
        info(warning)  # half masters: updates below their resolution are lost
    tok, model = load_student(cfg.model, device, precision.load)  # full fine-tuning: the masters themselves
    if any(t.model == SELF for t in cfg.model.teacher_configs) and cfg.lora.enabled and dist.world_size() > 1 and \
            cfg.distributed.strategy == "fsdp2":
        raise UserError("model.teacher=self with LoRA scores with the student's own sharded weights, which FSDP2 does "
                        "not allow outside its forward; use distributed.strategy=ddp, or lora.enabled=false")
    teachers = open_teachers(cfg, vocab_size=len(tok), device=device, student=model, student_tok=tok)
    with contextlib.ExitStack() as closing:
        closing.callback(lambda: teachers.close())
        prompts = training_prompts(cfg, tok, model, teachers, info)  # read once: the pre-flight sees these rows
        rules = ResumeRules(cfg.steps, cfg.batch_size, len(prompts.student), fingerprint.data_fingerprint(prompts),
                            str(cfg.data.train), start.allow_data_change)
        out_dir, config_dict = Path(cfg.output_dir), config_to_dict(cfg)
        # Everything that refuses this start (a foreign or corrupt checkpoint, changed data, newer work) is judged
        # now, read-only, before a rollout engine starts (vLLM: seconds); the directory is claimed after it started.
        claim = dist.on_main(lambda: _judge(out_dir, config_dict, start, rules))
        if prompts.teacher is not None:  # the teacher reads each completion after its own prompt (docs/real_models.md)
            teachers = teachers.map(lambda t: OwnPromptTeacher(t, tok.pad_token_id))
        plan = loss_plan(cfg.loss, logit_transform(model))  # resolved once; every teacher must serve its method
        for _name, teacher in teachers:  # what the method needs of answers beyond score's arguments (vopd-ttopk)
            prepare_for(teacher, plan.spec, plan.top_k)
        for line in preflight(model, tok, teachers, cfg, prompts=prompts, plan=plan):  # placement and method
            info(f"pre-flight ok: {line}")
        _shard_teachers(teachers, cfg, device)  # after the pre-flight, which runs them whole
        if cfg.batch_size % dist.world_size():
            raise UserError(f"batch_size={cfg.batch_size} is not divisible by the world size {dist.world_size()}")
        if cfg.lora.enabled:
            model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                               target_modules=cfg.lora.target_modules, float32_adapters=precision.adapters_float32)
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        # The student under DDP/FSDP2 (one process: unwrapped) and the sampler on its live weights, before the
        # output directory is claimed: a rollout engine that cannot start leaves no run behind.
        student = dist.wrap(model, len(tok), cfg.distributed.strategy, device, precision)
        make = make_sampler or engine_factory(cfg, precision, sharded=student.sharded)
        sample = make(student.model, tok, cfg.rollout)
        if make_sampler is None and cfg.rollout.engine == "vllm":
            info("rollout engine: vLLM started (weights pushed from the student before every step)")
        if make_sampler is not None or cfg.rollout.engine == "hf":  # FSDP2: generate on the sharded module, in step
            sample = student.inferring(sample)  # (the vLLM push gathers each weight itself: no root to gather)
        turns = None if not cfg.rollout.env else turn_sampler(  # multi-turn episodes (vopd.episodes), on its engine
            cfg, sample, student.model, tok, precision, custom=make_sampler is not None, sharded=student.sharded)
        start_from = dist.on_main(lambda: _claim(claim, cfg, info))  # the same on every rank
        if start.how == "resume" and start.checkpoint is None and start_from is None:
            info(f"resume: no checkpoint in {out_dir} yet; starting from step 0")
        optimizer = make_optimizer(cfg, student.trainable())
        scheduler = make_scheduler(optimizer, cfg)
        state = TrainerState()
        if start_from is not None:
            state = _resume(start_from, student, optimizer, scheduler, info, rules)
        state.world_size, state.data_fingerprint = dist.world_size(), rules.data.to_dict()
        stream = PromptStream(len(prompts.student), seed=cfg.seed, shuffle=cfg.data.shuffle, **state.data)
        rows = None if turns is None else EpisodeRows.for_run(cfg.rollout, chat_options(cfg.data), prompts, tok, turns)
        source = OnPolicyRollouts(sample, prompts, stream, tok.pad_token_id, batch_size=cfg.batch_size,
                                  rank=dist.rank(), world_size=dist.world_size(),
                                  balance=cfg.micro_batch_tokens > 0, rows=rows)
        # The history continues at the resumed step: later lines (about to be recomputed) and torn ones are dropped.
        with one_line(f"cannot open the history {out_dir / METRICS_FILE}", lambda: "free disk space or fix the cause, "
                      "and run the command again (the checkpoints are untouched)"):
            writer = MetricsWriter(out_dir, cfg.loggers, config_dict, resume_step=state.step) if dist.is_main() \
                else None
        if writer is not None:
            closing.callback(writer.close)
        bar = _progress(cfg, state.step) if dist.is_main() else None
        if bar is not None:
            closing.callback(bar.close)
        yield Run(cfg, device, info, tok, student, teachers, plan, prompts, source, out_dir, config_dict, optimizer,
                  scheduler, state, writer, bar, start_from, sample)


def _shard_teachers(teachers: Teachers, cfg: TrainConfig, device: torch.device) -> None:
    """Shard, in place, each in-process teacher this run shards (``vopd.sharding.teacher_is_sharded``: under torchrun,
    by default whenever the student is sharded), onto ``device``; ``offload`` keeps its shards in host memory."""
    for entry in cfg.model.teacher_configs:
        if teacher_is_sharded(entry, strategy=cfg.distributed.strategy, lora=cfg.lora.enabled):
            local = in_process(teachers.by_name[entry.name])
            assert local is not None  # open_teachers loaded it in this process
            local.shard(device, offload=entry.offload)


def _judge(out_dir: Path, config_dict: dict[str, Any], start: Start, rules: ResumeRules) -> tuple[Claim, list[str]]:
    """On rank 0: what claiming ``output_dir`` for ``start`` will do (``vopd.rundir.judge_output_dir``, nothing
    written), the trainer state of the checkpoint it resumes from judged by ``rules``; and the notes to log once the
    claim succeeded."""
    notes: list[str] = []

    def judge(checkpoint: Path) -> None:
        note = rules.judge(checkpoint, ckpt.read_trainer_state(checkpoint, None)).note
        if note is not None:
            notes.append(note)

    claim = judge_output_dir(out_dir, config_dict, resume=start.how == "resume", overwrite=start.how == "overwrite",
                             resume_from=start.checkpoint, discard_newer=start.discard_newer, check=judge)
    return claim, notes


def _claim(judged: tuple[Claim, list[str]] | None, cfg: TrainConfig, info: Callable[[str], None]) -> Path | None:
    """On rank 0: claim ``output_dir`` as judged (``_judge``) and write the config; the checkpoint to resume from, or
    None. A file-system fault (a full disk, no permission) is one line."""
    assert judged is not None  # rank 0 judged it
    claim, notes = judged
    with one_line(f"cannot claim output_dir {claim.out}", lambda: "free disk space or fix the cause, and run the "
                  "command again (the checkpoints are untouched)"):
        found = claim_output_dir(claim)
        ckpt.remove_stale_temps(claim.out)
        save_config(cfg, claim.out / "config.yaml")
    for note in notes:  # logged once the claim succeeded: a refusal after the judgement says only why
        info(note)
    return found


def _resume(start_from: Path, student: dist.WrappedStudent, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, info: Callable[[str], None],
            rules: ResumeRules) -> TrainerState:
    """Every rank reads its part of the checkpoint (any world size and strategy resumes it:
    ``vopd.checkpoint_sharded.resume``), after checking that its trainer state can be this run's (``rules``),
    before anything is loaded. On data the user allowed to change, the data position is recomputed for the current
    prompts (the same number of prompts consumed)."""
    if not Path(start_from).is_dir():
        raise UserError(f"rank {dist.rank()} cannot see checkpoint {start_from}: with several nodes, output_dir "
                        "must be on a filesystem every node shares")
    verdicts: list[fingerprint.DataVerdict] = []
    saved = sharded.resume(start_from, student, optimizer, scheduler,
                           check_state=lambda saved: verdicts.append(rules.judge(start_from, saved)))
    state = TrainerState.from_dict(saved)
    if verdicts and verdicts[0].changed:
        state.data = fingerprint.position_for(state.step * rules.batch_size, rules.prompts)
    if scheduler.last_epoch != state.step:
        raise UserError(f"checkpoint {start_from} is inconsistent: scheduler.pt is at step {scheduler.last_epoch}, "
                        f"trainer_state at step {state.step}; resume from another checkpoint")
    info(f"resumed from {start_from} at step {state.step}")
    if state.world_size != dist.world_size():
        info(f"resume: world size {dist.world_size()} (the checkpoint was written at {state.world_size}); the global "
             "batch and its token mean are unchanged, but rollouts are sampled on other ranks with other seeds")
    return state


def _progress(cfg: TrainConfig, start: int) -> tqdm | None:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"vopd {cfg.loss.method}", unit="step", dynamic_ncols=True)
