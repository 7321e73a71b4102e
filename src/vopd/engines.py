"""Which rollout engine a run samples with (``rollout.engine``), resolved once from its config.

What it knows: that ``hf`` is Hugging Face generate (``vopd.rollout.hf_engine``) and ``vllm`` the colocated vLLM
engine (``vopd.vllm_engine``, imported only when asked for), built for the student's directory, the ``[vllm]``
options and the length the run's prompts need (``engine_length``: the pre-flight's prompt budget + the completion,
or a ``vllm.max_model_len`` checked against both, refused in one line naming the keys before vLLM is imported).
Also the per-turn sampler of a multi-turn run (``turn_sampler``, ``rollout.env``) on the same engine.
What it does not know: how either engine samples. It sits above both ``vopd.check`` (the prompt budget) and
``vopd.rollout``, which ``check`` reaches through the teachers: inside ``rollout`` the choice would close an import
cycle.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from vopd.check import position_limit, prompt_budget
from vopd.errors import UserError
from vopd.models import base_model
from vopd.episodes import HfTurns, SamplerTurns, TurnSampler
from vopd.rollout import Sampler, SamplerFactory, hf_engine

if TYPE_CHECKING:
    from vopd.config import RolloutConfig, TrainConfig
    from vopd.models import Model, Tokenizer
    from vopd.precision import Precision


def engine_factory(cfg: TrainConfig, precision: Precision | None = None, *, sharded: bool = False) -> SamplerFactory:
    """The ``SamplerFactory`` of ``rollout.engine``: ``hf_engine``, or one that builds the colocated vLLM engine
    (its length checked against the student first, before vLLM is imported). ``precision``: the student's
    (``vopd.precision``): generate autocasts float32 masters to the compute dtype, and the vLLM engine runs in it
    (the pushed masters are cast by its weight loader); None: the weights' own dtype. ``sharded``: the student is
    sharded (FSDP2): generate runs on every rank in step (``synced``) and FSDP2's policy casts the gathered weights
    (no autocast, as in training); the vLLM push gathers one parameter at a time."""
    if cfg.rollout.engine == "hf":
        if sharded:
            return partial(hf_engine, synced=True)
        return hf_engine if precision is None or precision.autocast is None else partial(
            hf_engine, autocast=precision.autocast)

    def vllm_engine(model: Model, tokenizer: Tokenizer, rollout: RolloutConfig) -> Sampler:
        from vopd.vllm_engine import VllmSampler

        return VllmSampler(model, tokenizer, rollout, cfg.vllm, model_dir=cfg.model.student,
                           max_model_len=engine_length(cfg, model),
                           dtype=None if precision is None else precision.compute)

    return vllm_engine


def engine_length(cfg: TrainConfig, student: Model) -> int:
    """The engine's ``max_model_len``: the longest prompt the run trains on plus ``rollout.max_new_tokens`` (with
    ``rollout.env``, a whole episode: ``rollout.max_total_tokens``; or the evaluation's ``eval.max_new_tokens`` when
    longer and ``data.eval`` is set: evaluation samples through it), where
    the longest prompt is the Hugging Face path's (``vopd.check.prompt_budget``: ``data.max_prompt_tokens``, or less
    where the student's position limit leaves less), so that both engines serve the same prompts. A
    ``vllm.max_model_len`` that is set must hold that much (vLLM would cut completions short, silently) and stay
    within the position limit (vLLM would refuse to start): a one-line ``UserError`` naming the keys otherwise,
    before the engine starts."""
    student = base_model(student)
    prompt, prompt_name = prompt_budget(cfg, student)
    new, new_name = cfg.rollout.completion_tokens  # a whole episode with rollout.env
    if cfg.data.eval and cfg.eval_max_new_tokens > new:  # evaluation samples through this engine too
        new, new_name = cfg.eval_max_new_tokens, "eval.max_new_tokens"
    asked = cfg.vllm.max_model_len
    need = prompt + new
    if not asked:
        return need
    found = position_limit(student)
    limit = None if found is None else found[0]
    if limit is not None and asked > limit:
        raise UserError(f"vllm.max_model_len={asked} exceeds the student's position limit (max_position_embeddings="
                        f"{limit}): set vllm.max_model_len <= {limit}, or 0 (derived: {need} here)")
    if asked < need:
        fix = (f"or data.max_prompt_tokens <= {asked - new}" if asked > new else
               f"or {new_name} < {asked}")
        raise UserError(f"vllm.max_model_len={asked} is shorter than the longest prompt + completion, {prompt} + "
                        f"{new_name}={new} = {need} tokens (prompts up to {prompt_name}): vLLM would cut "
                        f"completions short; set vllm.max_model_len >= {need} (or 0: derived), {fix}")
    return asked


def turn_sampler(cfg: TrainConfig, sample: Sampler, model: Model, tokenizer: Tokenizer,
                 precision: Precision | None = None, *, custom: bool, sharded: bool) -> TurnSampler:
    """The per-turn sampler of a multi-turn run (``rollout.env``, ``vopd.episodes``) on the run's engine: the vLLM
    engine of ``sample`` (``vopd.vllm_turns``), Hugging Face generate with each turn's stops (``HfTurns``), or, for a
    ``custom`` sampler (``train(make_sampler=...)``), its samples cut at each turn's end (``SamplerTurns``).
    ``sharded`` (FSDP2) with generate is refused: its forwards are collectives, and ranks whose episodes end at
    different turns would run different numbers of them."""
    if custom:
        return SamplerTurns(sample)
    if cfg.rollout.engine == "vllm":
        from vopd.vllm_engine import VllmSampler
        from vopd.vllm_turns import VllmTurns

        assert isinstance(sample, VllmSampler)  # engine_factory's
        return VllmTurns(sample)
    if sharded:
        raise UserError("rollout.env with distributed.strategy=fsdp2 samples with rollout.engine=vllm only (generate "
                        "on a sharded student would wait on ranks whose episodes already ended); set "
                        "rollout.engine=vllm or distributed.strategy=ddp")
    r = cfg.rollout
    return HfTurns(model, tokenizer, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, batch_size=r.batch_size,
                   cache=r.cache, autocast=None if precision is None else precision.autocast)
