"""The student's weights as the colocated vLLM engine receives them: whole tensors under Hugging Face names, streamed
in bounded pieces within one in-place vLLM reload.

What it knows: how to list a student's full weights one tensor at a time (``student_weights``: a sharded FSDP2 weight
gathered as it is asked for, a PEFT student's LoRA merged layer by layer in float32 into copies, a tied output layer
named explicitly), how to cut them into pieces of bounded size (``pieces``), and how vLLM 0.32's layerwise reload
takes any number of partial state dicts between one set-up and one finalisation (``push_weights``; calling
``reload_weights`` per piece would finalise a layer split over two pieces with part of its weights). What it does
not know: building or sampling from the engine (``vopd.vllm_engine``), the loss, the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import Tensor

from vopd.models import Model, base_model, is_peft

if TYPE_CHECKING:
    from vllm import LLM


def student_weights(model: Model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """The student's full weights under Hugging Face names, one whole tensor at a time, as the engine loads them, in
    ``dtype`` (None: as stored): a sharded (FSDP2) weight gathered when it is asked for (a collective: every rank
    consumes the whole iterator); a PEFT model's LoRA merged layer by layer into copies (W + B A s, formed in float32
    for that one layer, the trainer's model untouched); a tied output layer listed explicitly. At most one merged
    layer exists at a time unless the consumer keeps them."""
    from vopd.sharding import full_tensor

    base = base_model(model)
    lora = _lora_layers(base) if is_peft(model) else {}
    state = {name: t for name, t in base.state_dict(keep_vars=True).items() if "lora_" not in name}
    keys = [name.replace(".base_layer.", ".") for name in state]
    for name, key in zip(state, keys):
        with torch.no_grad():  # not across the yield: the consumer's grad mode is its own
            weight = full_tensor(state[name].detach())
            if key.endswith(".weight") and key.removesuffix(".weight") in lora:
                weight = _merged(weight, lora[key.removesuffix(".weight")])
            weight = weight if dtype is None else weight.to(dtype)
        yield key, weight
    if getattr(base.config, "tie_word_embeddings", False) and "lm_head.weight" not in keys:
        with torch.no_grad():
            emb = full_tensor(base.get_input_embeddings().weight.detach())
        yield "lm_head.weight", emb if dtype is None else emb.to(dtype)


def _lora_layers(base: Model) -> dict[str, Any]:
    """The LoRA layers of a PEFT model's base, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def _merged(weight: Tensor, layer: Any) -> Tensor:
    """``weight`` + B A s of each of ``layer``'s active adapters (gathered when sharded), in float32: the result a
    float32 merge gives, whatever dtype it is pushed in."""
    from vopd.sharding import full_tensor

    merged = weight.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            a = full_tensor(layer.lora_A[adapter].weight.detach()).float()
            b = full_tensor(layer.lora_B[adapter].weight.detach()).float()
            merged = merged + (b @ a) * layer.scaling[adapter]
    return merged


def pieces(weights: Iterable[tuple[str, Tensor]], limit_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """``weights`` in consecutive pieces of at most ``limit_bytes`` each (a single larger tensor is a piece alone).
    Every rank cuts the same pieces from the same names and shapes."""
    piece: list[tuple[str, Tensor]] = []
    size = 0
    for name, t in weights:
        nbytes = t.numel() * t.element_size()
        if piece and size + nbytes > limit_bytes:
            yield piece
            piece, size = [], 0
        piece.append((name, t))
        size += nbytes
    if piece:
        yield piece


# vLLM's in-place reload, as its own weight-transfer engines drive it (vllm/distributed/weight_transfer/
# nccl_engine.py, ipc_engine.py: start_weight_update / update_weights / finish_weight_update): the layers are set up
# for loading once, ``load_weights`` takes any number of partial state dicts (a layer is processed once all its
# weights have come, whichever call brought them), and the reload is finalised once. ``reload_weights`` does all
# three in one call, so calling it per piece would finalise every layer whose weights were split over two pieces
# with only part of them (tests/test_vllm_engine.py shows the corruption). Each runs on the engine's worker (in
# this process: VLLM_ENABLE_V1_MULTIPROCESSING=0) through ``collective_rpc``, under the worker's vLLM config.

def _begin_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())


def _load_piece(worker: Any, piece: list[tuple[str, Tensor]]) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.get_model().load_weights(piece)


def _finish_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(runner.get_model(), runner.model_config)
    # what the runner's own reload_weights resets after loading (state derived from the old weights)
    runner.reset_lora_state()
    runner.reset_encoder_cache()
    runner.reset_mm_cache()


def push_weights(llm: LLM, weights: Iterable[tuple[str, Tensor]], *, piece_bytes: int) -> int:
    """Load ``weights`` into the engine in place, in pieces of at most ``piece_bytes`` (``pieces``) within one vLLM
    reload; the number of pieces. The push holds one piece (plus the weights of layers vLLM has not completed)."""
    llm.collective_rpc(_begin_reload)
    count = 0
    try:
        for piece in pieces(weights, piece_bytes):
            llm.collective_rpc(_load_piece, args=(piece,))
            count += 1
    finally:
        llm.collective_rpc(_finish_reload)  # also after a failure: layers without new weights get their old ones
    return count
