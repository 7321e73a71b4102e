"""Batched sampling from a Hugging Face causal LM, with the sampler's own per-token log-probs.

What it knows: left-padding a batch of prompt ids, calling ``model.generate`` (a dynamic or a static KV cache)
with *every* sampling setting written out (transformers otherwise fills in defaults such as top_k=50 that would bias the OPD estimators),
and reading back the log-prob of each sampled token under the distribution it was actually drawn from (the
processed scores: after temperature/top-k/top-p). Those log-probs are gathered step by step, so sampling holds
one step's (B, V) scores, never all of them (transformers' ``output_scores`` would keep every step's: 32 rows x 2048
steps x 151,936 x 4 B is 40 GB). What it does not know: which settings are allowed for a method (the trainer
validates that), grading, or training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, get_args

import torch

from vopd.precision import autocast_to
from vopd.prompts import stop_token_ids

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from vopd.models import Model, Tokenizer


#: KV caches of ``generate``: "dynamic" is transformers' default (a cache that grows with the sequence); "static" is
#: preallocated for prompt + max_new_tokens, and on CUDA transformers then also compiles the decode step.
Cache = Literal["dynamic", "static"]
CACHES: tuple[str, ...] = get_args(Cache)

#: A transformers logits processor: (ids so far, (B, V) scores of the next token) -> processed scores.
Processor = Callable[[torch.LongTensor, torch.FloatTensor], torch.FloatTensor]


def biasing_settings(*, temperature: float, top_p: float, top_k: int) -> list[str]:
    """The ``rollout.*`` settings that make the samples come from another distribution than the student's (every
    OPD estimator assumes temperature 1, no top-p, no top-k: docs/estimators.md, "Background"); empty when none."""
    found = []
    if temperature != 1.0:
        found.append(f"rollout.temperature={temperature}")
    if top_p < 1.0:
        found.append(f"rollout.top_p={top_p}")
    if top_k > 0:
        found.append(f"rollout.top_k={top_k}")
    return found


class _SampledLogprobs:
    """A logits processor, last in ``generate``'s list, that records the log-prob of each sampled token under the
    scores it sees (the processed scores, the distribution the token is drawn from).

    ``generate`` calls processors before it picks the token, so step t's (B, V) log-softmax is held until step t + 1,
    whose ``input_ids`` end with step t's token; ``finish`` gathers the last step's. Only one step's scores are alive.
    """

    def __init__(self) -> None:
        self._steps: list[torch.Tensor] = []  # (B,) per step: log p(sampled token)
        self._pending: torch.Tensor | None = None  # (B, V) log-softmax of the step whose token is not yet known

    def _take(self, tokens: torch.Tensor) -> None:
        if self._pending is not None:
            self._steps.append(self._pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self._pending = None  # freed before the next step's log-softmax is allocated

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self._pending = scores.float().log_softmax(-1)
        return scores

    def finish(self, new: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of ``new``, the (B, T) generated ids. A step that ``generate`` ran and then undid (it
        may, on some devices, to defer its stop check) recorded step T's token and left its own scores pending:
        those are dropped, as its token was."""
        if len(self._steps) < new.shape[1]:
            self._take(new[:, -1])
        self._pending = None
        return torch.stack(self._steps, dim=1)


def _warpers(*, temperature: float, top_p: float, top_k: int) -> list[Processor]:
    """The temperature/top-k/top-p processors ``generate`` would add itself, in its order and under its conditions
    (transformers ``_get_logits_processor``). They are passed in explicitly, ahead of the recorder, because
    ``generate`` appends its own warpers after the caller's processors: a recorder passed alone would see the scores
    before temperature/top-k/top-p. ``tests/test_sampling_memory.py`` holds the result to ``output_scores``."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    found: list[Processor] = []
    if temperature != 1.0:
        found.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        found.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        found.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return found


@dataclass(frozen=True)
class SamplingSettings:
    """The settings of one sampling call, as ``generate`` takes them: an evaluation samples at its own (``eval.*``,
    the held-out KL's temperature 1), not at the rollout's that a rollout engine was built with."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass(frozen=True)
class Episode:
    """What one multi-turn episode did (``vopd.episodes``): its assistant ``turns``, the tool calls among its
    environment's messages and how many of them were errors, the completion tokens the environment wrote, and the
    environment's final ``reward`` (metrics only; None: it gave none)."""

    turns: int
    tool_calls: int = 0
    tool_errors: int = 0
    env_tokens: int = 0
    reward: float | None = None


@dataclass(frozen=True)
class Samples:
    """Completions for a batch of prompts. Lists are per sequence, without padding.

    ``completions[i]`` holds the generated ids (the stop token included when one was generated: EOS or the chat
    template's end of turn, ``vopd.prompts.stop_token_ids``); ``logprobs[i]`` the sampler's log-prob of each of them
    (empty lists when not requested); ``truncated[i]`` is True when no stop token was produced within
    ``max_new_tokens``. ``loss_masks[i]``, when given, says per completion token whether the student sampled it
    (True: it is trained on) or not (False: a tool's output, another speaker's turn, a forced token: the student and
    the teacher read it, the loss skips it); None: every completion token was sampled. ``episodes[i]``: what the
    multi-turn episode of completion i did (``Episode``); None: single-turn completions.
    """

    completions: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    loss_masks: list[list[bool]] | None = None
    episodes: list[Episode] | None = None


@torch.no_grad()
def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    return_logprobs: bool = False,
    batch_size: int = 64,
    cache: Cache = "dynamic",
    stop_ids: list[int] | None = None,
    autocast: torch.dtype | None = None,
    synced: bool = False,
) -> Samples:
    """Sample one completion per prompt (repeat a prompt in ``prompts`` to get several).

    Generation stops at any of ``stop_ids`` (default ``vopd.prompts.stop_token_ids(tokenizer)``: EOS and the chat
    template's end-of-turn token).
    Randomness comes from torch's global generator: seed it (``torch.manual_seed``) for reproducible samples.
    ``cache`` picks the KV cache (``CACHES``); it changes speed and memory, not the distribution sampled from.
    ``autocast``: the compute dtype of a model stored as float32 masters (``vopd.precision.Precision.autocast``): its
    forwards run under ``torch.autocast`` to it, as the trainer's do; None: in the weights' own dtype.
    ``synced``: ``model`` is sharded over the ranks (FSDP2), so each forward is a collective: every rank calls this
    with as many prompts, and a rank whose rows have all stopped keeps running forwards (their tokens dropped)
    until every rank's have (transformers' ``synced_gpus``), so that all ranks run the same number of forwards.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}; valid caches: {', '.join(CACHES)}")
    if not prompts:
        return Samples([], [], [])
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer) if stop_ids is None else list(stop_ids)
    gen_config = _generation_config(max_new_tokens, greedy, pad_id, stops, tokenizer.bos_token_id, cache)
    warpers = [] if greedy else _warpers(temperature=temperature, top_p=top_p, top_k=top_k)
    was_training = model.training
    model.eval()
    # generate() fills every None field of gen_config from model.generation_config (the checkpoint's
    # generation_config.json: min_p, suppress_tokens, top_h, ...), which would silently change the distribution
    # sampled from. A blank config for the duration of the call leaves only the settings written out above.
    checkpoint_config = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    completions: list[list[int]] = []
    logprobs: list[list[float]] = []
    truncated: list[bool] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding: every row's last prompt token sits at the same position, so generation starts aligned.
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention[i, width - len(p) :] = 1
            recorder = _SampledLogprobs() if return_logprobs else None
            with autocast_to(autocast, device):
                sequences = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=gen_config,
                    logits_processor=LogitsProcessorList(warpers + ([recorder] if recorder else [])),
                    **({"synced_gpus": True} if synced else {}),  # else generate's own default, as before
                ).sequences  # only the ids: the output also holds the KV cache, which must not outlive this batch
            new = sequences[:, width:]
            if recorder is not None:
                chosen = recorder.finish(new).cpu()
            new = new.cpu()
            for i in range(new.shape[0]):
                row = new[i].tolist()
                end = next((j for j, t in enumerate(row) if t in stops), None)
                if end is not None:
                    n = end + 1
                    truncated.append(False)
                else:
                    n = len(row)
                    truncated.append(True)
                completions.append(row[:n])
                logprobs.append(chosen[i, :n].tolist() if return_logprobs else [])
    finally:
        model.generation_config = checkpoint_config
        model.train(was_training)
    return Samples(completions, logprobs, truncated)


def _generation_config(max_new_tokens: int, greedy: bool, pad_id: int, stops: list[int], bos_id: int | None,
                       cache: Cache) -> GenerationConfig:
    """Every setting of one ``generate`` call written out (none left to the checkpoint's generation_config.json)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        # Neutral values: the warpers are passed as processors (_warpers), so that the recorder can follow them.
        temperature=None if greedy else 1.0,
        top_k=None if greedy else 0,  # 0 disables top-k; None would fall back to the default 50
        top_p=None if greedy else 1.0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=stops or None,  # a list: generate stops at any of them
        bos_token_id=bos_id,
        return_dict_in_generate=True,
        # None keeps the model's default (a dynamic cache); a static cache is sized prompt width + max_new_tokens
        # (transformers keeps the largest size seen, so later calls reuse one shape instead of recompiling).
        cache_implementation=None if cache == "dynamic" else cache,
    )
