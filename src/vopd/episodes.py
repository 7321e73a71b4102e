"""Multi-turn rollouts (``rollout.env``): the student and an environment take turns, and the episode becomes one
completion whose loss mask marks the student's own tokens only.

What it knows: the episode loop, run for a batch of rows at once, turn by turn (rows finish at different turns): the
student samples one assistant turn, up to its end-of-turn token or the end of a tool call (``</tool_call>`` when it is
one token), with the sampler's log-probs; the environment answers (``vopd.env.calls``: bounded); its messages are
appended as tokens computed by rendering: the chat template's text for the conversation with them (and the next
generation prompt) must extend the text of the sequence so far, and only the extra text is tokenised, alone. What
was sampled is never re-tokenised, so the trainer scores exactly the tokens the sampler drew. A template that does not
extend (it rewrites an earlier turn, e.g. drops past thinking) is refused in one line. Limits: ``rollout.max_turns``
and ``rollout.max_total_tokens`` (an episode cut by either is truncated). Also the turn samplers of Hugging Face
generate (``HfTurns``) and of any ``vopd.rollout.Sampler`` (``SamplerTurns``: sampled to its own stops, then cut),
and the rows source for ``vopd.rollout.OnPolicyRollouts`` (``EpisodeRows``).
What it does not know: what an environment does (``vopd.env``), the vLLM engine (``vopd.vllm_turns``), the loss,
teachers or the loop: the result is ``vopd.sampling.Samples`` with ``loss_masks`` and ``episodes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch

from vopd.env import env_chat, load_env, tools_of
from vopd.env.base import is_tool_error
from vopd.env.calls import EnvCalls
from vopd.env.toolcalls import CLOSE
from vopd.errors import UserError
from vopd.prompts import stop_token_ids
from vopd.sampling import Cache, Episode, Samples, generate

if TYPE_CHECKING:
    from vopd.config import RolloutConfig
    from vopd.data import PromptSet
    from vopd.env.base import Env, EnvFactory, Message
    from vopd.prompts import ChatOptions
    from vopd.models import Model, Tokenizer
    from vopd.rollout import Sampler


class TurnSampler(Protocol):
    """Samples one assistant turn per prompt: prompt i continued by at most ``max_tokens[i]`` tokens, stopping at
    (and keeping) any of ``stop_ids``, with the sampler's log-prob of each token; ``start``/``finish`` bracket one
    batch of episodes (the vLLM engine takes the student's weights once, at ``start``)."""

    def start(self) -> None: ...

    def finish(self) -> None: ...

    def __call__(self, prompts: list[list[int]], max_tokens: list[int], stop_ids: list[int]) -> Samples: ...


def cut(samples: Samples, max_tokens: list[int], stop_ids: list[int]) -> Samples:
    """Each completion up to its first stop token (kept) within its own ``max_tokens[i]``, else its first
    ``max_tokens[i]`` tokens (truncated). Cutting a sample at its first stop draws from the same distribution as
    stopping there: the tokens after it were never part of the turn."""
    stops = set(stop_ids)
    ids, lps, truncated = [], [], []
    for i, (c, cap) in enumerate(zip(samples.completions, max_tokens)):
        end = next((j + 1 for j, t in enumerate(c[:cap]) if t in stops), None)
        n = end if end is not None else min(cap, len(c))
        ids.append(c[:n])
        lps.append(samples.logprobs[i][:n] if samples.logprobs else [])
        truncated.append(end is None)
    return Samples(ids, lps, truncated)


class HfTurns:
    """Turns sampled with Hugging Face generate on the live student, at the rollout's settings; one generate call
    per turn over the rows still going (to the longest of their budgets, each cut to its own: ``cut``)."""

    def __init__(self, model: Model, tokenizer: Tokenizer, *, temperature: float, top_p: float, top_k: int,
                 batch_size: int, cache: Cache = "dynamic", autocast: torch.dtype | None = None,
                 greedy: bool = False) -> None:
        """``greedy``: each turn decoded greedily (an evaluation's, ``vopd.eval_episodes``)."""
        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast
        self.temperature, self.top_p, self.top_k, self.batch_size, self.cache = temperature, top_p, top_k, batch_size, \
            cache
        self.greedy = greedy

    def start(self) -> None:
        """Generate reads the live weights: nothing to take."""

    def finish(self) -> None:
        """Nothing to release."""

    def __call__(self, prompts: list[list[int]], max_tokens: list[int], stop_ids: list[int]) -> Samples:
        out = generate(self.model, self.tokenizer, prompts, max_new_tokens=max(max_tokens, default=1),
                       temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, return_logprobs=True,
                       batch_size=self.batch_size, cache=self.cache, stop_ids=stop_ids, autocast=self.autocast,
                       greedy=self.greedy)
        return cut(out, max_tokens, stop_ids)


class SamplerTurns:
    """Turns from any ``vopd.rollout.Sampler`` (a ``train(make_sampler=...)`` engine): it samples to its own stops
    and length, and each completion is cut at the turn's first stop and budget (``cut``)."""

    def __init__(self, sample: Sampler) -> None:
        self.sample = sample

    def start(self) -> None:
        """The sampler takes the weights itself at each call."""

    def finish(self) -> None:
        """Nothing to release."""

    def __call__(self, prompts: list[list[int]], max_tokens: list[int], stop_ids: list[int]) -> Samples:
        return cut(self.sample(prompts), max_tokens, stop_ids)


def turn_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Where an assistant turn ends: EOS and the chat template's end of turn (``vopd.prompts.stop_token_ids``), and
    ``</tool_call>`` when the tokenizer has it as one token (Qwen3's): the environment answers the call at once."""
    stops = stop_token_ids(tokenizer)
    close = tokenizer(CLOSE, add_special_tokens=False)["input_ids"]
    if len(close) == 1 and int(close[0]) not in stops:
        stops.append(int(close[0]))
    return stops


@dataclass(frozen=True)
class Limits:
    """The bounds of one episode: ``max_turns`` assistant turns, ``turn_tokens`` sampled tokens per turn
    (``rollout.max_new_tokens``), ``total_tokens`` completion tokens in all (sampled and the environment's)."""

    max_turns: int
    turn_tokens: int
    total_tokens: int


class Renderer:
    """The chat template's text of a conversation, with the run's template variables (the environment's tools)."""

    def __init__(self, tokenizer: Tokenizer, template_kwargs: Mapping[str, Any]) -> None:
        self.tokenizer, self.kwargs = tokenizer, dict(template_kwargs)
        self.end_of_turn = set(stop_token_ids(tokenizer))

    def name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)

    def text(self, messages: list[Message], where: str = "a conversation") -> str:
        """The template's text of ``messages`` with the generation prompt; a one-line error when it cannot render
        them (a role it does not know, e.g. ``tool``)."""
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                     **self.kwargs)
        except Exception as exc:  # jinja's TemplateError (raise_exception in the template) and friends
            raise UserError(f"the chat template of {self.name()} cannot render the conversation at {where} with the "
                            f"environment's messages ({' '.join(str(exc).split())[:160]}): use a template that "
                            "renders its roles (tool messages: Qwen3's format)") from None
        return str(out)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def content(self, ids: list[int]) -> str:
        """The assistant message of a sampled turn: its text, the end-of-turn token left out (the template writes
        it), a stopping ``</tool_call>`` kept (it is the call's own text)."""
        return self.decode(ids[:-1] if ids and ids[-1] in self.end_of_turn else ids)

    def extension(self, so_far: str, messages: list[Message], where: str) -> str:
        """The text the template adds after ``so_far`` (the sequence's text) to render ``messages`` and open the next
        assistant turn; a one-line refusal when its rendering does not start with ``so_far``."""
        full = self.text(messages, where)
        if not full.startswith(so_far):
            at = next((i for i, (a, b) in enumerate(zip(full, so_far)) if a != b), min(len(full), len(so_far)))
            raise UserError(f"the chat template of {self.name()} does not extend the conversation at {where} when the "
                            f"environment's messages are appended (it renders {full[at:at + 30]!r} where the sampled "
                            f"sequence has {so_far[at:at + 30]!r}: it rewrites an earlier turn, e.g. drops past "
                            "thinking); multi-turn rollouts append tokens and never re-tokenise what was sampled: use "
                            "a chat template that renders every earlier turn as it was")
        return full[len(so_far):]

    def tokens(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]


@dataclass
class _Run:
    """One episode in progress: its conversation, the sequence's text, and the completion built so far."""

    where: str
    env: Env
    prompt: list[int]
    messages: list[Message]
    text: str
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    env_tokens: int = 0
    reward: float | None = None
    over: bool = False
    truncated: bool = False

    def end(self, *, truncated: bool) -> None:
        self.over, self.truncated = True, truncated


def _answer(run: _Run, ids: list[int], cut_short: bool, render: Renderer, calls: EnvCalls, limits: Limits) -> None:
    """After a sampled turn ``ids`` of ``run``: the environment's answer, appended as tokens (or the episode's end)."""
    run.turns += 1
    run.text += render.decode(ids)
    if cut_short:  # no end of turn within the budget: nothing for the environment to answer
        return run.end(truncated=True)
    content = render.content(ids)
    reply = calls.step(run.env, content, run.where)
    if reply.done:
        run.reward = reply.reward
        return run.end(truncated=False)
    tools = [m for m in reply.messages if m["role"] == "tool"]
    run.tool_calls += len(tools)
    run.tool_errors += sum(is_tool_error(m["content"]) for m in tools)
    if run.turns >= limits.max_turns:
        return run.end(truncated=True)
    run.messages += [{"role": "assistant", "content": content}, *reply.messages]
    extra = render.extension(run.text, run.messages, run.where)
    added = render.tokens(extra)
    if len(run.ids) + len(added) >= limits.total_tokens:  # no room left for another sampled token
        return run.end(truncated=True)
    run.ids += added
    run.mask += [False] * len(added)
    run.logprobs += [0.0] * len(added)
    run.env_tokens += len(added)
    run.text += extra


def run_episodes(prompts: list[list[int]], first: list[list[Message]], envs: list[Env], where: list[str],
                 tokenizer: Tokenizer, template_kwargs: Mapping[str, Any], sample: TurnSampler, limits: Limits,
                 calls: EnvCalls) -> Samples:
    """The episodes of rows whose first messages are ``first`` (rendered with ``template_kwargs`` and the generation
    prompt: ``prompts``), each with its own started environment ``envs[i]`` (``where[i]`` names the row in errors),
    sampled turn by turn by ``sample``. Completion i is every token after prompt i: ``loss_masks[i]`` True on the
    sampled ones, whose ``logprobs`` are the sampler's (0 on the environment's); ``episodes[i]`` its counts."""
    render = Renderer(tokenizer, template_kwargs)
    runs = []
    for p, msgs, env, at in zip(prompts, first, envs, where):
        text = render.text(list(msgs))
        if render.tokens(text) != list(p):
            raise ValueError(f"{at}: the prompt ids are not the rendering of its first messages with the "
                             "environment's tools (vopd.env.env_chat)")
        runs.append(_Run(at, env, list(p), list(msgs), text))
    stops = turn_stop_ids(tokenizer)
    sample.start()
    try:
        while live := [r for r in runs if not r.over]:
            budgets = [min(limits.turn_tokens, limits.total_tokens - len(r.ids)) for r in live]
            out = sample([r.prompt + r.ids for r in live], budgets, stops)
            for r, ids, lps, short in zip(live, out.completions, out.logprobs, out.truncated):
                r.ids += ids
                r.mask += [True] * len(ids)
                r.logprobs += list(lps)
                _answer(r, ids, short, render, calls, limits)
    finally:
        sample.finish()
    return Samples([r.ids for r in runs], [r.logprobs for r in runs], [r.truncated for r in runs],
                   [r.mask for r in runs],
                   [Episode(r.turns, r.tool_calls, r.tool_errors, r.env_tokens, r.reward) for r in runs])


class EpisodeRows:
    """The rows sampler of a multi-turn run (``OnPolicyRollouts(rows=...)``): row i of the prompt set starts a new
    environment from ``first[i]`` (its first messages) and plays an episode (``run_episodes``)."""

    def __init__(self, first: list[list[Message]], factory: EnvFactory, calls: EnvCalls, tokenizer: Tokenizer,
                 template_kwargs: Mapping[str, Any], sample: TurnSampler, limits: Limits, *,
                 where: str = "training row") -> None:
        """``where``: what a row is called in errors (``"training row"`` i, ``"eval problem"`` i)."""
        self.first, self.factory, self.calls, self.tokenizer = first, factory, calls, tokenizer
        self.kwargs, self.sample, self.limits, self.where = dict(template_kwargs), sample, limits, where

    @classmethod
    def for_run(cls, rollout: RolloutConfig, chat: ChatOptions, prompts: PromptSet, tokenizer: Tokenizer,
                sample: TurnSampler) -> EpisodeRows:
        """The episodes of a run's ``rollout.env`` over its training prompts (read with ``keep_messages``), rendered
        with the data's ``chat`` options and the environment's tools (``vopd.env.env_chat``)."""
        factory = load_env(rollout.env)
        if prompts.messages is None:
            raise ValueError("the training prompts of a multi-turn run keep their first messages (keep_messages)")
        kwargs = env_chat(chat, tools_of(factory, rollout.env)).template_kwargs
        limits = Limits(rollout.max_turns, rollout.max_new_tokens, rollout.completion_tokens[0])
        return cls(prompts.messages, factory, EnvCalls(rollout.env, rollout.env_timeout_s, rollout.env_max_chars),
                   tokenizer, kwargs, sample, limits)

    def __call__(self, ids: list[int], prompts: list[list[int]]) -> Samples:
        where = [f"{self.where} {i}" for i in ids]
        envs = []
        for i, at in zip(ids, where):
            env = self.calls.make(self.factory, at)
            self.calls.start(env, self.first[i], at)
            envs.append(env)
        return run_episodes(prompts, [self.first[i] for i in ids], envs, where, self.tokenizer, self.kwargs,
                            self.sample, self.limits, self.calls)
