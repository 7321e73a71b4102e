"""``vopd eval --engine vllm``: a vLLM engine over a model directory's own weights, as an evaluation engine.

What it knows: building the engine for the longest prompt it is asked to sample plus the completion length (refused
in one line past the model's position limit, before vLLM starts), with nothing pushed and no Hugging Face copy of
the model loaded, and sampling evaluation batches with it (``vopd.vllm_engine.sample_batches``: per-request seeds
from the batch seeds). What it does not know: grading (``vopd.eval``), the split over ranks (``vopd.eval_split``),
or the rollout engine's weight push (``vopd.vllm_engine.VllmSampler``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vopd.errors import UserError
from vopd.prompts import stop_token_ids
from vopd.vllm_engine import EngineShape, engine, sample_batches

if TYPE_CHECKING:
    import torch

    from vopd.config import VllmConfig
    from vopd.models import Tokenizer
    from vopd.sampling import Samples, SamplingSettings


class VllmEvaluator:
    """A vLLM engine over a model directory's own weights, for ``vopd eval --engine vllm``: nothing is pushed, and
    no Hugging Face copy of the model is loaded (``vopd.eval_split.EvalEngine`` through ``sample_batches``). Built
    at the first call, for the longest prompt it is given + ``max_new_tokens``."""

    def __init__(self, model_dir: str, tokenizer: Tokenizer, options: VllmConfig, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model_dir, self.options, self.dtype, self.device = model_dir, options, dtype, device
        self.stop_ids = stop_token_ids(tokenizer)

    def sample_batches(self, batches: list[list[list[int]]], seeds: list[int],
                       settings: SamplingSettings) -> list[Samples]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_dir)
        need = max((len(p) for b in batches for p in b), default=1) + settings.max_new_tokens
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise UserError(f"the longest prompt + --max-new-tokens is {need} tokens, beyond the model's position "
                            f"limit (max_position_embeddings={limit}): lower --max-new-tokens to at most "
                            f"{limit - need + settings.max_new_tokens}")
        o = self.options
        shape = EngineShape(model_dir=self.model_dir, dtype=str(self.dtype).removeprefix("torch."),
                            max_model_len=need, device=self.device.type,
                            gpu_memory_utilization=o.gpu_memory_utilization, enforce_eager=o.enforce_eager,
                            sleep=False, kv_cache_bytes=int(o.cpu_kv_cache_gb * 2**30), world_size=1)
        return sample_batches(engine(shape, config), batches, seeds, settings, self.stop_ids)
