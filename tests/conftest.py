"""Shared fixtures: a micro world (tokenizer, tiny random teacher/student, task files) built once per session.

It uses the same code as the real tiny world (``vopd.world.build``/``vopd.world.task``) at sizes that take a second, with no
SFT, so trainer tests run in seconds. Tests that need trained models use the cached world and are marked slow.
``launch_teacher_servers`` serves the micro world's teacher with real ``vopd serve-teacher`` processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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
    from vopd.world.sft import SFTConfig, train_sft
    from vopd.world.task import TaskConfig, read_jsonl, write_splits
    from vopd.world.tiny_models import ModelShape, make_model, train_tokenizer

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


def fake_rollout(tok):
    """Six prompts with random completions of different lengths (one of a single token) and fake sampler log-probs:
    a rollout to score without sampling (the teacher-server tests)."""
    from vopd.rollout import pack
    from vopd.sampling import Samples

    gen = torch.Generator().manual_seed(0)
    texts = ["1 + 2 = ?", "What is 7 + 5?", "Compute 3 * 4.", "12 - 9", "2 + 2 + 2 = ?", "9 + 10"]
    prompts = [list(tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
    lengths = [5, 12, 3, 9, 1, 7]
    completions = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths]
    logprobs = [(-3 * torch.rand(n, generator=gen)).tolist() for n in lengths]
    return pack(prompts, Samples(completions, logprobs, [False] * len(texts)), tok.pad_token_id)


@pytest.fixture(scope="session")
def make_fake_rollout():
    """``fake_rollout`` as a fixture: a function of a tokenizer."""
    return fake_rollout


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (restored after it), whatever earlier modules set: the tiny models are as
    fast on one thread when the CPU is idle and far faster when it is shared. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> MicroWorld:
    return build_micro_world(tmp_path_factory.mktemp("micro_world"))


@pytest.fixture(scope="module")
def vllm_teacher_dir(micro_world, tmp_path_factory) -> Path:
    """A teacher with head size 32 (vLLM's CPU attention refuses the micro world's) over the micro world's
    tokenizer, for stock vLLM servers."""
    from vopd.models import load_tokenizer
    from vopd.world.tiny_models import ModelShape, make_model

    root = tmp_path_factory.mktemp("vllm_teacher")
    tok = load_tokenizer(str(micro_world.student))
    model = make_model(ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96),
                       tok, seed=5)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def vllm_pair(micro_world, vllm_teacher_dir):
    """(tokenizer, student, that teacher in process), fp32 on the CPU."""
    from vopd.models import load_model, load_tokenizer
    from vopd.teacher.local import InProcessTeacher

    cpu = torch.device("cpu")
    tok = load_tokenizer(str(micro_world.student))
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=cpu)
    teacher = InProcessTeacher(load_model(str(vllm_teacher_dir), role="teacher", dtype=torch.float32, device=cpu),
                               len(tok))
    return tok, student, teacher


@pytest.fixture(scope="module")
def micro_pair(micro_world):
    """(tokenizer, student, in-process teacher) of the micro world in fp32 on the CPU, one per test module (a module
    may change the models' attention implementation or gradients, and puts them back)."""
    from vopd.models import load_model, load_tokenizer
    from vopd.teacher.local import InProcessTeacher

    cpu = torch.device("cpu")
    tok = load_tokenizer(str(micro_world.student))
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=cpu)
    teacher = InProcessTeacher(load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=cpu),
                               len(tok))
    return tok, student, teacher


@pytest.fixture
def train_overrides(micro_world, tmp_path):
    """Overrides for a seconds-long training run on the micro world."""
    return [
        f"model.student={micro_world.student}", f"model.teacher={micro_world.teacher}",
        f"data.train={micro_world.train}", f"output_dir={tmp_path / 'run'}",
        "rollout.max_new_tokens=12", "batch_size=4", "micro_batch_size=2", "steps=3", "optim.lr=3e-3",
        "optim.schedule=constant", "progress=false", "loss.top_k=8",
    ]


# --- teacher servers: real `vopd serve-teacher` processes over loopback (test_serve.py, test_remote_train.py) ------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, token: str | None) -> None:
    import httpx  # the server extra; only tests that start a server need it

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer /health in time:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def launch_teacher_servers(micro_world, tmp_path_factory):
    """A function that serves the micro world's teacher with real ``vopd serve-teacher`` processes (CPU, one
    thread, free loopback ports). Call it with ``{name: (extra CLI arguments, bearer token or None)}`` (or a third
    element: the model directory to serve instead of the micro world's teacher): the servers
    start together (their start-ups overlap), and it returns ``{name: (process, url)}`` once every one answers
    ``/health``. They are stopped when the test module ends (a test may kill one first)."""
    logs = tmp_path_factory.mktemp("teacher_servers")
    started: list[subprocess.Popen] = []

    def launch(specs: dict[str, tuple[list[str], str | None]]) -> dict[str, tuple[subprocess.Popen, str]]:
        out = {}
        for name, (extra, token, *model) in specs.items():
            port = _free_port()
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            env.pop("VOPD_TEACHER_TOKEN", None)
            if token:
                env["VOPD_TEACHER_TOKEN"] = token
            with (logs / f"{name}.log").open("w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "vopd", "serve-teacher", str(model[0] if model else micro_world.teacher),
                                         "--port", str(port), "--device", "cpu", *extra],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
            started.append(proc)
            out[name] = (proc, f"http://127.0.0.1:{port}")
        for name, (proc, url) in out.items():
            _wait_ready(proc, url, logs / f"{name}.log", specs[name][1])
        return out

    try:
        yield launch
    finally:
        for proc in started:
            _stop(proc)


@pytest.fixture(scope="module")
def tool_world(tmp_path_factory):
    """(directory of a tiny student, of a teacher, their tokenizer) in Qwen3's tool format (tests/tool_models.py)."""
    from tool_models import build_tool_world

    return build_tool_world(tmp_path_factory.mktemp("tool_world"))
