"""`vopd bench teacher-payload`: the bytes per scored token of each teacher-server protocol, measured on a real server.

What it knows: serving a teacher with a real ``vopd serve-teacher`` process on loopback (a given model directory, or
the tiny random pair of ``vopd.tools.bench.pair``), scoring one fixed batch of rollouts with ``RemoteTeacher`` in each
protocol (log q at the sampled ids; + the teacher's logits at k ids; + its log-sum-exp; its last hidden states in
fp32 or bf16), and counting the request and answer bodies the client really sent and received; with
``--stock-vllm``, the same for stock vLLM servers of the teacher started beside it (the pooling route's hidden
states and the generate route's ``prompt_logprobs``, with the client ``vopd train`` uses). Beside each measured
answer it prints the size the protocol's layout predicts (base64: 4/3 of the raw bytes) for this teacher and for a
model of given shape (default Qwen3-8B: V=151936, D=4096), next to fp32 and bf16 full logits. Every measured number
comes from this run; the predicted columns are arithmetic on the shapes, validated by the measured ones (the
generate route's JSON is an estimate: its digits vary).
What it does not know: step time (``vopd bench teacher-overlap``), the loss math, or training.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

from vopd.errors import UserError
from vopd.rollout import Rollout
from vopd.tools.bench.common import ratio
from vopd.tools.bench.pair import random_rollout, serve_teacher, tiny_pair
from vopd.tools.bench.stock import Route, logprobs_bytes, pooling_bytes, route_flags, serve_vllm, stop_vllm


def add_payload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher model directory (default: a tiny random teacher built here)")
    p.add_argument("--top-k", type=int, default=64, help="ids per position for the top-k protocols (default 64)")
    p.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--vocab", type=int, default=151936, help="V of the model the predicted column is for "
                   "(default Qwen3-8B's 151936)")
    p.add_argument("--hidden-size", type=int, default=4096, help="D of that model (default Qwen3-8B's 4096)")
    p.add_argument("--stock-vllm", action="store_true", help="also stock vLLM servers of the teacher (the pooling "
                   "and the generate route, started here: needs vLLM and a head size vLLM's CPU build takes, e.g. 32)")


def _answer_bytes(protocol: str, k: int, d: int) -> float:
    """Answer bytes per scored position that a protocol's layout predicts (base64; JSON framing excluded): the
    bound the server checks answers against (``vopd.teacher.wire.response_bytes``)."""
    from vopd.teacher.wire import response_bytes

    hidden = {"hidden-fp32": "float32", "hidden-bf16": "bfloat16"}.get(protocol)
    return response_bytes(1, k if protocol.startswith("topk") else 0, protocol == "topk+lse", "base64", hidden, d)


def run_payload_bench(args: argparse.Namespace) -> int:
    from vopd.models import load_tokenizer

    if args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} must be >= 1")
    with tempfile.TemporaryDirectory(prefix="vopd-payload-") as tmp:
        root = Path(tmp)
        teacher_dir = Path(args.teacher) if args.teacher else tiny_pair(root)[0]
        proc, url = serve_teacher(teacher_dir, 1, root / "server.log")
        stock: dict[Route, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            if args.stock_vllm:  # beside vopd's server, in the same run
                routes: tuple[Route, ...] = ("pooling", "generate")
                stock = serve_vllm(teacher_dir, {r: route_flags(r) for r in routes}, root)
            tok = load_tokenizer(str(teacher_dir), role="teacher")
            vocab = len(tok)
            gen = torch.Generator().manual_seed(0)
            rollout = random_rollout(tok, args.batch, args.prompt_len, args.completion_len, gen)
            k = min(args.top_k, vocab)
            ids = torch.randint(0, vocab, (*rollout.targets.shape, k), generator=gen)
            rows, d = _vopd_rows(url, teacher_dir, rollout, ids, k, args)
            rows += _stock_rows({r: u for r, (_p, u) in stock.items()}, teacher_dir, rollout, vocab, d, args)
        finally:
            proc.terminate()
            proc.wait(30)
            stop_vllm(*(server for server, _url in stock.values()))
    _print_table(rows, args, k, vocab, d)
    return 0


#: One row of the table: protocol, methods, request and answer bytes per scored token (measured), answer bytes per
#: scored token that the layout predicts for this teacher and for the given V/D, and whether those two are estimates.
Row = tuple[str, str, float, float, float, float, bool]


def _vopd_rows(url: str, teacher_dir: Path, rollout: Rollout, ids: torch.Tensor, k: int,
               args: argparse.Namespace) -> tuple[list[Row], int]:
    """The vopd server's protocols, each scoring ``rollout`` once: its rows, and the teacher's D."""
    from vopd.teacher.client import RemoteTeacher

    rows: list[Row] = []
    cases: list[tuple[str, str, dict[str, object], dict[str, object]]] = [
        ("ids", "opd", {}, {}),
        ("topk", "vopd-topk, opd-topk", {}, {"topk_ids": ids}),
        ("topk+lse", "rb-topk", {}, {"topk_ids": ids, "lse": True}),
        ("hidden-fp32", "all seven", {"head": str(teacher_dir), "hidden_dtype": "float32"}, {}),
        ("hidden-bf16", "all seven", {"head": str(teacher_dir), "hidden_dtype": "bfloat16"}, {}),
    ]
    d = 0
    tokens = rollout.num_tokens
    for name, methods, make, call in cases:
        with RemoteTeacher(url, **make) as remote:  # type: ignore[arg-type]
            d = int(remote.health()["hidden_size"])  # cached: scoring asks for it no more
            remote.http.bytes_sent = remote.http.bytes_received = 0  # /score bodies only
            remote.score(rollout, **call)  # type: ignore[arg-type]
            rows.append((name, methods, remote.http.bytes_sent / tokens, remote.http.bytes_received / tokens,
                         _answer_bytes(name, k, d), _answer_bytes(name, k, args.hidden_size), False))
    return rows, d


def _stock_rows(urls: dict[Route, str], teacher_dir: Path, rollout: Rollout, vocab: int, d: int,
                args: argparse.Namespace) -> list[Row]:
    """The stock vLLM servers' routes (``urls``: route -> URL), each scoring ``rollout`` once with the client
    ``vopd train`` uses: the pooling route (hidden states, base64 fp32) and the generate route (``opd``)."""
    from vopd.teacher.stock_vllm import StockVllmTeacher

    tokens = rollout.num_tokens
    # Both routes send every position up to a sequence's last completion token, the prompt's too.
    live = rollout.loss_mask.cpu()
    sent = sum(int(row.nonzero().max()) + 1 for row in live if row.any()) / tokens
    rows: list[Row] = []
    for route in urls:
        pooling = route == "pooling"
        with StockVllmTeacher([urls[route]], vocab_size=vocab, head=str(teacher_dir) if pooling else None) as remote:
            remote.model_info()
            session = remote.sessions[0]
            session.bytes_sent = session.bytes_received = 0  # the scoring requests only
            remote.score(rollout)
            layout = (pooling_bytes(d, sent), pooling_bytes(args.hidden_size, sent)) if pooling else \
                (logprobs_bytes(vocab, sent), logprobs_bytes(args.vocab, sent))
            rows.append((f"stock vLLM {route}", "all seven" if pooling else "opd", session.bytes_sent / tokens,
                         session.bytes_received / tokens, *layout, not pooling))
    return rows


def _print_table(rows: list[Row], args: argparse.Namespace, k: int, vocab: int, d: int) -> None:
    v_big, d_big = args.vocab, args.hidden_size
    print(f"# vopd bench teacher-payload: {args.batch} sequences x ({args.prompt_len} prompt + {args.completion_len} "
          f"completion) tokens, k={k}; this teacher: V={vocab}, D={d}; predicted: answer layout for V={v_big}, "
          f"D={d_big}")
    print("| protocol | methods | request B/token (measured) | answer B/token (measured) | answer B/token "
          "(layout, this teacher) | answer B/token (layout, V/D given) | fp32 logits / answer (V/D given) |")
    print("|---|---|---|---|---|---|---|")
    for name, methods, sent, got, small, big, estimate in rows:
        mark = "~" if estimate else ""
        print(f"| {name} | {methods} | {sent:.0f} | {got:.0f} | {mark}{small:.0f} | {mark}{big:.0f} | "
              f"{4 * v_big / big:.0f}x |")
    print(f"| full logits fp32 / bf16 (not a protocol) | - | - | - | {4 * vocab} / {2 * vocab} | "
          f"{4 * v_big} / {2 * v_big} | 1x / 2x |")
    answers = {name: answer for name, _m, _s, answer, *_rest in rows}
    if "stock vLLM pooling" in answers:
        print(f"stock vLLM / vopd serve-teacher, answer bytes per scored token: pooling route / hidden-fp32 "
              f"{ratio(answers['stock vLLM pooling'], answers['hidden-fp32'])}x, generate route / ids "
              f"{ratio(answers['stock vLLM generate'], answers['ids'])}x (the stock routes send the prompt's "
              "positions too; ~: a JSON estimate)")
