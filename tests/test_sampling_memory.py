"""Sampling memory: ``vopd.sampling.generate`` holds a few (B, V) score tensors whatever the number of new tokens (it
used to keep every step's, via ``output_scores``), and the log-probs it records are still those of the distribution
sampled from: equal, bit for bit, to transformers' own ``output_scores`` under temperature, top-k and top-p.

Peak memory is measured on CPU by a dispatch mode that counts the bytes of the storages created inside it while a
tensor still refers to them (torch has no allocator statistics on CPU, and tracemalloc does not see its allocations).
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vopd.sampling import generate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 32768
ROWS = 2
STEP_SCORES = ROWS * VOCAB * 4  # bytes of one step's fp32 (B, V) scores


class LiveTensorBytes(TorchDispatchMode):
    """The peak, over the mode's lifetime, of the bytes held by storages that ops inside it allocated and that some
    tensor still refers to (views of one storage count it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors referring to it]

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, t: torch.Tensor, input_storages: set[int]) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in self._storages:
            if nbytes == 0 or key in input_storages:
                return  # a view of (or an in-place op on) a storage made before the mode (a weight): no allocation
            self._storages[key] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._storages[key][1] += 1  # a view keeps its base's storage alive: counted until the last tensor dies
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        inputs = {a.untyped_storage().data_ptr() for a in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


@pytest.fixture(scope="module")
def wide_model():
    """A one-layer random Qwen3 over a 32k vocabulary (its lm_head scaled up, so the distribution is peaked and
    top-k/top-p cut real mass), and a real tokenizer for its special ids."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vopd.world.tiny_models import train_tokenizer

    tok = train_tokenizer(["1 + 2 = 3", "the answer is 42"], vocab_size=280)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    prompts = [[tok.bos_token_id, 5, 6, 7], [tok.bos_token_id, 9, 10, 11]]  # one width: no padding
    return model, tok, prompts


def _peak_bytes(model, tok, prompts, new_tokens: int) -> int:
    torch.manual_seed(0)
    with LiveTensorBytes() as counter:
        # no stop ids: every row runs to new_tokens
        out = generate(model, tok, prompts, max_new_tokens=new_tokens, return_logprobs=True, stop_ids=[])
    assert [len(lp) for lp in out.logprobs] == [new_tokens] * ROWS
    return counter.peak


def test_sampling_memory_does_not_grow_with_new_tokens(wide_model):
    short, long = (_peak_bytes(*wide_model, n) for n in (64, 256))
    kept_scores = (256 - 64) * STEP_SCORES  # what keeping every step's scores adds between the two: 48 MiB
    print(f"peak live tensor bytes: 64 new tokens {short / 2**20:.2f} MiB, 256 {long / 2**20:.2f} MiB")
    # The growth is the KV cache (a few KiB per token here), not the scores.
    assert long - short < kept_scores / 50
    assert long < 16 * STEP_SCORES  # a few (B, V) buffers (logits, probs, the pending log-softmax), not 256


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.9)])
def test_logprobs_equal_transformers_output_scores(wide_model, temperature, top_k, top_p):
    from transformers import GenerationConfig

    model, tok, prompts = wide_model
    torch.manual_seed(5)
    ours = generate(model, tok, prompts, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
                    return_logprobs=True, stop_ids=[])
    # transformers' own path: its warpers in its order, every step's processed scores returned
    ids = torch.tensor(prompts)
    torch.manual_seed(5)
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
        max_new_tokens=12, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=None,
        pad_token_id=tok.pad_token_id, eos_token_id=None, output_scores=True, return_dict_in_generate=True))
    new = ref.sequences[:, ids.shape[1]:]
    steps = torch.stack([s.log_softmax(-1) for s in ref.scores], dim=1)
    expected = steps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    assert ours.completions == new.tolist()
    assert torch.equal(torch.tensor(ours.logprobs), expected)
    assert bool((expected > -1.0).any()) and bool((expected < -1e-3).all())  # peaked, and really sampled
