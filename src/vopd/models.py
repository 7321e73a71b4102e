"""Loading Hugging Face causal LMs from local paths and reaching their last hidden states and output layer.

What it knows: device/dtype resolution, ``AutoModelForCausalLM``/``AutoTokenizer`` loading with
``local_files_only`` (nothing is ever downloaded) and one-line errors for bad paths, LoRA through PEFT, gradient
checkpointing, and how to run a model's body without its output layer so that the chunked estimator path
(``vopd.loss.chunked``) can form logits chunk by chunk. What it does not know: estimators, sampling, training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.config import resolve_dtype as dtype_name
from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={name} but CUDA is not available on this machine; use model.device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config dtype name on ``device`` ('auto': ``vopd.config.resolve_dtype``'s rule)."""
    return _DTYPES[dtype_name(name, str(device))]


def _check_model_dir(path: str, role: str) -> Path:
    p = Path(path).expanduser()
    if not str(path):
        raise UserError(f"no {role} model given; set model.{role}=/path/to/hf_model_dir")
    if not p.is_dir():
        raise UserError(f"{role} model path {str(p)!r} does not exist or is not a directory; pass a local Hugging Face "
                        "model directory (vopd never downloads from a hub)")
    if not (p / "config.json").is_file():
        raise UserError(f"{role} model path {str(p)!r} has no config.json; it is not a Hugging Face model directory")
    return p


def load_tokenizer(path: str, *, role: str = "student", trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    p = _check_model_dir(path, role)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here; the user needs the path and the cause
        raise UserError(f"cannot load the {role} tokenizer from {str(p)!r}: {str(exc).splitlines()[0]}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation needs a pad id; EOS never appears inside a completion
    return tok


def load_model(path: str, *, role: str, dtype: torch.dtype, device: torch.device,
               trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    p = _check_model_dir(path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise UserError(f"cannot load the {role} model from {str(p)!r}: {str(exc).splitlines()[0]}") from exc
    return model.to(device)


def load_student(model: ModelConfig, device: torch.device) -> tuple[Any, Any]:
    """(tokenizer, model) of ``model.student`` at ``model.dtype`` on ``device``: the one way the student is loaded
    (the teacher's is ``vopd.teacher.base.open_teacher``)."""
    tok = load_tokenizer(model.student, role="student", trust_remote_code=model.trust_remote_code)
    student = load_model(model.student, role="student", dtype=resolve_dtype(model.dtype, device), device=device,
                         trust_remote_code=model.trust_remote_code)
    return tok, student


def apply_lora(model: Any, *, r: int, alpha: int, dropout: float, target_modules: list[str]) -> Any:
    """Wrap with PEFT LoRA adapters. The output layer is never a target: the chunked head reads its weight."""
    from peft import LoraConfig, get_peft_model

    if any(t in ("lm_head", "embed_tokens") for t in target_modules):
        raise UserError("lora.target_modules may not include lm_head or embed_tokens; list the attention/MLP "
                        "projections (e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in present]
    if missing:
        raise UserError(f"lora.target_modules {missing} not found in the student; its linear layers include "
                        f"{sorted(n for n in present if 'proj' in n or 'fc' in n)[:12]}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (LoRA adapters around a base model)."""
    peft = sys.modules.get("peft")  # a PeftModel cannot exist unless peft was imported; avoid importing it here
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(model: Any, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """(weight (V, D), bias (V,) or None) of the output layer, sliced to the tokenizer's ``vocab_size`` rows:
    rows past the tokenizer are padding that no token id can reach (they are also suppressed when sampling)."""
    head = base_model(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"{type(base_model(model)).__name__} has no linear output layer; vopd needs a causal LM head")
    if head.weight.shape[0] < vocab_size:
        raise UserError(f"output layer has {head.weight.shape[0]} rows but the tokenizer has {vocab_size} tokens; "
                        "the model and tokenizer do not belong together")
    weight = head.weight[:vocab_size]
    bias = head.bias[:vocab_size] if getattr(head, "bias", None) is not None else None
    return weight, bias


def last_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states (B, L, D) after the last norm, without running the output layer."""
    decoder = base_model(model).get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def enable_gradient_checkpointing(model: Any) -> None:
    base = base_model(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns, goes in v6
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # PEFT: frozen embeddings would otherwise cut the checkpointed graph
