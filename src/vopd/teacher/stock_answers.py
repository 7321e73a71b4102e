"""The bodies sent to a stock vLLM server and what its answers must hold, read into tensors (``vopd.teacher.stock_vllm``).

What it knows: the ``/v1/completions`` body asking for prompt log-probs of token-id prompts (``max_tokens: 1``: vLLM
generates at least one token), and the shapes of its ``prompt_logprobs`` (one per prompt token, entry 0 null) and of a
``/pooling`` answer (``data``: one base64 float32 array of T x D per input, by ``index``). Every answer is refused in
one line (naming the server, the field and what to do) when it does not hold what was asked. What it does not know:
the numbers' meaning (``vopd.teacher.stock_vllm`` reads ranks and log-probs), HTTP, or the loss.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import torch
from torch import Tensor

from vopd.errors import UserError


def completion_requests(model: str, prompts: list[list[int]], k: int) -> dict[str, Any]:
    """One ``/v1/completions`` body: the prompt log-probs (the top ``k`` and the actual token) of ``prompts``."""
    return {"model": model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0,
            "detokenize": False}


def _choices(answer: dict[str, Any], count: int, url: str, advice: str) -> list[dict[str, Any]]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != count or not all(isinstance(c, dict) for c in choices):
        raise UserError(f"vLLM server at {url} answered /v1/completions without {count} objects in 'choices' "
                        f"(got {str(choices)[:80]}){advice}")
    try:
        return sorted(choices, key=lambda c: int(c["index"]))  # vLLM keeps the order; the index says it
    except (KeyError, TypeError, ValueError):
        raise UserError(f"vLLM server at {url} answered /v1/completions with a choice lacking its index{advice}") from None


def read_prompt_logprobs(answer: dict[str, Any], count: int, url: str, advice: str) -> list[list[Any]]:
    """Per prompt, its ``prompt_logprobs`` list (entry j: the token at j given the tokens before it)."""
    out = []
    for j, choice in enumerate(_choices(answer, count, url, advice)):
        rows = choice.get("prompt_logprobs")
        if not isinstance(rows, list) or not rows:
            raise UserError(f"vLLM server at {url} answered /v1/completions without choices[{j}].prompt_logprobs "
                            f"(got {str(rows)[:60]}): is it a vLLM server (prompt_logprobs is vLLM's field)?{advice}")
        out.append(rows)
    return out


def read_pooled(answer: dict[str, Any], lengths: list[int], url: str, advice: str) -> list[Tensor]:
    """Per input of ``lengths`` tokens, its pooled states (T, D) decoded from base64 float32."""
    data = answer.get("data")
    if not isinstance(data, list) or len(data) != len(lengths) or not all(isinstance(d, dict) for d in data):
        raise UserError(f"vLLM server at {url} answered /pooling without {len(lengths)} objects in 'data' (got "
                        f"{str(data)[:80]}){advice}")
    out = []
    for j, item in enumerate(sorted(data, key=lambda d: int(d.get("index", 0)))):
        raw = item.get("data")
        try:
            flat = torch.frombuffer(bytearray(base64.b64decode(raw, validate=True)), dtype=torch.float32)
        except (TypeError, ValueError, binascii.Error) as exc:
            raise UserError(f"vLLM server at {url} sent data[{j}] of a /pooling answer that is not base64 float32 "
                            f"({str(exc)[:80]}): is it a vLLM pooling server?{advice}") from None
        n = lengths[j]
        if flat.numel() == 0 or flat.numel() % n:
            raise UserError(f"vLLM server at {url} sent data[{j}] of {flat.numel()} floats in a /pooling answer, not "
                            f"one hidden state per each of its {n} tokens (is --pooler-config task token_embed?)"
                            f"{advice}")
        out.append(flat.reshape(n, -1))
    return out
