"""Rollouts: the one data contract between sampling, teacher scoring and the loss.

What it knows: turning prompts + sampled completions (+ the sampler's log-probs) into right-padded training tensors,
already aligned for the estimators (``targets[:, t]`` is the token the logits at position t predict), with a loss
mask that may have holes (tokens the student did not sample), slicing them into micro-batches, and the rollout
source the loop takes each step's batch from (``RolloutSource``; synchronous today). What it does not know: which sampler produced the completions (Hugging Face generate today,
an inference engine later: anything returning ``vopd.sampling.Samples`` fits), models, or the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.sampling import Cache, Samples, biasing_settings, generate

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

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def select(self, start: int, stop: int) -> "Rollout":
        """Rows [start, stop), trimmed to their own longest sequence (micro-batches carry no extra padding)."""
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
        batch, e.g. the student's hidden states, can be indexed by the same rows)."""
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
                       self.weights_version)

    def completions(self) -> list[list[int]]:
        """Each sequence's completion ids (the sampled tokens, the stop token included)."""
        return [self.input_ids[i, p:p + c].tolist()
                for i, (p, c) in enumerate(zip(self.prompt_lengths, self.completion_lengths))]


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
    )


#: A sampler maps prompt ids to ``Samples`` (completions + their sampler log-probs); this is the seam where an
#: inference engine can replace Hugging Face generate (``train(cfg, make_sampler=...)``, docs/scaling.md). Contract: one
#: completion per prompt, in order, drawn from the *current* student at the configured settings; ``logprobs[i]`` the
#: sampler's log-prob of each completion token (they feed the importance ratio, so an engine whose numerics differ
#: from the trainer's is corrected for, up to ``loss.ratio_cap``); ``truncated[i]`` when no EOS was generated.
Sampler = Callable[[list[list[int]]], Samples]


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
                 rank: int, world_size: int) -> None:
        self.sample, self.prompts, self.stream, self.pad_id = sample, prompts, stream, pad_id
        per_rank = batch_size // world_size
        self.batch_size, self.lo, self.hi = batch_size, rank * per_rank, (rank + 1) * per_rank

    def rollouts(self, step: int) -> Rollout:
        ids = self.stream.take(self.batch_size)[self.lo:self.hi]
        p = self.prompts
        batch = [p.student[i] for i in ids]
        own = None if p.teacher is None else [p.teacher[i] for i in ids]
        route = None if p.routes is None else [p.routes[i] for i in ids]
        return pack(batch, self.sample(batch), self.pad_id, teacher_prompts=own, routes=route, weights_version=step)

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
