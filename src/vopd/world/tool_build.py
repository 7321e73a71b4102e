"""The tool world, built and cached: a tokenizer with the calculator's tokens and Qwen3's tool template, a teacher
SFT'd on episodes that call the calculator and use its answer, and a student that uses it badly (docs/tiny_world.md,
"The tool world").

``build_tool_world`` draws the problems (``vopd.world.tool_task``), trains the tokenizer on the rendered episodes,
SFTs the teacher on ``tool`` traces and the student, smaller and for fewer steps, on ``skip`` traces when the
multiplier is small and otherwise a seeded mix of ``tool`` and ``malformed`` ones (``ToolWorldConfig``), the loss on the assistant's tokens only
(``vopd.world.tool_sft``), then measures both with the world's own greedy episode runner and a true calculator
(accuracy, tool calls, tool errors, malformed calls, episodes without a call), greedy and sampled at temperature 1.
It is cached like the arithmetic world (``vopd.world.cache``) under ``world-tools-<key>``.

What it knows: the recipe (``ToolWorldConfig``), the built world's paths and numbers (``ToolWorld``), and what a run
on it needs from it: its episode rows and the tools declaration (``tool_world_data``). What it does not know: the
agentic rollouts or distillation (vopd's core), how the models are made (``vopd.world.tiny_models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from vopd.prompts import ChatOptions
from vopd.world.cache import cached_build, default_cache_dir, read_metrics, save_pair
from vopd.world.calculator import TOOLS
from vopd.world.sft import SFTConfig, train_sft
from vopd.world.task import read_jsonl, write_jsonl
from vopd.world.tiny_models import (BOS, IM_END, IM_START, TOOL_TOKENS, ModelShape, count_parameters, make_model,
                                    train_tokenizer)
from vopd.world.tool_sft import collate_masked, encode_episodes, episode_stats, run_episodes
from vopd.world.tool_task import (KINDS, Kind, ToolTaskConfig, episode_row, generate_problems, prompt_messages,
                                  solve_steps, trace)

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer

#: Bump when the layout or the recipe changes, so that old caches are not taken for new ones.
TOOL_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ToolWorldConfig:
    """Everything that determines the tool world; its hash names the cache directory. The models have the
    arithmetic world's shapes (head size 32, for vLLM's CPU attention)."""

    seed: int = 0
    task: ToolTaskConfig = ToolTaskConfig()
    n_train: int = 20000
    n_test: int = 500
    # BPE target: the fixed tools block then becomes a few tokens (the vocabulary saturates near 656).
    vocab_size: int = 768
    teacher: ModelShape = ModelShape(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=384,
                                     head_dim=32)
    student: ModelShape = ModelShape(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=192,
                                     head_dim=32)
    # 600 teacher steps gave 90.0% and 400 student steps 3.0%, most of the errors in the in-head arithmetic of the
    # first steps (docs/tiny_world.md, "The tool world"): episodes are about 3x the arithmetic world's solutions.
    teacher_sft: SFTConfig = SFTConfig(steps=800, lr=3e-3)
    student_sft: SFTConfig = SFTConfig(steps=700, lr=3e-3)
    # The student's traces (docs/tiny_world.md, "The tool world"): it skips the tool (a ``skip`` trace: it guesses the
    # product) when the multiplier is below ``student_skip_below``, and a seeded ``student_malformed`` share of its
    # calls are ``malformed``. A rule rather than a random share, so that greedy decoding shows it too: with random
    # shares greedy decoding follows the majority on every problem.
    student_skip_below: int = 500
    student_malformed: float = 0.2
    max_turns: int = 3  # assistant turns per episode in the build's checks
    eval_max_new_tokens: int = 64  # per turn

    def __post_init__(self) -> None:
        from vopd.errors import UserError

        if not 0.0 <= self.student_malformed <= 1.0:
            raise UserError(f"ToolWorldConfig.student_malformed={self.student_malformed}: give a share in [0, 1]")

    @property
    def chat_options(self) -> ChatOptions:
        """How the world's prompts are rendered: the chat template with the calculator declared."""
        return ChatOptions(template_kwargs={"tools": TOOLS})

    def key(self) -> str:
        blob = json.dumps({"world": "tools", "format": TOOL_FORMAT_VERSION, **dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ToolWorld:
    """A built tool world: paths (models are HF directories with the tokenizer inside) and the build's metrics."""

    root: Path
    config: ToolWorldConfig
    metrics: dict[str, Any] = field(compare=False)
    reused: bool = False

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def test_data(self) -> Path:
        return self.root / "data" / "test.jsonl"

    def summary(self) -> str:
        """Paths and numbers (what `vopd sft --world tools` prints)."""
        m = self.metrics
        lines = [f"tool world ({'reused' if self.reused else 'built'}): {self.root}"]
        for role in ("teacher", "student"):
            lines.append(f"  {role:<8}  {self.root / role}  ({m[f'{role}_sft_steps']} SFT steps, "
                         f"{m[f'{role}_sft_seconds']:.0f}s)")
            for how in ("greedy", "sampled"):
                lines.append(f"    {how:<7}  accuracy {m[f'{role}_{how}_accuracy']:.1%}  tool calls/episode "
                             f"{m[f'{role}_{how}_tool_calls']:.2f}  tool errors/episode "
                             f"{m[f'{role}_{how}_tool_errors']:.2f}  no call {m[f'{role}_{how}_no_call']:.1%}")
        lines += [f"  tokenizer {self.tokenizer}", f"  data      {self.train_data}  {self.test_data}",
                  "  rows and tools for a run: vopd.world.tool_build.tool_world_data; grading: "
                  "vopd.world.tool_task.grade_episode (docs/tiny_world.md)"]
        return "\n".join(lines)


def tool_world_data(world: ToolWorld, split: str = "train") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, tools) of a run on the world: each row's ``messages`` is the prompt conversation and ``answer`` the
    reference (``vopd.world.tool_task.grade_episode`` grades an episode against it); ``tools`` is the declaration
    to render prompts with (``apply_chat_template(..., tools=tools)``, or ``ToolWorldConfig.chat_options``)."""
    from vopd.errors import UserError

    if split not in ("train", "test"):
        raise UserError(f"split {split!r}: the tool world has 'train' and 'test'")
    return read_jsonl(world.train_data if split == "train" else world.test_data), [dict(t) for t in TOOLS]


def _tokenizer_corpus(conversations: list[list[dict[str, str]]]) -> list[str]:
    """The rendered episodes cut at every special and tool token: the pieces the pre-tokenizer sees (a tokenizer
    without merges renders them with the same template)."""
    boot = train_tokenizer(["a"], 260, chat=True, tools=True)
    cut = re.compile("|".join(re.escape(t) for t in (BOS, IM_START, IM_END, *TOOL_TOKENS)))
    texts = [boot.apply_chat_template(c, tools=TOOLS, tokenize=False) for c in conversations]
    return [piece for text in texts for piece in cut.split(text) if piece]


def _student_kinds(problems: list[str], config: ToolWorldConfig) -> list[Kind]:
    """The kind of each problem's student trace: ``skip`` below the multiplier threshold, else ``malformed`` with
    probability ``student_malformed`` (seeded), else ``tool``."""
    rng = random.Random(f"vopd-tool-mix:{config.seed}")
    kinds: list[Kind] = []
    for p in problems:
        multiplier = next((s.operand for s in solve_steps(p) if s.needs_tool), 0)
        malformed = rng.random() < config.student_malformed  # drawn for every problem: the stream does not shift
        kinds.append("skip" if multiplier < config.student_skip_below else "malformed" if malformed else "tool")
    return kinds


def _measure(model: Model, tok: Tokenizer, test: list[dict[str, Any]], config: ToolWorldConfig,
             role: str) -> dict[str, float]:
    """Greedy and sampled (temperature 1, seeded) episode statistics on the test split, keys ``<role>_<how>_<stat>``."""
    out: dict[str, float] = {}
    for how in ("greedy", "sampled"):
        torch.manual_seed(config.seed * 1000 + 7)
        episodes = run_episodes(model, tok, [r["messages"] for r in test], max_turns=config.max_turns,
                                max_new_tokens=config.eval_max_new_tokens, greedy=how == "greedy")
        stats = episode_stats(episodes, [r["answer"] for r in test])
        out.update({f"{role}_{how}_{k}": round(v, 4) for k, v in stats.items()})
    return out


def _build_into(tmp: Path, config: ToolWorldConfig, log: Callable[[str], None]) -> dict[str, Any]:
    test_p = generate_problems(config.n_test, seed=2 * config.seed + 1, config=config.task)
    train_p = generate_problems(config.n_train, seed=2 * config.seed, config=config.task, exclude=test_p)
    write_jsonl([episode_row(p) for p in train_p], tmp / "data" / "train.jsonl")
    write_jsonl([episode_row(p) for p in test_p], tmp / "data" / "test.jsonl")
    test = read_jsonl(tmp / "data" / "test.jsonl")
    kinds = _student_kinds(train_p, config)
    episodes = {"teacher": [prompt_messages(p) + trace(p, "tool") for p in train_p],
                "student": [prompt_messages(p) + trace(p, k) for p, k in zip(train_p, kinds)]}
    tok = train_tokenizer(_tokenizer_corpus(episodes["teacher"] + episodes["student"]), config.vocab_size,
                          chat=True, tools=True)
    tok.save_pretrained(tmp / "tokenizer")
    metrics: dict[str, Any] = {"vocab_size": len(tok),
                               "student_kinds": {k: kinds.count(k) for k in KINDS}}
    log(f"tokenizer: {len(tok)} tokens, Qwen3 tool template; data: {len(train_p)} train / {len(test)} test problems;"
        f" student traces {metrics['student_kinds']}")
    for role, shape, sft_config, seed_offset in (("teacher", config.teacher, config.teacher_sft, 1),
                                                 ("student", config.student, config.student_sft, 2)):
        examples = encode_episodes(tok, episodes[role])
        model = make_model(shape, tok, seed=config.seed * 1000 + seed_offset)
        log(f"{role}: Qwen3 {count_parameters(model):,} parameters, SFT {sft_config.steps} steps on "
            f"{len(examples)} episodes ({sum(len(i) for i, _ in examples) / len(examples):.0f} tokens each)")
        sft = dataclasses.replace(sft_config, seed=config.seed * 1000 + seed_offset)
        result = train_sft(model, tok, [], sft, log=log, log_every=max(1, sft.steps // 5), examples=examples,
                           collate_fn=collate_masked)
        stats = _measure(model, tok, test, config, role)
        log(f"{role}: " + ", ".join(f"{k.removeprefix(role + '_')} {v:.3g}" for k, v in stats.items()))
        save_pair(model, tok, tmp / role)
        metrics.update(stats)
        metrics.update({f"{role}_sft_seconds": round(result.seconds, 2), f"{role}_sft_steps": result.steps,
                        f"{role}_parameters": count_parameters(model),
                        f"{role}_final_loss": sum(result.losses[-10:]) / len(result.losses[-10:])})
    return metrics


def build_tool_world(config: ToolWorldConfig = ToolWorldConfig(), cache_dir: str | Path | None = None, *,
                     force: bool = False, log: Callable[[str], None] = print) -> ToolWorld:
    """Build the tool world, or reuse a verified cached copy of the same configuration."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"world-tools-{config.key()}"
    reused = cached_build(final, format_version=TOOL_FORMAT_VERSION, key=config.key(),
                          config=dataclasses.asdict(config), build_into=lambda tmp: _build_into(tmp, config, log),
                          force=force, log=log, what="tool world")
    return ToolWorld(final, config, read_metrics(final), reused)
