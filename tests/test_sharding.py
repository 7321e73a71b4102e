"""FSDP2 sharding on the CPU (gloo, 2 processes): a sharded in-process teacher scores as the whole one and holds half
of its weights per rank; the sharded student generates and evaluates on every rank in step without any unsharded copy
on the device; training with a sharded teacher (routed rows included, where a rank has none of a teacher's rows),
under DDP with an offloaded teacher, and a sharded LoRA checkpoint resumed under FSDP2 all give the one-process
run.

Scores and samples are compared bit for bit: FSDP2's all-gather copies the weights exactly, and each rank's forward is
then the same computation on the same shapes as the unsharded model's in the same process. Whole runs are compared
with test_distributed's tolerance (1e-5 relative), which covers the different order of float32 sums over ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from test_distributed import (LORA, FixedSampler, _assert_same_run, _free_port, _metrics, _quiet, _two_ranks,
                              dist_overrides)
from vopd.checkpoint_sharded import saved_tensors
from vopd.config import load_config
from vopd.train import Start, train


def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)


def _spawn(worker: Any, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, port, queue, *args)`` on 2 ranks; what each rank put in the queue, by rank."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(2, _free_port(), queue, *args), nprocs=2, join=True, start_method="spawn")
    got = dict(queue.get() for _ in range(2))
    return [got[0], got[1]]


def _teacher(path: Path, vocab: int) -> Any:
    from vopd.models import load_model
    from vopd.teacher.local import InProcessTeacher

    return InProcessTeacher(load_model(str(path), role="teacher", dtype=torch.float32, device=torch.device("cpu")),
                            vocab)


def _teacher_worker(rank: int, world: int, port: int, queue: Any, root: str, offload: bool) -> None:
    _rank_env(rank, world, port)
    from conftest import fake_rollout

    from vopd import distributed as dist
    from vopd.models import load_tokenizer
    from vopd.sharding import local_numel
    from vopd.teacher.routing import Teachers

    dist.init(torch.device("cpu"), timeout_min=2)
    try:
        teacher_dir = Path(root) / "teacher"
        tok = load_tokenizer(str(teacher_dir))
        whole, sharded = _teacher(teacher_dir, len(tok)), _teacher(teacher_dir, len(tok))
        total = sum(p.numel() for p in whole.model.parameters())
        sharded.shard(torch.device("cpu"), offload=offload)
        local = local_numel(sharded.model)
        rollout = fake_rollout(tok).select(2 * rank, 2 * rank + 3 + rank)  # other rows, another count per rank
        got, want = sharded.score(rollout), whole.score(rollout)
        same = torch.equal(got.hidden, want.hidden) and torch.equal(got.weight, want.weight)
        # Routed rows: rank 1 has none of teacher b's, yet it must join b's forward (an idle part).
        other = _teacher(teacher_dir, len(tok))
        other.shard(torch.device("cpu"))
        teachers = Teachers({"a": sharded, "b": other}, routed=True)
        routes = ["a", "b", "a"] if rank == 0 else ["a", "a", "a"]
        mb = dataclasses.replace(fake_rollout(tok).select(0, 3), routes=routes)
        parts = teachers.parts(mb)
        for part in parts:  # what vopd.step does before the student's forward
            part.teacher.score(part.of(mb))
        summed = int(dist.all_reduce_sum(torch.tensor(local)))
        queue.put((rank, {"same": same, "local": local, "total": total, "summed": summed,
                          "idle": [p.name for p in parts if p.idle]}))
        dist.shutdown(clean=True)  # a last barrier, or a gloo thread can abort the exit (see shutdown)
    finally:
        dist.shutdown()


@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offload"])
def test_a_sharded_teacher_scores_as_the_whole_one_with_half_its_weights(micro_world, offload):
    ranks = _spawn(_teacher_worker, str(micro_world.root), offload)
    for rank, r in enumerate(ranks):
        assert r["same"], rank  # hidden states and output layer, bit for bit
        assert r["summed"] == r["total"]  # the shards add up to the teacher, nothing held twice
        assert r["local"] <= 0.55 * r["total"], (rank, r["local"], r["total"])  # ~1/2 each (dim-0 chunks round up)
    assert ranks[0]["idle"] == [] and ranks[1]["idle"] == ["b"]


def _student_worker(rank: int, world: int, port: int, queue: Any, root: str) -> None:
    _rank_env(rank, world, port)
    from vopd import distributed as dist
    from vopd.heldout import rollout_kl
    from vopd.models import load_model, load_tokenizer
    from vopd.rollout import hf_sampler, pack
    from vopd.sharding import local_numel

    dist.init(torch.device("cpu"), timeout_min=2)
    try:
        student_dir, teacher_dir = Path(root) / "student", Path(root) / "teacher"
        tok = load_tokenizer(str(student_dir))
        ref = load_model(str(student_dir), role="student", dtype=torch.float32, device=torch.device("cpu"))
        model = load_model(str(student_dir), role="student", dtype=torch.float32, device=torch.device("cpu"))
        student = dist.wrap(model, len(tok), "fsdp2", torch.device("cpu"))
        total = sum(p.numel() for p in ref.parameters())
        # Different prompts and lengths per rank: one rank's rows stop long before the other's, and it must keep
        # joining the other's forwards (synced generation).
        texts = ["1 + 2 =", "What is 7 + 5?"] if rank == 0 else ["12 - 4 + 9 =", "3"]
        prompts = [tok(t)["input_ids"] for t in texts]
        new_tokens = 3 if rank == 0 else 11
        results = {}
        for name, sample in (("sharded", student.inferring(hf_sampler(model, tok, max_new_tokens=new_tokens,
                                                                      temperature=1.0, top_p=1.0, top_k=0,
                                                                      batch_size=8, synced=True))),
                             ("whole", hf_sampler(ref, tok, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                                  top_k=0, batch_size=8))):
            torch.manual_seed(7)
            results[name] = sample(prompts)
        # The exact held-out KL as evaluation computes it, on the sharded student and a sharded teacher, in step.
        rollout = pack(prompts, results["whole"], tok.pad_token_id)
        teacher, sharded_teacher = _teacher(teacher_dir, len(tok)), _teacher(teacher_dir, len(tok))
        sharded_teacher.shard(torch.device("cpu"))
        with student.inference() as live:
            kl_sharded, _ = rollout_kl(live, sharded_teacher, rollout, vocab_size=len(tok), micro_batch_size=1)
        kl_whole, _ = rollout_kl(ref, teacher, rollout, vocab_size=len(tok), micro_batch_size=1)
        # Files come from a host copy on rank 0, gathered one parameter at a time; the other rank gets nothing.
        with student.unsharded() as copy:
            same_copy = copy is None if rank else all(
                torch.equal(a, b) for a, b in zip(copy.state_dict().values(), ref.state_dict().values()))
        queue.put((rank, {"samples": results["sharded"] == results["whole"], "kl": (kl_sharded, kl_whole),
                          "lengths": [len(c) for c in results["whole"].completions], "copy": same_copy,
                          "local": local_numel(model), "total": total}))
        dist.shutdown(clean=True)
    finally:
        dist.shutdown()


def test_the_sharded_student_samples_and_evaluates_in_step_without_a_whole_copy(micro_world):
    ranks = _spawn(_student_worker, str(micro_world.root))
    for rank, r in enumerate(ranks):
        assert r["samples"], rank  # tokens and sampler log-probs of the whole model, bit for bit
        assert r["kl"][0] == r["kl"][1] and r["kl"][0] > 0, (rank, r["kl"])
        assert r["copy"], rank
        assert r["local"] <= 0.55 * r["total"], (rank, r["local"], r["total"])  # no whole student on the device
    assert max(ranks[0]["lengths"]) < max(ranks[1]["lengths"])  # the ranks ran different numbers of decode steps


def _teachers_list(overrides: list[str], entries: list[dict[str, Any]]) -> list[str]:
    kept = [o for o in overrides if not o.startswith("model.teacher=")]
    return kept + [f"model.teachers={json.dumps(entries)}"]


def test_ddp_with_an_offloaded_sharded_teacher_equals_one_process(dist_overrides, micro_world, tmp_path):
    """``shard: always`` shards the teacher under DDP too, ``offload`` keeps its shards in host memory; the run is
    one process's (where nothing is sharded: offload needs a sharded teacher, so one process runs without it)."""
    entry = {"name": "teacher", "model": str(micro_world.teacher), "shard": "always"}
    base = dist_overrides + ["steps=2", "distributed.strategy=ddp"]
    train(load_config(None, _teachers_list(base, [entry]) + [f"output_dir={tmp_path / 'one'}"]),
          make_sampler=lambda *_: FixedSampler(), log=_quiet)
    _two_ranks(_teachers_list(base, [{**entry, "offload": True}]) + [f"output_dir={tmp_path / 'two'}"])
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_routed_sharded_teachers_when_a_rank_lacks_a_teachers_rows(dist_overrides, micro_world, tmp_path):
    """FSDP2 shards both in-process teachers (``shard: auto``); rank 1's rows all go to one teacher, so for every
    micro-batch it joins the other's forward on a placeholder row. The update is one process's."""
    from vopd.world.task import read_jsonl

    routed = tmp_path / "routed.jsonl"
    rows = read_jsonl(micro_world.train)[:16]
    # unshuffled, 8 a step: rank 0 takes rows 0-3 and 8-11 (both teachers), rank 1 rows 4-7 and 12-15 (arith only)
    routed.write_text("".join(json.dumps({**r, "domain": "other" if i % 8 < 4 and i % 2 else "arith"}) + "\n"
                              for i, r in enumerate(rows)))
    base = [o for o in dist_overrides if not o.startswith("data.train=")] + [
        f"data.train={routed}", "data.shuffle=false", "data.teacher_field=domain", "steps=2",
        "distributed.strategy=fsdp2"]
    base = _teachers_list(base, [{"name": "arith", "model": str(micro_world.teacher)},
                                 {"name": "other", "model": str(micro_world.student)}])
    train(load_config(None, base + [f"output_dir={tmp_path / 'one'}"]), make_sampler=lambda *_: FixedSampler(),
          log=_quiet)
    _two_ranks(base + [f"output_dir={tmp_path / 'two'}", "distributed.timeout_min=3"])
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two")):
        assert 0 < y["teacher/other/tokens_frac"] == pytest.approx(x["teacher/other/tokens_frac"], rel=1e-6)


def test_a_lora_checkpoint_under_fsdp2_resumes_to_the_uninterrupted_run(dist_overrides, tmp_path):
    """The checkpoint holds the adapters alone, each rank's shards of them in its own file; on resume each rank
    loads its shards back. 2 ranks stop after step 1 and resume to step 3, as one uninterrupted process."""
    base = dist_overrides + ["steps=3", "distributed.strategy=fsdp2", *LORA]
    train(load_config(None, base + [f"output_dir={tmp_path / 'ref'}"]), make_sampler=lambda *_: FixedSampler(),
          log=_quiet)
    split = base + [f"output_dir={tmp_path / 'split'}"]
    _two_ranks(split, stop_at=1)
    saved = saved_tensors(tmp_path / "split" / "checkpoints" / "step-00000001")
    assert saved and all("lora_" in k for k in saved)
    _two_ranks(split, start=Start.resume())
    _assert_same_run(tmp_path / "ref", tmp_path / "split")


def test_shard_and_offload_rules(train_overrides, micro_world, tmp_path):
    from vopd.errors import UserError

    base = ["model.student=/s", "data.train=/d.jsonl"]
    for entry, message in [
        ("{model: 'http://h:1', shard: always}", r"model.teachers\[0\].shard=always is for a teacher loaded in this"),
        ("{model: 'http://h:1', offload: true}", r"model.teachers\[0\].offload=true is for a teacher loaded in this"),
        ("{model: /t, offload: true, shard: never}", r"offload=true keeps a sharded teacher's shards .*shard=never:"),
        ("{model: /t, shard: true}", r"model.teachers\[0\].shard"),  # YAML's true is not one of the words
    ]:
        with pytest.raises(UserError, match=message):
            load_config(None, [*base, f"model.teachers=[{entry}]"])
    # Rules that need the run: nothing to offload in one process; `self` with LoRA has no weights of its own.
    kept = [o for o in train_overrides if not o.startswith(("model.teacher=", "output_dir="))]
    for entry, extra, message in [
        ({"model": str(micro_world.teacher), "offload": True}, [], r"offload=true keeps a sharded teacher's shards in "
         r"host memory, but this teacher is not sharded in one process"),
        ({"model": "self", "shard": "always"}, LORA, r"shard=always: model.teacher=self with LoRA"),
    ]:
        cfg = load_config(None, _teachers_list(kept, [entry]) + extra + [f"output_dir={tmp_path / 'run'}"])
        with pytest.raises(UserError, match=message) as err:
            train(cfg, log=_quiet)
        assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
