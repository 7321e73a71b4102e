"""Evaluation split over the ranks, and the held-out KL's memory.

Two gloo ranks evaluate the micro world (accuracy at n=3, temperature 1, and the exact held-out KL), each its strided
share of the batches, and get the one-process numbers and samples, bit for bit: the student as it is (one process,
DDP), and an FSDP2-sharded student with a sharded teacher, whose forwards are collectives (the rank with fewer
batches runs placeholders in step). The held-out KL through the chunked fused head equals the dense KL computed from
full (B, T, V) logits, at any chunk size and micro-batch, and its peak memory does not grow with B x T x V.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from test_sampling_memory import LiveTensorBytes
from test_sharding import _rank_env, _spawn
from vopd.config import load_config
from vopd.errors import UserError
from vopd.eval import evaluate
from vopd.eval_split import batch_seed, hf_eval_engine, model_inference, sample_split, share
from vopd.eval_student import evaluate_student
from vopd.heldout import heldout_kl, rollout_kl_sum
from vopd.models import load_model, load_tokenizer
from vopd.rollout import pack
from vopd.sampling import Samples, SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")

#: 5 problems x 3 samples in batches of 3 rows: 5 batches, so rank 0 samples 3 and rank 1 two (and, in lockstep,
#: one placeholder); 5 held-out rows in batches of 3, micro-batches of 1: rank 0 runs 3 forwards, rank 1 two (and,
#: in lockstep, one more on a placeholder row).
EVAL = ["eval.limit=5", "eval.n=3", "eval.temperature=1.0", "eval.max_new_tokens=8", "rollout.batch_size=3",
        "micro_batch_size=1", "seed=3"]


def _cfg(root: Path) -> Any:
    return load_config(None, [f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
                              f"data.train={root / 'data' / 'train.jsonl'}",
                              f"data.eval={root / 'data' / 'test.jsonl'}",
                              f"output_dir={root / 'unused'}", *EVAL])


def _models(root: Path) -> tuple[Any, Any, Any]:
    from vopd.teacher.local import InProcessTeacher

    tok = load_tokenizer(str(root / "student"))
    student = load_model(str(root / "student"), role="student", dtype=torch.float32, device=CPU)
    teacher = InProcessTeacher(load_model(str(root / "teacher"), role="teacher", dtype=torch.float32, device=CPU),
                               len(tok))
    return tok, student, teacher


def _counting(engine: Any, seen: list[int]) -> Any:
    def count(batches, seeds, settings):
        seen.extend(len(b) for b in batches)
        return engine(batches, seeds, settings)

    return count


def _records(result) -> list[tuple]:
    return [(r.problem_index, r.sample_index, r.completion, r.correct) for r in result.records]


def _split_worker(rank: int, world: int, port: int, queue: Any, root: str) -> None:
    _rank_env(rank, world, port)
    from vopd import distributed as dist
    from vopd.data import load_problems
    from vopd.eval_student import evaluate_run

    dist.init(CPU, timeout_min=2)
    try:
        cfg = _cfg(Path(root))
        tok, student, teacher = _models(Path(root))
        problems = load_problems(cfg.data.eval, kind="math", limit=cfg.eval.limit)
        seen: list[int] = []
        engine = _counting(hf_eval_engine(model_inference(student), tok), seen)
        result = evaluate(student, tok, problems, n=3, temperature=1.0, max_new_tokens=8, batch_size=3, seed=3,
                          engine=engine, split=True)
        plain = evaluate_student(student, teacher, tok, cfg, len(tok), split=True)
        # FSDP2: the student and the teacher sharded over the two ranks, every forward a collective
        sharded = dist.wrap(student, len(tok), "fsdp2", CPU)
        teacher.shard(CPU)
        lockstep = evaluate_run(sharded, None, teacher, tok, cfg, len(tok))
        queue.put((rank, {"records": _records(result), "seen": seen, "plain": plain, "fsdp2": lockstep}))
        dist.shutdown(clean=True)
    finally:
        dist.shutdown()


def test_evaluation_split_over_two_ranks_equals_one_process(micro_world):
    cfg = _cfg(micro_world.root)
    tok, student, teacher = _models(micro_world.root)
    from vopd.data import load_problems

    problems = load_problems(cfg.data.eval, kind="math", limit=cfg.eval.limit)
    one = evaluate(student, tok, problems, n=3, temperature=1.0, max_new_tokens=8, batch_size=3, seed=3)
    numbers = evaluate_student(student, teacher, tok, cfg, len(tok))
    ranks = _spawn(_split_worker, str(micro_world.root))
    for rank, got in enumerate(ranks):
        assert got["records"] == _records(one), rank  # every rank: all samples, in the one-process order
        assert got["plain"] == numbers, (rank, got["plain"], numbers)
        assert got["fsdp2"] == numbers, (rank, got["fsdp2"], numbers)
    # each rank sampled only its strided share: batches 0, 2, 4 and 1, 3 (3 rows each)
    assert ranks[0]["seen"] == [3, 3, 3] and ranks[1]["seen"] == [3, 3]
    assert 0 < numbers["eval_kl"] and len({r[2] for r in _records(one)}) > 7  # sampled: the completions differ


def test_shares_and_seeds():
    assert share(5, split=False, lockstep=True) == ([0, 1, 2, 3, 4], 0)
    assert batch_seed(7, 0) == 7 and batch_seed(7, 1) != batch_seed(8, 0)
    calls: list[tuple] = []

    def engine(batches, seeds, settings):
        calls.append((batches, seeds))
        return [Samples([[1]] * len(b), [[]] * len(b), [False] * len(b)) for b in batches]

    rows = [[i] for i in range(7)]
    parts = sample_split(engine, rows, SamplingSettings(4), batch_size=3, seed=5, split=False, lockstep=False)
    assert [(p.index, list(p.rows)) for p in parts] == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]
    assert calls == [([[[0], [1], [2]], [[3], [4], [5]], [[6]]], [batch_seed(5, k) for k in range(3)])]
    with pytest.raises(UserError, match="batch size must be at least 1"):
        sample_split(engine, rows, SamplingSettings(4), batch_size=0, seed=5, split=False, lockstep=False)

    def short(batches, seeds, settings):
        return []

    with pytest.raises(ValueError, match="one Samples per batch"):
        sample_split(short, rows, SamplingSettings(4), batch_size=3, seed=5, split=False, lockstep=False)


# ------------------------------------------------------------------------------------------------ the held-out KL


def _dense_kl(student, teacher_model, rollout, vocab: int) -> tuple[float, float]:
    """The reference: full (B, T, V) logits of both models, KL_t = sum_v p (log p - log q) at every completion
    position, summed."""
    with torch.no_grad():
        zs = student(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, :-1, :vocab]
        zt = teacher_model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, :-1, :vocab]
        logp, logq = zs.double().log_softmax(-1), zt.double().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    m = rollout.loss_mask
    return float(kl[m].sum()), float(m.sum())


def test_heldout_kl_chunked_equals_unchunked(micro_world):
    cfg = _cfg(micro_world.root)
    tok, student, teacher = _models(micro_world.root)
    from vopd.world.task import read_jsonl

    problems = [r["problem"] for r in read_jsonl(micro_world.test)][:7]
    value = heldout_kl(student, teacher, tok, problems, cfg, len(tok))
    # the same samples, by hand: batches of rollout.batch_size, each seeded from its index
    from vopd.prompts import chat_options, render_prompt

    ids = [render_prompt(tok, p, template=cfg.data.template, chat=chat_options(cfg.data)) for p in problems]
    parts = sample_split(hf_eval_engine(model_inference(student), tok), ids, SamplingSettings(8), batch_size=3,
                         seed=cfg.seed + 12345, split=False, lockstep=False)
    rollouts = [pack(p.prompts, p.samples, tok.pad_token_id) for p in parts]
    dense = [_dense_kl(student, teacher.model, r, len(tok)) for r in rollouts]
    total, count = sum(d[0] for d in dense), sum(d[1] for d in dense)
    assert count > 20 and value == pytest.approx(total / count, rel=1e-5, abs=1e-7)
    for r, (want, tokens) in zip(rollouts, dense):
        for mb, budget in ((1, 0.01), (2, 0.01), (8, 1024)):  # chunks of 8 positions, or all at once
            got, n = rollout_kl_sum(student, teacher, r, vocab_size=len(tok), micro_batch_size=mb,
                                    memory_budget_mb=budget)
            assert n == tokens and got == pytest.approx(want, rel=1e-5, abs=1e-7), (mb, budget)


VOCAB = 32768


def _wide(seed: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float().eval()


def _peak(student, teacher, rows: int, length: int) -> tuple[int, float]:
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, VOCAB, (4,), generator=g).tolist()] for _ in range(rows)]
    completions = [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(rows)]
    rollout = pack(prompts, Samples(completions, [], [True] * rows), 0)
    with LiveTensorBytes() as counter:
        total, n = rollout_kl_sum(student, teacher, rollout, vocab_size=VOCAB, micro_batch_size=rows,
                                  memory_budget_mb=2)
    assert n == rows * length and total > 0
    return counter.peak, total


def test_heldout_kl_memory_does_not_grow_with_rows_times_length_times_vocab():
    from vopd.teacher.local import InProcessTeacher

    student, teacher = _wide(0), InProcessTeacher(_wide(1), VOCAB)
    small, _ = _peak(student, teacher, 2, 16)
    large, _ = _peak(student, teacher, 8, 128)
    dense = 8 * 128 * VOCAB * 4  # one fp32 (B, T, V) tensor of the large case: 128 MiB
    print(f"peak live tensor bytes: 2 x 16 {small / 2**20:.2f} MiB, 8 x 128 {large / 2**20:.2f} MiB "
          f"(one (B, T, V) fp32 tensor: {dense / 2**20:.0f} MiB)")
    # The chunk buffers (a 2 MiB budget) and the (V, D) weight-gradient buffer, not B x T x V; the growth is the
    # hidden states and attention of 1024 positions (a few hundred KiB).
    assert large < dense / 16 and large - small < dense / 64


def test_heldout_kl_refuses_bad_input(micro_world):
    cfg = dataclasses.replace(_cfg(micro_world.root))
    tok, student, teacher = _models(micro_world.root)
    bad = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, batch_size=0))
    with pytest.raises(UserError, match="batch size must be at least 1") as err:
        heldout_kl(student, teacher, tok, ["1 + 1"], bad, len(tok))
    assert "\n" not in str(err.value)


def test_vopd_eval_under_torchrun_equals_one_process(micro_world, tmp_path):
    """`torchrun --nproc_per_node 2 -m vopd eval`: each rank samples and grades its share, rank 0 writes the
    one-process summary and samples (one summary line printed, by rank 0 only); `--engine vllm` under torchrun is
    refused in one line."""
    import json
    import os
    import socket
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    args = ["eval", str(micro_world.student), "--data", str(micro_world.test), "--kind", "math", "--limit", "5",
            "--num-samples", "3", "--temperature", "1.0", "--max-new-tokens", "8", "--batch-size", "3", "--seed", "3",
            "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "vopd", *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "vopd"]
    two = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("Avg@3") == 1, two.stdout
    for name in ("samples.jsonl", "summary.json"):
        a, b = (tmp_path / "one" / name).read_text(), (tmp_path / "two" / name).read_text()
        if name == "summary.json":  # all but the wall-clock seconds
            a, b = ({k: v for k, v in json.loads(x).items() if not k.endswith("_s")} for x in (a, b))
        assert a == b and a, name
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_samples"] == 15
    refused = subprocess.run([*torchrun, *args, "--engine", "vllm"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert refused.returncode != 0 and "vopd eval --engine vllm runs in one process" in refused.stderr
