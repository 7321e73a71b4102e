"""The tool world's SFT examples (multi-turn, the loss on the assistant's tokens only) and its own small greedy
episode runner, used by the world's build to measure its models (docs/tiny_world.md, "The tool world").

An episode is rendered by the tokenizer's chat template with the calculator declared (``tools=TOOLS``). A turn of the
assistant is what a sampler would produce after ``<|im_start|>assistant\\n``: its text, up to and including the first
stop token, ``<|im_end|>`` or ``</tool_call>`` (one token each). Everything else, the prompt, what the template writes
after a ``</tool_call>`` (``<|im_end|>\\n``), the tool response's user turn and the next ``<|im_start|>assistant\\n``,
is the environment's: in the sequence, never in the loss (the agentic contract's loss masks).

``run_episodes`` is NOT vopd's agentic rollout: it is a minimal greedy loop (``vopd.sampling.generate`` per turn,
the conversation re-rendered from its messages each turn, calls answered by ``vopd.env.calculator``) that only the
build's accuracy and tool-use checks use. Runs on the world sample through vopd's own multi-turn rollouts.

What it knows: the tokens of an episode and which of them are the assistant's, the batch layout, greedy episodes and
their tool-use statistics. What it does not know: the task's problems (``vopd.world.tool_task``), the training loop
(``vopd.world.sft.train_sft``), caching.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from vopd.errors import UserError
from vopd.prompts import chat_ids
from vopd.env.base import is_tool_error
from vopd.env.calculator import NAME as TOOL_NAME
from vopd.env.calculator import Calculator, answer_call
from vopd.env.toolcalls import CLOSE as CALL_CLOSE
from vopd.env.toolcalls import parse_tool_calls as parse_calls
from vopd.world.sft import IGNORE
from vopd.world.tiny_models import IM_END
from vopd.world.tool_task import grade_episode

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer

#: One SFT example: the episode's ids and, per id, whether the loss covers it (the assistant sampled it).
Example = tuple[list[int], list[bool]]
#: The tools the world's episodes declare: the calculator environment's own (``rollout.env=calculator``), so that
#: the SFT prompts are the prompts a run renders.
TOOLS = Calculator.tools
#: How the calculator's answer to a malformed call begins (``vopd.env.toolcalls``).
MALFORMED = "error: malformed tool call"


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end an assistant turn: ``<|im_end|>`` and ``</tool_call>`` (which must be one token)."""
    ids = []
    for token in (IM_END, CALL_CLOSE):
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise UserError(f"{token} is {len(encoded)} tokens with this tokenizer; the tool world needs it as one "
                            "(build the tokenizer with tools=True)")
        ids.append(int(encoded[0]))
    return ids


def encode_episode(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Mapping[str, Any]] = TOOLS, where: str = "episode") -> Example:
    """The ids of a whole episode and its loss mask: True exactly on the assistant turns' tokens (each up to its first
    stop token, ``stop_ids``), the final turn's ``<|im_end|>`` included; the ids end there."""
    kwargs = {"tools": list(tools)}
    stops = set(stop_ids(tokenizer))
    ids: list[int] = []
    mask: list[bool] = []
    turns = [{str(k): v for k, v in m.items()} for m in messages]
    for i, message in enumerate(turns):
        if message.get("role") != "assistant":
            continue
        prefix = chat_ids(tokenizer, turns[:i], add_generation_prompt=True, kwargs=kwargs, where=where)
        full = chat_ids(tokenizer, turns[: i + 1], add_generation_prompt=False, kwargs=kwargs, where=where)
        if prefix[: len(ids)] != ids or full[: len(prefix)] != prefix:
            raise UserError(f"{where}: the chat template renders turn {i} so that the earlier tokens are not a prefix "
                            "of the later ones; the assistant's tokens cannot be told apart")
        turn = full[len(prefix):]
        end = next((j + 1 for j, t in enumerate(turn) if t in stops), None)
        if end is None:
            raise UserError(f"{where}: assistant turn {i} has no stop token (<|im_end|> or </tool_call>)")
        mask += [False] * (len(prefix) - len(ids)) + [True] * end
        ids = prefix + turn[:end]
    if not ids:
        raise UserError(f"{where}: no assistant turn to learn")
    return ids, mask


def encode_episodes(tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]],
                    tools: Sequence[Mapping[str, Any]] = TOOLS) -> list[Example]:
    return [encode_episode(tokenizer, c, tools, where=f"episode {i}") for i, c in enumerate(conversations)]


def collate_masked(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are the ids where the mask is True, ``IGNORE`` elsewhere (``completion_loss``
    shifts them: position t predicts token t + 1)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = row
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(mask), row, torch.tensor(IGNORE))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def run_episodes(model: Model, tokenizer: Tokenizer, prompts: Sequence[Sequence[Mapping[str, Any]]], *,
                 tools: Sequence[Mapping[str, Any]] = TOOLS, max_turns: int = 3, max_new_tokens: int = 64,
                 greedy: bool = True, batch_size: int = 128) -> list[list[dict[str, str]]]:
    """Greedy (or sampled, torch's global generator) episodes from prompt conversations: each turn is sampled until a
    stop token, a turn with tool calls is answered by one tool message per call and the episode goes on, a turn
    without one ends it; at most ``max_turns`` assistant turns. Returns each episode's whole conversation."""
    from vopd.sampling import generate

    stops = stop_ids(tokenizer)
    episodes = [[dict(m) for m in p] for p in prompts]
    active = list(range(len(episodes)))
    for _turn in range(max_turns):
        if not active:
            break
        ids = [chat_ids(tokenizer, episodes[i], add_generation_prompt=True, kwargs={"tools": list(tools)})
               for i in active]
        samples = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, greedy=greedy, stop_ids=stops,
                           batch_size=batch_size)
        still = []
        for i, completion in zip(active, samples.completions):
            text = tokenizer.decode(completion, skip_special_tokens=True)  # drops <|im_end|>, keeps the tool tags
            episodes[i].append({"role": "assistant", "content": text})
            calls = parse_calls(text)
            if calls:
                episodes[i] += [{"role": "tool", "name": TOOL_NAME, "content": answer_call(c)} for c in calls]
                still.append(i)
        active = still
    return episodes


def episode_stats(episodes: Sequence[Sequence[Mapping[str, Any]]], answers: Sequence[str]) -> dict[str, float]:
    """Per-episode means: ``accuracy`` (``grade_episode``), ``tool_calls``, ``tool_errors`` (tool messages starting
    "error: "), ``malformed`` (calls answered "error: malformed tool call"), ``no_call`` (share of episodes that never
    called the tool), ``turns`` (assistant turns)."""
    n = len(episodes)
    if n == 0:
        return {}
    tool_msgs = [[m for m in e if m.get("role") == "tool"] for e in episodes]
    return {
        "accuracy": sum(grade_episode(e, a) for e, a in zip(episodes, answers)) / n,
        "tool_calls": sum(len(t) for t in tool_msgs) / n,
        "tool_errors": sum(is_tool_error(str(m["content"])) for t in tool_msgs for m in t) / n,
        "malformed": sum(str(m["content"]).startswith(MALFORMED) for t in tool_msgs for m in t) / n,
        "no_call": sum(not t for t in tool_msgs) / n,
        "turns": sum(sum(m.get("role") == "assistant" for m in e) for e in episodes) / n,
    }
