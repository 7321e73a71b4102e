"""The final model export: a full Hugging Face model directory, with LoRA adapters merged into the base weights, in
the dtype asked for.

What it knows: how to write a model (plain Hugging Face, or PEFT with plain-LoRA linear layers) so that
``AutoModelForCausalLM.from_pretrained`` loads it without PEFT, computing the merged weights layer by layer on the
side, so the live model (still training, or still wrapped) is never changed; and how to write it in another floating
dtype than it is stored in (float32 master weights saved as the half model they computed as: a cast CPU copy of the
state dict, tied weights kept tied, ``config.json`` naming the saved dtype). What it does NOT know: checkpoints
and resuming (``vopd.checkpoint``), run directories, or when the trainer exports.
"""

from __future__ import annotations

import copy
from pathlib import Path
import torch

from vopd.models import Model, Tokenizer, base_model, is_peft


def _merged_lora_state_dict(peft_model: Model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """Base weights + LoRA deltas as a plain model's CPU state dict, computed layer by layer (the live model is not
    touched, and only one merged weight at a time is on its device), its floating tensors in ``dtype`` (None: as
    computed). None when the model uses PEFT features other than unmerged plain-LoRA linear layers; the caller then
    merges a deep copy."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    lora = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLinear):
            adapters = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
            if module.merged or any(module.use_dora.get(a, False) for a in adapters):
                return None
            lora[name] = (module, adapters)
        elif isinstance(module, BaseTunerLayer) or type(module).__name__ == "ModulesToSaveWrapper":
            return None
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if key.split(".lora_", 1)[0] in lora:
            continue  # the adapter's own parameters (lora_A/lora_B)
        owner, _, leaf = key.rpartition(".")
        module_name = owner.removesuffix(".base_layer")
        if owner.endswith(".base_layer") and module_name in lora:
            module, adapters = lora[module_name]
            if leaf == "weight":
                with torch.no_grad():
                    for adapter in adapters:
                        tensor = tensor + module.get_delta_weight(adapter)
            key = f"{module_name}.{leaf}"
        state[key] = tensor.detach().to("cpu", dtype=_floating(tensor, dtype), copy=True)
    return state


def _floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for a floating tensor (when given), else the tensor's own dtype."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _cast_state_dict(model: Model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``model``'s state dict as a CPU copy with floating tensors in ``dtype``; tensors that share storage (tied
    input/output embeddings) stay one tensor, which is how transformers' ``save_pretrained`` finds the ties."""
    copies: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        alias = (tensor.data_ptr(), tuple(tensor.shape))
        if alias not in copies:
            copies[alias] = tensor.detach().to("cpu", dtype=_floating(tensor, dtype), copy=True)
        state[key] = copies[alias]
    return state


def _stored_in(model: Model, dtype: torch.dtype | None) -> bool:
    """Whether every floating parameter of ``model`` is already ``dtype`` (None: whatever it is)."""
    return dtype is None or all(p.dtype == dtype for p in model.parameters() if p.is_floating_point())


def export_merged(model: Model, tokenizer: Tokenizer | None, path: str | Path, *,
                  dtype: torch.dtype | None = None) -> Path:
    """Write a full model (adapters merged, for a PEFT model) that ``AutoModelForCausalLM.from_pretrained`` loads,
    plus the tokenizer (if given), to ``path``, its floating weights in ``dtype`` (None: as stored; a model already
    stored in ``dtype`` is saved exactly as without it). The live model is left unchanged."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_peft(model):
        if _stored_in(model, dtype):
            model.save_pretrained(path, safe_serialization=True)
        else:
            assert dtype is not None
            model.save_pretrained(path, state_dict=_cast_state_dict(model, dtype), safe_serialization=True)
    else:
        state = _merged_lora_state_dict(model, dtype)
        if state is not None:
            model.get_base_model().save_pretrained(path, state_dict=state, safe_serialization=True)
        else:
            copy.deepcopy(model).merge_and_unload().to(dtype=dtype).save_pretrained(path, safe_serialization=True)
    if dtype is not None:
        _write_config_dtype(base_model(model), path, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _write_config_dtype(model: Model, path: Path, dtype: torch.dtype) -> None:
    """``config.json`` naming ``dtype``: ``save_pretrained`` writes the dtype of the live model's parameters, which
    for float32 masters (or float32 LoRA adapters) is not the dtype of the weights saved. Rewritten only when it
    differs, so a model saved as it is stored keeps its file byte for byte."""
    import json

    config = path / "config.json"
    saved = json.loads(config.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    if saved.get("dtype") != name:
        config_copy = copy.deepcopy(model.config)
        config_copy.dtype = name
        config_copy.save_pretrained(path)
