"""`vopd bench`: the dispatcher of the benchmarks (estimators, training, generation, trl, teacher-overlap,
teacher-payload, packing).

What it knows: the sub-command names and which module serves each; a benchmark's module (and TRL, for ``trl``) is
imported only when that benchmark runs or adds its arguments. What it does not know: what any benchmark measures.
"""

from __future__ import annotations

import argparse

from vopd.tools.bench.estimators import add_estimator_arguments, run_estimators_bench
from vopd.tools.bench.training import add_bench_arguments


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    # One sub-parser per benchmark: training/generation reuse flag names (--tokens, --methods, --device, ...) with
    # other defaults, which a single flat parser cannot hold.
    sub = parser.add_subparsers(dest="what", required=True, metavar="{estimators,training,generation,trl,teacher-overlap,teacher-payload,packing}")
    add_bench_arguments(sub.add_parser("training", help="training-side step at real shapes (needs CUDA)"), "training")
    add_bench_arguments(sub.add_parser("generation", help="model.generate tokens/s, static vs dynamic KV cache"),
                        "generation")
    from vopd.tools.bench.trl import add_trl_arguments  # TRL itself is imported only when the benchmark runs

    add_trl_arguments(sub.add_parser("trl", help="vopd's trainer side by side with TRL's DistillationTrainer "
                                     "(needs `pip install 'vopd[trl]'`)"))
    add_estimator_arguments(sub.add_parser("estimators", help="loss head alone: every method, dense vs chunked"))
    from vopd.tools.bench.overlap import add_overlap_arguments

    add_overlap_arguments(sub.add_parser("teacher-overlap", help="step gradient with a teacher server, scoring "
                                         "overlapped with the student or inline"))
    from vopd.tools.bench.payload import add_payload_arguments

    add_payload_arguments(sub.add_parser("teacher-payload", help="bytes per token of each teacher-server protocol "
                                         "(ids, top-k, lse, hidden states), measured on a real server"))
    from vopd.tools.bench.packing import add_packing_arguments

    add_packing_arguments(sub.add_parser("packing", help="padded rows vs packed tokens on a long-tailed length "
                                         "distribution: token slots, step time, peak memory"))


def cli_main(args: argparse.Namespace) -> int:
    if args.what == "packing":
        from vopd.tools.bench.packing import run_packing_bench

        return run_packing_bench(args)
    if args.what == "teacher-payload":
        from vopd.tools.bench.payload import run_payload_bench

        return run_payload_bench(args)
    if args.what == "teacher-overlap":
        from vopd.tools.bench.overlap import run_overlap_bench

        return run_overlap_bench(args)
    if args.what == "trl":
        from vopd.tools.bench.trl import run_trl_bench

        return run_trl_bench(args)
    if args.what in ("training", "generation"):
        from vopd.tools.bench.training import run_generation_bench, run_training_bench

        return (run_training_bench if args.what == "training" else run_generation_bench)(args)
    return run_estimators_bench(args)
