"""Batched sampling from a Hugging Face causal LM, with the sampler's own per-token log-probs.

What it knows: left-padding a batch of prompt ids, calling ``model.generate`` (a dynamic or a static KV cache)
with *every* sampling setting written out (transformers otherwise fills in defaults such as top_k=50 that would bias the OPD estimators),
and reading back the log-prob of each sampled token under the distribution it was actually drawn from (the
processed scores: after temperature/top-k/top-p). What it does not know: which settings are allowed for a method
(the trainer validates that), grading, or training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from vopd.precision import autocast_to
from vopd.prompts import stop_token_ids

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer


#: KV caches of ``generate``: "dynamic" is transformers' default (a cache that grows with the sequence); "static" is
#: preallocated for prompt + max_new_tokens, and on CUDA transformers then also compiles the decode step.
Cache = Literal["dynamic", "static"]
CACHES: tuple[str, ...] = get_args(Cache)



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

@dataclass(frozen=True)
class Samples:
    """Completions for a batch of prompts. Lists are per sequence, without padding.

    ``completions[i]`` holds the generated ids (the stop token included when one was generated: EOS or the chat
    template's end of turn, ``vopd.prompts.stop_token_ids``); ``logprobs[i]`` the sampler's log-prob of each of them
    (empty lists when not requested); ``truncated[i]`` is True when no stop token was produced within
    ``max_new_tokens``. ``loss_masks[i]``, when given, says per completion token whether the student sampled it
    (True: it is trained on) or not (False: a tool's output, another speaker's turn, a forced token: the student and
    the teacher read it, the loss skips it); None: every completion token was sampled.
    """

    completions: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    loss_masks: list[list[bool]] | None = None


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
) -> Samples:
    """Sample one completion per prompt (repeat a prompt in ``prompts`` to get several).

    Generation stops at any of ``stop_ids`` (default ``vopd.prompts.stop_token_ids(tokenizer)``: EOS and the chat
    template's end-of-turn token).
    Randomness comes from torch's global generator: seed it (``torch.manual_seed``) for reproducible samples.
    ``cache`` picks the KV cache (``CACHES``); it changes speed and memory, not the distribution sampled from.
    ``autocast``: the compute dtype of a model stored as float32 masters (``vopd.precision.Precision.autocast``): its
    forwards run under ``torch.autocast`` to it, as the trainer's do; None: in the weights' own dtype.
    """
    from transformers import GenerationConfig

    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}; valid caches: {', '.join(CACHES)}")
    if not prompts:
        return Samples([], [], [])
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer) if stop_ids is None else list(stop_ids)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else top_k,  # 0 disables top-k; None would fall back to the default 50
        top_p=None if greedy else top_p,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=stops or None,  # a list: generate stops at any of them
        bos_token_id=tokenizer.bos_token_id,
        output_scores=return_logprobs,
        return_dict_in_generate=True,
        # None keeps the model's default (a dynamic cache); a static cache is sized prompt width + max_new_tokens
        # (transformers keeps the largest size seen, so later calls reuse one shape instead of recompiling).
        cache_implementation=None if cache == "dynamic" else cache,
    )
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
            with autocast_to(autocast, device):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=gen_config,
                )
            new = out.sequences[:, width:].cpu()
            if return_logprobs:
                # scores[t] are the processed logits of step t: the distribution the token was drawn from.
                steps = torch.stack([s.float().log_softmax(-1) for s in out.scores], dim=1).cpu()
                chosen = steps.gather(-1, new[:, : steps.shape[1]].unsqueeze(-1)).squeeze(-1)
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
