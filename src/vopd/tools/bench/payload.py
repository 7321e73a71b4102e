"""`vopd bench teacher-payload`: the bytes per scored token of each teacher-server protocol, measured on a real server.

What it knows: serving a teacher with a real ``vopd serve-teacher`` process on loopback (a given model directory, or
the tiny random pair of ``vopd.tools.bench.pair``), scoring one fixed batch of rollouts with ``RemoteTeacher`` in each
protocol (log q at the sampled ids; + the teacher's logits at k ids; + its log-sum-exp; its last hidden states in
fp32 or bf16), and counting the request and answer bodies the client really sent and received. Beside each measured
answer it prints the size the protocol's layout predicts (base64: 4/3 of the raw bytes) for this teacher and for a
model of given shape (default Qwen3-8B: V=151936, D=4096), next to fp32 and bf16 full logits. Every measured number
comes from this run; the predicted columns are arithmetic on the shapes, validated by the measured ones.
What it does not know: step time (``vopd bench teacher-overlap``), the loss math, or training.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vopd.errors import UserError
from vopd.tools.bench.pair import serve_teacher, tiny_pair

def add_payload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher model directory (default: a tiny random teacher built here)")
    p.add_argument("--top-k", type=int, default=64, help="ids per position for the top-k protocols (default 64)")
    p.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--vocab", type=int, default=151936, help="V of the model the predicted column is for "
                   "(default Qwen3-8B's 151936)")
    p.add_argument("--hidden-size", type=int, default=4096, help="D of that model (default Qwen3-8B's 4096)")


def _answer_bytes(protocol: str, k: int, d: int) -> float:
    """Answer bytes per scored position that a protocol's layout predicts (base64; JSON framing excluded): the
    bound the server checks answers against (``vopd.teacher.wire.response_bytes``)."""
    from vopd.teacher.wire import response_bytes

    hidden = {"hidden-fp32": "float32", "hidden-bf16": "bfloat16"}.get(protocol)
    return response_bytes(1, k if protocol.startswith("topk") else 0, protocol == "topk+lse", "base64", hidden, d)


def run_payload_bench(args: argparse.Namespace) -> int:
    from vopd.models import load_tokenizer
    from vopd.rollout import pack
    from vopd.sampling import Samples
    from vopd.teacher.client import RemoteTeacher

    if args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} must be >= 1")
    with tempfile.TemporaryDirectory(prefix="vopd-payload-") as tmp:
        root = Path(tmp)
        teacher_dir = Path(args.teacher) if args.teacher else tiny_pair(root)[0]
        proc, url = serve_teacher(teacher_dir, 1, root / "server.log")
        try:
            tok = load_tokenizer(str(teacher_dir), role="teacher")
            vocab = len(tok)
            gen = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
            comps = [torch.randint(3, vocab, (args.completion_len,), generator=gen).tolist() for _ in prompts]
            rollout = pack(prompts, Samples(comps, [[-1.0] * len(c) for c in comps], [False] * len(comps)),
                           tok.pad_token_id)
            k = min(args.top_k, vocab)
            ids = torch.randint(0, vocab, (*rollout.targets.shape, k), generator=gen)
            rows: list[tuple[str, str, float, float]] = []
            cases: list[tuple[str, str, dict[str, object], dict[str, object]]] = [
                ("ids", "opd", {}, {}),
                ("topk", "vopd-topk, opd-topk", {}, {"topk_ids": ids}),
                ("topk+lse", "rb-topk", {}, {"topk_ids": ids, "lse": True}),
                ("hidden-fp32", "all seven", {"head": str(teacher_dir), "hidden_dtype": "float32"}, {}),
                ("hidden-bf16", "all seven", {"head": str(teacher_dir), "hidden_dtype": "bfloat16"}, {}),
            ]
            d = 0
            for name, methods, make, call in cases:
                with RemoteTeacher(url, **make) as remote:  # type: ignore[arg-type]
                    d = int(remote.health()["hidden_size"])  # cached: scoring asks for it no more
                    remote.http.bytes_sent = remote.http.bytes_received = 0  # /score bodies only
                    remote.score(rollout, **call)  # type: ignore[arg-type]
                    tokens = rollout.num_tokens
                    rows.append((name, methods, remote.http.bytes_sent / tokens, remote.http.bytes_received / tokens))
        finally:
            proc.terminate()
            proc.wait(30)
    v_big, d_big = args.vocab, args.hidden_size
    print(f"# vopd bench teacher-payload: {args.batch} sequences x ({args.prompt_len} prompt + {args.completion_len} "
          f"completion) tokens, k={k}; this teacher: V={vocab}, D={d}; predicted: answer layout for V={v_big}, "
          f"D={d_big}")
    print("| protocol | methods | request B/token (measured) | answer B/token (measured) | answer B/token "
          "(layout, this teacher) | answer B/token (layout, V/D given) | fp32 logits / answer (V/D given) |")
    print("|---|---|---|---|---|---|---|")
    for name, methods, sent, got in rows:
        big = _answer_bytes(name, k, d_big)
        print(f"| {name} | {methods} | {sent:.0f} | {got:.0f} | {_answer_bytes(name, k, d):.0f} | {big:.0f} | "
              f"{4 * v_big / big:.0f}x |")
    print(f"| full logits fp32 / bf16 (not a protocol) | - | - | - | {4 * vocab} / {2 * vocab} | "
          f"{4 * v_big} / {2 * v_big} | 1x / 2x |")
    return 0
