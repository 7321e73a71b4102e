"""Per-step metrics: token statistics from the estimators, and the sinks they are written to.

What it knows: accumulating token-level sums from ``LossOutput`` over micro-batches (and over ranks, by one
all-reduce), turning them into the means/variances defined in docs/metrics.md, and writing a metrics dict to
``metrics.jsonl`` (always), TensorBoard and Weights & Biases (optional extras, imported only when asked for). It
keeps the history exact across resumes: opening the writer at a resumed step drops (atomically) the lines after it
and any line torn by a crash, so the file reads like an uninterrupted run's (docs/reliability.md).
What it does not know: the training loop's order of work, models, checkpoints, or what the numbers mean for a run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from vopd import distributed as dist
from vopd.errors import UserError
from vopd.loss.estimators import LossOutput

if TYPE_CHECKING:
    from vopd.rollout import Rollout

#: The run's history, one JSON object per logged step, in ``output_dir``.
METRICS_FILE = "metrics.jsonl"
#: The W&B run id of a run, in ``output_dir``: a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id"

# Names of the sums accumulated per step, in the order they are all-reduced.
_SUMS = ("tokens", "r", "r2", "adv", "adv2", "adv_tokens", "kl", "kl_tokens", "kl_topk", "mass", "topk_tokens",
         "ratio", "ratio_tokens", "ratio_over_cap", "lp_diff", "lp_tokens", "kl_ttopk", "ttopk_mass", "ttopk_tokens")


class TokenStats:
    """Sums of per-token diagnostics over every micro-batch of a step."""

    def __init__(self, *, ratio_cap: float = 0.0) -> None:
        self.sums = dict.fromkeys(_SUMS, 0.0)
        self.ratio_cap = ratio_cap  # for how often the cap binds (loss.ratio_cap; 0 = no cap)
        self.lp_diff_max = 0.0

    def add(self, out: LossOutput, mask: torch.Tensor, sampler_logprobs: torch.Tensor | None = None) -> None:
        m = mask.to(out.reward.dtype)
        s = self.sums
        s["tokens"] += float(m.sum())
        s["r"] += float((out.reward * m).sum())
        s["r2"] += float((out.reward.square() * m).sum())
        if out.advantage is not None:
            s["adv"] += float((out.advantage * m).sum())
            s["adv2"] += float((out.advantage.square() * m).sum())
            s["adv_tokens"] += float(m.sum())
        if out.kl is not None:
            s["kl"] += float((out.kl * m).sum())
            s["kl_tokens"] += float(m.sum())
        if out.kl_topk is not None and out.topk_mass is not None:
            s["kl_topk"] += float((out.kl_topk * m).sum())
            s["mass"] += float((out.topk_mass * m).sum())
            s["topk_tokens"] += float(m.sum())
        if out.kl_ttopk is not None and out.ttopk_mass is not None:  # on the teacher's own top-k (vopd-ttopk)
            s["kl_ttopk"] += float((out.kl_ttopk * m).sum())
            s["ttopk_mass"] += float((out.ttopk_mass * m).sum())
            s["ttopk_tokens"] += float(m.sum())
        if out.ratio is not None:
            s["ratio"] += float((out.ratio * m).sum())
            s["ratio_tokens"] += float(m.sum())
            if self.ratio_cap and sampler_logprobs is not None:
                raw = torch.exp(out.logp - sampler_logprobs.to(out.logp.dtype))
                s["ratio_over_cap"] += float(((raw > self.ratio_cap) * m).sum())
        if sampler_logprobs is not None:
            # Sampler vs trainer log-prob of the same token: 0 up to numerics when on-policy.
            diff = (out.logp - sampler_logprobs.to(out.logp.dtype)).abs() * m
            s["lp_diff"] += float(diff.sum())
            s["lp_tokens"] += float(m.sum())
            self.lp_diff_max = max(self.lp_diff_max, float(diff.max()) if diff.numel() else 0.0)

    def reduce(self) -> dict[str, float]:
        """Means and variances over all tokens of the step on all ranks (docs/metrics.md)."""
        vec = dist.all_reduce_sum(torch.tensor([self.sums[k] for k in _SUMS], dtype=torch.float64))
        s = dict(zip(_SUMS, vec.tolist()))
        lp_max = float(dist.all_reduce_max(torch.tensor(self.lp_diff_max, dtype=torch.float64)))

        def mean(key: str, count: str) -> float:
            return s[key] / s[count] if s[count] else math.nan

        out: dict[str, float] = {"tokens": s["tokens"]}
        out["reward_mean"] = mean("r", "tokens")
        out["reward_var"] = mean("r2", "tokens") - out["reward_mean"] ** 2
        out["kl_estimate"] = -out["reward_mean"]  # E[r_t] = -KL_t: an unbiased estimate for every method
        if s["adv_tokens"]:
            out["advantage_mean"] = mean("adv", "adv_tokens")
            out["advantage_var"] = mean("adv2", "adv_tokens") - out["advantage_mean"] ** 2
            if out["reward_var"] > 0:
                out["baseline_var_reduction"] = 1.0 - out["advantage_var"] / out["reward_var"]
        if s["kl_tokens"]:
            out["kl_mean"] = mean("kl", "kl_tokens")
        if s["topk_tokens"]:
            out["kl_topk_mean"] = mean("kl_topk", "topk_tokens")
            out["topk_mass_mean"] = mean("mass", "topk_tokens")
        if s["ttopk_tokens"]:
            out["kl_ttopk_mean"] = mean("kl_ttopk", "ttopk_tokens")
            out["ttopk_mass_mean"] = mean("ttopk_mass", "ttopk_tokens")
        if s["ratio_tokens"]:
            out["ratio_mean"] = mean("ratio", "ratio_tokens")
            out["ratio_capped_frac"] = mean("ratio_over_cap", "ratio_tokens")
        if s["lp_tokens"]:
            out["logprob_diff_mean"] = mean("lp_diff", "lp_tokens")
            out["logprob_diff_max"] = lp_max
        return out


def gradient_noise(half_sq_norm: float, half_units: int, full_sq_norm: float, full_units: int) -> dict[str, float]:
    """The online variance proxy: two unbiased estimates from the squared norms of one step's gradient measured
    on its first ``half_units`` rollouts and on all ``full_units`` (McCandlish et al. 2018, "An empirical model of
    large-batch training", App. A).

    With G_n the mean gradient of n independent rollouts, E|G_n|^2 = |G|^2 + tr(Sigma)/n, so two batch sizes give
        tr(Sigma) = (|G_a|^2 - |G_n|^2) / (1/a - 1/n)       (per-rollout gradient covariance trace)
        |G|^2     = (n |G_n|^2 - a |G_a|^2) / (n - a)
    Returned: ``grad_var`` = tr(Sigma)/n, the trace of the covariance of the step's gradient estimate, and
    ``grad_sq_signal`` = |G|^2. Each is unbiased but noisy on one step (either can be negative); average over steps,
    and compare ``grad_var`` between methods only at equal batch size. Returns {} when the sizes cannot separate.
    """
    a, n = half_units, full_units
    if not (0 < a < n) or not (math.isfinite(half_sq_norm) and math.isfinite(full_sq_norm)):
        return {}
    trace = (half_sq_norm - full_sq_norm) / (1.0 / a - 1.0 / n)
    return {"grad_var": trace / n, "grad_sq_signal": (n * full_sq_norm - a * half_sq_norm) / (n - a)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsWriter:
    """``metrics.jsonl`` always; TensorBoard/W&B when asked.

    ``resume_step``: the step the run continues from (0 for a new run). Lines of later steps (written before a
    crash, about to be recomputed) and torn lines are dropped first, atomically, so that every logged step has
    exactly one line, in order. TensorBoard hides the events after ``resume_step`` (``purge_step``); W&B continues
    the same run (its id is kept in ``output_dir/wandb_run_id``) and ignores steps it has already seen."""

    def __init__(self, output_dir: Path, loggers: Sequence[str], config: dict[str, Any], *,
                 resume_step: int = 0) -> None:
        self.path = output_dir / METRICS_FILE
        truncate_history(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._failed = False  # a write or flush failed (a full disk): its error was raised then, not again at close
        self._tb = self._wandb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise UserError("loggers includes tensorboard but it is not installed; "
                                "pip install 'vopd[tensorboard]'") from exc
            tb_dir = output_dir / "tensorboard"
            # purge_step: events at or after it, left by the run before a crash, are hidden from TensorBoard.
            self._tb = SummaryWriter(str(tb_dir), purge_step=resume_step + 1 if tb_dir.exists() else None)
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError as exc:
                raise UserError("loggers includes wandb but it is not installed; pip install 'vopd[wandb]'") from exc
            id_file = output_dir / WANDB_ID_FILE
            if not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:16] + "\n", encoding="utf-8")
            self._wandb = wandb.init(project="vopd", dir=str(output_dir), config=config,
                                     id=id_file.read_text(encoding="utf-8").strip(), resume="allow")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self._reporting():
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def flush(self) -> None:
        """Make every line written so far durable (before a checkpoint vouches for the steps they describe)."""
        with self._reporting():
            self._file.flush()
            os.fsync(self._file.fileno())

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        try:
            yield
        except OSError:
            self._failed = True
            raise

    def close(self) -> None:
        try:
            self._file.close()  # the file is closed even when the flush inside fails
        except OSError:
            if not self._failed:
                raise
            # the bytes still buffered are those of the write that failed, already reported: a resume drops the
            # torn line and recomputes it
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the records of ``path``, the 1-based numbers of the lines that are not a JSON object with an integer
    ``step``: a write cut short by a crash, or damage)."""
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def _warn_unreadable(path: Path, bad: list[int], what: str) -> None:
    if bad:
        warnings.warn(f"{path}: {what} {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}): a write "
                      "cut short by a crash", RuntimeWarning, stacklevel=3)


def truncate_history(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the lines of ``path`` for steps 1..``last_step`` in step order (of a step written twice, by a version
    before this rule, the last line wins); drop later steps, and unreadable lines with a ``RuntimeWarning``. The file
    is replaced atomically (temporary file, fsync, rename), and only when something changes. Returns what is kept."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed while replacing the file
        stale.unlink(missing_ok=True)
    if not path.is_file():
        return []
    records, bad = _parse_lines(path)
    _warn_unreadable(path, bad, "dropped")
    by_step = {r["step"]: r for r in records if 1 <= r["step"] <= last_step}
    kept = [by_step[s] for s in sorted(by_step)]
    if not bad and kept == records:
        return kept
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return kept


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in file order. A line that is not a complete JSON record (a write cut
    short by a crash) is skipped with a ``RuntimeWarning``; the file is not changed."""
    records, bad = _parse_lines(Path(path))
    _warn_unreadable(Path(path), bad, "skipped")
    return records


class PhaseTimer:
    """Wall time per phase (CUDA-synchronised so asynchronous kernels are charged to their phase). Phases nest: time
    in an inner phase (the teacher inside the student's micro-batch loop) is charged to it alone, so the phases add
    up to ``total``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.total = device, 0.0
        self.times: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def _switch(self) -> None:
        """Charge the time since the last switch to the phase on top of the stack."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._stack:
            dt = now - self._since
            self.times[self._stack[-1]] = self.times.get(self._stack[-1], 0.0) + dt
            self.total += dt
        self._since = now

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}": v for k, v in self.times.items()} | {"time_step": self.total}


def rollout_metrics(r: Rollout) -> dict[str, float]:
    """The rollout's lengths and truncations on this rank; with multi-turn episodes (``Rollout.episodes``) also their
    turns, tool calls and errors per episode, the environment's share of the completion tokens and the mean final
    reward over the episodes that gave one (docs/metrics.md, "Rollouts")."""
    lengths = r.completion_lengths
    out = {"completion_len_mean": sum(lengths) / max(len(lengths), 1), "completion_len_max": max(lengths, default=0),
           "truncation_rate": sum(r.truncated) / max(len(r.truncated), 1)}
    if r.episodes:
        n = len(r.episodes)
        out.update(turns_mean=sum(e.turns for e in r.episodes) / n,
                   tool_calls_mean=sum(e.tool_calls for e in r.episodes) / n,
                   tool_errors_mean=sum(e.tool_errors for e in r.episodes) / n,
                   env_token_frac=sum(e.env_tokens for e in r.episodes) / max(sum(lengths), 1))
        rewards = [e.reward for e in r.episodes if e.reward is not None]
        if rewards:
            out["env_reward_mean"] = sum(rewards) / len(rewards)
    return out
