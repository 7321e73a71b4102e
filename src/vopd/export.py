"""The final model export: a full Hugging Face model directory, with LoRA adapters merged into the base weights.

What it knows: how to write a model (plain Hugging Face, or PEFT with plain-LoRA linear layers) so that
``AutoModelForCausalLM.from_pretrained`` loads it without PEFT, computing the merged weights layer by layer on the
side, so the live model (still training, or still wrapped) is never changed. What it does NOT know: checkpoints
and resuming (``vopd.checkpoint``), run directories, or when the trainer exports.
"""

from __future__ import annotations

import copy
from pathlib import Path
import torch

from vopd.models import Model, Tokenizer, is_peft


def _merged_lora_state_dict(peft_model: Model) -> dict[str, torch.Tensor] | None:
    """Base weights + LoRA deltas as a plain model's CPU state dict, computed layer by layer (the live model is not
    touched, and only one merged weight at a time is on its device). None when the model uses PEFT features other
    than unmerged plain-LoRA linear layers; the caller then merges a deep copy."""
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
        state[key] = tensor.detach().to("cpu", copy=True)
    return state


def export_merged(model: Model, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    """Write a full model (adapters merged, for a PEFT model) that ``AutoModelForCausalLM.from_pretrained`` loads,
    plus the tokenizer (if given), to ``path``. The live model is left unchanged."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_peft(model):
        model.save_pretrained(path, safe_serialization=True)
    else:
        state = _merged_lora_state_dict(model)
        if state is not None:
            model.get_base_model().save_pretrained(path, state_dict=state, safe_serialization=True)
        else:
            copy.deepcopy(model).merge_and_unload().save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
