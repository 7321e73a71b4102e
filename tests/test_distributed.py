"""Data-parallel training on the CPU (gloo, 2 processes): DDP and FSDP2 give the one-process update on the same
global batch (under FSDP2 the final model is streamed from the shards), and a sharded checkpoint written by 2 ranks
resumes (at 2 ranks or at 1) to the uninterrupted result (more world-size changes: test_sharded_checkpoints.py).

The rollouts must be the same in every run being compared, so these runs use a deterministic sampler: the
completion depends only on the prompt (on one process or two, each prompt gets the same completion). One test runs
the real command line under torchrun with Hugging Face generate, evaluation and gradient checkpointing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from vopd import checkpoint as ckpt
from vopd.checkpoint_sharded import saved_tensors
from vopd.config import load_config
from vopd.sampling import Samples
from vopd.train import Start, train

#: Per-step metrics that must agree between runs (all are global: reduced over ranks).
COMPARE = ("loss", "grad_norm", "kl_estimate", "tokens", "reward_var")


class FixedSampler:
    """Completions (and sampler log-probs) that are a function of the prompt alone."""

    def __call__(self, prompts: list[list[int]]) -> Samples:
        completions, logprobs = [], []
        for p in prompts:
            h = sum(p) * 31 + len(p)
            n = 3 + h % 7
            completions.append([3 + (h * (j + 7) + 11 * j) % 190 for j in range(n)])
            logprobs.append([-1.0 - 0.25 * (j % 3) for j in range(n)])
        return Samples(completions, logprobs, [False] * len(prompts))


def _quiet(_msg: str) -> None:
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], kwargs: dict[str, Any]) -> None:
    """One rank, as torchrun would start it (the same environment variables)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from vopd import distributed as dist

    clean = False
    try:
        train(load_config(None, overrides), make_sampler=lambda *_: FixedSampler(), log=_quiet, **kwargs)
        clean = True
    finally:
        dist.shutdown(clean=clean)  # clean: a last barrier, or a gloo thread can abort the exit (see shutdown)


def _on_main_worker(rank: int, world: int, port: int, errors: Any) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from vopd import distributed as dist
    from vopd.errors import UserError

    dist.init(torch.device("cpu"), timeout_min=1)
    try:
        assert dist.on_main(lambda: f"written by rank {dist.rank()}") == "written by rank 0"

        def disk_full() -> None:
            raise UserError("disk full while writing the checkpoint")

        try:
            dist.on_main(disk_full)
        except UserError as exc:
            errors.put((rank, str(exc)))
        dist.shutdown(clean=True)
    finally:
        dist.shutdown()


def test_a_rank0_failure_reaches_every_rank():
    """Rank 0 alone writes files; when that fails, the other ranks must raise too, not wait forever."""
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_on_main_worker, args=(2, _free_port(), errors), nprocs=2, join=True, start_method="spawn")
    got = sorted(errors.get() for _ in range(2))
    assert got == [(0, "disk full while writing the checkpoint"), (1, "disk full while writing the checkpoint")]


def _two_ranks(overrides: list[str], **kwargs: Any) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), overrides, kwargs), nprocs=2, join=True,
                       start_method="spawn")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = _weights(a_dir / "final"), _weights(b_dir / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ma, mb = _metrics(a_dir), _metrics(b_dir)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in COMPARE:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


@pytest.fixture
def dist_overrides(train_overrides):
    # 8 sequences: 4 micro-batches in one process, 2 per rank on two (so DDP's no_sync path runs). eps=1 makes
    # Adam's update ~ lr * g, so equal weights mean equal gradients; the clip threshold sits below the gradient
    # norm, so clipping (of sharded gradients, under FSDP2) is part of every step.
    return train_overrides + ["batch_size=8", "micro_batch_size=2", "optim.eps=1.0", "optim.grad_clip=0.001",
                              "loss.method=vopd", "save_every=0",
                              "rollout.check_sync=false"]  # FixedSampler's log-probs are not the student's


LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj,down_proj]"]


@pytest.mark.parametrize("strategy,extra", [("ddp", []), ("fsdp2", []), ("fsdp2", LORA)], ids=["ddp", "fsdp2",
                                                                                              "fsdp2-lora"])
def test_two_ranks_equal_one_process(strategy, extra, dist_overrides, tmp_path):
    base = dist_overrides + ["steps=2", f"distributed.strategy={strategy}", *extra]
    train(load_config(None, base + [f"output_dir={tmp_path / 'one'}"]), make_sampler=lambda *_: FixedSampler(), log=_quiet)
    _two_ranks(base + [f"output_dir={tmp_path / 'two'}"])
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert _metrics(tmp_path / "two")[0]["grad_norm"] > 0.001  # the clip was active
    state = json.loads((ckpt.list_checkpoints(tmp_path / "two")[-1] / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2


# ddp under -m slow (suite time): the 2-rank resume stays for fsdp2, the harder (sharded) checkpoint.
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp2"])
def test_two_rank_checkpoint_resumes_to_the_uninterrupted_run(strategy, dist_overrides, tmp_path):
    base = dist_overrides + ["steps=3", "optim.schedule=cosine", f"distributed.strategy={strategy}"]
    train(load_config(None, base + [f"output_dir={tmp_path / 'ref'}"]), make_sampler=lambda *_: FixedSampler(), log=_quiet)
    split = base + [f"output_dir={tmp_path / 'split'}"]
    _two_ranks(split, stop_at=1)
    saved = ckpt.list_checkpoints(tmp_path / "split")
    assert [p.name for p in saved] == ["step-00000001"] and not (tmp_path / "split" / "final").exists()
    ckpt.verify_checkpoint(saved[0])
    # Sharded: each rank wrote (and hashed) a file of its own. Under FSDP2 every weight and moment is in 2 chunks,
    # one per rank's file; under DDP each whole tensor was written once, by one of the ranks.
    from torch.distributed.checkpoint import FileSystemReader

    manifest = json.loads((saved[0] / ckpt.MANIFEST).read_text())
    assert manifest["world_size"] == 2 and sorted(e["rank"] for e in manifest["files"] if "rank" in e) == [0, 1]
    tensors = FileSystemReader(saved[0] / "shards").read_metadata().state_dict_metadata
    weights = {k.removeprefix("model.") for k in tensors if k.startswith("model.")}
    assert weights == set(load_file(str(tmp_path / "ref" / "final" / "model.safetensors")))
    assert {k for k in tensors if k.startswith("optim.")} == {
        f"optim.state.{w}.{moment}" for w in weights for moment in ("exp_avg", "exp_avg_sq")}
    assert {len(m.chunks) for m in tensors.values()} == ({2} if strategy == "fsdp2" else {1})
    # The same checkpoint resumed by one process (a world-size change) ...
    shutil.copytree(tmp_path / "split", tmp_path / "single")
    train(load_config(None, base + [f"output_dir={tmp_path / 'single'}"]), start=Start.resume(), make_sampler=lambda *_: FixedSampler(),
          log=_quiet)
    # ... and by two ranks, as it was written.
    _two_ranks(split, start=Start.resume())
    _assert_same_run(tmp_path / "ref", tmp_path / "split")
    _assert_same_run(tmp_path / "ref", tmp_path / "single")


def test_torchrun_command_line_fsdp2(micro_world, train_overrides, tmp_path):
    """The real entry point: torchrun -m vopd train, with generate on the unsharded copy, gradient checkpointing,
    evaluation split over both ranks (in step: the student is sharded), a checkpoint and the final export; one
    summary line."""
    out = tmp_path / "run"
    overrides = [o for o in train_overrides if not o.startswith("output_dir=")] + [
        f"output_dir={out}", "steps=2", "distributed.strategy=fsdp2", "model.gradient_checkpointing=true",
        f"data.eval={micro_world.test}", "eval.limit=2", "eval.max_new_tokens=6", "loss.method=vopd-topk"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "vopd", "train", *overrides],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 2 steps") == 1, proc.stdout
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2] and "eval_kl" in lines[-1] and "eval_avg_at_n" in lines[-1]
    # generate ran on the unsharded copy; at step 2 it must hold the weights the sharded student was updated to
    assert all(m["logprob_diff_max"] < 1e-4 for m in lines)
    ckpt.verify_checkpoint(ckpt.list_checkpoints(out)[-1])
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_teachers_routed_on_two_ranks_equal_one_process(strategy, dist_overrides, micro_world, tmp_path):
    """Routing by a data field under DDP/FSDP2: ranks hold different mixes of the two teachers' rows (and so
    different teacher parts per micro-batch), yet the update and the per-teacher metrics are one process's."""
    from vopd.world.task import read_jsonl

    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**r, "domain": "arith" if i % 3 else "other"}) + "\n"
                              for i, r in enumerate(read_jsonl(micro_world.train))))
    base = [o for o in dist_overrides if not o.startswith(("model.teacher=", "data.train="))] + [
        f"model.teachers={{arith: {micro_world.teacher}, other: {micro_world.student}}}", "data.teacher_field=domain",
        f"data.train={routed}", "steps=2", f"distributed.strategy={strategy}"]
    train(load_config(None, base + [f"output_dir={tmp_path / 'one'}"]), make_sampler=lambda *_: FixedSampler(),
          log=_quiet)
    _two_ranks(base + [f"output_dir={tmp_path / 'two'}"])
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two")):
        for key in ("teacher/arith/tokens_frac", "teacher/other/kl_estimate", "teacher/arith/advantage_var"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key


def _runs_worker(rank: int, world: int, port: int, runs: list[list[str]]) -> None:
    """One rank that trains several runs in turn in one process group (the ranks' start-up is paid once)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from vopd import distributed as dist

    clean = False
    try:
        for overrides in runs:
            train(load_config(None, overrides), make_sampler=lambda *_: FixedSampler(), log=_quiet)
        clean = True
    finally:
        dist.shutdown(clean=clean)


def test_teacher_self_on_two_ranks(dist_overrides, micro_world, tmp_path):
    """``model.teacher=self`` under DDP, as a frozen copy of the student and (LoRA) as the student's base with its
    adapters off: with the student's prompts the teacher is the student at step 0 (KL = 0, no gradient); with a
    prompt of its own (the reference solution) the student moves, and 2 ranks give one process's run."""
    # The micro world's SFT'd teacher as the student: its predictions depend on the prompt.
    base = [o for o in dist_overrides if not o.startswith(("model.teacher=", "model.student="))] + [
        f"model.student={micro_world.teacher}", "model.teacher=self", "distributed.strategy=ddp"]
    variants = {"copy": base, "lora": base + LORA}
    two_ranks = []
    for name, overrides in variants.items():
        hinted = overrides + ["steps=2", "data.teacher_prompt_field=solution"]
        train(load_config(None, hinted + [f"output_dir={tmp_path / name / 'one'}"]),
              make_sampler=lambda *_: FixedSampler(), log=_quiet)
        two_ranks += [overrides + ["steps=1", f"output_dir={tmp_path / name / 'same'}"],
                      hinted + [f"output_dir={tmp_path / name / 'two'}"]]
    # Starting ranks is most of the time: all four 2-rank runs share one start, and the ranks are forked from a fresh
    # (single-threaded, so fork-safe) server process that imported what a run needs once (spawned ranks each import
    # it, ~30 s on a shared 2-core machine).
    multiprocessing.set_forkserver_preload([__name__, "peft", "transformers.models.qwen3.modeling_qwen3"])
    mp.start_processes(_runs_worker, args=(2, _free_port(), two_ranks), nprocs=2, join=True,
                       start_method="forkserver")
    for name in variants:
        first = _metrics(tmp_path / name / "same")[0]
        assert first["kl_mean"] < 1e-6 and abs(first["kl_estimate"]) < 1e-6 and first["grad_norm"] < 1e-6, name
        _assert_same_run(tmp_path / name / "one", tmp_path / name / "two")
        moved = _metrics(tmp_path / name / "two")
        assert all(m["kl_mean"] > 1e-3 for m in moved) and moved[0]["grad_norm"] > 1e-3, name
        state = json.loads((ckpt.list_checkpoints(tmp_path / name / "two")[-1] / "trainer_state.json").read_text())
        assert state["world_size"] == 2, name


def _step_delta(run: Path, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update of the first step: the checkpointed (float32 master) weights minus the student's initial ones."""
    masters = saved_tensors(ckpt.list_checkpoints(run)[-1])
    assert all(w.dtype == torch.float32 for w in masters.values())
    return {k: masters[k] - start[k].float() for k in start}


def test_two_ranks_at_bf16_compute_equal_one_process(dist_overrides, micro_world, tmp_path):
    """bf16 compute over float32 masters: one step under DDP and under FSDP2 on two ranks is the one-process step.

    With Adam's eps=1 far above |g| and no clipping, the step is lr * g/(|g| + 1) ~ lr * g: the update measures the
    gradient itself (lr=10 makes it ~1e6 float32 steps of a typical weight, so the weights resolve it). DDP runs the
    one-process computation (autocast over the float32 masters) on the same micro-batches; only the float32 sums
    over micro-batches and ranks are ordered differently, so its update matches to float32 rounding (measured 2e-8).
    FSDP2 computes in bf16 throughout (MixedPrecisionPolicy casts the parameters, so norms and the residual stream
    are bf16 too, where autocast keeps them float32): each op rounds to bf16 (relative error up to 2^-9 ~ 0.2%), and
    the gradient passes a few dozen such ops, so its update differs by a few tenths of a percent (measured 0.5%).
    2% leaves room for that and is far below a reduction error (a sum instead of a mean over ranks is 100%, a rank's
    micro-batches lost 50%). That FSDP2 computes in bf16 and reduces in float32 is test_master_weights' check."""
    base = dist_overrides + ["steps=1", "model.dtype=bfloat16", "optim.lr=10", "optim.grad_clip=0"]
    train(load_config(None, base + [f"output_dir={tmp_path / 'one'}"]), make_sampler=lambda *_: FixedSampler(),
          log=_quiet)
    runs = [base + [f"distributed.strategy={s}", f"output_dir={tmp_path / s}"] for s in ("ddp", "fsdp2")]
    multiprocessing.set_forkserver_preload([__name__, "transformers.models.qwen3.modeling_qwen3"])
    mp.start_processes(_runs_worker, args=(2, _free_port(), runs), nprocs=2, join=True, start_method="forkserver")
    start = load_file(str(micro_world.student / "model.safetensors"))
    one = _step_delta(tmp_path / "one", start)
    for strategy, tol in (("ddp", 1e-6), ("fsdp2", 2e-2)):
        delta = _step_delta(tmp_path / strategy, start)
        error = sum(float((delta[k] - one[k]).norm() ** 2) for k in one) ** 0.5
        size = sum(float(one[k].norm() ** 2) for k in one) ** 0.5
        assert 0 < size and error <= tol * size, (strategy, error / size)
        assert _weights(tmp_path / strategy / "final")[next(iter(start))].dtype == torch.bfloat16
        (x,), (y,) = _metrics(tmp_path / "one"), _metrics(tmp_path / strategy)
        for key in ("loss", "grad_norm", "kl_estimate"):
            assert y[key] == pytest.approx(x[key], rel=tol, abs=1e-7), (strategy, key)
        state = json.loads((ckpt.list_checkpoints(tmp_path / strategy)[-1] / "trainer_state.json").read_text())
        assert state["world_size"] == 2, strategy


def test_packed_token_budget_on_two_ranks_equals_one_process_padded(dist_overrides, micro_world, tmp_path):
    """Tokens, not rows, under DDP, FSDP2 and FSDP2 with LoRA on two ranks: the step's sequences rebalanced over the
    ranks by tokens, micro-batches by a token budget (as many on each rank), each packed into one row; the run
    equals one process's with padded micro-batches of rows (weights and global metrics), and nothing is padding.
    Two routed teachers on two ranks match one process too."""
    from vopd.world.task import read_jsonl

    packed = ["packing=true", "micro_batch_tokens=160"]
    base = dist_overrides + ["steps=2", "save_every=1"]
    train(load_config(None, base + [f"output_dir={tmp_path / 'one'}"]), make_sampler=lambda *_: FixedSampler(),
          log=_quiet)
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**r, "domain": "arith" if i % 3 else "other"}) + "\n"
                              for i, r in enumerate(read_jsonl(micro_world.train))))
    two_teachers = [o for o in base if not o.startswith(("model.teacher=", "data.train="))] + [
        f"model.teachers={{arith: {micro_world.teacher}, other: {micro_world.student}}}", "data.teacher_field=domain",
        f"data.train={routed}"]
    train(load_config(None, two_teachers + [f"output_dir={tmp_path / 'routed-one'}"]),
          make_sampler=lambda *_: FixedSampler(), log=_quiet)
    train(load_config(None, base + LORA + [f"output_dir={tmp_path / 'lora-one'}"]),
          make_sampler=lambda *_: FixedSampler(), log=_quiet)
    variants = {"ddp": ["distributed.strategy=ddp"], "fsdp2": ["distributed.strategy=fsdp2"]}
    runs = [base + packed + extra + [f"output_dir={tmp_path / name}"] for name, extra in variants.items()]
    runs.append(two_teachers + packed + ["distributed.strategy=ddp", f"output_dir={tmp_path / 'routed-two'}"])
    runs.append(base + LORA + packed + ["distributed.strategy=fsdp2", f"output_dir={tmp_path / 'lora-two'}"])
    multiprocessing.set_forkserver_preload([__name__, "transformers.models.qwen3.modeling_qwen3"])
    mp.start_processes(_runs_worker, args=(2, _free_port(), runs), nprocs=2, join=True, start_method="forkserver")
    for name in variants:
        _assert_same_run(tmp_path / "one", tmp_path / name)
        lines = _metrics(tmp_path / name)
        assert all(m["pad_fraction"] == 0.0 and m["micro_batches"] >= 2 for m in lines), name
    _assert_same_run(tmp_path / "routed-one", tmp_path / "routed-two")
    _assert_same_run(tmp_path / "lora-one", tmp_path / "lora-two")
    padded = _metrics(tmp_path / "one")
    assert all(m["pad_fraction"] > 0.0 for m in padded)
