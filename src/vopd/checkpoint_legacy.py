"""Reading checkpoints in the full layout vopd wrote before sharded checkpoints (manifest version 1), so that runs
saved then still resume, at any world size and strategy.

Layout (inside the step directory of ``vopd.checkpoint``'s protocol): ``model/`` (``save_pretrained`` output: the
whole weights, or the adapter of a PEFT model; plus tokenizer files), ``optimizer.pt`` (the whole AdamW state in
``torch.optim``'s own layout, keyed by parameter index; under FSDP2 it was gathered on rank 0), and the files both
layouts share (``scheduler.pt``, ``trainer_state.json``, ``rng.pt``, ``config.yaml``, ``manifest.json``). Every
rank reads every file: that is what the layout is, and why vopd no longer writes it.

What it knows: how to put such saved weights back into a live, unsharded model (plain Hugging Face, PEFT, or an
architecture whose file names transformers converts) and the optimizer file into whatever loads it (a
``torch.optim`` optimizer, or ``vopd.distributed.WrappedStudent.optimizer_loader``, which shards it). What it does
NOT know: writing (nothing writes this layout any more), sharding, the run directory or the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from vopd import checkpoint as ckpt
from vopd.errors import UserError
from vopd.models import Model, is_peft


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file, device="cpu"))
    return state


def _load_weights(model_dir: Path, model: Model, where: Path) -> None:
    if is_peft(model) != (model_dir / "adapter_config.json").is_file():
        kinds = ("a LoRA adapter", "a full model") if is_peft(model) else ("a full model", "a LoRA adapter")
        raise UserError(f"checkpoint {where} holds {kinds[1]} but the model to resume is {kinds[0]}: "
                        "resume with the same lora.enabled setting")
    state = _read_safetensors(model_dir)
    if is_peft(model):
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state, adapter_name=getattr(model, "active_adapter", "default"))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            bad = (list(result.unexpected_keys) + missing)[:3]
            raise UserError(f"checkpoint {where} adapter does not fit the model (e.g. {bad}): "
                            "resume with the same lora settings")
        return
    own = model.state_dict()
    # A missing key is fine if it is tied to a loaded one (lm_head.weight shares the embedding's storage).
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs]
    if not missing and all(k in own and own[k].shape == v.shape for k, v in state.items()):
        model.load_state_dict(state, strict=False)
        return
    # Saved names differ from the live ones: transformers converts some architectures' weights (e.g. fused MoE
    # experts) between file and memory. Let transformers load the files, then copy into the live model.
    fresh, info = type(model).from_pretrained(
        model_dir, dtype=next(model.parameters()).dtype, output_loading_info=True
    )
    bad = [k for name in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(name, [])]
    if bad:
        raise UserError(f"checkpoint {where} model does not fit the model to resume (e.g. {bad[:3]}): "
                        "resume with the same model.student")
    model.load_state_dict(fresh.state_dict())
    del fresh


def load_checkpoint(
    path: str | Path, *, model: Model, optimizer: ckpt.LoadsStateDict | None = None,
    scheduler: ckpt.LoadsStateDict | None = None, restore_rng: bool = True,
    check_state: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Verify the full-layout checkpoint ``path`` (every file, sha256), load its weights into the unsharded ``model``
    (the adapter for a PEFT model), the optimizer and scheduler states (when given), and restore the global RNGs
    (``restore_rng``). ``check_state(trainer_state)`` runs after the verification and before anything is loaded.
    Returns the ``trainer_state`` dict as saved."""
    path = Path(path)
    ckpt.verify_checkpoint(path)
    trainer_state = ckpt.read_trainer_state(path, check_state)
    _load_weights(path / "model", model, path)
    ckpt.load_state_file(path, "optimizer.pt", optimizer)
    ckpt.load_state_file(path, "scheduler.pt", scheduler)
    if restore_rng:
        ckpt.restore_rng(path)
    return trainer_state
