"""Shared fixtures: a micro world (tokenizer, tiny random teacher/student, task files) built once per session.

It uses the same code as the real tiny world (``vopd.world``/``vopd.task``) at sizes that take a second, with no
SFT, so trainer tests run in seconds. Tests that need trained models use the cached world and are marked slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# One thread: on a shared 2-core machine two torch threads were up to 20x slower when other processes ran.
torch.set_num_threads(1)


@dataclass(frozen=True)
class MicroWorld:
    root: Path
    teacher: Path
    student: Path
    train: Path
    test: Path


def build_micro_world(root: Path) -> MicroWorld:
    from vopd.data import format_prompt
    from vopd.sft import SFTConfig, train_sft
    from vopd.task import TaskConfig, read_jsonl, write_splits
    from vopd.world import ModelShape, make_model, train_tokenizer

    task = TaskConfig(n_steps=2, max_start=20, max_value=40)
    train, test = write_splits(root / "data", n_train=64, n_test=16, seed=0, config=task)
    rows = read_jsonl(train)
    tok = train_tokenizer([format_prompt(r["problem"]) + r["solution"] for r in rows], vocab_size=200)
    paths = {}
    for name, shape, seed in (("teacher", ModelShape(hidden_size=48, num_layers=2, intermediate_size=96), 1),
                              ("student", ModelShape(hidden_size=32, num_layers=1, intermediate_size=64), 2)):
        model = make_model(shape, tok, seed=seed)
        if name == "teacher":  # a short SFT makes the teacher peaked, so the student has a clear KL to close
            train_sft(model, tok, rows, SFTConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5), log=None)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return MicroWorld(root, paths["teacher"], paths["student"], train, test)


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> MicroWorld:
    return build_micro_world(tmp_path_factory.mktemp("micro_world"))


@pytest.fixture
def train_overrides(micro_world, tmp_path):
    """Overrides for a seconds-long training run on the micro world."""
    return [
        f"model.student={micro_world.student}", f"model.teacher={micro_world.teacher}",
        f"data.train={micro_world.train}", f"output_dir={tmp_path / 'run'}",
        "rollout.max_new_tokens=12", "batch_size=4", "micro_batch_size=2", "steps=3", "optim.lr=3e-3",
        "optim.schedule=constant", "progress=false", "loss.top_k=8",
    ]
