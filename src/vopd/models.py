"""Loading Hugging Face causal LMs from local paths and reaching their last hidden states and output layer.

What it knows: device/dtype resolution, ``AutoModelForCausalLM``/``AutoTokenizer`` loading with
``local_files_only`` (nothing is ever downloaded) and one-line errors for bad paths, LoRA through PEFT, gradient
checkpointing, and how to run a model's body without its output layer so that the chunked estimator path
(``vopd.loss.chunked``) can form logits chunk by chunk: the output layer and the logit transform a model's config
declares (``OutputHead``). What it does not know: estimators, sampling, training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.head import LogitTransform, OutputHead
from vopd.precision import autocast_to, torch_dtype  # torch_dtype: importable from here too, as before

if TYPE_CHECKING:
    from vopd.config import ModelConfig

#: A Hugging Face causal LM as vopd passes it around: a ``transformers`` ``PreTrainedModel``, or a PEFT model wrapping
#: one (LoRA), or either inside DDP. transformers and PEFT are not type-checked here (mypy treats them as untyped), and
#: both kinds flow through the same functions, so this names the role rather than a class.
Model: TypeAlias = Any
#: A Hugging Face tokenizer (a ``transformers.PreTrainedTokenizerBase``, as ``load_tokenizer`` returns it).
Tokenizer: TypeAlias = Any

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={name} but CUDA is not available on this machine; use model.device=cpu")
    return device


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


def load_tokenizer(path: str, *, role: str = "student", trust_remote_code: bool = False) -> Tokenizer:
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
               trust_remote_code: bool = False) -> Model:
    from transformers import AutoModelForCausalLM

    p = _check_model_dir(path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise UserError(f"cannot load the {role} model from {str(p)!r}: {str(exc).splitlines()[0]}") from exc
    return model.to(device)


def model_from_config(path: str, *, role: str, dtype: torch.dtype, trust_remote_code: bool = False) -> Model:
    """The causal LM that ``path``'s ``config.json`` describes, with weightless parameters on the meta device (no
    weights, no tokenizer read): the shapes ``vopd plan`` traces (``vopd.memplan``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = _check_model_dir(path, role)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here; the user needs the path and the cause
        raise UserError(f"cannot build the {role} model from {str(p / 'config.json')!r}: "
                        f"{str(exc).splitlines()[0]}") from exc


def load_student(model: ModelConfig, device: torch.device, dtype: torch.dtype | None = None) -> tuple[Tokenizer, Model]:
    """(tokenizer, model) of ``model.student`` on ``device``, at ``dtype`` (the trainer's: ``Precision.load``, the
    masters) or else at ``model.dtype``: the one way the student is loaded (the teacher's is
    ``vopd.teacher.base.open_teacher``)."""
    tok = load_tokenizer(model.student, role="student", trust_remote_code=model.trust_remote_code)
    student = load_model(model.student, role="student", dtype=dtype or torch_dtype(model.dtype, device),
                         device=device, trust_remote_code=model.trust_remote_code)
    return tok, student


#: ``lora.target_modules`` meaning every linear layer of the body (PEFT's ``all-linear``: never the output layer).
ALL_LINEAR = "all-linear"


def apply_lora(model: Model, *, r: int, alpha: int, dropout: float, target_modules: list[str],
               float32_adapters: bool = True) -> Model:
    """Wrap with PEFT LoRA adapters on ``target_modules`` (module names, or ``[all-linear]``: every linear layer of the
    body, whatever the architecture calls its projections). The output layer is never a target: the chunked head
    reads its weight; nor are the input embeddings (tied to it in some families). ``float32_adapters``: adapters of
    a half base in float32 (their master weights, ``vopd.precision``), else in the base's dtype."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    base = base_model(model)
    heads = [m for m in (base.get_output_embeddings(), base.get_input_embeddings()) if m is not None]
    forbidden = {"lm_head", "embed_tokens"} | {n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                                               if any(m is h for h in heads)}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)} - forbidden)
    targets: str | list[str]
    if ALL_LINEAR in target_modules:
        if len(target_modules) != 1:
            raise UserError(f"lora.target_modules={target_modules} mixes {ALL_LINEAR} with module names; use "
                            f"[{ALL_LINEAR}] alone or list the modules (this student's: {','.join(linear)})")
        targets = ALL_LINEAR
    else:
        bad = sorted(set(target_modules) & forbidden)
        if bad:
            raise UserError(f"lora.target_modules may not include the output layer or the embeddings ({bad}): the "
                            f"fused head reads the output weight; use [{ALL_LINEAR}] or list projections "
                            f"(this student's: {','.join(linear)})")
        present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        missing = [t for t in target_modules if t not in present]
        if missing:
            raise UserError(f"lora.target_modules {missing} not found in the student ({type(base).__name__}); its "
                            f"linear layers are {','.join(linear)}, or use lora.target_modules=[{ALL_LINEAR}]")
        targets = list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    # PEFT's autocast_adapter_dtype upcasts bf16/fp16 adapter weights to float32 (a float32 base is left alone).
    wrapped = get_peft_model(model, cfg, autocast_adapter_dtype=float32_adapters)
    if hasattr(base_model(wrapped).get_output_embeddings(), "lora_A"):  # never: PEFT's all-linear skips it too
        raise UserError("LoRA adapters ended up on the output layer; set lora.target_modules to the body's projections")
    return wrapped


def is_peft(model: Model) -> bool:
    """Whether ``model`` is a PEFT model (LoRA adapters around a base model)."""
    peft = sys.modules.get("peft")  # a PeftModel cannot exist unless peft was imported; avoid importing it here
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: Model) -> Model:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


#: Logit scaling by model type (prefix): (config attribute, whether the model divides by it). Softcapping needs no
#: table: every family that sets ``final_logit_softcapping`` computes c·tanh(z/c) (docs/estimators.md, "Output
#: transforms").
_SCALING = {"granite": ("logits_scaling", True), "cohere": ("logit_scale", False),
            "hyperclovax": ("logits_scaling", False)}


def logit_transform(model: Model) -> LogitTransform:
    """What the model does to ``hidden @ W.T + b`` before its softmax, read from its config: scaling (Granite divides
    by ``logits_scaling``, Cohere multiplies by ``logit_scale``), then final-logit softcapping (Gemma 2). A transform
    this table does not know is caught by the pre-flight self-check (``head_error``, ``vopd.check.self_check``)."""
    config = base_model(model).config
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    for prefix, (attr, divide) in _SCALING.items():
        value = getattr(config, attr, None)
        if model_type.startswith(prefix) and value is not None and float(value) != 1.0:
            scale = 1.0 / float(value) if divide else float(value)
    cap = getattr(config, "final_logit_softcapping", None)
    try:
        return LogitTransform(scale=scale, softcap=None if cap is None or float(cap) == 0 else float(cap))
    except ValueError as exc:
        raise UserError(f"{type(base_model(model)).__name__}'s config declares an invalid output transform ({exc}); "
                        "fix final_logit_softcapping / the logit scale in its config.json") from None


def output_layer(model: Model, vocab_size: int) -> OutputHead:
    """The output layer sliced to the tokenizer's ``vocab_size`` rows (weight (V, D), bias (V,) or None) and the
    model's logit transform: rows past the tokenizer are padding that no token id can reach (they are also suppressed
    when sampling)."""
    head = base_model(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"{type(base_model(model)).__name__} has no linear output layer (get_output_embeddings() "
                        "returns none); vopd needs a causal LM head whose weight it can read")
    if head.weight.shape[0] < vocab_size:
        raise UserError(f"output layer has {head.weight.shape[0]} rows but the tokenizer has {vocab_size} tokens; "
                        "the model and tokenizer do not belong together")
    weight = head.weight[:vocab_size]
    bias = head.bias[:vocab_size] if getattr(head, "bias", None) is not None else None
    return OutputHead(weight, bias, logit_transform(model))


@torch.no_grad()
def head_error(model: Model, input_ids: Tensor, vocab_size: int) -> float:
    """Max |log p| difference between ``output_layer(...).logits(last_hidden(...))`` and the model's own forward on
    ``input_ids`` (B, L), in fp32: ~0 when vopd reproduces the model's logits. The train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    try:
        attention = torch.ones_like(input_ids)
        head = output_layer(model, vocab_size)
        hidden = last_hidden(model, input_ids, attention).float()
        fp32 = OutputHead(head.weight.float(), None if head.bias is None else head.bias.float(), head.transform)
        ours = fp32.logits(hidden).log_softmax(-1)
        ref = model(input_ids=input_ids, attention_mask=attention).logits[..., :vocab_size].float().log_softmax(-1)
    finally:
        model.train(was_training)
    return float((ours - ref).abs().max())


def head_mismatch(model: Model, error: float, *, role: str) -> str:
    """The one-line refusal of a model whose logits vopd's output head does not reproduce."""
    return (f"{role} self-check failed: {type(base_model(model)).__name__}'s output layer with the logit transform "
            f"vopd reads from its config ({logit_transform(model).describe()}) does not reproduce the model's own logits "
            f"(max |log p| error {error:.2e}); vopd supports logits = transform(hidden @ W.T + b) with "
            "final_logit_softcapping and Granite/Cohere logit scaling: this architecture computes its logits another "
            "way and is not supported")


def last_hidden(model: Model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Final hidden states (B, L, D) after the last norm, without running the output layer. ``position_ids``: a
    packed row (``vopd.packing``): transformers' own packed-sequence support reads the sequence boundaries from the
    positions when no attention mask is given (a block-diagonal causal mask for SDPA/eager, variable-length
    flash-attention), so the mask is left out."""
    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise UserError(f"{type(base).__name__} does not expose its decoder body (get_decoder() returns "
                        f"{'nothing' if decoder is None else 'the whole model'}); vopd needs the last hidden states "
                        "before the output layer, so this architecture is not supported")
    if position_ids is not None:
        from vopd.attention import packed_forward

        with packed_forward(base, position_ids) as segments:
            out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **segments)
    else:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise UserError(f"{type(base).__name__}'s decoder body ({type(decoder).__name__}) returns no "
                        "last_hidden_state; vopd needs the last hidden states before the output layer, so this "
                        "architecture is not supported")
    return hidden


#: Attention implementations through which transformers honours packed sequences (``last_hidden``'s positions).
PACKING_ATTENTION = ("vopd_packed", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def packing_error(model: Model, vocab_size: int) -> float:
    """Max |difference| / max |value| between the last hidden states of two probe sequences run padded and run
    packed into one row (``vopd.packing``): 0 up to float order when the family packs; large when its attention
    crosses the boundary or its positions ignore ``position_ids``."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab_size, (n,), generator=gen) for n in (5, 7))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, :5], padded[1] = a, b
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    row, pos = torch.cat([a, b]).unsqueeze(0), torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        ref = last_hidden(model, padded.to(device), mask.to(device)).float()
        got = last_hidden(model, row.to(device), torch.ones_like(row).to(device), pos.to(device)).float()[0]
    want = torch.cat([ref[0, :5], ref[1]])
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def student_states(model: Model, input_ids: Tensor, attention_mask: Tensor, vocab_size: int, *,
                   autocast: torch.dtype | None = None,
                   position_ids: Tensor | None = None) -> tuple[Tensor, OutputHead]:
    """The last hidden states (B, L, D) and the output layer (``output_layer``) as the fused head reads them.

    ``autocast``: the compute dtype of a student whose weights are float32 masters (``Precision.autocast``): the body
    runs under ``torch.autocast`` to it, and the hidden states and the output weight and bias are cast to it, as an
    autocast output layer would multiply them (the cast is differentiable: the masters get float32 gradients). The
    head then gets what a half model gives it, its half path on CUDA included (fp32 accumulation, fp32 loss math);
    its math is not changed. None: as stored. ``position_ids``: a packed row (``last_hidden``)."""
    with autocast_to(autocast, input_ids.device):
        hidden = last_hidden(model, input_ids, attention_mask, position_ids)
    head = output_layer(model, vocab_size)
    if autocast is None:
        return hidden, head
    bias = None if head.bias is None else head.bias.to(autocast)
    return hidden.to(autocast), OutputHead(head.weight.to(autocast), bias, head.transform)


def enable_gradient_checkpointing(model: Model) -> None:
    base = base_model(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns, goes in v6
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # PEFT: frozen embeddings would otherwise cut the checkpointed graph


def load_output_layer(path: str, *, vocab_size: int, dtype: torch.dtype, trust_remote_code: bool = False) -> OutputHead:
    """The output layer of the causal LM saved in ``path`` (weight sliced to ``vocab_size`` rows, bias, logit
    transform from its config), read from its safetensors without building or loading the body: a remote teacher's
    hidden states become its logits through it (``vopd.teacher.client``). A tied head is the input embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = _check_model_dir(path, "teacher_head")
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):  # shapes and module names only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad config
        raise UserError(f"cannot read the teacher model's config in {str(p)!r}: {str(exc).splitlines()[0]}") from exc
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"{type(skeleton).__name__} has no linear output layer; a hidden-state teacher needs one")
    names = {id(m): n for n, m in skeleton.named_modules()}
    files = _safetensors_keys(p)
    weight_key = _find_key(files, names[id(head)], "weight")
    if weight_key is None and embed is not None and head.weight is embed.weight:  # tied: stored once, as embeddings
        weight_key = _find_key(files, names[id(embed)], "weight")
    if weight_key is None:
        raise UserError(f"{str(p)!r} holds no output-layer weight ({names[id(head)]}.weight) in its safetensors files; "
                        "set the teacher's head (model.teachers[].head) to the directory of the checkpoint the server "
                        "serves")
    bias_key = _find_key(files, names[id(head)], "bias") if getattr(head, "bias", None) is not None else None
    from safetensors import safe_open

    def read(key: str) -> Tensor:
        with safe_open(str(files[key]), framework="pt") as f:
            part = f.get_slice(key)
            rows = part.get_shape()[0]
            if rows < vocab_size:
                raise UserError(f"the output layer in {str(p)!r} has {rows} rows but the tokenizer has {vocab_size} "
                                "tokens; the checkpoint does not belong to this tokenizer")
            return part[:vocab_size].to(dtype)

    return OutputHead(read(weight_key), None if bias_key is None else read(bias_key), logit_transform(skeleton))


def _safetensors_keys(p: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``p`` holding it (one file, or a sharded index)."""
    import json

    index = p / "model.safetensors.index.json"
    if index.is_file():
        return {k: p / f for k, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    single = p / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{str(p)!r} has no model.safetensors (or sharded index); a teacher head is read from "
                        "safetensors: re-save the checkpoint with save_pretrained(safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _find_key(files: dict[str, Path], module: str, leaf: str) -> str | None:
    """The checkpoint name of ``module``'s ``leaf`` tensor: exact, else the one name ending with its last component
    (checkpoints may prefix module names differently than the class does)."""
    exact = f"{module}.{leaf}"
    if exact in files:
        return exact
    tail = f"{module.rsplit('.', 1)[-1]}.{leaf}"
    found = [k for k in files if k == tail or k.endswith("." + tail)]
    return found[0] if len(found) == 1 else None
