"""Evaluation split over the ranks: which batches of an evaluation's rows each rank samples, with which seeds, through
which engine, and every rank's results put back together in the one-process order.

What it knows: an evaluation's rows (prompt ids, a problem's samples side by side) are cut into batches of
``batch_size`` exactly as one process cuts them; rank r samples batches r, r + W, r + 2W, ... (strided: no rank has
more than one batch more than another); batch k is sampled right after ``torch.manual_seed(batch_seed(seed, k))``, a
seed derived from the batch's global index, never from the rank, so every batch gets the tokens one process gives it
(batch 0 keeps the evaluation's own seed: one-batch evaluations sample what they sampled before the split). When
every rank must run as many forwards (a sharded student: each forward is a collective), a rank with fewer batches
samples placeholder batches (one real prompt, the result dropped) until it made as many calls as the others. The
engines: Hugging Face ``generate`` on the student (``hf_eval_engine``), or an engine object that samples whole
shares itself at given settings (``BatchEngine``: the vLLM engine, one weight push per share, per-request seeds from
the batch seeds). Results come back with ``gathered``: every rank's work run, its outcome or its error, all-gathered,
so one rank's failure is every rank's one-line error instead of a wait in a collective.
What it does not know: grading and metrics (``vopd.eval``), the held-out KL (``vopd.heldout``), how tokens are drawn
(``vopd.sampling``, ``vopd.vllm_engine``), or the training loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol, TypeVar, runtime_checkable

from vopd import distributed as dist
from vopd.errors import UserError
from vopd.sampling import Samples, SamplingSettings

if TYPE_CHECKING:
    import torch

    from vopd.models import Model, Tokenizer

T = TypeVar("T")


class EvalEngine(Protocol):
    """Samples one completion per prompt of each batch at ``settings``, batch k right after
    ``torch.manual_seed(seeds[k])`` (or, for an engine with per-request seeds, with seeds drawn from a generator
    seeded so): the tokens of a batch depend on its prompts and seed only. The caller's RNG state is left as it was."""

    def __call__(self, batches: list[list[list[int]]], seeds: list[int],
                 settings: SamplingSettings) -> list[Samples]: ...


@runtime_checkable
class BatchEngine(Protocol):
    """A rollout engine that also samples evaluation shares at other settings than its rollout ones (the vLLM
    sampler: its weights pushed once per share): ``sample_batches`` is an ``EvalEngine``."""

    def sample_batches(self, batches: list[list[list[int]]], seeds: list[int],
                       settings: SamplingSettings) -> list[Samples]: ...


def hf_eval_engine(inference: Callable[[], ContextManager[Model]], tokenizer: Tokenizer, *,
                   autocast: torch.dtype | None = None, synced: bool = False, progress: bool = False) -> EvalEngine:
    """Hugging Face ``generate`` on the model ``inference()`` yields (the student itself, or under FSDP2 the sharded
    module with its root gathered: ``WrappedStudent.inference``), one ``generate`` call per batch, torch's RNG forked
    around them; ``autocast``, ``synced``: as ``vopd.sampling.generate``'s."""

    def sample(batches: list[list[list[int]]], seeds: list[int], settings: SamplingSettings) -> list[Samples]:
        import torch
        from tqdm import tqdm

        from vopd.sampling import generate

        out: list[Samples] = []
        with inference() as model:
            device = next(model.parameters()).device
            # Forked: evaluation inside a training run must not shift the trainer's random stream.
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                for batch, seed in tqdm(list(zip(batches, seeds)), desc="eval", unit="batch", disable=not progress):
                    torch.manual_seed(seed)
                    out.append(generate(model, tokenizer, batch, max_new_tokens=settings.max_new_tokens,
                                        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                        greedy=settings.greedy, batch_size=max(1, len(batch)), autocast=autocast,
                                        synced=synced))
        return out

    return sample


def eval_engine(sampler: object, inference: Callable[[], ContextManager[Model]], tokenizer: Tokenizer, *,
                autocast: torch.dtype | None = None, synced: bool = False) -> EvalEngine:
    """The run's own engine at evaluation settings: the rollout sampler itself when it samples shares
    (``BatchEngine``: vLLM), else Hugging Face ``generate`` on the student (the hf engine, and a custom sampler
    passed to ``train``, which samples at its own settings only)."""
    if isinstance(sampler, BatchEngine):
        return sampler.sample_batches
    return hf_eval_engine(inference, tokenizer, autocast=autocast, synced=synced)


def model_inference(model: Model) -> Callable[[], ContextManager[Model]]:
    """``inference`` for a model used as it is (one process, DDP, a model loaded for evaluation)."""
    return lambda: contextlib.nullcontext(model)


def batch_seed(seed: int, k: int) -> int:
    """The seed of an evaluation's batch ``k``: a function of the global batch index (batch 0: ``seed`` itself)."""
    return (seed + k * 1_000_003) % 2**63


@dataclass(frozen=True)
class Part:
    """One batch this rank sampled: its global index (-1: a placeholder, sampled only to keep the ranks' calls in
    step), the global indices of its rows, its prompts and their samples."""

    index: int
    rows: range
    prompts: list[list[int]]
    samples: Samples


def shares(num_batches: int, *, split: bool, lockstep: bool) -> list[tuple[list[int], int]]:
    """Every rank's share, by rank: its batches (strided over the ranks when ``split``, else all) and how many
    placeholders it adds so that every rank makes the same number of calls (``lockstep``: a collective per forward).
    A function of the batch count and the world size alone, so each rank knows every rank's share unasked."""
    world = dist.world_size() if split else 1
    calls = -(-num_batches // world)
    out = []
    for rank in range(world):
        mine = list(range(rank, num_batches, world))
        out.append((mine, calls - len(mine) if lockstep else 0))
    return out


def share(num_batches: int, *, split: bool, lockstep: bool) -> tuple[list[int], int]:
    """This rank's share (``shares``)."""
    return shares(num_batches, split=split, lockstep=lockstep)[dist.rank() if split else 0]


def sample_split(engine: EvalEngine, rows: list[list[int]], settings: SamplingSettings, *, batch_size: int,
                 seed: int, split: bool, lockstep: bool) -> list[Part]:
    """This rank's share of ``rows`` sampled by ``engine`` (``share``), placeholders last. One engine call on every
    rank, even one with nothing to sample: the vLLM engine's weight push is a collective under FSDP2."""
    if batch_size < 1:
        raise UserError(f"the evaluation batch size must be at least 1, got {batch_size}")
    batches = [rows[lo:lo + batch_size] for lo in range(0, len(rows), batch_size)]
    mine, placeholders = share(len(batches), split=split, lockstep=lockstep)
    indices = mine + [-1] * placeholders
    prompts = [batches[k] if k >= 0 else batches[0][:1] for k in indices]
    samples = engine(prompts, [batch_seed(seed, max(k, 0)) for k in indices], settings)
    if len(samples) != len(prompts) or any(len(s.completions) != len(p) for s, p in zip(samples, prompts)):
        raise ValueError("the evaluation engine must return one Samples per batch, one completion per prompt")
    return [Part(k, range(k * batch_size, k * batch_size + len(p)) if k >= 0 else range(0), p, s)
            for k, p, s in zip(indices, prompts, samples)]


def gathered(work: Callable[[], list[T]], *, split: bool) -> list[T]:
    """``work()`` on this rank, and, when ``split``, every rank's results concatenated in rank order, on every rank.
    A rank whose work failed makes every rank raise: its own error there, a one-line ``UserError`` on the others
    (a rank left waiting in the gather would wait for the whole collective timeout)."""
    if not split or not dist.is_initialized():
        return work()
    items: list[T] = []
    why: str | None = None  # this rank's failure, as the other ranks will read it
    error: BaseException | None = None
    try:
        items = work()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, re-raised below
        error = exc
        why = str(exc) if isinstance(exc, UserError) else (f"rank {dist.rank()} failed in evaluation: "
                                                           f"{type(exc).__name__}: {_first_line(exc)}")
    outcomes: list[tuple[str | None, list[T]]] = dist.all_gather_object((why, items))
    if error is not None:
        raise error
    for failed, _ in outcomes:
        if failed is not None:
            raise UserError(failed)
    return [x for _, part in outcomes for x in part]


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
