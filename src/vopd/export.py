"""The final model export: a full Hugging Face model directory, with LoRA adapters merged into the base weights, in
the dtype asked for.

What it knows: how to write a model (plain Hugging Face, or PEFT with plain-LoRA linear layers) so that
``AutoModelForCausalLM.from_pretrained`` loads it without PEFT, computing the merged weights layer by layer on the
side, so the live model (still training, or still wrapped) is never changed; how to write it in another floating
dtype than it is stored in (float32 master weights saved as the half model they computed as: a cast CPU copy of the
state dict, tied weights kept tied, ``config.json`` naming the saved dtype); and, for sharded weights (FSDP2), how to
stream them into safetensors files one tensor at a time (``export_streamed``), so that no rank ever holds the whole
model. What it does NOT know: checkpoints and resuming (``vopd.checkpoint``), run directories, or when the trainer
exports.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from vopd import distributed as dist
from vopd.sharding import full_tensor as _full
from vopd.errors import UserError
from vopd.models import Model, Tokenizer, base_model, is_peft

#: ``export_streamed`` starts a new safetensors file at the first layer boundary past this many bytes: rank 0 holds
#: at most about this much of the model in host memory.
EXPORT_FILE_BYTES = 1 << 30


def _merged_lora_items(peft_model: Model) -> Iterator[tuple[str, torch.Tensor]] | None:
    """(name, tensor) of base weights + LoRA deltas, the keys of a plain model's state dict, one at a time and
    unsharded (under FSDP2 each is gathered here: a collective every rank joins in the same order). The live model is
    not touched, and only one merged weight at a time is whole. None when the model uses PEFT features other than
    unmerged plain-LoRA linear layers; the caller then merges a deep copy."""
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

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in base.state_dict().items():
            if key.split(".lora_", 1)[0] in lora:
                continue  # the adapter's own parameters (lora_A/lora_B)
            owner, _, leaf = key.rpartition(".")
            module_name = owner.removesuffix(".base_layer")
            tensor = _full(tensor)
            if owner.endswith(".base_layer") and module_name in lora:
                module, adapters = lora[module_name]
                if leaf == "weight":
                    with torch.no_grad():
                        for adapter in adapters:  # PEFT's own delta; under FSDP2 computed on DTensors, then gathered
                            tensor = tensor + _full(module.get_delta_weight(adapter))
                key = f"{module_name}.{leaf}"
            yield key, tensor.detach()

    return items()


def _merged_lora_state_dict(peft_model: Model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """Base weights + LoRA deltas as a plain model's CPU state dict (``_merged_lora_items``), its floating tensors in
    ``dtype`` (None: as computed); None as there."""
    items = _merged_lora_items(peft_model)
    if items is None:
        return None
    return {key: tensor.to("cpu", dtype=_floating(tensor, dtype), copy=True) for key, tensor in items}


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


# ------------------------------------------------------------------------------------------- streamed export


def _plain_items(model: Model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of what a plain model's files hold, in state-dict order, one at a time; for a PEFT model
    the base weights with the LoRA deltas merged. A tied weight appears once, under its first name (the input
    embedding: the one transformers keeps)."""
    base = model.get_base_model() if is_peft(model) else model
    tied = {n for n, _ in base.named_parameters(remove_duplicate=False)} - {n for n, _ in base.named_parameters()}
    if is_peft(model):
        items = _merged_lora_items(model)
        if items is None:
            raise UserError("the streamed export merges plain LoRA linear layers only, and this model has other "
                            "PEFT layers: train it with distributed.strategy=ddp, or save the adapter yourself")
    else:
        items = ((key, _full(tensor).detach()) for key, tensor in base.state_dict().items() if key not in tied)
    for key, tensor in items:
        if key not in tied:
            yield key, tensor


def _layer(key: str) -> str:
    """The part of a name up to its first number (``model.layers.3``): a file boundary never splits a layer, so
    transformers can undo its weight conversions (fused experts, ...) file by file."""
    parts = key.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numbered[0] + 1] if numbered else parts[:-1])


def _write_file(base: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> dict[str, int]:
    """One safetensors file, in the names transformers' files use (its weight conversions reverted, as
    ``save_pretrained`` does); the bytes of each tensor written, by name."""
    from safetensors.torch import save_file

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions: the names in memory are the files'
        pass
    else:
        tensors = revert_weight_conversion(base, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    return {k: v.numel() * v.element_size() for k, v in tensors.items()}


def export_streamed(model: Model, tokenizer: Tokenizer | None, path: str | Path, *, dtype: torch.dtype | None = None,
                    file_bytes: int | None = None) -> None:
    """Write the full model (LoRA merged, for a PEFT model; floating weights in ``dtype``, None: as stored) to
    ``path`` as ``export_merged`` does, from weights that may be sharded (FSDP2): every rank gathers one tensor at a
    time, in the same order, and rank 0 adds it (cast) to the file it is filling, written out at the first layer
    boundary past ``file_bytes`` (None: ``EXPORT_FILE_BYTES``, read at the call) (``model.safetensors``; several
    files get ``model-0000i-of-0000n.safetensors`` and transformers' index). Rank 0 writes every file; a failure
    there reaches every rank as one ``UserError``, after the gathers every rank must finish."""
    path = Path(path)
    file_bytes = EXPORT_FILE_BYTES if file_bytes is None else file_bytes
    base = model.get_base_model() if is_peft(model) else model
    main = dist.is_main()
    files: list[tuple[Path, dict[str, int]]] = []
    pending: dict[str, torch.Tensor] = {}
    size, failure = 0, None

    def flush() -> None:
        nonlocal size
        path.mkdir(parents=True, exist_ok=True)
        file = path / f".part-{len(files):05d}.safetensors"
        files.append((file, _write_file(base, pending, file)))
        pending.clear()
        size = 0

    for key, tensor in _plain_items(model):
        if not main or failure is not None:
            continue
        try:
            if pending and size >= file_bytes and _layer(key) != _layer(next(reversed(pending))):
                flush()
            kept = pending[key] = tensor.to("cpu", dtype=_floating(tensor, dtype), copy=True)
            size += kept.numel() * kept.element_size()
        except Exception as exc:  # noqa: BLE001 - the gathers go on; every rank hears of it below
            failure = f"{type(exc).__name__}: {exc}"
    if main and failure is None:
        try:
            flush()
            _finish(base, tokenizer, path, files, dtype)
        except Exception as exc:  # noqa: BLE001 - reported to every rank just below
            failure = f"{type(exc).__name__}: {exc}"
    failure = dist.broadcast_object(failure)
    if failure is not None:
        raise ExportFailed(path, failure)


class ExportFailed(UserError):
    """``export_streamed`` could not write its files (``cause``: the first failure, in one line)."""

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(f"the final model could not be written to {path} ({cause}); the last checkpoint is intact: "
                         "fix the cause and resume with --resume")
        self.cause = cause


def _finish(base: nn.Module, tokenizer: Tokenizer | None, path: Path, files: list[tuple[Path, dict[str, int]]],
            dtype: torch.dtype | None) -> None:
    """Name the weight files as transformers does (and index several), then write config, generation config and
    tokenizer: what ``save_pretrained`` writes besides the weights."""
    if len(files) == 1:
        os.rename(files[0][0], path / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, (file, sizes) in enumerate(files, start=1):
            name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            os.rename(file, path / name)
            weight_map.update({key: name for key in sizes})
            total += sum(sizes.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = copy.deepcopy(getattr(base, "config"))  # the live model's is left as it is
    config.dtype = str(dtype or getattr(base, "dtype")).removeprefix("torch.")  # the weights' (save_pretrained's)
    config.architectures = [type(base).__name__]
    config.save_pretrained(path)
    generation = getattr(base, "generation_config", None)
    if getattr(base, "can_generate", lambda: False)() and generation is not None:
        generation.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
