"""CUDA-only checks (skipped without a GPU): the chunked head's bf16 path (``torch.mm(..., out_dtype=float32)``,
bf16 gradient matmuls) against an fp64 dense reference for every method, static vs dynamic KV cache with
transformers' compiled decode step, a bf16 training run with gradient checkpointing, and the chunked head's peak
memory against the naive dense path. The CPU suite proves the math; these prove the CUDA code paths that the CPU
never takes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vopd import METHODS, distillation_loss
from vopd.loss.chunked import chunked_distillation_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: these tests cover the bf16/CUDA code paths only")

CUDA = torch.device("cuda")


def _bf16_batch(b: int, t: int, v: int, ds: int, dt: int, seed: int):
    """bf16 hidden states and heads, drawn on the CPU (the same numbers on every GPU), moved to CUDA."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, t, ds, generator=g)
    ws = torch.randn(v, ds, generator=g) * 0.3  # logits with a std of ~2.4: peaked, like a real model's
    ht = torch.randn(b, t, dt, generator=g)
    wt = torch.randn(v, dt, generator=g) * 0.25
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    noise = torch.rand(b, t, generator=g)
    return [x.bfloat16().to(CUDA) for x in (hs, ws, ht, wt)] + [y.to(CUDA), mask.to(CUDA), noise.to(CUDA)]


@pytest.mark.parametrize("method", METHODS)
def test_bf16_chunked_head_matches_the_fp64_dense_reference(method):
    hs, ws, ht, wt, y, mask, noise = _bf16_batch(4, 64, 2048, 64, 96, seed=0)
    # The reference: the same bf16 values, every operation in fp64 (logits, softmax, loss and autograd).
    hs64, ws64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    zs64, zt64 = hs64 @ ws64.T, ht.double() @ wt.double().T
    with torch.no_grad():  # sampler log-probs a little off the trainer's, so the importance ratio is exercised
        slp = zs64.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1) - 0.05 * noise.double()
    kw = dict(method=method, top_k=16, ratio_cap=2.0)
    ref = distillation_loss(zs64, zt64, y, mask, sampler_logprobs=slp, **kw)
    ref_grads = torch.autograd.grad(ref.loss, (hs64, ws64))

    hsb, wsb = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    # 1 MiB per chunk: 40 rows, so the 200-odd live rows take several chunks
    out = chunked_distillation_loss(hsb, wsb, ht, wt, y, mask, sampler_logprobs=slp.float(), memory_budget_mb=1,
                                    **kw)
    grads = torch.autograd.grad(out.loss, (hsb, wsb))

    assert out.loss.dtype == torch.float32 and out.logp.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item())), method
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads):
        # bf16 gradients: the fp32 dL/dz is rounded to bf16 for the matmul and the result to bf16 (2^-8 each)
        assert got.dtype == torch.bfloat16, name
        err = (got.double() - want).abs().max().item()
        assert err <= 2e-2 * want.abs().max().item(), (method, name, err, want.abs().max().item())
    for field in ("logp", "logq", "reward", "baseline", "advantage", "kl", "kl_topk", "topk_mass", "ratio"):
        a, b = getattr(out, field), getattr(ref, field)
        assert (a is None) == (b is None), field
        if a is not None:  # fp32 math on logits accumulated in fp32: far below bf16's own rounding
            assert (a.double() - b).abs().max().item() < 2e-3, (method, field)


@pytest.fixture(scope="module")
def cuda_teacher(micro_world):
    """The micro world's SFT'd teacher on the GPU in fp32 (peaked, so near-ties between tokens are rare) and
    prompts of different lengths (left padding differs between rows)."""
    from vopd.data import format_prompt
    from vopd.models import load_model, load_tokenizer
    from vopd.world.task import read_jsonl

    tok = load_tokenizer(str(micro_world.teacher))
    model = load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=CUDA)
    prompts = [list(tok(format_prompt(r["problem"]))["input_ids"]) for r in read_jsonl(micro_world.test)[:6]]
    prompts[1] = prompts[1][-3:]
    return model, tok, prompts


def test_static_cache_generation_equals_dynamic_on_cuda(cuda_teacher):
    from vopd.rollout import hf_sampler
    from vopd.sampling import generate

    model, tok, prompts = cuda_teacher
    for greedy in (True, False):
        runs = {}
        for cache in ("dynamic", "static"):  # static: transformers compiles the decode step on CUDA
            torch.manual_seed(7)
            if greedy:
                runs[cache] = generate(model, tok, prompts, max_new_tokens=24, greedy=True, return_logprobs=True,
                                       batch_size=4, cache=cache)
            else:
                sample = hf_sampler(model, tok, max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0,
                                    batch_size=4, cache=cache)
                runs[cache] = sample(prompts)
        assert runs["static"].completions == runs["dynamic"].completions, greedy
        for a, b in zip(runs["static"].logprobs, runs["dynamic"].logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-3, rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_bf16_training_with_gradient_checkpointing_on_cuda(cache, train_overrides, micro_world, tmp_path):
    from vopd.config import load_config
    from vopd.train import train

    cfg = load_config(None, train_overrides + [
        "model.device=cuda", "model.dtype=bfloat16", "model.teacher_dtype=bfloat16",
        "model.gradient_checkpointing=true", "loss.method=vopd", "steps=2", f"rollout.cache={cache}",
        f"output_dir={tmp_path / 'run'}"])
    result = train(cfg, log=lambda _m: None)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and result.skipped_steps == 0
    for r in rows:
        assert torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all(), r
    before = load_file(str(micro_world.student / "model.safetensors"))
    after = load_file(str(result.output_dir / "final" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    changed = [k for k in before if not torch.equal(after[k], before[k].bfloat16())]
    # lr 3e-3 moves every weight matrix; norm gains near 1.0 may sit below bf16's spacing there (2^-7)
    assert all(k in changed for k in before if k.endswith("proj.weight") or "embed" in k or "lm_head" in k), \
        sorted(set(before) - set(changed))


def _peak_mib(fn) -> float:
    """Peak CUDA memory of ``fn()`` above what was allocated before it (after a warm-up call, so cuBLAS workspaces
    and the allocator's first growth are not counted)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def test_chunked_opd_full_peak_memory_is_far_below_the_naive_path():
    # 8k completion tokens, a 32k vocabulary, bf16: the naive path holds several (T, V) fp32 tensors (GiBs)
    hs, ws, ht, wt, y, mask, _ = _bf16_batch(2, 4096, 32768, 1024, 1024, seed=1)
    hs.requires_grad_(True)
    ws.requires_grad_(True)

    def naive() -> None:
        out = distillation_loss(hs @ ws.T, ht @ wt.T, y, mask, method="opd-full")
        grads = torch.autograd.grad(out.loss, (hs, ws))
        del out, grads

    def chunked() -> None:
        out = chunked_distillation_loss(hs, ws, ht, wt, y, mask, method="opd-full", memory_budget_mb=256)
        grads = torch.autograd.grad(out.loss, (hs, ws))
        del out, grads

    naive_mib, chunked_mib = _peak_mib(naive), _peak_mib(chunked)
    assert chunked_mib < naive_mib / 4, (chunked_mib, naive_mib)
