"""`vopd reproduce` end to end at micro scale: the grid, its summary, the top-k error sweep, the interleaved timing
and the plots, on the micro world standing in for the tiny world."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

from vopd.prompts import ChatOptions
from vopd.tools import reproduce


def test_reproduce_pipeline_on_the_micro_world(micro_world, tmp_path):
    world = SimpleNamespace(student=micro_world.student, teacher=micro_world.teacher, train_data=micro_world.train,
                            test_data=micro_world.test, root=micro_world.root,
                            config=SimpleNamespace(eval_max_new_tokens=10, chat_options=ChatOptions()),
                            data_overrides=lambda: ["data.text_as_chat=false"])  # the micro world has no template
    parser = argparse.ArgumentParser()
    reproduce.add_cli_arguments(parser)
    args = parser.parse_args(["--methods", "opd", "vopd", "--seeds", "0", "1", "--lrs", "1e-3", "--steps", "2",
                              "--batch-size", "4", "--top-k", "4", "--eval-every", "2", "--eval-problems", "6",
                              "--ks", "1", "4", "1000000"])
    args.sweep_lr = args.lrs[0]

    runs = reproduce.run_grid(world, tmp_path, args)
    assert sorted(runs) == sorted(f"{m}-lr0.001-seed{s}" for m in ("opd", "vopd") for s in (0, 1))
    assert all(len(rows) == 2 for rows in runs.values())
    table = reproduce.summarise_grid(runs, args.methods, args.seeds, 1e-3)
    for row in table.values():
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["accuracy"]["n"] == 2
        assert math.isfinite(row["heldout_kl"]["mean"]) and row["heldout_kl"]["mean"] > 0
        assert math.isfinite(row["grad_var_mean"]["mean"])
    assert table["opd"]["time_ratio_to_opd"]["step"] == 1.0
    # A finished run is reused, not retrained: the second grid reads the same rows.
    assert reproduce.run_grid(world, tmp_path, args) == runs

    topk = reproduce.topk_baseline_error(world, args.ks, prompts=4, max_new_tokens=8, seed=0)
    vocab = topk["vocab"]
    mse = [topk["k"][k]["mse"] for k in ("1", "4", str(vocab))]
    assert mse[0] >= mse[1] >= mse[2] and mse[2] < 1e-10  # k = V is the exact KL
    timing = reproduce.interleaved_step_times(world, args.methods, batch_size=4, top_k=4, repeats=2)
    assert set(timing["methods"]) == {"opd", "vopd"} and timing["methods"]["opd"]["step_ratio_to_opd"] == 1.0
    sweep = reproduce.run_k_sweep(world, tmp_path, args, vocab)
    assert sorted(sweep) == [1, 4, vocab]
    initial = reproduce.evaluate_initial_student(world, tmp_path, args)
    assert initial["accuracy"]["n"] == 2

    assert reproduce.plot(runs, {1e-3: table}, tmp_path / "grid.png").stat().st_size > 0
    sweep_rows = {str(k): {"accuracy": r[-1]["eval_avg_at_n"], "seed": 0} for k, r in sweep.items()}
    assert reproduce.plot_topk(topk, sweep_rows, tmp_path / "topk.png").stat().st_size > 0


def test_reproduce_refuses_a_zero_budget_before_building_anything(capsys):
    from vopd.cli import main

    assert main(["reproduce", "--steps", "0"]) != 0
    assert "--steps 0: must be >= 1" in capsys.readouterr().err


def test_regime_study_on_the_micro_world(micro_world, tmp_path):
    """`vopd regime` at micro scale: an equal budget gives steps = budget / batch, the grid's own batch reuses the
    grid's run, every run has a record with the fields docs/results/regime.json promises, the gaps to opd-full are
    paired by seed, and the plot is drawn."""
    from vopd.tools import regime

    world = SimpleNamespace(student=micro_world.student, teacher=micro_world.teacher, train_data=micro_world.train,
                            test_data=micro_world.test, root=micro_world.root,
                            config=SimpleNamespace(eval_max_new_tokens=8, chat_options=ChatOptions()),
                            data_overrides=lambda: ["data.text_as_chat=false"])
    parser = argparse.ArgumentParser()
    reproduce.add_cli_arguments(parser)
    grid = parser.parse_args(["--steps", "2", "--batch-size", "4", "--top-k", "4", "--eval-every", "2",
                              "--eval-problems", "4", "--methods", "opd", "--seeds", "0", "--lrs", "1e-3"])
    grid_runs = reproduce.run_grid(world, tmp_path, grid)
    study = argparse.ArgumentParser()
    regime.add_cli_arguments(study)
    args = study.parse_args(["--batch-sizes", "2", "4", "--budget", "8", "--methods", "opd", "opd-full",
                             "--seeds", "0", "1", "--lr", "1e-3"])
    records = regime.run_study(world, tmp_path, args, grid)
    assert [(r["batch_size"], r["steps"], r["method"], r["seed"]) for r in records] == [
        (b, 8 // b, m, s) for b in (2, 4) for m in ("opd", "opd-full") for s in (0, 1)]
    for r in records:
        assert {"method", "batch_size", "seed", "accuracy", "heldout_kl"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["heldout_kl"] > 0 and r["tokens_per_step"] > 0
    same = next(r for r in records if (r["batch_size"], r["method"], r["seed"]) == (4, "opd", 0))
    assert same["heldout_kl"] == grid_runs["opd-lr0.001-seed0"][-1]["eval_kl"]  # the grid's run, reused
    table = regime.summarise(records)
    assert table["2"]["steps"] == 4 and table["4"]["methods"]["opd-full"]["accuracy_minus_opd-full"]["mean"] == 0.0
    gap = table["2"]["methods"]["opd"]["heldout_kl_minus_opd-full"]
    pairs = [a["heldout_kl"] - b["heldout_kl"] for a in records for b in records
             if a["batch_size"] == b["batch_size"] == 2 and a["seed"] == b["seed"]
             and (a["method"], b["method"]) == ("opd", "opd-full")]
    assert gap["n"] == 2 and math.isclose(gap["mean"], sum(pairs) / 2)
    assert regime.plot(table, tmp_path / "regime.png").stat().st_size > 0


def test_regime_refuses_an_unequal_budget_before_building_anything(capsys):
    from vopd.cli import main

    assert main(["regime", "--batch-sizes", "8", "12", "--budget", "100"]) != 0
    assert "--budget 100 is not a positive multiple of every batch size" in capsys.readouterr().err
