"""One measured case of `vopd bench trl`, run in this process: a trainer for warm-up plus measured steps, timed or
measured for memory.

What it knows: how to run both trainers on the same teacher and student, the same prompts in the same order, batch
size and completion length, temperature-1 sampling without top-k/top-p, AdamW with the same learning rate, constant
schedule and gradient clip 1.0, fp32 on the CPU. TRL's side is ``trl.DistillationTrainer`` with ``beta=1.0`` (reverse
KL(student || teacher) in its generalized-JSD convention; it always trains on completions the student has just
sampled, GKD's ``lmbda=1``), run by ``Trainer.train``; vopd's side is ``vopd.train.train`` with
``loss.method=opd-full`` (the same exact gradient) or ``vopd``. A step is timed from the start of one optimizer step
to the start of the next, generation included for both; every completion has exactly ``max_new_tokens`` tokens (TRL:
``min_new_tokens``; vopd: its sampler with EOS ignored), so both do the same work. Memory is measured on one step after
warm-up: the peak RSS above the step's start, and the peak of torch CPU tensor bytes allocated above those live at the
start (torch profiler allocation events). Two hooks are this file's: a callback and a wrapper around TRL's generation
call on TRL's side, and on vopd's side a sampler factory handed to ``train(make_sampler=...)`` (fixed-length sampling
needs a sampler that ignores EOS). ``load_pair``, ``prompt_texts`` and ``trl_args`` also serve the loss cross-check.

What it does not know: fresh processes, thread counts, rounds, medians or the report (``vopd.tools.bench.trl``), the loss
cross-check (``vopd.tools.bench.trl_crosscheck``), GPUs, vLLM or LoRA.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ParamSpec, TypeVar

from vopd.errors import UserError

if TYPE_CHECKING:
    import torch
    from trl import DistillationConfig

    from vopd.config import RolloutConfig
    from vopd.models import Model, Tokenizer
    from vopd.rollout import Sampler, SamplerFactory
    from vopd.sampling import Samples

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _StepClock:
    """Called at the start of every optimizer step. mode "time": steps [warmup, warmup+repeats) are timed. mode
    "memory": step ``warmup`` is measured by its resident memory, step ``warmup+1`` by torch's allocation events
    under the profiler (which slows it down, so nothing is timed in this mode)."""

    def __init__(self, mode: str, warmup: int, repeats: int) -> None:
        self.mode, self.warmup, self.repeats = mode, warmup, repeats
        self.steps = warmup + (repeats + 1 if mode == "time" else 3)  # one more start closes the last measured step
        self.starts: list[float] = []
        self.gen_s: list[float] = []
        self.prof: torch.profiler.profile | None = None
        self.out: dict[str, Any] = {}

    def mark(self) -> None:
        import torch

        self.starts.append(time.perf_counter())
        k = len(self.starts) - 1 - self.warmup
        if k == 0:
            self.out["threads"] = torch.get_num_threads()  # what the trainer really ran with
        if self.mode != "memory":
            return
        if k == 0:
            self.out["rss_start_mb"] = _vm("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS: the next reading is this step's peak
        elif k == 1:
            self.out["rss_step_mb"] = _vm("VmHWM") - self.out["rss_start_mb"]
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.start()
        elif k == 2:
            assert self.prof is not None  # started at k == 1
            self.prof.stop()
            self.out["tensor_peak_mb"] = _tensor_peak_mb(self.prof)

    def timed(self, fn: Callable[_P, _R]) -> Callable[_P, _R]:
        """``fn`` (a step's generation call) with its duration recorded."""
        def wrapper(*a: _P.args, **kw: _P.kwargs) -> _R:
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.gen_s.append(time.perf_counter() - t0)
            return out
        return wrapper

    def result(self) -> dict[str, Any]:
        if len(self.starts) != self.steps:
            raise RuntimeError(f"{len(self.starts)} step starts seen, expected {self.steps}")
        if self.mode == "memory":  # plus the whole process's peak RSS (imports, models, everything)
            return {**self.out, "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        w, n = self.warmup, self.repeats
        return {**self.out, "step_ms": [1000 * (self.starts[i + 1] - self.starts[i]) for i in range(w, w + n)],
                "gen_ms": [1000 * g for g in self.gen_s[w:w + n]]}


def _vm(key: str) -> float:
    """A line of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _tensor_peak_mb(prof: Any) -> float:  # a torch.profiler.profile: its private event fields are not in the stubs
    """Peak of the running sum of CPU allocation events (frees count negative): the most torch tensor memory live at
    once during the window above what was live when it opened. Allocated bytes, touched or not."""
    import torch

    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    running = itertools.accumulate(e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()))
    return max(0, max(running, default=0)) / 2**20


def prompt_texts(data: str, n: int) -> list[str]:
    """The first ``n`` problems of ``data``, formatted as vopd's trainer formats them (no chat template)."""
    from vopd.data import format_prompt, read_rows

    rows = [row for _, row in read_rows(data)][:n]
    if len(rows) < n:
        raise UserError(f"{data} has {len(rows)} problems; this benchmark needs {n}")
    return [format_prompt(r["problem"]) for r in rows]


def _exactly(n: int, out: _R, completions: Callable[[_R], list[list[int]]]) -> _R:
    """``out`` once every completion in it is known to have ``n`` tokens: both sides must do the same work."""
    lengths = {len(c) for c in completions(out)}
    if lengths != {n}:
        raise RuntimeError(f"completion lengths {sorted(lengths)}, expected exactly {n}")
    return out


def _fixed_length_sampler(clock: _StepClock, length: int) -> SamplerFactory:
    """``train(make_sampler=...)``: vopd's own Hugging Face sampler with EOS ignored, and the clock at the start of
    each step."""
    from vopd.rollout import hf_engine

    def factory(model: Model, tok: Tokenizer, rollout: RolloutConfig) -> Sampler:
        # generate() reads these three ids; without an EOS id every completion runs to max_new_tokens
        view = SimpleNamespace(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=None)
        sample = clock.timed(hf_engine(model, view, rollout))

        def step_start(prompts: list[list[int]]) -> Samples:
            clock.mark()  # train() calls the sampler first thing in every step
            return _exactly(length, sample(prompts), lambda out: out.completions)
        return step_start

    return factory


def _vopd_case(case: dict[str, Any], clock: _StepClock, tmp: Path) -> None:
    from vopd.config import load_config
    from vopd.train import train

    b = case["batch_size"]
    overrides = [
        f"model.student={case['student']}", f"data.train={case['data']}",
        f"model.teachers=[{{model: {json.dumps(str(case['teacher']))}, dtype: float32}}]",
        f"loss.method={case['impl']}", f"output_dir={tmp / 'run'}", f"steps={case['steps']}", f"batch_size={b}",
        f"micro_batch_size={b}", f"rollout.max_new_tokens={case['max_new_tokens']}", f"rollout.batch_size={b}",
        f"optim.lr={case['lr']}", "optim.schedule=constant", "optim.grad_clip=1.0", "optim.weight_decay=0.0",
        "data.shuffle=false", "progress=false", f"seed={case['seed']}", "model.device=cpu", "model.dtype=float32",
        "model.gradient_checkpointing=false",
    ]
    overrides.append("grad_noise=false")  # an optional diagnostic costing an extra micro-batch; TRL has none
    train(load_config(None, overrides + list(case["overrides"])), log=lambda _msg: None,
          make_sampler=_fixed_length_sampler(clock, case["max_new_tokens"]))


def trl_args(case: dict[str, Any], out: Path, steps: int) -> DistillationConfig:
    from trl import DistillationConfig

    n = case["max_new_tokens"]
    fields = {f.name for f in dataclasses.fields(DistillationConfig)}  # transformers 5 renamed the option
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in fields else
                        "gradient_checkpointing": False}  # TRL's default is on; vopd's (and the bench's) off
    return DistillationConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=case["batch_size"], gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=case["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, seed=case["seed"], beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=n, generation_kwargs={"min_new_tokens": n}, bf16=False, fp16=False,
        use_cpu=True, shuffle_dataset=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, **no_checkpointing)


def load_pair(case: dict[str, Any]) -> tuple[Tokenizer, Model, Model]:
    import torch

    from vopd.models import load_model, load_tokenizer

    load = lambda role: load_model(case[role], role=role, dtype=torch.float32, device=torch.device("cpu"))  # noqa: E731
    tok = load_tokenizer(case["student"])
    tok.padding_side = "left"  # TRL requires it for prompts; vopd pads its own batches
    return tok, load("student"), load("teacher")


def _trl_case(case: dict[str, Any], clock: _StepClock, tmp: Path) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationTrainer

    tok, student, teacher = load_pair(case)
    prompts = prompt_texts(case["data"], case["batch_size"] * case["steps"])

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.mark()  # Trainer fetched the batch just before; generation happens inside the step

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trl_args(case, tmp, case["steps"]),
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                                  processing_class=tok, callbacks=[Clock()])
    generate = clock.timed(trainer._generate_single_turn)
    # An instance attribute: TRL's own generation call, timed and its lengths checked.
    trainer._generate_single_turn = lambda *a, **kw: _exactly(case["max_new_tokens"], generate(*a, **kw), list)
    trainer.train()


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """A timing or memory case (``case["mode"]``): its trainer run on the first prompts, and the step measurements."""
    from vopd.data import read_rows

    clock = _StepClock(case["mode"], case["warmup"], case["repeats"])
    with tempfile.TemporaryDirectory(prefix="vopd-bench-trl-") as tmp:
        # The same prompts for both: the first batch_size x steps problems, in order, in a file of their own.
        subset = Path(tmp) / "prompts.jsonl"
        rows = [row for _, row in read_rows(case["data"])][:case["batch_size"] * clock.steps]
        subset.write_text("".join(json.dumps(row) + "\n" for row in rows))
        case = {**case, "data": str(subset), "steps": clock.steps}
        (_trl_case if case["impl"] == "trl" else _vopd_case)(case, clock, Path(tmp))
    return {**case, **clock.result()}
