"""Sharded checkpoints across world sizes, on the CPU (gloo, 2 processes), with real training runs on the micro world:
a checkpoint written by one process resumes on two under FSDP2; one in the old full layout (written file for file
as vopd wrote it before: legacy_checkpoint.py) still resumes, on one process bit for bit and on two; each rank opens
and hashes only its own shard file plus the files every rank reads, so a damaged shard of rank 1 is refused by rank
1 without rank 0 reading it; a full disk on rank 1 ends the save on both ranks with the same line, the previous
checkpoint the newest; 2 ranks killed with SIGKILL in the middle of writing a checkpoint leave the previous one valid,
and the run resumes from it (on one process) to the uninterrupted result. A 2-rank save resumed on 2 and
on 1 (FSDP2 and DDP) is test_distributed.py's.

As there, the rollouts are made identical across world sizes with a deterministic sampler, and starting ranks is most
of the time: the 2-rank work of the first four tests runs once, in one process group (the ``runs`` fixture)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from legacy_checkpoint import write_full_checkpoint
from test_distributed import FixedSampler, _assert_same_run, _free_port, _metrics, _quiet, _weights
from vopd import checkpoint as ckpt
from vopd import checkpoint_sharded as sharded
from vopd.config import TrainConfig, load_config
from vopd.errors import UserError
from vopd.train import Start, make_scheduler, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(micro_world: Any, out: Path) -> list[str]:
    # test_distributed's settings: 8 sequences, 2 micro-batches per rank on two, eps=1 and a clip below the gradient
    # norm, so that equal weights mean equal gradients and sharded clipping runs
    return [f"model.student={micro_world.student}", f"model.teacher={micro_world.teacher}",
            f"data.train={micro_world.train}", f"output_dir={out}", "rollout.max_new_tokens=12", "batch_size=8",
            "micro_batch_size=2", "steps=3", "optim.lr=3e-3", "optim.schedule=cosine", "progress=false",
            "loss.top_k=8", "optim.eps=1.0", "optim.grad_clip=0.001", "loss.method=vopd", "save_every=0",
            "rollout.check_sync=false", "distributed.strategy=fsdp2"]


def _run(overrides: list[str], **kwargs: Any) -> None:
    train(load_config(None, overrides), make_sampler=lambda *_: FixedSampler(), log=_quiet, **kwargs)


def _rewrite_in_full_layout(cfg: TrainConfig) -> None:
    """Replace the run's only checkpoint (sharded) by the same state in the full layout, as vopd wrote it before."""
    from vopd.models import load_student

    [path] = ckpt.list_checkpoints(cfg.output_dir)
    tok, model = load_student(cfg.model, torch.device("cpu"))
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    state = sharded.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
    rng = torch.load(path / "rng.pt", weights_only=True)
    config = yaml.safe_load((path / "config.yaml").read_text())
    shutil.rmtree(path)
    write_full_checkpoint(cfg.output_dir, 1, model=model, tokenizer=tok, optimizer_state=optimizer.state_dict(),
                          scheduler=scheduler, trainer_state=state, config=config, rng=rng)


def _student(seed: int) -> tuple[Any, torch.optim.Optimizer]:
    """A small Qwen3 under FSDP2 on this rank, and its optimizer."""
    import transformers

    from vopd import distributed as dist

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    wrapped = dist.wrap(model, 64, "fsdp2", torch.device("cpu"))
    return wrapped, torch.optim.AdamW(wrapped.trainable(), lr=1e-2)


def _full_disk_on_rank_1(root: Path) -> None:
    """On each of 2 ranks: save step 1, then step 2 with rank 1's disk full partway through its shard file (its DCP
    writer writes a few bytes, then fails with ENOSPC). Writes root/full-R.json: each rank's error, what is left."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_files

    from vopd import distributed as dist

    dist.init(torch.device("cpu"))
    student, optimizer = _student(0)
    save = dict(model=student.model, optimizer=optimizer, trainer_state={"step": 1}, config={"steps": 2},
                keep_last=2)
    sharded.save_checkpoint(root / "run", 1, **save)
    real = dcp_files._write_item

    def write_item(transforms: Any, stream: Any, *args: Any, **kwargs: Any) -> Any:
        stream.write(b"\0" * 16)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if dist.rank() == 1:
        dcp_files._write_item = write_item
    try:
        sharded.save_checkpoint(root / "run", 2, **{**save, "trainer_state": {"step": 2}})
        error = None
    except UserError as exc:
        error = str(exc)
    finally:
        dcp_files._write_item = real
    dist.barrier()
    left = sorted(os.listdir(root / "run" / "checkpoints"))
    (root / f"full-{dist.rank()}.json").write_text(json.dumps({"error": error, "left": left}))


def _shard_reads(root: Path) -> None:
    """On each of 2 ranks: the files it opens while loading a sharded FSDP2 checkpoint, whether the weights came back,
    and what a byte flipped in rank 1's shard file does to a second load. Writes root/rank-R.json."""
    from vopd import distributed as dist
    from vopd.sharding import full_tensor

    dist.init(torch.device("cpu"))
    rank = dist.rank()
    trained, optimizer = _student(0)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    hidden, weight, _ = trained.forward(ids, torch.ones_like(ids))
    (hidden @ weight.T).logsumexp(-1).mean().backward()
    optimizer.step()
    path = sharded.save_checkpoint(root / "run", 1, model=trained.model, optimizer=optimizer,
                                   trainer_state={"step": 1}, config={"steps": 1}, keep_last=1)
    opened: set[str] = set()
    prefix = f"{path}{os.sep}"

    def audit(event: str, args: tuple[Any, ...]) -> None:  # every open() and os.open() of this process
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]).startswith(prefix):
            opened.add(os.fspath(args[0])[len(prefix):])

    sys.addaudithook(audit)
    fresh, fresh_optimizer = _student(1)
    sharded.load_checkpoint(path, model=fresh.model, optimizer=fresh_optimizer)
    pairs = zip(trained.model.parameters(), fresh.model.parameters())
    report: dict[str, Any] = {"opened": sorted(opened),
                              "weights_back": all(torch.equal(full_tensor(a), full_tensor(b)) for a, b in pairs)}
    dist.barrier()
    if rank == 1:
        shard = path / "shards" / "__1_0.distcp"
        blob = bytearray(shard.read_bytes())
        blob[len(blob) // 2] ^= 0xFF  # same size: only its hash can tell
        shard.write_bytes(bytes(blob))
    dist.barrier()
    opened.clear()
    try:
        sharded.load_checkpoint(path, model=fresh.model, optimizer=fresh_optimizer)
        report["damaged"] = None
    except UserError as exc:
        report["damaged"] = str(exc)
    report["opened_damaged"] = sorted(opened)
    (root / f"rank-{rank}.json").write_text(json.dumps(report))


def _jobs(rank: int, world: int, port: int, jobs: list[tuple[str, Any]]) -> None:
    """One rank doing the 2-rank work in turn, in one process group (its start-up is paid once)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from vopd import distributed as dist

    clean = False
    try:
        for kind, arg in jobs:
            if kind == "resume":
                _run(arg, start=Start.resume())
            elif kind == "full":
                _full_disk_on_rank_1(arg)
            else:
                _shard_reads(arg)
        clean = True
    finally:
        dist.shutdown(clean=clean)  # clean: a last barrier, or a gloo thread can abort the exit (see shutdown)


@pytest.fixture(scope="module")
def runs(micro_world, tmp_path_factory) -> Path:
    """The reference (3 uninterrupted steps, one process), and runs stopped after step 1 by one process, then
    resumed: ``one_to_two`` on 2 ranks; ``full_on_one`` and ``full_on_two`` from their checkpoint rewritten in the
    full layout, on 1 and 2. ``reads``: ``_shard_reads``'s reports."""
    root = tmp_path_factory.mktemp("sharded")
    _run(_overrides(micro_world, root / "reference"))
    _run(_overrides(micro_world, root / "one_to_two"), stop_at=1)
    for name in ("full_on_one", "full_on_two"):
        shutil.copytree(root / "one_to_two", root / name)
        _rewrite_in_full_layout(load_config(None, _overrides(micro_world, root / name)))
    jobs = [("resume", _overrides(micro_world, root / name)) for name in ("one_to_two", "full_on_two")]
    (root / "reads").mkdir()
    (root / "full").mkdir()
    multiprocessing.set_forkserver_preload([__name__, "peft", "transformers.models.qwen3.modeling_qwen3"])
    mp.start_processes(_jobs, args=(2, _free_port(), [*jobs, ("reads", root / "reads"), ("full", root / "full")]),
                       nprocs=2, join=True, start_method="forkserver")
    _run(_overrides(micro_world, root / "full_on_one"), start=Start.resume())
    return root


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    _assert_same_run(runs / "reference", runs / "one_to_two")  # final/: streamed from the FSDP2 shards
    first, *later = ckpt.list_checkpoints(runs / "one_to_two")
    assert [json.loads((p / ckpt.MANIFEST).read_text())["world_size"] for p in (first, *later)] == [1, 2]
    manifest = json.loads((later[-1] / ckpt.MANIFEST).read_text())
    assert sorted((e["path"], e["rank"]) for e in manifest["files"] if "rank" in e) == [
        ("shards/__0_0.distcp", 0), ("shards/__1_0.distcp", 1)]
    ckpt.verify_checkpoint(later[-1])


def test_a_checkpoint_in_the_old_full_layout_still_resumes(runs):
    for name in ("full_on_one", "full_on_two"):
        assert (runs / name / "checkpoints" / "step-00000001" / "optimizer.pt").is_file(), name  # the old layout
        assert ckpt.checkpoint_layout(runs / name / "checkpoints" / "step-00000003") == "sharded", name
    _assert_same_run(runs / "reference", runs / "full_on_two")
    # on the process count that wrote it: bit for bit (all but the numbers that time the machine)
    ref, got = _weights(runs / "reference" / "final"), _weights(runs / "full_on_one" / "final")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    machine = ("time_", "tokens_per_s", "peak_memory_mb")
    assert [{k: v for k, v in m.items() if not k.startswith(machine)} for m in _metrics(runs / "full_on_one")] == [
        {k: v for k, v in m.items() if not k.startswith(machine)} for m in _metrics(runs / "reference")]


def test_each_rank_reads_only_its_own_shard_file(runs):
    """Counted with an audit hook on every file a rank opens while loading. The damaged shard is refused by rank 1,
    which reads it; rank 0 never opens it, and both ranks raise the same one-line error before loading anything."""
    shared = ["config.yaml", "manifest.json", "optimizer_scalars.pt", "rng.pt", "shards/.metadata",
              "trainer_state.json"]
    for rank in (0, 1):
        report = json.loads((runs / "reads" / f"rank-{rank}.json").read_text())
        assert report["opened"] == sorted([*shared, f"shards/__{rank}_0.distcp"]), rank
        assert report["weights_back"], rank
        assert report["damaged"] is not None and "file shards/__1_0.distcp: sha256 differs" in report["damaged"]
        assert len(report["damaged"].splitlines()) == 1
    assert "shards/__1_0.distcp" not in json.loads((runs / "reads" / "rank-0.json").read_text())["opened_damaged"]


def test_a_full_disk_on_one_rank_ends_the_save_on_both_in_one_line_and_keeps_the_last_checkpoint(runs):
    ckdir = runs / "full" / "run" / "checkpoints"
    reports = [json.loads((runs / "full" / f"full-{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0] == reports[1], reports  # the same line on both ranks, the same files left
    error = reports[0]["error"]
    assert error is not None and len(error.splitlines()) == 1
    assert error.startswith(f"checkpoint step 2 could not be written to {ckdir} (rank 1: OSError: [Errno 28] No space "
                            "left on device); the partial checkpoint was removed and the last valid checkpoint is "
                            f"{ckdir / 'step-00000001'}: free disk space"), error
    assert reports[0]["left"] == ["step-00000001"]
    ckpt.verify_checkpoint(ckdir / "step-00000001")


KILLED_RANKS = textwrap.dedent("""
    import faulthandler, os, signal, sys, time
    import torch
    import torch.multiprocessing as mp
    from test_distributed import FixedSampler, _free_port, _quiet

    def rank(r, port, overrides):
        os.environ.update({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        torch.set_num_threads(1)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a rank is, if one never gets there
        import vopd.checkpoint_sharded as sharded
        from vopd.config import load_config
        from vopd.train import train
        real_checkpoint, real_torch_save = sharded.save_checkpoint, torch.save
        def save_checkpoint(out, step, **kwargs):  # at step 2 each rank writes one tensor of its shard, then hangs
            if step == 2:
                def save(*args, **kw):
                    real_torch_save(*args, **kw)
                    print("FAULT", r, flush=True)
                    time.sleep(600)
                torch.save = save
            return real_checkpoint(out, step, **kwargs)
        sharded.save_checkpoint = save_checkpoint
        train(load_config(None, overrides), make_sampler=lambda *_: FixedSampler(), log=_quiet)

    if __name__ == "__main__":
        mp.start_processes(rank, args=(_free_port(), sys.argv[1:]), nprocs=2, join=True, start_method="spawn")
""")


def _kill_when_both_write(proc: subprocess.Popen, wait_s: float) -> tuple[set[str], str]:
    """SIGKILL the launcher and both ranks once each rank has said it is writing its shard (or ``wait_s`` after the
    first did: the ranks' stacks are then dumped first, into stderr). (ranks that got there, stderr)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
    faults: set[str] = set()
    deadline = time.monotonic() + 600
    while len(faults) < 2 and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line.startswith("FAULT"):
            faults.add(line.split()[1])
            deadline = min(deadline, time.monotonic() + wait_s)
    if len(faults) == 1:
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    return faults, err


def test_two_ranks_killed_mid_save_leave_the_previous_checkpoint_valid(runs, micro_world, tmp_path):
    import vopd

    out = tmp_path / "run"
    overrides = [*_overrides(micro_world, out), "save_every=1"]
    script = tmp_path / "killed_ranks.py"
    script.write_text(KILLED_RANKS)
    paths = [str(Path(vopd.__file__).resolve().parents[1]), str(Path(__file__).parent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    # its own session, so that one signal reaches the launcher and both ranks
    proc = subprocess.Popen([sys.executable, str(script), *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    faults, err = _kill_when_both_write(proc, wait_s=60)
    assert faults == {"0", "1"}, f"the ranks did not both reach the checkpoint of step 2: {err[-6000:]}"
    first = out / "checkpoints" / "step-00000001"
    assert ckpt.list_checkpoints(out) == [first]
    ckpt.verify_checkpoint(first)  # every file, every hash
    [partial] = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step-00000002")]
    assert not (partial / ckpt.MANIFEST).exists()
    writer = int(partial.name.split(".")[2])  # rank 0's pid names it
    deadline = time.monotonic() + 30
    while ckpt._pid_alive(writer) and time.monotonic() < deadline:  # SIGKILL is delivered, not yet done
        time.sleep(0.1)
    # resumed by one process from step 1 (2 -> 1): the dead writers' directory is swept, the run ends as the reference
    _run(overrides, start=Start.resume())
    assert not partial.exists()
    _assert_same_run(runs / "reference", out)
