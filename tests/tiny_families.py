"""Tiny random decoders of the common families, built in code from transformers configs (nothing is downloaded).

A helper for the tests (not collected: no ``test_`` prefix): ``make`` builds a seeded model of a family over a
vocabulary size, ``save_pair`` writes a teacher and a student with a tokenizer, as `vopd train` reads them.
The sizes are the smallest that exercise each family's peculiarity (tied embeddings, MoE experts, fused
projections, softcapping, logit scaling); ``initializer_range`` is large so that logits are spread wide enough
for a softcap or a scale to change them by much more than any tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: family -> (config class, causal LM class, config options beyond the common ones)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8, "tie_word_embeddings": True}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 0.25}),
}


def make(family: str, vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 1,
         **options: Any) -> Any:
    """A freshly initialised ``family`` causal LM with ``vocab_size`` output rows, fp32, eval mode. PAD, BOS, EOS are
    ids 0, 1, 2 (the micro world's tokenizer)."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **{**extra, **options})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def save_pair(root: Path, family: str, tokenizer: Any, *, student_rows: int | None = None,
              teacher_rows: int | None = None, teacher_family: str | None = None) -> tuple[Path, Path]:
    """(student dir, teacher dir) under ``root``: a 1-layer student and a 2-layer, wider teacher of ``family`` (or
    ``teacher_family``), each saved with ``tokenizer``. ``*_rows``: output rows (default the tokenizer's size; more
    rows are padding past the tokenizer)."""
    from transformers import AutoTokenizer

    dirs = []
    for role, fam, rows, seed, hidden, layers in (
            ("student", family, student_rows, 1, 32, 1), ("teacher", teacher_family or family, teacher_rows, 2, 48, 2)):
        path = root / f"{family}-{role}"
        for _attempt in range(2):
            model = make(fam, rows or len(tokenizer), seed=seed, hidden=hidden, layers=layers)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            # transformers loads the tokenizer as the family's own class, which may add a token (Qwen2's
            # <|endoftext|>): size the model to what `vopd train` will load.
            loaded = len(AutoTokenizer.from_pretrained(path, local_files_only=True))
            if (rows or len(tokenizer)) >= loaded:
                break
            rows = loaded
        dirs.append(path)
    return dirs[0], dirs[1]
