"""The tiny world's tokenizer and models: a byte-level BPE tokenizer trained offline and tiny ``Qwen3ForCausalLM``s.

What it knows: how to train the tokenizer (digits one per token, arithmetic operators isolated, BOS prepended to a
text; with ``chat``, a ChatML chat template whose end of turn ``<|im_end|>`` is the EOS, as Qwen's instruct tokenizers
declare it) on the task's text, and how to create a freshly initialised Qwen3 model of a given ``ModelShape`` over a
tokenizer's vocabulary, seeded. What it does NOT know: the task itself (``vopd.world.task``), how prompts are rendered
(``vopd.prompts``: the template saved here is applied there), training (``vopd.world.sft``), or building and caching a
whole world (``vopd.world.build``).
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
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: ChatML as Qwen writes it: ``<|im_start|>role\ncontent<|im_end|>\n`` per turn, and ``<|im_start|>assistant\n`` as the
#: generation prompt; no default system turn. Unlike Qwen's, the conversation starts with BOS (as Llama's and Gemma's
#: templates do): models this small use the first token as an attention sink, and without a token that occurs only
#: there the student needed 680 SFT steps instead of 380 to reach its target (docs/tiny_world.md).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: The tool world's tokens (docs/tiny_world.md, "The tool world"): one id each, as in Qwen3's tokenizer, where they are
#: added tokens that are not special (``decode(skip_special_tokens=True)`` keeps them: a parser reads the calls back).
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
#: Qwen3's chat template with tools, less its thinking parts, after one BOS (as ``CHAT_TEMPLATE``): the tools declared
#: in a system turn between ``<tools></tools>``, an assistant turn's text verbatim (its tool calls included; a
#: ``tool_calls`` field is written as Qwen3 writes it), and tool messages inside one user turn, each between
#: ``<tool_response>`` tags. Without tools it renders exactly as ``CHAT_TEMPLATE``.
TOOL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if (loop.first and message.content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set f = call.function if call.function else call %}"
    "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{{- f.arguments if f.arguments is string else f.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384, *, chat: bool = False,
                    tools: bool = False) -> Tokenizer:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``.

    Digits are split one per token before BPE (so no merge ever spans digits, and numbers are spelled digit by
    digit); every byte is in the base alphabet (any text encodes, and decode(encode(x)) == x). The post-processor
    prepends BOS to a text, so ``vopd.prompts.encode_prompt`` yields BOS + prompt; PAD, BOS, EOS have ids 0, 1, 2.

    With ``chat``: ``<|im_start|>`` and ``<|im_end|>`` are special tokens too (ids 3, 4), ``CHAT_TEMPLATE`` (BOS, then
    ChatML) is the chat template (saved with the tokenizer, so ``AutoTokenizer.from_pretrained(dir).apply_chat_template``
    renders it), and ``<|im_end|>`` is the EOS, as in Qwen's instruct tokenizers: a completion ends on it, rendered through the
    template or not. ``<|eos|>`` stays in the vocabulary, unused (as Qwen's ``<|endoftext|>``). A newline is a
    token of its own, never merged with its neighbours, so the ids of a prompt ending with the generation prompt's
    ``assistant\\n`` are a prefix of the ids of the same conversation with the answer (``vopd.prompts.encode_example``).

    With ``tools`` (needs ``chat``): the chat template is ``TOOL_CHAT_TEMPLATE`` and the ``TOOL_TOKENS`` are added
    after training, one id each, not special (as Qwen3's); ``texts`` should not contain them (BPE would spend merges
    on them).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as BPETokenizer
    from transformers import PreTrainedTokenizerFast

    if tools and not chat:
        raise UserError("a tokenizer with tools needs the chat template (chat=True)")
    tok = BPETokenizer(models.BPE())
    # Merges may cross spaces (no word regex), which makes the fixed phrases of the task one token each and keeps
    # sequences short for CPU training. Arithmetic operators are isolated so that "+" in a problem and in a worked
    # solution is the same token: copying an operation is then a literal copy, which small models learn faster.
    splits = [pre_tokenizers.Digits(individual_digits=True),
              pre_tokenizers.Split(Regex(r" [-+*/] "), behavior="isolated")]
    if chat:
        splits.append(pre_tokenizers.Split("\n", behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *([IM_START, IM_END] if chat else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    if not chat:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD,
                                  chat_template=TOOL_CHAT_TEMPLATE if tools else CHAT_TEMPLATE)
    # Declared special (skipped by decode(skip_special_tokens=True)); they are in the vocabulary already.
    out.add_special_tokens({"additional_special_tokens": [IM_START, EOS]})
    if tools:
        from tokenizers import AddedToken

        out.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return out


def tokenizer_corpus(rows: Iterable[dict[str, Any]], *, chat: bool = False) -> list[str]:
    """The texts the tiny world's tokenizer is trained on: every row's prompt (``format_prompt``), then every worked
    solution; with ``chat``, each after the role name the chat template writes before it (``user``, ``assistant``)
    and its newline, so each role name becomes one token."""
    rows = list(rows)
    user, assistant = ("user\n", "assistant\n") if chat else ("", "")
    return [user + format_prompt(r["problem"]) for r in rows] + [assistant + r["solution"] for r in rows]


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
