"""A teacher/student pair for the teacher-server benchmarks, and a real `vopd serve-teacher` process serving one.

What it knows: building a tiny random teacher and student that share one tokenizer (no download, seconds), a batch of
random rollouts over a tokenizer, and starting ``vopd serve-teacher`` on a free loopback port, waiting for
``/health``. What it does not know: what a benchmark measures with them (``vopd.tools.bench.overlap``,
``vopd.tools.bench.payload``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.models import Tokenizer
    from vopd.rollout import Rollout


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """A tiny random teacher (4 layers, width 256) and student (2 layers, width 128) sharing one tokenizer."""
    from vopd.world.tiny_models import ModelShape, make_model, train_tokenizer

    texts = [f"{a} + {b} = {a + b}. " * 3 for a in range(60) for b in range(0, 60, 7)]
    tok = train_tokenizer(texts, vocab_size=512)
    paths = []
    for name, shape, seed in (("teacher", ModelShape(hidden_size=256, num_layers=4, intermediate_size=768,
                                                     num_heads=8, num_kv_heads=4, max_positions=512), 1),
                              ("student", ModelShape(hidden_size=128, num_layers=2, intermediate_size=384,
                                                     max_positions=512), 2)):
        model = make_model(shape, tok, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def random_rollout(tok: Tokenizer, batch: int, prompt_len: int, completion_len: int,
                   gen: torch.Generator) -> Rollout:
    """``batch`` sequences of ``prompt_len`` random prompt ids and ``completion_len`` random completion ids (from 3:
    no special tokens), with made-up sampler log-probs: a rollout to score without sampling."""
    from vopd.rollout import pack
    from vopd.sampling import Samples

    vocab = len(tok)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    comps = [torch.randint(3, vocab, (completion_len,), generator=gen).tolist() for _ in prompts]
    return pack(prompts, Samples(comps, [[-1.0] * len(c) for c in comps], [False] * len(comps)), tok.pad_token_id)


def serve_teacher(teacher: Path, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("VOPD_TEACHER_TOKEN", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vopd", "serve-teacher", str(teacher), "--port", str(port),
                                 "--device", "cpu"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the teacher server exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise UserError(f"the teacher server did not answer within 120 s; see {log}")
