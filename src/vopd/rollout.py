"""Rollouts: the one data contract between sampling, teacher scoring and the loss.

What it knows: turning prompts + sampled completions (+ the sampler's log-probs) into right-padded training tensors,
already aligned for the estimators (``targets[:, t]`` is the token the logits at position t predict), with a loss
mask that may have holes (tokens the student did not sample), slicing them into micro-batches (rows; a packed
rollout's sequences: ``vopd.packing`` builds the packed layout, ``take``/``pick`` read it), and the rollout
source the loop takes each step's batch from (``RolloutSource``; synchronous today, optionally rebalanced over the
ranks by tokens). What it does not know: which sampler produced the completions (Hugging Face generate today,
an inference engine later: anything returning ``vopd.sampling.Samples`` fits), models, or the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.sampling import Cache, Episode, Samples, biasing_settings, generate

if TYPE_CHECKING:
    from vopd.config import RolloutConfig
    from vopd.data import PromptSet, PromptStream
    from vopd.models import Model, Tokenizer


_Item = TypeVar("_Item")


@dataclass(frozen=True)
class Rollout:
    """A batch of sampled sequences. Shapes: B sequences, L = longest prompt + completion in the batch.

    input_ids:        (B, L) prompt + completion ids, right-padded (padding is masked out everywhere).
    attention_mask:   (B, L) 1 on real tokens.
    targets:          (B, L-1) ``input_ids[:, 1:]``: position t's logits produce ``targets[:, t]``.
    loss_mask:        (B, L-1) True where ``targets[:, t]`` is a completion token the student sampled: the loss,
                      the metrics, the importance ratio and the teachers read this mask, which may have holes (a
                      completion with tokens the student did not sample, ``Samples.loss_masks``).
    sampler_logprobs: (B, L-1) the sampler's log-prob of each sampled completion target, 0 elsewhere.
    prompt_lengths, completion_lengths, truncated: per sequence.
    teacher_prompts:  per sequence, the teacher's own prompt ids when it reads the completion after a prompt of its
                      own (``vopd.teacher.reprompt``); None: the teacher reads the student's sequences. The student's
                      tensors above never depend on it.
    routes:           per sequence, the name of the teacher that scores it (``model.teachers``); None: one teacher.
    weights_version:  the student weights that sampled it: those after this many training steps (the loop trains
                      on-policy, so step k takes rollouts of version k; a buffered or asynchronous producer tags
                      older ones, ``RolloutSource``).
    position_ids:     None (padded: sequence i is row i from position 0), or packed (``vopd.packing``): B = 1 row of
                      the sequences concatenated without padding, (1, L) each token's position in its own sequence;
                      ``starts[i]`` is where sequence i begins in the row. Attention never crosses a boundary; the
                      last position of a sequence predicts the next one's first token, never in ``loss_mask``.
    episodes:         per sequence, what its multi-turn episode did (``vopd.sampling.Episode``: turns, tool calls,
                      environment tokens), read by the step's metrics; None: single-turn rollouts, and micro-batches
                      (``select``, ``take``), which no metric reads them from.
    """

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    loss_mask: Tensor
    sampler_logprobs: Tensor
    prompt_lengths: list[int]
    completion_lengths: list[int]
    truncated: list[bool]
    teacher_prompts: list[list[int]] | None = None
    routes: list[str] | None = None
    weights_version: int = 0
    position_ids: Tensor | None = None
    starts: tuple[int, ...] | None = None
    episodes: list[Episode] | None = None

    @property
    def size(self) -> int:
        """The number of sequences (rows, unless packed)."""
        return len(self.prompt_lengths)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def lengths(self) -> list[int]:
        """Each sequence's tokens: its prompt and its completion."""
        return [p + c for p, c in zip(self.prompt_lengths, self.completion_lengths)]

    def spans(self) -> list[tuple[int, int, int]]:
        """(row, start, length) of each sequence in ``input_ids``: (i, 0, its length) when padded."""
        lengths = self.lengths()
        if self.starts is None:
            return [(i, 0, n) for i, n in enumerate(lengths)]
        return [(0, s, n) for s, n in zip(self.starts, lengths)]

    def completion_positions(self) -> tuple[Tensor, Tensor]:
        """(rows, positions) on the targets grid of every completion target, sequence by sequence: completion token j
        of sequence i is predicted at its start + prompt length - 1 + j."""
        rows: list[int] = []
        pos: list[int] = []
        for (row, start, _n), p, c in zip(self.spans(), self.prompt_lengths, self.completion_lengths):
            rows += [row] * c
            pos += range(start + p - 1, start + p - 1 + c)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def select(self, start: int, stop: int) -> "Rollout":
        """Sequences [start, stop), trimmed to their own longest sequence (micro-batches carry no extra padding)."""
        if self.packed:
            return self.take(list(range(start, min(stop, self.size))))
        width = int(self.attention_mask[start:stop].sum(-1).max())
        return Rollout(
            input_ids=self.input_ids[start:stop, :width],
            attention_mask=self.attention_mask[start:stop, :width],
            targets=self.targets[start:stop, : width - 1],
            loss_mask=self.loss_mask[start:stop, : width - 1],
            sampler_logprobs=self.sampler_logprobs[start:stop, : width - 1],
            prompt_lengths=self.prompt_lengths[start:stop],
            completion_lengths=self.completion_lengths[start:stop],
            truncated=self.truncated[start:stop],
            teacher_prompts=None if self.teacher_prompts is None else self.teacher_prompts[start:stop],
            routes=None if self.routes is None else self.routes[start:stop],
            weights_version=self.weights_version,
        )

    def take(self, rows: list[int]) -> "Rollout":
        """The sequences ``rows``, in that order, at this rollout's width (so that tensors computed on the whole
        batch, e.g. the student's hidden states, can be indexed by the same rows: ``pick``). Packed: those
        sequences packed in that order (``vopd.packing.take``)."""
        if self.packed:
            return _take_packed(self, rows)
        idx = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

        def pick(items: list[_Item] | None) -> list[_Item] | None:
            return None if items is None else [items[i] for i in rows]

        return Rollout(self.input_ids.index_select(0, idx), self.attention_mask.index_select(0, idx),
                       self.targets.index_select(0, idx), self.loss_mask.index_select(0, idx),
                       self.sampler_logprobs.index_select(0, idx), [self.prompt_lengths[i] for i in rows],
                       [self.completion_lengths[i] for i in rows], [self.truncated[i] for i in rows],
                       pick(self.teacher_prompts), pick(self.routes), self.weights_version)

    def to(self, device: torch.device) -> "Rollout":
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                       self.loss_mask.to(device), self.sampler_logprobs.to(device), self.prompt_lengths,
                       self.completion_lengths, self.truncated, self.teacher_prompts, self.routes,
                       self.weights_version, None if self.position_ids is None else self.position_ids.to(device),
                       self.starts, self.episodes)

    def pick(self, x: Tensor, rows: list[int]) -> Tensor:
        """A tensor on this rollout's targets grid (B, L-1, ...) restricted to the sequences ``rows``, on the grid of
        ``take(rows)``."""
        if not self.packed:
            return x.index_select(0, torch.tensor(rows, device=x.device))
        idx = _take_index(self, rows).to(x.device)
        out = x[0].index_select(0, idx.clamp(min=0))
        keep = (idx >= 0).reshape(-1, *([1] * (x.dim() - 2)))
        return torch.where(keep, out, torch.zeros((), dtype=x.dtype, device=x.device)).unsqueeze(0)

    def completions(self) -> list[list[int]]:
        """Each sequence's completion ids (the sampled tokens, the stop token included)."""
        return [self.input_ids[row, s + p:s + p + c].tolist()
                for (row, s, _n), p, c in zip(self.spans(), self.prompt_lengths, self.completion_lengths)]


def _take_index(r: Rollout, rows: list[int]) -> Tensor:
    """For the packed rollout ``r``: the index into its targets grid of each position of ``take(r, rows)``'s grid
    (-1 at a boundary that ``r`` has no position for: the last sequence of ``r`` taken before another)."""
    spans = r.spans()
    grid = r.targets.shape[1]
    parts: list[Tensor] = []
    for k, i in enumerate(rows):
        _row, s, n = spans[i]
        span = torch.arange(s, s + n, dtype=torch.long)  # its targets (n-1) and the boundary after it
        span[span >= grid] = -1
        parts.append(span if k + 1 < len(rows) else span[:-1])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _take_packed(r: Rollout, rows: list[int]) -> Rollout:
    """The sequences ``rows`` of the packed rollout ``r``, packed in that order."""
    spans = r.spans()
    ids = torch.cat([r.input_ids[0, spans[i][1]:spans[i][1] + spans[i][2]] for i in rows])
    pos = torch.cat([r.position_ids[0, spans[i][1]:spans[i][1] + spans[i][2]] for i in rows]) \
        if r.position_ids is not None else None
    lengths = [spans[i][2] for i in rows]
    starts = tuple(int(x) for x in torch.tensor([0] + lengths[:-1]).cumsum(0))

    def pick(items: list[_Item] | None) -> list[_Item] | None:
        return None if items is None else [items[i] for i in rows]

    return Rollout(ids.unsqueeze(0), torch.ones_like(ids).unsqueeze(0), ids[1:].unsqueeze(0),
                   r.pick(r.loss_mask, rows), r.pick(r.sampler_logprobs, rows), [r.prompt_lengths[i] for i in rows],
                   [r.completion_lengths[i] for i in rows], [r.truncated[i] for i in rows], pick(r.teacher_prompts),
                   pick(r.routes), r.weights_version, None if pos is None else pos.unsqueeze(0), starts)


def pack(prompts: list[list[int]], samples: Samples, pad_id: int, *,
         teacher_prompts: list[list[int]] | None = None, routes: list[str] | None = None,
         weights_version: int = 0) -> Rollout:
    """Right-pad prompt + completion rows and align targets, masks and sampler log-probs. ``teacher_prompts``: the
    teacher's own prompt per row (kept as ids; ``vopd.teacher.reprompt`` builds the teacher's sequences);
    ``routes``: the name of each row's teacher (``model.teachers``); ``weights_version``: see ``Rollout``."""
    if routes is not None and len(routes) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(routes)} routes")
    if len(prompts) != len(samples.completions):
        raise ValueError(f"{len(prompts)} prompts but {len(samples.completions)} completions")
    if teacher_prompts is not None and len(teacher_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(teacher_prompts)} teacher prompts")
    holes = samples.loss_masks
    if holes is not None and [len(m) for m in holes] != [len(c) for c in samples.completions]:
        raise ValueError("Samples.loss_masks must hold one flag per completion token of every sequence")
    rows = [p + c for p, c in zip(prompts, samples.completions)]
    width = max(2, max(len(r) for r in rows))
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width - 1), dtype=torch.bool)
    sampler_lp = torch.zeros((b, width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, samples.completions)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        attention[i, :n] = 1
        # completion token j sits at input position len(p)+j and is predicted from position len(p)+j-1.
        sampled = torch.ones(len(c), dtype=torch.bool) if holes is None else torch.tensor(holes[i], dtype=torch.bool)
        loss_mask[i, len(p) - 1 : n - 1] = sampled
        if samples.logprobs and samples.logprobs[i]:
            lp = torch.tensor(samples.logprobs[i], dtype=torch.float32)
            sampler_lp[i, len(p) - 1 : n - 1] = torch.where(sampled, lp, torch.zeros_like(lp))
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention,
        targets=input_ids[:, 1:].clone(),
        loss_mask=loss_mask,
        sampler_logprobs=sampler_lp,
        prompt_lengths=[len(p) for p in prompts],
        completion_lengths=[len(c) for c in samples.completions],
        truncated=list(samples.truncated),
        teacher_prompts=None if teacher_prompts is None else [list(p) for p in teacher_prompts],
        routes=None if routes is None else list(routes),
        weights_version=weights_version,
        episodes=None if samples.episodes is None else list(samples.episodes),
    )


#: A sampler maps prompt ids to ``Samples`` (completions + their sampler log-probs); this is the seam where an
#: inference engine can replace Hugging Face generate (``train(cfg, make_sampler=...)``, docs/scaling.md). Contract: one
#: completion per prompt, in order, drawn from the *current* student at the configured settings; ``logprobs[i]`` the
#: sampler's log-prob of each completion token (they feed the importance ratio, so an engine whose numerics differ
#: from the trainer's is corrected for, up to ``loss.ratio_cap``); ``truncated[i]`` when no EOS was generated.
Sampler = Callable[[list[list[int]]], Samples]
#: Samples the rows of the prompt set given by their indices and their prompt ids (``vopd.episodes.EpisodeRows``: a
#: row's episode needs more than its ids), with the ``Sampler`` contract otherwise.
RowsSampler = Callable[[list[int], list[list[int]]], Samples]


class RolloutSource(Protocol):
    """Where the loop takes each step's rollouts from: ``rollouts(k)`` gives this rank's share of step k's batch,
    tagged with the weights version that sampled it; ``position()`` is the data position after the batches taken so
    far (a checkpoint saves it, ``vopd.setup.TrainerState.data``). Synchronous today (``OnPolicyRollouts``); a
    buffered or asynchronous producer fits behind the same two calls without touching the loop."""

    def rollouts(self, step: int) -> Rollout: ...

    def position(self) -> dict[str, int]: ...


class OnPolicyRollouts:
    """The synchronous source: step k's prompts (``PromptStream``, the global batch sliced per rank) sampled when
    asked, by the sampler over the live student, so from the weights after k steps (version k)."""

    def __init__(self, sample: Sampler, prompts: PromptSet, stream: PromptStream, pad_id: int, *, batch_size: int,
                 rank: int, world_size: int, balance: bool = False, rows: RowsSampler | None = None) -> None:
        """``balance``: after sampling, the step's sequences are redistributed over the ranks by tokens
        (``vopd.batching.balance``): each rank samples its share of the prompts and trains on a share of near-equal
        tokens (the gradient is the same sum: docs/estimators.md). ``rows``: samples the rows itself instead of
        ``sample`` (multi-turn episodes, ``rollout.env``)."""
        self.sample, self.prompts, self.stream, self.pad_id, self.rows = sample, prompts, stream, pad_id, rows
        per_rank = batch_size // world_size
        self.batch_size, self.lo, self.hi = batch_size, rank * per_rank, (rank + 1) * per_rank
        self.rank, self.world_size, self.balance = rank, world_size, balance and world_size > 1

    def rollouts(self, step: int) -> Rollout:
        ids = self.stream.take(self.batch_size)[self.lo:self.hi]
        p = self.prompts
        batch = [p.student[i] for i in ids]
        samples = self.sample_rows(ids, batch)
        if self.balance:
            return self._balanced(ids, samples, step)
        own = None if p.teacher is None else [p.teacher[i] for i in ids]
        route = None if p.routes is None else [p.routes[i] for i in ids]
        return pack(batch, samples, self.pad_id, teacher_prompts=own, routes=route, weights_version=step)

    def sample_rows(self, ids: list[int], batch: list[list[int]]) -> Samples:
        """The completions of the rows ``ids`` of the prompt set, whose prompt ids are ``batch``: the rows sampler's
        (multi-turn episodes: ``vopd.episodes.EpisodeRows``), else one call of the sampler."""
        return self.rows(ids, batch) if self.rows is not None else self.sample(batch)

    def _balanced(self, ids: list[int], samples: Samples, step: int) -> Rollout:
        """This rank's token-balanced share of every rank's sampled sequences (all gathered: ids, not tensors)."""
        from vopd import distributed as dist
        from vopd.batching import balance

        n = len(ids)
        holes_in: list[list[bool] | None] = list(samples.loss_masks) if samples.loss_masks is not None else [None] * n
        episodes_in: list[Episode | None] = list(samples.episodes) if samples.episodes is not None else [None] * n
        mine = list(zip(ids, samples.completions, samples.logprobs or [[] for _ in range(n)], samples.truncated,
                        holes_in, episodes_in))
        every = [item for part in dist.all_gather_object(mine) for item in part]
        p = self.prompts
        lengths = [len(p.student[i]) + len(c) for i, c, *_ in every]
        share = [every[j] for j in balance(lengths, self.world_size)[self.rank]]
        holes = None if samples.loss_masks is None else [list(h or []) for *_, h, _e in share]
        episodes = None if samples.episodes is None else [e for *_, e in share if e is not None]
        got = Samples([c for _i, c, *_ in share], [list(lp) for _i, _c, lp, *_ in share] if samples.logprobs else [],
                      [t for _i, _c, _lp, t, *_ in share], holes, episodes)
        chosen = [i for i, *_ in share]
        return pack([p.student[i] for i in chosen], got, self.pad_id,
                    teacher_prompts=None if p.teacher is None else [p.teacher[i] for i in chosen],
                    routes=None if p.routes is None else [p.routes[i] for i in chosen], weights_version=step)

    def position(self) -> dict[str, int]:
        return self.stream.state()


def hf_sampler(model: Model, tokenizer: Tokenizer, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
               batch_size: int, cache: Cache = "dynamic", autocast: torch.dtype | None = None,
               synced: bool = False) -> Sampler:
    """Sampling with ``model.generate`` and a ``cache`` KV cache ("dynamic" or "static"; the same tokens either way),
    returning the sampler's log-probs for the importance ratio; ``autocast``, ``synced``: as
    ``vopd.sampling.generate``'s."""

    def sample(prompts: list[list[int]]) -> Samples:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, return_logprobs=True, batch_size=batch_size, cache=cache,
                        autocast=autocast, synced=synced)

    return sample


#: Builds the run's sampler from the live student (updated in place every step), its tokenizer and the ``rollout``
#: section of the config: the one argument through which ``train`` takes another rollout engine.
SamplerFactory = Callable[["Model", "Tokenizer", "RolloutConfig"], Sampler]


def hf_engine(model: Model, tokenizer: Tokenizer, rollout: RolloutConfig, *,
              autocast: torch.dtype | None = None, synced: bool = False) -> Sampler:
    """The default ``SamplerFactory``: Hugging Face generate at the config's rollout settings (``autocast``,
    ``synced``: as ``vopd.sampling.generate``'s)."""
    return hf_sampler(model, tokenizer, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                      top_p=rollout.top_p, top_k=rollout.top_k, batch_size=rollout.batch_size, cache=rollout.cache,
                      autocast=autocast, synced=synced)


def check_weight_sync(rollout: RolloutConfig, token_metrics: dict[str, float], compute_dtype: torch.dtype) -> None:
    """With ``rollout.check_sync`` and unbiased sampling settings, a one-line error when the sampler's log-probs of
    the sampled tokens drifted from the trainer's (``logprob_diff_mean``) by more than ``rollout.sync_tolerance`` (0:
    1e-3 when the student computes in float32, 5e-2 in half precision, where engine and trainer kernels round
    differently; float32 masters computed in half count as half): the rollouts did not come from the weights being
    trained, e.g. a skipped or half-applied weight sync."""
    gap = token_metrics.get("logprob_diff_mean")
    biased = biasing_settings(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k)
    if not rollout.check_sync or gap is None or biased:
        return  # biased sampling (allowed by override) draws from another distribution than the trainer's by design
    tol = rollout.sync_tolerance or (1e-3 if compute_dtype == torch.float32 else 5e-2)
    if not gap <= tol:  # NaN fails too
        raise UserError(f"the {rollout.engine} sampler's log-probs differ from the trainer's by {gap:.3g} per token "
                        f"(rollout.sync_tolerance={tol:g}): the rollouts were not sampled from the weights being "
                        "trained (a stale or partial weight sync); nothing of this step was applied. Raise "
                        "rollout.sync_tolerance for a lower-precision engine, or set rollout.check_sync=false")
