"""`vopd bench estimators`: every case in a fresh process, rounds in rotated order, medians and the table."""

from __future__ import annotations

import json
import statistics

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
