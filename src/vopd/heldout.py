"""The exact held-out KL(student || teacher) of a training run: one fresh temperature-1 completion per problem, and
the mean per-token KL over a rollout.

What it knows: how the held-out sample is drawn (``heldout_kl``: batches of ``rollout.batch_size`` prompts, each
seeded from the held-out seed and its global index, through the run's engine, split over the ranks on request:
``vopd.eval_split``; prompts rendered as in training; the caller's torch RNG state restored) and how its KL is
computed exactly (``rollout_kl_sum``: the ``opd-full`` fused head without gradients, whose value is the mean KL_t, so
the teacher must send its full distribution). Memory: the samples carry no log-probs (the KL does not need the
sampler's), each micro-batch holds the two models' hidden states, and the head walks over chunks of completion
positions within ``memory_budget_mb`` (``vopd.loss.chunked``): no (B, T, V) tensor of either model, at any B or T.
What it does not know: accuracy, grading and the evaluation protocol (``vopd.eval``; ``vopd.eval_student`` calls
this module), how tokens are drawn (``vopd.sampling``, ``vopd.vllm_engine``), how the teacher scores
(``vopd.teacher``), or the loss math (``vopd.loss``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, ContextManager

from vopd import distributed as dist
from vopd.eval_split import EvalEngine, gathered, hf_eval_engine, model_inference, sample_split, shares
from vopd.eval_episodes import eval_chat
from vopd.prompts import render_prompt
from vopd.sampling import SamplingSettings

if TYPE_CHECKING:
    import torch

    from vopd.config import TrainConfig
    from vopd.models import Model, Tokenizer
    from vopd.rollout import Rollout
    from vopd.teacher.base import Teacher


def heldout_kl(student: Model, teacher: Teacher, tok: Tokenizer, problems: list[str], cfg: TrainConfig,
               vocab: int, seed: int | None = None, *, autocast: torch.dtype | None = None,
               synced: bool = False, engine: EvalEngine | None = None, split: bool = False,
               inference: Callable[[], ContextManager[Model]] | None = None,
               memory_budget_mb: float = 256) -> float:
    """Mean exact KL_t(student || teacher) on one temperature-1 completion per problem; RNG state is restored.

    ``engine``: what samples (``vopd.eval_split.EvalEngine``; default Hugging Face ``generate`` on the student).
    ``split``: every rank calls this with the same problems, samples and scores its share of the batches, and gets
    the one-process value (the per-batch sums all-gathered and added in batch order). ``autocast``: the student's
    compute dtype when it is stored as float32 masters (``vopd.precision``); ``synced``: the student is sharded over
    the ranks, so every rank runs as many sampling calls and forwards (as does a collective teacher);
    ``inference``: the student ready for forwards (``WrappedStudent.inference``; default: ``student`` as it is)."""
    from vopd.rollout import pack
    from vopd.teacher.base import collective

    inference = inference or model_inference(student)
    engine = engine or hf_eval_engine(inference, tok, autocast=autocast, synced=synced)
    lockstep = synced or collective(teacher)
    ids = [render_prompt(tok, p, template=cfg.data.template, chat=eval_chat(cfg)) for p in problems]
    settings = SamplingSettings(max_new_tokens=cfg.eval_max_new_tokens)  # temperature 1, no top-p/top-k

    b, mb = cfg.rollout.batch_size, cfg.micro_batch_size

    def forwards(batches: list[int], placeholders: int) -> int:
        return sum(math.ceil(min(b, len(ids) - k * b) / mb) for k in batches) + placeholders

    def share_sums() -> list[tuple[int, float, float]]:
        parts = sample_split(engine, ids, settings, batch_size=b, seed=cfg.seed + 12345 if seed is None else seed,
                             split=split, lockstep=lockstep)
        rollouts = [(p.index, pack(p.prompts, p.samples, tok.pad_token_id)) for p in parts]
        # Every rank runs as many micro-batch forwards when they are collectives (a sharded student or teacher):
        # the ranks with fewer run the rest on a placeholder row, whose tokens are not counted. Each rank knows
        # every rank's count from the shares alone (no collective that a failed rank could leave unmatched).
        counts = [forwards(*s) for s in shares(-(-len(ids) // b), split=split, lockstep=lockstep)]
        idle = max(counts) - counts[dist.rank() if split else 0] if lockstep else 0
        with inference() as live:
            sums = [(k, *rollout_kl_sum(live, teacher, r, vocab_size=vocab, micro_batch_size=mb,
                                        memory_budget_mb=memory_budget_mb, autocast=autocast,
                                        count=k >= 0)) for k, r in rollouts]
            for _ in range(idle):
                rollout_kl_sum(live, teacher, rollouts[0][1].select(0, 1), vocab_size=vocab, micro_batch_size=1,
                               memory_budget_mb=memory_budget_mb, autocast=autocast, count=False)
        return [s for s in sums if s[0] >= 0]

    sums = sorted(gathered(share_sums, split=split))  # batch order: the one-process sum, whatever the split
    total, count = sum(s[1] for s in sums), sum(s[2] for s in sums)
    return total / count if count else float("nan")


def rollout_kl(student: Model, teacher: Teacher, rollout: Rollout, *, vocab_size: int, micro_batch_size: int,
               memory_budget_mb: float = 256, autocast: torch.dtype | None = None) -> tuple[float, float]:
    """Exact mean KL_t(student || teacher) over the rollout's completion tokens, and the token count
    (``rollout_kl_sum``, divided)."""
    total, count = rollout_kl_sum(student, teacher, rollout, vocab_size=vocab_size,
                                  micro_batch_size=micro_batch_size, memory_budget_mb=memory_budget_mb,
                                  autocast=autocast)
    return (total / count if count else float("nan")), count


def rollout_kl_sum(student: Model, teacher: Teacher, rollout: Rollout, *, vocab_size: int, micro_batch_size: int,
                   memory_budget_mb: float = 256, autocast: torch.dtype | None = None,
                   count: bool = True) -> tuple[float, float]:
    """The sum of the exact KL_t(student || teacher) over the rollout's completion tokens, and the token count
    (``count=False``: the forwards only, (0, 0): a placeholder that keeps collective forwards in step).

    Uses the ``opd-full`` fused head without gradients (its value is the mean KL_t), so the teacher must have the
    full distribution; the student's states reach it as in training (``vopd.models.student_states``, ``autocast``).
    The student's train/eval mode is left as it was. Every micro-batch runs both models' forwards, so a sharded
    model's collectives come in the same number on every rank."""
    import torch

    from vopd.loss.chunked import fused_distillation_loss
    from vopd.models import student_states

    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for lo in range(0, rollout.size, micro_batch_size):
                mb = rollout.select(lo, lo + micro_batch_size).to(device)
                n = int(mb.loss_mask.sum())
                # Both forwards run even without tokens to count: a sharded student's or teacher's forward is a
                # collective, and every rank must run as many.
                scores = teacher.score(mb)
                hidden, head = student_states(student, mb.input_ids, mb.attention_mask, vocab_size,
                                              autocast=autocast)
                if n == 0 or not count:
                    continue
                hs = hidden[:, :-1]
                out = fused_distillation_loss(hs, head.weight, mb.targets, mb.loss_mask, scores,
                                              method="opd-full", student_bias=head.bias,
                                              memory_budget_mb=memory_budget_mb, student_transform=head.transform)
                assert out.kl is not None  # opd-full always reports the exact KL_t
                total += float(out.kl.sum())
                tokens += n
    finally:
        student.train(was_training)
    return total, float(tokens)
