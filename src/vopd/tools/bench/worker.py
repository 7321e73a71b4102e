"""The measuring side of `vopd bench training` / `vopd bench generation`: model shapes and one case per process.

What it knows: how to build random-initialised ``Qwen3ForCausalLM`` models from configs written here (Qwen3-1.7B and
-4B students, Qwen3-8B teacher, V = 151,936, bf16 weights; and a ``tiny`` set for CPU smoke tests), and how to time
one case: a training-side step the way the trainer runs it (teacher ``last_hidden`` without grad, student
``last_hidden`` with gradient checkpointing, LoRA or all weights trainable, ``fused_distillation_loss`` on the
completion positions, backward, optionally an AdamW step), the loss head alone (``vopd.tools.bench.estimators``'s worker), or
``model.generate`` with a static or dynamic KV cache. Median of repeats after warm-up, peak memory from
``torch.cuda.max_memory_allocated`` (CPU: peak RSS, indicative only); an out-of-memory error becomes a result row.
``python -m vopd.tools.bench.worker CASE_JSON`` runs one case and prints its result as one JSON line.

What it does NOT know: which cases make a benchmark, defaults, tables or targets (``vopd.tools.bench.training``, which
runs each case in a fresh process), real weights, or what any number will be: all are measured.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from vopd.tools.bench.common import rss_mb

if TYPE_CHECKING:  # torch is imported by each case, not by the module (the parent process imports only its tables)
    import torch

    from vopd.models import Model

_QWEN3 = dict(head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
              rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


def _tiny(hidden: int, layers: int, tie: bool, heads: int = 4, head_dim: int = 0) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=head_dim or hidden // heads,
                intermediate_size=2 * hidden, tie_word_embeddings=tie)


#: Shapes of the public Qwen3 configs (random weights); "tiny" keeps the same structure at CPU-test size.
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "real": {
        "1.7b": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     intermediate_size=6144, tie_word_embeddings=True),
        "4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=9728, tie_word_embeddings=True),
        "8b": dict(_QWEN3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=12288, tie_word_embeddings=False),
    },
    "tiny": {"1.7b": _tiny(32, 2, True), "4b": _tiny(48, 2, True), "8b": _tiny(64, 3, False)},
    # CPU generation, engine against engine: the tiny world's student (hidden 48, 2 layers, 2 heads of 32) and a
    # larger random model (hidden 512, 8 layers, 8 heads of 64, V = 32k); "8b" only completes the set.
    # (head size 32 or more: vLLM's CPU attention kernel refuses smaller ones).
    "cpu": {"world": dict(_tiny(48, 2, False, heads=2, head_dim=32), intermediate_size=192),
            "wide": dict(_tiny(512, 8, True, heads=8, head_dim=64), intermediate_size=1536),
            "8b": _tiny(64, 3, False)},
}
TEACHER = "8b"
VOCAB = {"real": 151_936, "tiny": 1024, "cpu": 32_000}
#: The tiny world's vocabulary size (its BPE tokenizer), for the "world" CPU shape.
WORLD_VOCAB = 361
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(size: dict[str, Any], vocab: int, device: torch.device, dtype: torch.dtype, *, use_cache: bool) -> Model:
    """A random-initialised Qwen3 model built directly on ``device`` (an 8B model never passes through CPU RAM)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, use_cache=use_cache, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None, **size)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")


def _memory(dev: torch.device) -> tuple[float, float]:
    """(peak, current) in MiB: CUDA allocator statistics, else process RSS (peak since the process started)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20, torch.cuda.memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mb()


def _timed(fn: Callable[[], object], dev: torch.device, warmup: int, repeats: int) -> tuple[list[float], float, float]:
    """Warm-up calls, then ``repeats`` timed calls; returns (seconds each, peak MiB, resident MiB before)."""
    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = _memory(dev)[1]
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, _memory(dev)[0], base


def _train_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vopd.loss.chunked import fused_distillation_loss
    from vopd.loss.scores import TeacherHidden
    from vopd.models import apply_lora, enable_gradient_checkpointing, last_hidden, output_layer

    torch.manual_seed(0)
    dev, dtype = torch.device(case["device"]), torch.bfloat16
    shapes, vocab = SHAPES[case["shapes"]], VOCAB[case["shapes"]]
    teacher = _build(shapes[TEACHER], vocab, dev, dtype, use_cache=False).eval().requires_grad_(False)
    student = _build(shapes[case["student"]], vocab, dev, dtype, use_cache=False)
    if case["trainable"] == "lora":  # the authors' setup: r=64, alpha=128 on every linear projection
        student = apply_lora(student, r=64, alpha=128, dropout=0.0, target_modules=LORA_TARGETS)
    enable_gradient_checkpointing(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0) if case["optimizer"] == "adamw" else None

    b, p_len, c_len = case["batch"], case["prompt_len"], case["completion_len"]
    ids = torch.randint(0, vocab, (b, p_len + c_len), device=dev)
    attention = torch.ones_like(ids)
    targets = ids[:, 1:]
    # Hidden state j predicts token j+1: the completion tokens p_len.. are predicted from positions p_len-1..
    mask = (torch.arange(p_len + c_len - 1, device=dev) >= p_len - 1).expand(b, -1)
    t_head = output_layer(teacher, vocab)

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.no_grad():
            ht = last_hidden(teacher, ids, attention)[:, :-1]
        hs = last_hidden(student, ids, attention)[:, :-1]
        s_head = output_layer(student, vocab)
        out = fused_distillation_loss(hs, s_head.weight, targets, mask,
                                      TeacherHidden(ht, t_head.weight, t_head.bias, t_head.transform),
                                      method=case["method"], top_k=case["top_k"], student_bias=s_head.bias,
                                      memory_budget_mb=case["budget_mb"], student_transform=s_head.transform)
        out.loss.backward()
        if opt is not None:
            opt.step()

    times, peak, base = _timed(step, dev, case["warmup"], case["repeats"])
    return {"time_ms": 1000 * statistics.median(times), "peak_mb": peak, "step_mb": max(peak - base, 0.0),
            "trainable_params": sum(p.numel() for p in params)}


def _generation_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(0)
    dev = torch.device(case["device"])
    vocab = WORLD_VOCAB if case["student"] == "world" else VOCAB[case["shapes"]]
    # bf16 on a GPU; fp32 on the CPU, where both engines are compared in the precision the tiny world trains in
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = _build(SHAPES[case["shapes"]][case["student"]], vocab, dev, dtype, use_cache=True).eval()
    b, n_new = case["batch"], case["new_tokens"]
    ids = torch.randint(1, vocab, (b, case["prompt_len"]), device=dev)
    if case.get("engine", "hf") == "vllm":
        return _vllm_generation(model, ids.tolist(), case)
    cache = case["cache"]
    # Every setting written out (as vopd.sampling does): temperature-1 sampling, no top-k/top-p, and no EOS, so
    # every row generates exactly n_new tokens. "static" lets transformers compile the decode step on CUDA;
    # "static-eager" is the same cache with compilation off, to separate the two effects.
    gen = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, num_beams=1, pad_token_id=0, eos_token_id=None,
                           cache_implementation=None if cache == "dynamic" else "static",
                           disable_compile=cache != "static")
    model.generation_config = GenerationConfig()  # nothing filled in from the model's own defaults
    lengths: list[int] = []

    def call() -> None:
        with torch.no_grad():
            lengths.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          generation_config=gen).shape[1])

    t0 = time.perf_counter()
    call()  # the first call pays for compilation (static on CUDA) and allocator growth; reported, not timed
    first = time.perf_counter() - t0
    times, peak, _base = _timed(call, dev, max(case["warmup"] - 1, 0), case["repeats"])
    if set(lengths) != {case["prompt_len"] + n_new}:
        raise RuntimeError(f"generate returned lengths {sorted(set(lengths))}, expected {case['prompt_len'] + n_new}")
    med = statistics.median(times)
    return {"time_ms": 1000 * med, "tokens_per_s": b * n_new / med, "peak_mb": peak, "first_call_s": first}


def _vllm_generation(model: Any, prompts: list[list[int]], case: dict[str, Any]) -> dict[str, Any]:
    """The same model, prompts and lengths through vopd's colocated vLLM engine: each timed call is what a training
    step pays (the weight push from the live model, then sampling at temperature 1, no EOS so every row runs to
    ``new_tokens``)."""
    import tempfile
    from types import SimpleNamespace

    import torch

    from vopd.config import RolloutConfig, VllmConfig
    from vopd.vllm_engine import VllmSampler, shutdown

    n_new = case["new_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the engine reads the architecture from a directory; weights are pushed
        t0 = time.perf_counter()
        sampler = VllmSampler(model, SimpleNamespace(eos_token_id=None), RolloutConfig(max_new_tokens=n_new),
                              VllmConfig(cpu_kv_cache_gb=2.0, gpu_memory_utilization=0.5),
                              model_dir=tmp, max_model_len=case["prompt_len"] + n_new)
        lengths: list[int] = []
        sync_s: list[float] = []

        def call() -> None:
            lengths.extend(len(c) for c in sampler(prompts).completions)

        call()
        first = time.perf_counter() - t0
        times, peak, _base = _timed(call, torch.device(case["device"]), max(case["warmup"] - 1, 0), case["repeats"])
        for _ in range(3):
            s0 = time.perf_counter()
            sampler.sync_weights()
            sync_s.append(time.perf_counter() - s0)
        shutdown()
    if set(lengths) != {n_new}:
        raise RuntimeError(f"vLLM returned completion lengths {sorted(set(lengths))}, expected {n_new}")
    med = statistics.median(times)
    return {"time_ms": 1000 * med, "tokens_per_s": len(prompts) * n_new / med, "peak_mb": peak,
            "first_call_s": first, "sync_ms": 1000 * statistics.median(sync_s)}


def _head_case(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement, meant to run in a fresh process."""
    import torch

    from vopd.loss.chunked import fused_distillation_loss
    from vopd.loss.scores import TeacherHidden
    from vopd.loss.estimators import distillation_loss

    torch.manual_seed(0)
    if case["device"] == "cpu":
        torch.set_num_threads(case.get("threads", 1))  # a fixed thread count keeps timings comparable on a shared CPU
    dev = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    n, v, ds, dt = case["tokens"], case["vocab"], case["hidden"], case["teacher_hidden"]
    hs = (torch.randn(1, n, ds, device=dev) ).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, ds, device=dev) * ds**-0.5).to(dtype).requires_grad_(True)
    ht = torch.randn(1, n, dt, device=dev).to(dtype)
    wt = (torch.randn(v, dt, device=dev) * dt**-0.5).to(dtype)
    y = torch.randint(0, v, (1, n), device=dev)
    mask = torch.ones(1, n, dtype=torch.bool, device=dev)

    def step() -> None:
        hs.grad = ws.grad = None
        if case["path"] == "dense":
            with torch.no_grad():
                zt = ht @ wt.T
            out = distillation_loss(hs @ ws.T, zt, y, mask, method=case["method"], top_k=case["top_k"])
        else:
            out = fused_distillation_loss(hs, ws, y, mask, TeacherHidden(ht, wt), method=case["method"],
                                          top_k=case["top_k"], memory_budget_mb=case["budget_mb"])
        out.loss.backward()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, kernels)
    sync()
    base: float
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    times: list[float] = []
    for _ in range(case["repeats"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {**case, "time_ms": 1000 * statistics.median(times), "peak_mb": max(peak, 0.0)}


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case (meant for a fresh process); an out-of-memory error becomes a result with what the allocator
    had and wanted."""
    import torch

    run = {"train": _train_case, "generation": _generation_case, "head": _head_case}[case["kind"]]
    if case.get("shapes") == "tiny" and case["device"] == "cpu":
        torch.set_num_threads(1)  # tiny matmuls gain nothing from threads, and idle-spinning ones add noise
    try:
        return {**case, **run(case)}
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        msg = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in msg:  # CPU allocator
            raise
        tried = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB)", msg)
        tried_mb = None if tried is None else float(tried.group(1)) * (1024 if tried.group(2) == "GiB" else 1)
        peak = _memory(torch.device(case["device"]))[0]
        if case["kind"] == "head":  # vopd.tools.bench.estimators reports the head's memory above its inputs; do the same here
            n, v, dims = case["tokens"], case["vocab"], case["hidden"] + case["teacher_hidden"]
            peak -= ((n + v) * dims * 2 + n * 9) / 2**20  # bf16 hidden states and weights, int64 ids, bool mask
        return {**case, "oom": True, "peak_mb": max(peak, 0.0), "tried_mb": tried_mb,
                "error": msg.splitlines()[0][:300]}


if __name__ == "__main__":
    print(json.dumps(measure_case(json.loads(sys.argv[1]))))
