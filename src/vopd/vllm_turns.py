"""Multi-turn rollouts on the colocated vLLM engine: the ``vopd.episodes.TurnSampler`` of ``rollout.engine=vllm``.

What it knows: that a batch of episodes takes the student's weights once (``VllmSampler.sync_weights`` at
``start``; the engine sleeps again at ``finish`` with ``vllm.sleep``), and that each turn is one ``generate`` call
over the rows still going, as token prompts (the sequence so far, the environment's tokens included: nothing is
re-tokenised), with a per-request token budget (within the engine's ``max_model_len``), the turn's stop tokens and
per-request seeds drawn from torch's generator (seeded per step and rank by the loop: a resumed run draws the same).
What it does not know: the episode loop (``vopd.episodes``), environments, how the engine is built or pushed to
(``vopd.vllm_engine``).
"""

from __future__ import annotations

import torch

from vopd.sampling import Samples, SamplingSettings
from vopd.vllm_engine import VllmSampler, sample


class VllmTurns:
    """Turns sampled by the vLLM engine of ``sampler`` (the run's ``VllmSampler``, at its rollout settings)."""

    def __init__(self, sampler: VllmSampler) -> None:
        self.sampler = sampler

    def start(self) -> None:
        self.sampler.sync_weights()

    def finish(self) -> None:
        if self.sampler.sleep:
            self.sampler.llm.sleep(level=2)  # as after a single-turn call: memory back to the trainer

    def __call__(self, prompts: list[list[int]], max_tokens: list[int], stop_ids: list[int]) -> Samples:
        if not prompts:
            return Samples([], [], [])
        r = self.sampler.rollout
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        # The engine holds max_model_len tokens per sequence (vopd.engines.engine_length sizes it for whole episodes);
        # a budget that would pass it is cut there, and the turn is marked truncated like any other cut.
        room = [max(1, min(n, self.sampler.max_model_len - len(p))) for p, n in zip(prompts, max_tokens)]
        settings = SamplingSettings(max(room), r.temperature, r.top_p, r.top_k)
        return sample(self.sampler.llm, prompts, seeds, settings, stop_ids, logprobs=True, max_tokens=room)
