"""Rollout sampling with a static KV cache: the same tokens and sampler log-probs as the dynamic cache (greedy and
seeded sampling, ragged left-padded prompts, several generate calls), and the trainer wired to ``rollout.cache``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vopd.config import load_config
from vopd.models import load_model, load_tokenizer
from vopd.rollout import hf_sampler
from vopd.sampling import generate
from vopd.train import train


@pytest.fixture(scope="module")
def student(micro_world):
    """The micro world's teacher (SFT'd, so some rows end with EOS and others run to max_new_tokens), real prompts."""
    from vopd.data import format_prompt
    from vopd.world.task import read_jsonl

    tok = load_tokenizer(str(micro_world.teacher))
    model = load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=torch.device("cpu"))
    rows = read_jsonl(micro_world.test)[:5]
    prompts = [list(tok(format_prompt(r["problem"]))["input_ids"]) for r in rows]
    prompts[1] = prompts[1][-3:]  # ragged widths: left padding differs between rows
    return model, tok, prompts


def test_static_cache_gives_the_dynamic_cache_tokens(student):
    model, tok, prompts = student
    for greedy in (True, False):
        got = {}
        for cache in ("dynamic", "static"):
            torch.manual_seed(3)
            # batch_size 2: three generate calls with different prompt widths and batch sizes
            got[cache] = generate(model, tok, prompts, max_new_tokens=40, greedy=greedy, temperature=1.0, top_k=0,
                                  top_p=1.0, return_logprobs=True, batch_size=2, cache=cache)
        assert got["static"].completions == got["dynamic"].completions, greedy
        assert got["static"].truncated == got["dynamic"].truncated
        for a, b in zip(got["static"].logprobs, got["dynamic"].logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    # the sampled rows: some ended with EOS (then padded while the others go on), some ran to max_new_tokens
    assert 0 < sum(got["dynamic"].truncated) < len(prompts)


def test_hf_sampler_static_equals_dynamic_when_seeded(student):
    model, tok, prompts = student
    runs = []
    for cache in ("dynamic", "static"):
        sample = hf_sampler(model, tok, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, batch_size=8,
                            cache=cache)
        torch.manual_seed(11)
        runs.append(sample(prompts * 2))
    dynamic, static = runs
    assert static.completions == dynamic.completions
    assert len({tuple(c) for c in dynamic.completions}) > 1  # really sampled
    for a, b in zip(static.logprobs, dynamic.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_unknown_cache_is_refused(student):
    model, tok, prompts = student
    with pytest.raises(ValueError, match="valid caches: dynamic, static"):
        generate(model, tok, prompts, max_new_tokens=2, cache="paged")


def test_trainer_with_a_static_cache_gives_the_dynamic_cache_weights(train_overrides, tmp_path):
    finals = []
    for cache in ("dynamic", "static"):
        cfg = load_config(None, train_overrides + ["steps=2", "loss.method=vopd", f"rollout.cache={cache}",
                                                   f"output_dir={tmp_path / cache}"])
        finals.append(load_file(str(train(cfg, log=lambda _m: None).output_dir / "final" / "model.safetensors")))
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=1e-5, atol=1e-6, msg=key)
