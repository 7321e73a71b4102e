"""``vopd plan``: the traced step against the same tracker around the trainer's real step (1 process and 2 gloo ranks
under FSDP2, within 10%), a verdict that can say no (Qwen3-8B <- Qwen3-32B on one 80 GiB GPU) and yes (on eight),
advice that names a change which fits, the JSON keys, and ``vopd check --gpu-memory-gib``.

The real arm is the trainer's own code: ``vopd.setup.set_up`` builds the run (models loaded, wrapped, teachers
sharded, the optimizer), and ``vopd.step.accumulate_gradients`` plus the optimizer step run two steps on rollouts as
long as the config allows, under ``vopd.memtrace.MemTrace`` on real tensors. The plan arm builds the same config from
``config.json`` on fake tensors (``vopd.memplan.trace_step(..., target="cpu")``: the CPU run's dtypes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from test_distributed import _free_port

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "docs" / "configs"


def _overrides(world, run_dir: Path, strategy: str) -> list[str]:
    return [f"model.student={world.student}", f"model.teacher={world.teacher}", f"data.train={world.train}",
            f"output_dir={run_dir}", "data.max_prompt_tokens=176", "rollout.max_new_tokens=64", "micro_batch_size=2",
            "steps=2", "progress=false", "loss.method=vopd", "loss.chunk_memory_mb=1",
            f"distributed.strategy={strategy}", "model.gradient_checkpointing=true"]


def _real_peak(overrides: list[str]) -> tuple[int, dict[str, int]]:
    """The tracker's peak around two real steps of the trainer (this process's rank)."""
    from vopd.config import load_config
    from vopd.memplan import TracingTimer, planned_rollout, track_resident
    from vopd.memtrace import MemTrace
    from vopd.setup import Start, set_up
    from vopd.step import accumulate_gradients

    cfg = load_config(None, overrides)
    rows = cfg.batch_size // int(os.environ.get("WORLD_SIZE", "1"))
    with set_up(cfg, Start(), log=lambda _m: None, make_sampler=lambda *_a: None) as run:  # type: ignore[arg-type]
        trace = MemTrace()
        track_resident(trace, run.student, run.teachers, master_tag="parameters")
        rollout = planned_rollout(rows, cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens, run.vocab,
                                  run.teachers)
        with trace:
            for _ in range(2):
                accumulate_gradients(cfg, run.student, run.teachers, rollout, run.device, TracingTimer(trace),
                                     run.plan)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
        return trace.peak, dict(trace.at_peak)


def _rank(rank: int, world: int, port: int, queue: Any, overrides: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from vopd import distributed as dist

    try:
        queue.put((rank, _real_peak([*overrides, f"output_dir={overrides[3].split('=', 1)[1]}-{rank}"])))
    finally:
        dist.shutdown(clean=True)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_plan_predicts_the_real_step_within_ten_percent(micro_world, tmp_path, world_size):
    from vopd.config import load_config
    from vopd.memplan import trace_step

    overrides = _overrides(micro_world, tmp_path / "run", "fsdp2") + [f"batch_size={4 * world_size}"]
    if world_size == 1:
        real, real_parts = _real_peak(overrides)
    else:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_rank, args=(2, _free_port(), queue, overrides), nprocs=2, join=True,
                           start_method="spawn")
        real, real_parts = dict(queue.get() for _ in range(2))[0]
    planned = trace_step(load_config(None, overrides, require_paths=False), world_size, target="cpu")
    assert planned.shapes.strategy == ("fsdp2" if world_size > 1 else "single")
    assert abs(planned.peak - real) <= 0.10 * real, (planned.peak, real, planned.at_peak, real_parts)
    for kind in ("parameters", "teacher"):  # what each rank holds of the weights: the same bytes exactly
        assert planned.at_peak[kind] == real_parts[kind], kind


def _plan(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "vopd", "plan", "--config", str(config), "--json", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


@pytest.mark.slow
def test_8b_from_32b_fits_on_eight_gpus_and_not_on_one():
    rc, one = _plan(CONFIGS / "qwen3-8b-from-32b.yaml", "--world-size", "1", "--gpu-memory-gib", "80", "--no-advice")
    assert (rc, one["fits"]) == (1, False) and one["per_rank_peak_gib"] > 80
    rc, eight = _plan(CONFIGS / "qwen3-8b-from-32b.yaml", "--world-size", "8", "--gpu-memory-gib", "80")
    assert (rc, eight["fits"]) == (0, True) and eight["per_rank_peak_gib"] <= 80
    assert {"fits", "per_rank_peak_gib", "gpu_memory_gib", "by_category_gib"} <= set(eight)
    assert eight["by_category_gib"]["vLLM (gpu_memory_utilization)"] == 24.0  # 0.3 of 80 GiB


def test_a_plan_that_does_not_fit_names_a_change_that_does(micro_world, tmp_path):
    """The micro world on a GPU too small for it: the verdict is no, and the advice re-plans changes, at least one of
    which fits; applying that change gives the peak the advice said."""
    from vopd.config import load_config
    from vopd.memfit import plan
    from vopd.memplan import GIB, replace

    cfg = load_config(None, [*_overrides(micro_world, tmp_path / "run", "ddp"), "model.gradient_checkpointing=false",
                             "micro_batch_size=8", "batch_size=8", "rollout.engine=hf"], require_paths=False)
    whole = plan(cfg, world_size=1, gpu_memory_gib=100.0, advise=False)
    assert whole.fits and not whole.advice
    # A GPU just below what it needs, but above what the margin alone takes.
    tight = (whole.peak - 0.05 * (whole.peak - whole.margin)) / GIB
    verdict = plan(cfg, world_size=1, gpu_memory_gib=tight)
    assert not verdict.fits and verdict.peak > verdict.gpu_bytes
    fitting = [a for a in verdict.advice if a.fits]
    assert fitting, verdict.advice
    change = {"micro_batch_size=4": {"micro_batch_size": 4},
              "model.gradient_checkpointing=true": {"model.gradient_checkpointing": True}}[fitting[0].change]
    again = plan(replace(cfg, **change), world_size=1, gpu_memory_gib=tight, advise=False)
    assert again.fits and again.peak == fitting[0].peak


def test_plan_refuses_bad_numbers(tmp_path):
    for args, words in ((["--world-size", "0"], "--world-size 0"), (["--gpu-memory-gib", "-1"], "--gpu-memory-gib"),
                        (["--world-size", "3"], "does not split")):
        out = subprocess.run([sys.executable, "-m", "vopd", "plan", "--config",
                              str(CONFIGS / "qwen3-1.7b-from-8b.yaml"), *args], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
        assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_check_prints_the_plans_verdict(micro_world, tmp_path, capsys):
    from vopd.cli import main

    base = [f"model.student={micro_world.student}", f"model.teacher={micro_world.teacher}",
            "data.max_prompt_tokens=176", "rollout.max_new_tokens=64"]
    assert main(["check", "--gpu-memory-gib", "80", *base]) == 0
    out = capsys.readouterr().out
    assert "ok  memory: fits" in out and "of 80 GiB, on 1 GPU" in out
    assert main(["check", "--gpu-memory-gib", "0.001", *base]) == 1
    assert "FAIL memory: does NOT fit" in capsys.readouterr().out


@pytest.mark.slow
def test_the_recipe_of_real_models_md_fits_eight_80_gib_gpus(tmp_path):
    """docs/real_models.md's Qwen3 recipe, as written there (only the model paths point at the public config.json
    files), fits 8 x 80 GiB by the plan."""
    import yaml

    text = (ROOT / "docs" / "real_models.md").read_text()
    block = text.split("```yaml\n# qwen3.yaml\n", 1)[1].split("```", 1)[0]
    recipe = yaml.safe_load(block)
    recipe["model"].update(student=str(CONFIGS / "qwen3-1.7b"), teacher=str(CONFIGS / "qwen3-8b"))
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k not in ("train", "eval")}
    recipe.pop("eval")  # evaluation is not planned (it needs data.eval, a file)
    (tmp_path / "qwen3.yaml").write_text(yaml.safe_dump(recipe))
    rc, verdict = _plan(tmp_path / "qwen3.yaml", "--world-size", "8", "--gpu-memory-gib", "80", "--no-advice")
    assert (rc, verdict["fits"]) == (0, True), verdict
