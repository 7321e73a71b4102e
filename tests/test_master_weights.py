"""Mixed precision with float32 master weights (``model.master_dtype``, ``vopd.precision``) on the micro world, on
the CPU, where autocast runs bfloat16: small updates survive bf16 compute over float32 masters as they do in float32
and are rounded away by pure bf16 training; checkpoints hold the masters and resume exactly; ``final/`` is bf16;
LoRA adapters are float32 over a bf16 base; FSDP2's policy computes in bf16 and reduces in float32. The two-rank
DDP/FSDP2 runs at bf16 compute are in test_distributed (``test_two_ranks_at_bf16_compute_equal_one_process``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd import checkpoint as ckpt
from vopd.checkpoint_sharded import saved_tensors
from vopd.config import load_config
from vopd.errors import UserError
from vopd.precision import Precision, resolve_precision
from vopd.train import Start, train

pytestmark = pytest.mark.usefixtures("one_thread")

#: Six steps at a small learning rate (scale.md's measurement on the tiny world used these): an Adam step of ~3e-5
#: is below half a bf16 step for most of the micro student's weights (|w| > ~0.015).
SMALL_STEPS = ["steps=6", "optim.lr=3e-5", "loss.method=vopd", "save_every=0"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _moved_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The share of weights that differ, compared in bf16 (the dtype ``final/`` holds at bf16 compute)."""
    moved = sum(int((after[k].to(torch.bfloat16) != w.to(torch.bfloat16)).sum()) for k, w in before.items())
    return moved / sum(w.numel() for w in before.values())


def test_small_updates_survive_bf16_compute_over_float32_masters(micro_world, train_overrides, tmp_path):
    runs = {"fp32": ["model.dtype=float32"], "masters": ["model.dtype=bfloat16"],
            "pure": ["model.dtype=bfloat16", "model.master_dtype=bfloat16"]}
    logs: dict[str, list[str]] = {name: [] for name in runs}
    start = _weights(micro_world.student)
    share = {}
    for name, extra in runs.items():
        cfg = load_config(None, train_overrides + SMALL_STEPS + extra + [f"output_dir={tmp_path / name}"])
        result = train(cfg, log=logs[name].append)
        share[name] = _moved_share(start, _weights(result.output_dir / "final"))
        lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        assert result.skipped_steps == 0 and all(m["update_ratio"] > 0 for m in lines), name
    # fp32 moved ~61% of the weights, bf16 over float32 masters the same, pure bf16 ~26%
    assert abs(share["masters"] - share["fp32"]) <= 0.2 * share["fp32"], share
    assert share["pure"] < 0.6 * share["fp32"], share
    warned = [line for line in logs["pure"] if "master_dtype" in line]
    assert len(warned) == 1 and warned[0].startswith("warning:") and "rounded away" in warned[0]
    assert not any("master_dtype" in line for line in logs["masters"] + logs["fp32"])


def _optimizer_dtypes(checkpoint: Path) -> set[torch.dtype]:
    state = saved_tensors(checkpoint, "optim")
    return {v.dtype for k, v in state.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}


def test_bf16_compute_checkpoints_hold_the_masters_resume_exactly_and_export_bf16(train_overrides, tmp_path):
    base = train_overrides + ["model.dtype=bfloat16", "steps=3", "optim.schedule=cosine", "save_every=0"]
    full = train(load_config(None, base + [f"output_dir={tmp_path / 'full'}"]), log=lambda _m: None)
    cfg = load_config(None, base + [f"output_dir={tmp_path / 'split'}"])
    train(cfg, stop_at=1, log=lambda _m: None)
    (saved,) = ckpt.list_checkpoints(tmp_path / "split")
    masters = saved_tensors(saved)
    assert {w.dtype for w in masters.values()} == {torch.float32} and _optimizer_dtypes(saved) == {torch.float32}
    # the masters hold what bf16 cannot: some weight lies between two bf16 values
    assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in masters.values())
    second = train(cfg, start=Start.resume(), log=lambda _m: None)
    for run in (full, second):
        final = run.output_dir / "final"
        assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
        assert {w.dtype for w in _weights(final).values()} == {torch.bfloat16}
    a, b = _weights(full.output_dir / "final"), _weights(second.output_dir / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (saved_tensors(ckpt.list_checkpoints(r.output_dir)[-1]) for r in (full, second))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # the masters too, bit for bit
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["logprob_diff_mean"] < 5e-2 for m in lines)  # generate ran in bf16 too: the sync check passed


LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]", "steps=1"]


@pytest.mark.parametrize("master,adapters", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_lora_adapters_are_the_masters_over_a_bf16_base(master, adapters, train_overrides, tmp_path):
    cfg = load_config(None, train_overrides + LORA + ["model.dtype=bfloat16", f"model.master_dtype={master}"])
    result = train(cfg, log=lambda _m: None)
    assert result.final_checkpoint is not None
    saved = saved_tensors(result.final_checkpoint)  # the trainable weights: the adapters
    assert saved and all("lora_" in k for k in saved) and {w.dtype for w in saved.values()} == {adapters}
    assert _optimizer_dtypes(result.final_checkpoint) == {adapters}
    assert {w.dtype for w in _weights(result.output_dir / "final").values()} == {torch.bfloat16}  # merged, bf16


def test_master_dtype_rules(train_overrides):
    with pytest.raises(UserError, match="model.master_dtype='bfloat16' is invalid"):
        load_config(None, train_overrides + ["model.dtype=float32", "model.master_dtype=bfloat16"])
    # model.dtype=auto is float32 on the CPU: half masters under float32 compute are refused once the device is known
    cfg = load_config(None, train_overrides + ["model.master_dtype=bfloat16"])
    with pytest.raises(UserError, match="needs model.dtype=bfloat16"):
        resolve_precision(cfg.model, lora=False, device=torch.device("cpu"))
    fp32 = resolve_precision(load_config(None, train_overrides).model, lora=False, device=torch.device("cpu"))
    from torch.distributed.fsdp import MixedPrecisionPolicy

    assert fp32 == Precision.native(torch.float32) and fp32.autocast is None
    assert fp32.fsdp_policy() == MixedPrecisionPolicy()  # FSDP2's default: no cast
    assert fp32.warning() is None


def test_fsdp2_computes_in_bf16_and_reduces_in_float32(micro_world, tmp_path):
    """One rank of FSDP2 in this process: the sharded float32 student's forward gives the head bf16 hidden states
    and a bf16 output weight (MixedPrecisionPolicy's param_dtype), its gradients land on the float32 shards, and the
    policy reduces in float32."""
    import torch.distributed as tdist

    from vopd.distributed import StudentForward
    from vopd.sharding import shard_student
    from vopd.models import load_model

    precision = Precision(torch.bfloat16, torch.float32)
    policy = precision.fsdp_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = load_model(str(micro_world.student), role="student", dtype=precision.load, device=torch.device("cpu"))
        trunk = StudentForward(model, vocab_size=model.config.vocab_size)
        shard_student(model, trunk, torch.device("cpu"), precision)
        ids = torch.tensor([[5, 6, 7, 8]])
        hidden, weight, _ = trunk(ids, torch.ones_like(ids))
        assert hidden.dtype == weight.dtype == torch.bfloat16
        (hidden.float().square().sum() + weight.float().square().sum()).backward()
        params = list(model.parameters())
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    finally:
        tdist.destroy_process_group()


def test_a_self_teacher_copy_is_made_in_the_compute_dtype(micro_world):
    from vopd.models import load_model
    from vopd.teacher.base import SELF, open_teacher
    from vopd.teacher_config import TeacherConfig

    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=torch.device("cpu"))
    teacher = open_teacher(TeacherConfig(name="teacher", model=SELF), vocab_size=student.config.vocab_size,
                           device=torch.device("cpu"), student=student, student_dtype=torch.bfloat16)
    assert next(teacher.model.parameters()).dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert next(student.parameters()).dtype == torch.float32
