"""The tiny world's tokenizer and models: a byte-level BPE tokenizer trained offline and tiny ``Qwen3ForCausalLM``s.

What it knows: how to train the tokenizer (digits one per token, arithmetic operators isolated, BOS prepended) on
the task's text, and how to create a freshly initialised Qwen3 model of a given ``ModelShape`` over a tokenizer's
vocabulary, seeded. What it does NOT know: the task itself (``vopd.world.task``), training (``vopd.world.sft``), or building
and caching a whole world (``vopd.world.build``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch

from vopd.data import format_prompt
from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.models import Model, Tokenizer

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


@dataclass(frozen=True)
class ModelShape:
    """The size of a tiny Qwen3 model (vocabulary size comes from the tokenizer)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 256
    head_dim: int = 0  # 0: hidden_size // num_heads; vLLM's CPU attention needs 32, 64, 128, ...


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> Tokenizer:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``.

    Digits are split one per token before BPE (so no merge ever spans digits, and numbers are spelled digit by
    digit); every byte is in the base alphabet (any text encodes, and decode(encode(x)) == x). The post-processor
    prepends BOS, so ``vopd.data.encode_prompt`` yields BOS + prompt; PAD, BOS, EOS have ids 0, 1, 2.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as BPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = BPETokenizer(models.BPE())
    # Merges may cross spaces (no word regex), which makes the fixed phrases of the task one token each and keeps
    # sequences short for CPU training. Arithmetic operators are isolated so that "+" in a problem and in a worked
    # solution is the same token: copying an operation is then a literal copy, which small models learn faster.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(r" [-+*/] "), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def tokenizer_corpus(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The texts the tiny world's tokenizer is trained on: every row's prompt (``format_prompt``), then every worked
    solution."""
    rows = list(rows)
    return [format_prompt(r["problem"]) for r in rows] + [r["solution"] for r in rows]


# ------------------------------------------------------------------------------------------------ models


def make_model(shape: ModelShape, tokenizer: Tokenizer, *, seed: int) -> Model:
    """A freshly initialised ``Qwen3ForCausalLM`` of ``shape`` over ``tokenizer``'s vocabulary (fp32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if (not shape.head_dim and shape.hidden_size % shape.num_heads) or shape.num_heads % shape.num_kv_heads:
        raise UserError(f"{shape}: hidden_size must divide by num_heads (or set head_dim) and num_heads by "
                        "num_kv_heads")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim or shape.hidden_size // shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
