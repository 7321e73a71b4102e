"""`vopd bench training` / `vopd bench generation` at tiny shapes on the CPU: they run, print markdown tables with
the ratio columns, report out-of-memory cases as rows, and refuse real shapes without CUDA with a one-line error.

The numbers themselves are not checked (CPU timings at tiny shapes are noise); the GPU run is what measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from vopd.tools.bench.training import add_bench_arguments, format_generation, format_training, run_training_bench
from vopd.tools.bench.worker import measure_case
from vopd.errors import UserError


def _bench(*argv: str, tmp_path) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "vopd.tools.bench.training", *argv, "--shapes", "tiny", "--device", "cpu",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _rows(table: str, cell: str) -> list[list[str]]:
    """The markdown rows of ``table`` that have a cell equal to ``cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|")]
    return [r for r in rows if cell in r]


def test_training_bench_tiny_prints_both_methods_with_ratios(tmp_path):
    # --skip-head keeps this to two worker processes; the head cases are covered in-process below.
    stdout, res = _bench("training", "--students", "1.7b", "--tokens", "48", "--completion-len", "24",
                         "--methods", "opd", "vopd", "--skip-head", tmp_path=tmp_path)
    assert "| student | tokens | B x T | method | ms | peak GiB | step GiB | time / opd | peak / opd |" in stdout
    opd, vopd = _rows(stdout, "opd")[0], _rows(stdout, "vopd")[0]
    assert opd[:4] == ["1.7b", "48", "2 x 24", "opd"] and vopd[3] == "vopd"
    assert opd[7] == "1.00" and float(vopd[7]) > 0  # time / opd
    assert "vopd/opd" in stdout and "loss head only" not in stdout
    assert [r["method"] for r in res["training"]] == ["opd", "vopd"] and res["head"] == []
    assert all("error" not in r and r["time_ms"] > 0 and r["peak_mb"] > 0 for r in res["training"])
    # LoRA by default (r=64 on 7 projections x 2 layers of the tiny student): only the adapters train.
    assert res["training"][0]["trainable"] == "lora" and res["training"][0]["trainable_params"] == 65_536


def test_generation_bench_tiny_static_cache(tmp_path):
    # One case (one process, to keep the suite fast): the static cache is the path with something to go wrong.
    stdout, res = _bench("generation", "--batch-sizes", "2", "--new-tokens", "4", "--prompt-len", "4",
                         "--caches", "static", tmp_path=tmp_path)
    assert "| batch | prompt | new tokens | engine | cache | tokens/s |" in stdout
    (r,) = res["generation"]
    assert r["cache"] == "static" and r["tokens_per_s"] > 0 and "error" not in r
    assert _rows(stdout, "static")[0][:3] == ["2", "4", "4"]


def test_generation_table_ratio_to_dynamic():
    rows = [dict(batch=32, prompt_len=256, new_tokens=512, cache=c, time_ms=t, tokens_per_s=32 * 512e3 / t,
                 peak_mb=2048.0, first_call_s=1.0) for c, t in (("dynamic", 8000.0), ("static", 4000.0))]
    table = format_generation({"generation": rows})
    assert _rows(table, "dynamic")[0][-1] == "1.00" and _rows(table, "static")[0][-1] == "2.00"


def test_head_cases_run_and_format():
    # The same case dicts training_results builds, run in this process (the driver spawns one process each).
    common = dict(kind="head", shapes="tiny", device="cpu", repeats=1, warmup=1, student="1.7b", vocab=1024,
                  tokens=32, method="opd-full", hidden=32, teacher_hidden=64, top_k=100, budget_mb=64,
                  dtype="bfloat16")
    head = [measure_case({**common, "path": path}) for path in ("chunked", "dense")]
    assert all(r["time_ms"] > 0 and "error" not in r for r in head)
    table = format_training({"training": [], "head": head})
    assert "loss head only, opd-full" in table and len(_rows(table, "1.7b")) == 1


def test_real_shapes_without_cuda_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser, "training")
    for device in ("auto", "cpu", "cuda"):
        with pytest.raises(UserError, match=r"--shapes real needs a CUDA device .*; use --shapes tiny to smoke-test"
                           ) as err:
            run_training_bench(parser.parse_args(["--shapes", "real", "--device", device]))
        assert "\n" not in str(err.value)


def test_oom_cases_are_rows_not_crashes():
    base = dict(student="4b", tokens=16384, batch=8, completion_len=2048, device="cuda")
    res = {
        "training": [
            {**base, "method": "opd", "time_ms": 1000.0, "peak_mb": 40 * 1024.0, "step_mb": 10 * 1024.0},
            {**base, "method": "vopd", "time_ms": 1010.0, "peak_mb": 40 * 1024.0, "step_mb": 10 * 1024.0},
            {**base, "method": "opd-full", "oom": True, "error": "CUDA out of memory", "peak_mb": 79 * 1024.0},
        ],
        "head": [
            {**base, "path": "chunked", "time_ms": 50.0, "peak_mb": 3 * 1024.0},
            {**base, "path": "dense", "oom": True, "error": "CUDA out of memory", "peak_mb": 70 * 1024.0,
             "tried_mb": 10 * 1024.0},
        ],
    }
    table = format_training(res)
    assert _rows(table, "opd-full")[0][4] == "OOM"
    assert "vopd/opd 1.010 (met)" in table
    head = _rows(table, "4b")[-1]
    assert head[5] == "OOM (needs >= 80.0)" and head[6] == "<= 0.037"
    gen = format_generation({"generation": [dict(batch=128, prompt_len=256, new_tokens=512, cache="static",
                                                 oom=True, error="CUDA out of memory", peak_mb=1024.0)]})
    assert "| 128 | 256 | 512 | hf | static | OOM |" in gen
