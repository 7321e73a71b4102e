"""Evaluation of a multi-turn run (``rollout.env``): every evaluation sample is a whole episode with the environment.

What it knows: how an agent run's evaluation prompts are rendered (``eval_chat``: the data's chat options with the
environment's tools declared, as training renders them, ``vopd.env.env_chat``), and an evaluation engine
(``vopd.eval_split.EvalEngine``) whose completions are episodes: the prompt of each problem starts a fresh
environment from the problem's first messages, and the student plays it turn by turn with Hugging Face generate at
the evaluation's settings (greedy or sampled, ``eval.*``), within ``rollout.max_turns`` and the evaluation's length
per turn (``vopd.episodes``). Graded on the whole episode's text (its final answer), and the held-out KL counts the
student's own tokens only (the loss mask of the episodes): docs/real_models.md, "Multi-turn rollouts with tools". What it does NOT know:
grading or metrics (``vopd.eval``), the KL (``vopd.heldout``), or the training loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ContextManager

from vopd.env import env_chat, load_env, tools_of
from vopd.env.calls import EnvCalls
from vopd.episodes import EpisodeRows, HfTurns, Limits
from vopd.errors import UserError
from vopd.prompts import chat_options, prompt_messages, render_prompt

if TYPE_CHECKING:
    import torch

    from vopd.config import TrainConfig
    from vopd.models import Model, Tokenizer
    from vopd.prompts import ChatOptions, Prompt
    from vopd.sampling import SamplingSettings, Samples


def eval_chat(cfg: TrainConfig) -> ChatOptions:
    """How the run's evaluation prompts are rendered: the data's chat options, and with ``rollout.env`` its tools
    declared to the template (every turn through the chat template)."""
    chat = chat_options(cfg.data)
    if not cfg.rollout.env:
        return chat
    return env_chat(chat, tools_of(load_env(cfg.rollout.env), cfg.rollout.env))


class EpisodeEvalEngine:
    """An ``EvalEngine`` over the episodes of ``problems`` (their prompts, rendered as ``vopd.eval.evaluate`` renders
    them with ``eval_chat``): each prompt it is given is looked up to its problem's first messages, a new environment
    starts from them, and the episode's completion (sampled turns and the environment's tokens, ``loss_masks`` on the
    sampled ones, ``episodes`` its counts) is the sample."""

    def __init__(self, inference: Callable[[], ContextManager[Model]], tokenizer: Tokenizer, cfg: TrainConfig,
                 problems: list[Prompt], *, autocast: torch.dtype | None = None, synced: bool = False) -> None:
        if synced:
            raise UserError("rollout.env evaluates with Hugging Face generate, whose forwards on a student sharded by "
                            "distributed.strategy=fsdp2 would wait on ranks whose episodes already ended: use "
                            "distributed.strategy=ddp for an agent run")
        self.inference, self.tokenizer, self.cfg, self.autocast = inference, tokenizer, cfg, autocast
        chat = eval_chat(cfg)
        self.kwargs = dict(chat.template_kwargs)
        self.first = [prompt_messages(tokenizer, p, template=cfg.data.template, chat=chat, where=f"eval problem {i}")
                      for i, p in enumerate(problems)]
        self.index = {tuple(render_prompt(tokenizer, p, template=cfg.data.template, chat=chat)): i
                      for i, p in enumerate(problems)}
        self.factory = load_env(cfg.rollout.env)
        r = cfg.rollout
        self.calls = EnvCalls(r.env, r.env_timeout_s, r.env_max_chars)

    def __call__(self, batches: list[list[list[int]]], seeds: list[int],
                 settings: SamplingSettings) -> list[Samples]:
        import torch

        r = self.cfg.rollout
        # The evaluation's length per turn, the run's bound per episode (at least one whole turn).
        total = max(r.completion_tokens[0], settings.max_new_tokens)
        limits = Limits(r.max_turns, settings.max_new_tokens, total)
        out: list[Samples] = []
        with self.inference() as model:
            device = next(model.parameters()).device
            turns = HfTurns(model, self.tokenizer, temperature=settings.temperature, top_p=settings.top_p,
                            top_k=settings.top_k, greedy=settings.greedy, batch_size=max(1, r.batch_size),
                            autocast=self.autocast)
            rows = EpisodeRows(self.first, self.factory, self.calls, self.tokenizer, self.kwargs, turns, limits,
                               where="eval problem")
            # Forked: an evaluation inside a training run must not shift the trainer's random stream.
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                for batch, seed in zip(batches, seeds):
                    torch.manual_seed(seed)
                    ids = [self._problem(p) for p in batch]
                    out.append(rows(ids, batch))
        return out

    def _problem(self, prompt: list[int]) -> int:
        got = self.index.get(tuple(prompt))
        if got is None:
            raise ValueError("an evaluation prompt that is not the rendering of one of the engine's problems")
        return got
