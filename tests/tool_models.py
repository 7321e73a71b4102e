"""A tiny student and teacher of Qwen3's tool format for the multi-turn tests: a tokenizer with Qwen3's tool tokens
and a Qwen3-format tools chat template, random weights nudged so that the stop tokens are likely (``tool_world`` in
conftest builds the pair)."""

from __future__ import annotations

import json

import torch

from vopd.env.calculator import Calculator

TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

#: Qwen3's chat template with tools, its thinking branches left out (the tiny student does not think).
QWEN3_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tools_tokenizer():
    from vopd.world.tiny_models import EOS, IM_START, train_tokenizer

    texts = [json.dumps(Calculator.tools[0]), QWEN3_TOOLS,
             *[f"What is {a} * {b}? The answer is {a * b}." for a in range(20) for b in range(3)]]
    tok = train_tokenizer(texts, vocab_size=400, chat=True)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, EOS, *TOOL_TOKENS]})
    tok.chat_template = QWEN3_TOOLS
    return tok


def likely_stops(model, tok) -> None:
    """Make the stop tokens (and <tool_call>) likely whatever the context, in the weights only (both engines read
    them): one residual dimension held constant (embeddings write it, no layer output touches it), read by those
    tokens' output rows."""
    with torch.no_grad():
        inner = model.model
        inner.embed_tokens.weight[:, 0] = 4.0
        for layer in inner.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        for token, weight in (("<|im_end|>", 0.5), ("</tool_call>", 0.5), ("<tool_call>", 0.3)):
            model.lm_head.weight[tok.convert_tokens_to_ids(token), 0] = weight


def build_tool_world(root):
    """(directory of the student, of a teacher, the tokenizer): head size 32 (vLLM's CPU attention), 2048 positions
    (the tools' system turn is long)."""
    from vopd.world.tiny_models import ModelShape, make_model

    tok = tools_tokenizer()
    dirs = []
    for name, seed, layers in (("student", 3, 1), ("teacher", 4, 2)):
        model = make_model(ModelShape(hidden_size=64, num_layers=layers, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64, max_positions=2048), tok, seed=seed)
        likely_stops(model, tok)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1], tok
