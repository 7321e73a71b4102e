"""The tiny world: an offline tokenizer, a tiny Qwen3 teacher and a weaker tiny Qwen3 student, built and cached.

``build_world`` generates the arithmetic task (``vopd.world.task``), trains a byte-level BPE tokenizer on it (with a
ChatML chat template, ``WorldConfig.chat``) and creates two ``Qwen3ForCausalLM`` models of different sizes
(``vopd.world.tiny_models``), fine-tunes both on the worked solutions, each problem rendered as a user turn through
the chat template (``vopd.world.sft``), and measures their greedy test accuracy rendered the same way. Runs on the
world render prompts as SFT did when they set ``World.data_overrides()`` (``data.text_as_chat=true``);
``write_run_config`` writes a training config with them (``run.yaml`` in the world's directory). Everything is
saved in the formats real models use (``save_pretrained``: safetensors + tokenizer and chat template in the model
directory), so the rest of vopd loads the tiny world with ``AutoTokenizer`` / ``AutoModelForCausalLM`` like any other
checkpoint.

The world is cached under ``$VOPD_CACHE`` (default ``~/.cache/vopd``) in a directory keyed by a hash of the
configuration (``vopd.world.cache``: built in a temporary directory and renamed into place, with a manifest verified
on reuse so a partial or corrupt cache is rebuilt).

What it knows: the world's recipe (``WorldConfig``) and its cache key, the ``[data]`` settings that render prompts
as the world's SFT did, and the keys a training run on the world needs.
What it does not know: distillation, the estimators, or evaluation beyond greedy accuracy; how the tokenizer and
the models are made (``vopd.world.tiny_models``); how the cache works (``vopd.world.cache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vopd.errors import UserError
from vopd.prompts import ChatOptions
from vopd.world.cache import cached_build, default_cache_dir, read_metrics, save_pair, verify
from vopd.world.sft import SFTConfig, greedy_accuracy, train_sft
from vopd.world.task import TaskConfig, read_jsonl, write_splits
from vopd.world.tiny_models import ModelShape, count_parameters, make_model, tokenizer_corpus, train_tokenizer

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer

#: Bump when the layout or the build recipe changes, so old caches are not mistaken for new ones.
FORMAT_VERSION = 2  # 2: the chat template (WorldConfig.chat)
#: The training config of a run on the world (``write_run_config``); not in the manifest: it names the world's
#: paths, which change when the cache moves, and is rewritten by every `vopd sft`.
RUN_CONFIG = "run.yaml"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the tiny world; its hash names the cache directory."""

    seed: int = 0
    task: TaskConfig = TaskConfig()
    n_train: int = 20000
    n_test: int = 500
    vocab_size: int = 384  # BPE target; the trained vocabulary may be a little smaller
    # Sizes and steps were tuned on a shared 2-core CPU (docs/tiny_world.md): the teacher solves the test split,
    # the student stops SFT in the middle of its learning curve (the same student SFT'd 3x longer is near 100%).
    # Head size 32: the smallest that vLLM's CPU attention kernel runs (rollout.engine=vllm on the tiny world).
    teacher: ModelShape = ModelShape(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=384,
                                     head_dim=32)
    student: ModelShape = ModelShape(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=192,
                                     head_dim=32)
    teacher_sft: SFTConfig = SFTConfig(steps=600, lr=3e-3)
    student_sft: SFTConfig = SFTConfig(steps=700, lr=3e-3)
    # The student's SFT stops at the first check (every ``student_check_every`` steps from
    # ``student_check_from``) where its greedy accuracy on ``n_val`` held-out train problems reaches
    # ``student_target_accuracy``, and keeps that check's weights or the previous check's, whichever accuracy is
    # closer to the target: its learning curve is so steep that a fixed step count lands anywhere between 10% and
    # 70% depending on the seed. None trains for the full ``student_sft.steps`` (then ~90%+).
    student_target_accuracy: float | None = 0.3
    student_check_from: int = 200
    student_check_every: int = 10
    n_val: int = 200
    eval_max_new_tokens: int = 96
    # The tokenizer has a ChatML chat template (<|im_end|> is its EOS) and both models are SFT'd on problems rendered
    # as a user turn through it (``data.text_as_chat``); False: the plain-text prompt (BOS + template) and <|eos|>.
    chat: bool = True

    @property
    def chat_options(self) -> ChatOptions:
        """How the world's prompts are rendered (SFT, its accuracy checks, and runs that set ``data_overrides``)."""
        return ChatOptions(text_as_chat=self.chat)

    def key(self) -> str:
        """Short stable hash of the configuration (and the format version)."""
        blob = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class World:
    """A built tiny world: paths (models are HF directories with the tokenizer inside) and measured metrics."""

    root: Path
    teacher: Path
    student: Path
    tokenizer: Path
    train_data: Path
    test_data: Path
    config: WorldConfig
    teacher_accuracy: float
    student_accuracy: float
    teacher_sft_seconds: float
    student_sft_seconds: float
    reused: bool = False
    metrics: dict[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> str:
        """Human-readable paths and accuracies (what `vopd sft` prints)."""
        how = "reused" if self.reused else "built"
        return "\n".join([
            f"tiny world ({how}): {self.root}",
            f"  teacher   {self.teacher}  greedy test accuracy {self.teacher_accuracy:.1%}"
            f"  (SFT {self.teacher_sft_seconds:.0f}s)",
            f"  student   {self.student}  greedy test accuracy {self.student_accuracy:.1%}"
            f"  (SFT {self.student_sft_seconds:.0f}s)",
            f"  tokenizer {self.tokenizer}",
            f"  data      {self.train_data}  {self.test_data}",
            *([f"  config    {self.root / RUN_CONFIG}", f"train on it: vopd train --config {self.root / RUN_CONFIG}"]
              if (self.root / RUN_CONFIG).is_file() else []),
        ])

    def data_overrides(self) -> list[str]:
        """The config overrides that make a training or evaluation run render prompts as the world's SFT did."""
        return [f"data.text_as_chat={str(self.config.chat).lower()}"]

    def run_overrides(self) -> list[str]:
        """The keys a training run on the world needs: its models and data, completions as long as its accuracy
        checks' (its models' 256 positions hold no 2048-token default), and ``data_overrides``."""
        n = self.config.eval_max_new_tokens
        return [f"model.student={self.student}", f"model.teacher={self.teacher}", f"data.train={self.train_data}",
                f"data.eval={self.test_data}", f"rollout.max_new_tokens={n}", f"eval.max_new_tokens={n}",
                *self.data_overrides()]


def write_run_config(world: World) -> Path:
    """``run.yaml`` in the world's directory: ``World.run_overrides`` as a config for ``vopd train --config`` (other
    keys at their defaults), checked by ``load_config`` before it is written (atomically: a temporary file renamed
    into place). Returns its path."""
    import yaml

    from vopd.config import TrainConfig, config_from_dict
    from vopd.config_io import apply_overrides

    data = apply_overrides({}, world.run_overrides(), TrainConfig)
    config_from_dict(data)  # refuse to write a config that would not load
    path = world.root / RUN_CONFIG
    text = (f"# A training run on the tiny world {world.config.key()}, written by vopd sft; other keys: docs/config.md\n"
            f"# vopd train --config {path} [key=value ...]\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=4096))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({exc.strerror}); pass --cache-dir DIR or set VOPD_CACHE to a writable "
                        "directory") from None
    return path


def verify_world(root: Path) -> str | None:
    """None when ``root`` holds a complete world matching its manifest, else the reason it does not."""
    return verify(root, FORMAT_VERSION)


def _world_from(root: Path, config: WorldConfig, *, reused: bool) -> World:
    metrics = read_metrics(root)
    return World(
        root=root,
        teacher=root / "teacher",
        student=root / "student",
        tokenizer=root / "tokenizer",
        train_data=root / "data" / "train.jsonl",
        test_data=root / "data" / "test.jsonl",
        config=config,
        teacher_accuracy=metrics["teacher_accuracy"],
        student_accuracy=metrics["student_accuracy"],
        teacher_sft_seconds=metrics["teacher_sft_seconds"],
        student_sft_seconds=metrics["student_sft_seconds"],
        reused=reused,
        metrics=metrics,
    )


# ------------------------------------------------------------------------------------------------ build


def _accuracy_reached(
    model: Model, tokenizer: Tokenizer, val: list[dict[str, Any]], config: WorldConfig, log: Callable[[str], None]
) -> Callable[[int], bool]:
    """The student's stopping rule: validation accuracy >= the target (checked from ``student_check_from``); on
    stopping, the weights of this check or of the previous one, whichever accuracy is closer to the target."""
    previous: dict[str, Any] = {}  # the last check below the target: its step, accuracy and weights

    def stop_when(step: int) -> bool:
        target = config.student_target_accuracy
        if step < config.student_check_from or target is None:
            return False
        acc = greedy_accuracy(model, tokenizer, val, max_new_tokens=config.eval_max_new_tokens,
                              chat=config.chat_options)
        log(f"  student step {step}: validation accuracy {acc:.1%}")
        if acc < target:
            previous.update(step=step, acc=acc, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            return False
        if previous and target - previous["acc"] < acc - target:
            model.load_state_dict(previous["state"])
            log(f"  student: keeping step {previous['step']} ({previous['acc']:.1%}), closer to the target {target:.0%}")
        return True

    return stop_when


def _build_into(tmp: Path, config: WorldConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Build every artefact under ``tmp``; return the metrics."""
    train_path, test_path = write_splits(
        tmp / "data", n_train=config.n_train, n_test=config.n_test, seed=config.seed, config=config.task
    )
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    tokenizer = train_tokenizer(tokenizer_corpus(train, chat=config.chat), config.vocab_size, chat=config.chat)
    tokenizer.save_pretrained(tmp / "tokenizer")
    log(f"tokenizer: {len(tokenizer)} tokens{', ChatML chat template' if config.chat else ''}; "
        f"data: {len(train)} train / {len(test)} test problems")
    metrics: dict[str, Any] = {"vocab_size": len(tokenizer)}
    # The student's stopping rule looks at problems it does not train on (and never at the test split).
    n_val = min(config.n_val, len(train) // 2) if config.student_target_accuracy is not None else 0
    val, student_train = train[len(train) - n_val :], train[: len(train) - n_val]
    for role, shape, sft_config, rows, seed_offset in (
        ("teacher", config.teacher, config.teacher_sft, train, 1),
        ("student", config.student, config.student_sft, student_train, 2),
    ):
        model = make_model(shape, tokenizer, seed=config.seed * 1000 + seed_offset)
        log(f"{role}: Qwen3 {count_parameters(model):,} parameters, SFT up to {sft_config.steps} steps")
        sft = dataclasses.replace(sft_config, seed=config.seed * 1000 + seed_offset)
        stop_when = _accuracy_reached(model, tokenizer, val, config, log) if role == "student" and n_val else None
        result = train_sft(model, tokenizer, rows, sft, log=log, log_every=max(1, sft.steps // 5),
                           stop_when=stop_when, check_every=config.student_check_every, chat=config.chat_options)
        t0 = time.perf_counter()
        acc = greedy_accuracy(model, tokenizer, test, max_new_tokens=config.eval_max_new_tokens,
                              chat=config.chat_options)
        log(f"{role}: greedy test accuracy {acc:.1%} after {result.steps} steps "
            f"(SFT {result.seconds:.0f}s, eval {time.perf_counter() - t0:.0f}s)")
        save_pair(model, tokenizer, tmp / role)
        metrics.update({
            f"{role}_accuracy": acc,
            f"{role}_sft_seconds": round(result.seconds, 2),
            f"{role}_sft_steps": result.steps,
            f"{role}_parameters": count_parameters(model),
            f"{role}_final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        })
    return metrics


def build_world(
    config: WorldConfig = WorldConfig(),
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> World:
    """Build the tiny world, or reuse a verified cached copy of the same configuration (``vopd.world.cache``: an
    atomic build on one torch thread, verified on reuse)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"world-{config.key()}"
    reused = cached_build(final, format_version=FORMAT_VERSION, key=config.key(), config=dataclasses.asdict(config),
                          build_into=lambda tmp: _build_into(tmp, config, log), force=force, log=log)
    return _world_from(final, config, reused=reused)
