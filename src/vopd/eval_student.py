"""What a training run evaluates: accuracy on ``data.eval`` (Avg/Pass/Maj@n at ``eval.*``) and the exact held-out KL
to the teacher, sampled through the run's engine and split over the ranks.

What it knows: which settings of the config the evaluation reads (``eval.n``, ``eval.temperature``, ``eval.top_p``,
``eval.greedy``, ``eval.limit``, the evaluation length, ``rollout.batch_size`` as the sampling batch, ``seed``),
when the held-out KL can be computed (one teacher with its full distribution), and the training run's evaluation
(``evaluate_run``: every rank evaluates its share through the run's rollout engine at the evaluation's settings,
``vopd.eval_split``; no rank waits for another's whole evaluation). What it does not know: grading and metrics
(``vopd.eval``), the KL math (``vopd.heldout``), how the batches are shared and seeded (``vopd.eval_split``), or the
loop (``vopd.train`` calls ``evaluate_run`` when an evaluation is due).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ContextManager

from vopd.data import load_problems
from vopd.eval import evaluate
from vopd.eval_split import EvalEngine, eval_engine, hf_eval_engine, model_inference
from vopd.heldout import heldout_kl
from vopd.eval_episodes import EpisodeEvalEngine, eval_chat

if TYPE_CHECKING:
    import torch

    from vopd.config import TrainConfig
    from vopd.distributed import WrappedStudent
    from vopd.models import Model, Tokenizer
    from vopd.rollout import Sampler
    from vopd.teacher.base import Teacher


def evaluate_student(student: Model, teacher: Teacher | None, tok: Tokenizer, cfg: TrainConfig,
                     vocab: int, *, autocast: torch.dtype | None = None, synced: bool = False,
                     engine: EvalEngine | None = None, split: bool = False,
                     inference: Callable[[], ContextManager[Model]] | None = None) -> dict[str, float]:
    """Accuracy on ``data.eval`` (Avg/Pass/Maj@n) and the exact held-out KL on fresh temperature-1 samples. The KL
    needs the teacher's full distribution and one teacher for every problem: with a teacher that sends per-token
    numbers, or several teachers (``teacher`` None: held-out rows are not routed), ``eval_kl`` is left out.
    ``engine``: what samples (default Hugging Face ``generate`` on the student); ``split``: every rank calls this
    and evaluates its share, every rank gets the one-process numbers (``vopd.eval.evaluate``, ``heldout_kl``).
    ``autocast``: the student's (``vopd.precision.Precision.autocast``): float32 masters run in the compute dtype.
    ``synced``: the student is sharded (FSDP2): every rank runs as many sampling calls and forwards, in step;
    ``inference``: the student ready for forwards (``WrappedStudent.inference``; default: ``student`` as it is)."""
    inference = inference or model_inference(student)
    problems = load_problems(cfg.data.eval, kind="math", problem_field=cfg.data.prompt_field,
                             answer_field=cfg.data.answer_field, limit=cfg.eval.limit or None)
    if cfg.rollout.env:  # every sample an episode with the environment (vopd.eval_episodes)
        engine = EpisodeEvalEngine(inference, tok, cfg, [p.problem for p in problems], autocast=autocast,
                                   synced=synced)
    engine = engine or hf_eval_engine(inference, tok, autocast=autocast, synced=synced)
    result = evaluate(student, tok, problems, n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                      max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.rollout.batch_size, seed=cfg.seed,
                      greedy=cfg.eval.greedy, template=cfg.data.template, chat=eval_chat(cfg),
                      autocast=autocast, synced=synced, engine=engine, split=split)
    m = result.metrics
    out = {"eval_avg_at_n": m.avg_at_n, "eval_pass_at_n": m.pass_at_n, "eval_maj_at_n": m.maj_at_n}
    episodes = [r.episode for r in result.records if r.episode is not None]
    if episodes:  # docs/metrics.md: per evaluation episode
        for key in ("tool_calls", "tool_errors", "turns"):
            out[f"eval_{key}_mean"] = sum(getattr(e, key) for e in episodes) / len(episodes)
    if teacher is not None and teacher.full_distribution:
        out["eval_kl"] = heldout_kl(student, teacher, tok, [p.problem for p in problems], cfg, vocab,
                                    autocast=autocast, synced=synced, engine=engine, split=split,
                                    inference=inference)
    return out


def evaluate_run(student: WrappedStudent, sampler: Sampler | None, teacher: Teacher | None, tok: Tokenizer,
                 cfg: TrainConfig, vocab: int) -> dict[str, float]:
    """A training run's evaluation, on every rank: each samples and grades its share of the batches through the
    run's engine (``sampler``: the rollout sampler; the vLLM one samples at the evaluation's settings after one
    weight push, any other is replaced by Hugging Face ``generate`` on the student, as ``eval_split.eval_engine``),
    and every rank returns the numbers one process computes. Under FSDP2 the student's root is gathered around its
    own forwards only (``WrappedStudent.inference``): the vLLM push gathers each weight itself."""
    engine = eval_engine(sampler, student.inference, tok, autocast=student.autocast, synced=student.sharded)
    return evaluate_student(student.model, teacher, tok, cfg, vocab, autocast=student.autocast,
                            synced=student.sharded, engine=engine, split=True, inference=student.inference)
