"""`vopd bench estimators`: every case in a fresh process, rounds in rotated order, medians and the table; the
stock vLLM placements of `vopd bench teacher-payload` (bytes per token as their layout) and `teacher-overlap`
(gradients), against real vLLM servers beside `vopd serve-teacher`."""

from __future__ import annotations

import json
import statistics

import pytest

from vopd.cli import main


def test_estimator_bench_rounds_take_the_median_and_print_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "estimators", "--vocab", "64", "--tokens", "16", "--hidden", "8", "--teacher-hidden", "8",
               "--top-k", "4", "--repeats", "1", "--rounds", "2", "--methods", "opd", "vopd",
               "--paths", "dense", "chunked", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert sorted((r["method"], r["path"]) for r in results) == [("opd", "chunked"), ("opd", "dense"),
                                                                  ("vopd", "chunked"), ("vopd", "dense")]
    for r in results:
        assert len(r["round_times_ms"]) == 2 and r["time_ms"] == statistics.median(r["round_times_ms"])
        assert r["time_ms"] > 0 and r["peak_mb"] >= 0
    printed = capsys.readouterr().out
    assert "rounds=2" in printed and "| 64 | 16 | vopd |" in printed and "vopd/opd time" in printed


def test_estimator_bench_refuses_zero_rounds(capsys):
    assert main(["bench", "estimators", "--rounds", "0"]) != 0
    assert "--rounds 0" in capsys.readouterr().err


def _table(out: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith(("| protocol", "| teacher"))}


@pytest.mark.slow  # three servers started for one bench (~1 min); the routes themselves: tests/test_stock_vllm.py
def test_the_payload_bench_measures_the_stock_vllm_routes_as_their_layout(vllm_teacher_dir, capsys):
    """Beside vopd's server, in one run: the pooling route's answer is its layout (every position up to the last
    completion token, D fp32 values in base64, per scored token) plus a few bytes of JSON framing per token; the
    generate route's JSON is its estimate's size; the ratios to vopd's protocols are printed."""
    pytest.importorskip("vllm")
    from vopd.cli import main

    prompt, completion, batch = 8, 24, 2
    assert main(["bench", "teacher-payload", "--stock-vllm", "--teacher", str(vllm_teacher_dir), "--batch", str(batch),
                 "--prompt-len", str(prompt), "--completion-len", str(completion), "--top-k", "8"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    d = 64  # the served teacher's width (conftest vllm_teacher_dir)
    positions = (prompt + completion - 1) / completion  # sent per scored token
    pooling = rows["stock vLLM pooling"]
    assert float(pooling[3]) == pytest.approx(positions * 4 * d * 4 / 3, abs=0.5)  # the printed layout
    assert float(pooling[3]) <= float(pooling[2]) <= float(pooling[3]) + 16  # measured: layout + framing
    generate = rows["stock vLLM generate"]
    assert generate[3].startswith("~")  # an estimate: the JSON's digits vary
    assert 0.8 * float(generate[3][1:]) <= float(generate[2]) <= 1.25 * float(generate[3][1:]) + 16
    assert float(rows["hidden-fp32"][2]) < float(pooling[2])  # vopd's server sends the scored positions only
    assert "pooling route / hidden-fp32" in out and "generate route / ids" in out


@pytest.mark.slow
def test_the_overlap_bench_times_a_stock_vllm_pooling_server_beside_vopds(vllm_teacher_dir, micro_world, capsys):
    pytest.importorskip("vllm")
    from vopd.cli import main

    assert main(["bench", "teacher-overlap", "--stock-vllm", "--hidden", "--method", "vopd", "--teacher",
                 str(vllm_teacher_dir), "--student", str(micro_world.student), "--repeats", "1", "--batch", "2",
                 "--micro", "1", "--prompt-len", "8", "--completion-len", "8"]) == 0
    out = capsys.readouterr().out
    assert set(_table(out)) == {"in process", "server, scoring inline", "server, scoring overlapped",
                                "stock vLLM, scoring inline", "stock vLLM, scoring overlapped"}
    stock = next(line for line in out.splitlines() if line.startswith("stock vLLM: speedup"))
    assert "gradients bit-identical: yes" in stock and float(stock.split("difference ")[1]) < 1e-5
    assert "stock vLLM / vopd server step time: inline " in out
