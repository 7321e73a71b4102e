"""Evaluation: sample n completions per problem, grade them, report Avg@n, Pass@n and Maj@n; the results files.

What it knows: the authors' evaluation protocol (docs/evaluation.md, "Background: the authors' protocol": 8 samples at temperature
0.6, last boxed answer, math-verify; multiple choice at top-p 0.95, top-k 20 with a JSON letter), how the three
metrics follow from graded samples (``compute_metrics``, a pure function), ``evaluate`` (render, sample, grade; split
over the ranks on request) and the files ``vopd eval`` writes (``write_outputs``). ``heldout_kl`` of ``vopd.heldout``
is importable from here too. What it does not know: how answers are extracted and compared (``vopd.grading``), file
formats and field names (``vopd.data``), how the batches are shared over the ranks and seeded (``vopd.eval_split``),
how tokens are drawn (``vopd.sampling``, ``vopd.vllm_engine``), the command line (``vopd.eval_cli``), what a training
run evaluates (``vopd.eval_student``), or how models are loaded (``vopd.models``).

Metrics, for P problems with n samples each (c_ij = 1 when sample j of problem i is correct):
  Avg@n  = (1 / sum_i n_i) * sum_ij c_ij          mean accuracy over all samples
  Pass@n = (1 / P) * sum_i max_j c_ij              share of problems with at least one correct sample
  Maj@n  = (1 / P) * sum_i c_i,maj                 the majority answer's grade; samples without an answer do not
                                                   vote, equivalent answers (1/2, 0.5) vote together, ties go to
                                                   the answer seen first (lowest sample index)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

from vopd.data import MCQ_PROMPT_TEMPLATE, PROMPT_TEMPLATE, Problem
from vopd.errors import UserError
from vopd.eval_split import EvalEngine, gathered, hf_eval_engine, model_inference, sample_split
from vopd.grading import DEFAULT_TIMEOUT_S, answers_match, extract_answer
from vopd.heldout import heldout_kl
from vopd.prompts import ChatOptions, render_prompt
from vopd.sampling import Episode, Samples, SamplingSettings

if TYPE_CHECKING:
    import torch

    from vopd.models import Model, Tokenizer

__all__ = ["EvalResult", "Metrics", "SampleRecord", "compute_metrics", "evaluate", "heldout_kl", "majority_vote",
           "write_outputs", "check_out_dir"]

Kind = Literal["math", "mcq"]


@dataclass(frozen=True)
class SampleRecord:
    """One graded sample. ``answer`` is the extracted answer (None when the completion gives none)."""

    problem_index: int
    sample_index: int
    answer: str | None
    correct: bool
    gold: str = ""
    completion: str = ""
    num_tokens: int = 0
    truncated: bool = False
    source: str = ""
    episode: Episode | None = None  # a multi-turn evaluation's counts (``vopd.eval_episodes``), else None


@dataclass(frozen=True)
class Metrics:
    """Avg@n, Pass@n and Maj@n (each in [0, 1]) over ``num_problems`` problems and ``num_samples`` samples."""

    avg_at_n: float
    pass_at_n: float
    maj_at_n: float
    num_problems: int
    num_samples: int


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` returns: the metrics, every graded sample, and the settings that produced them."""

    metrics: Metrics
    records: list[SampleRecord]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The metrics, sample statistics and settings as one JSON-ready dict."""
        recs = self.records
        return {
            **asdict(self.metrics),
            "truncated_rate": sum(r.truncated for r in recs) / max(len(recs), 1),
            "no_answer_rate": sum(r.answer is None for r in recs) / max(len(recs), 1),
            "mean_completion_tokens": sum(r.num_tokens for r in recs) / max(len(recs), 1),
            **self.settings,
        }


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> int | None:
    """The index of the first sample of the most common answer, or None when no sample has an answer.

    ``same(a, b)`` decides whether two answers are one vote (default: equal strings); each answer joins the first
    group, in order of appearance, whose first answer it equals. Ties go to the group that appeared first.
    """
    firsts: list[int] = []
    heads: list[str] = []  # the answer of each group's first sample
    counts: list[int] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for g, head in enumerate(heads):
            if same(head, answer) if same else head == answer:
                counts[g] += 1
                break
        else:
            firsts.append(i)
            heads.append(answer)
            counts.append(1)
    if not firsts:
        return None
    best = max(range(len(firsts)), key=lambda g: (counts[g], -g))  # -g: the earlier group wins a tie
    return firsts[best]


def compute_metrics(
    records: Sequence[SampleRecord], *, same_answer: Callable[[str, str], bool] | None = None
) -> Metrics:
    """Avg@n, Pass@n and Maj@n from graded samples (definitions in the module docstring).

    Samples are grouped by ``problem_index`` and ordered by ``sample_index``. The majority answer's grade is the
    grade of its group's first sample.
    """
    if not records:
        raise ValueError("no graded samples to compute metrics from")
    by_problem: dict[int, list[SampleRecord]] = {}
    for r in sorted(records, key=lambda r: (r.problem_index, r.sample_index)):
        by_problem.setdefault(r.problem_index, []).append(r)
    passed = majority = 0
    for group in by_problem.values():
        passed += any(r.correct for r in group)
        winner = majority_vote([r.answer for r in group], same_answer)
        majority += winner is not None and group[winner].correct
    return Metrics(
        avg_at_n=sum(r.correct for r in records) / len(records),
        pass_at_n=passed / len(by_problem),
        maj_at_n=majority / len(by_problem),
        num_problems=len(by_problem),
        num_samples=len(records),
    )


def _as_problem(item: Problem | Mapping[str, Any], kind: Kind, i: int) -> Problem:
    if isinstance(item, Problem):
        if item.kind != kind:
            raise ValueError(f"problem {i} ({item.source}) is {item.kind!r} but kind={kind!r}; pass kind={item.kind!r}")
        return item
    # Rows such as the tiny task's {"problem", "solution", "answer"} are accepted as they are.
    return Problem(str(item["problem"]), str(item["answer"]).strip(), kind, f"item {i}")


def evaluate(
    model: Model | None,
    tokenizer: Tokenizer,
    problems: Sequence[Problem | Mapping[str, Any]],
    *,
    n: int = 8,
    temperature: float = 0.6,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 4096,
    batch_size: int = 64,
    seed: int = 0,
    kind: Kind = "math",
    greedy: bool = False,
    template: str | None = None,
    grading_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    chat: ChatOptions = ChatOptions(),
    autocast: torch.dtype | None = None,
    synced: bool = False,
    engine: EvalEngine | None = None,
    split: bool = False,
) -> EvalResult:
    """Sample ``n`` completions per problem and grade them.

    ``greedy=True`` (or ``temperature=0``) decodes greedily and needs ``n=1``. ``template`` defaults to the paper's
    prompt for math and ``MCQ_PROMPT_TEMPLATE`` for multiple choice; ``chat`` renders the templated text through the
    chat template (``ChatOptions.text_as_chat``, as training does: ``vopd.prompts.render_prompt``), and generation
    stops on EOS or the template's end of turn. Rows (a problem's samples side by side) are sampled in batches of
    ``batch_size``, batch k seeded from ``seed`` and k (``vopd.eval_split.batch_seed``): reproducible for a given
    ``seed``, ``batch_size`` and device; the caller's torch RNG state is left as it was. ``engine``: what samples
    (``vopd.eval_split.EvalEngine``; default Hugging Face ``generate`` on ``model``, which may then be None only
    when ``engine`` is given). ``split``: every rank of the process group calls this with the same arguments and
    samples and grades its share of the batches; the graded samples are all-gathered, so every rank returns the
    one-process result. ``autocast``, ``synced``: as ``vopd.sampling.generate``'s (a student stored as float32
    masters, evaluated in its compute dtype; a student sharded over the ranks, whose forwards every rank runs in
    step: each rank then makes as many sampling calls, placeholders included).
    """
    if kind not in ("math", "mcq"):
        raise UserError(f"kind must be 'math' or 'mcq', got {kind!r}")
    greedy = greedy or temperature == 0
    for ok, message in [
        (n >= 1, f"n must be at least 1, got {n}"),
        (not greedy or n == 1, f"greedy decoding gives {n} identical samples; use n=1 or a temperature > 0"),
        (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (max_new_tokens >= 1 and batch_size >= 1, "max_new_tokens and batch_size must be at least 1"),
    ]:
        if not ok:
            raise UserError(message)
    items = [_as_problem(p, kind, i) for i, p in enumerate(problems)]
    if not items:
        raise UserError("no problems to evaluate")
    if engine is None:
        if model is None:
            raise ValueError("evaluate needs a model or an engine")
        engine = hf_eval_engine(model_inference(model), tokenizer, autocast=autocast, synced=synced,
                                progress=progress)
    template = template or (PROMPT_TEMPLATE if kind == "math" else MCQ_PROMPT_TEMPLATE)
    prompt_ids = [render_prompt(tokenizer, p.problem, template=template, chat=chat, where=p.source) for p in items]
    # Sample j of problem i is row i * n + j: a problem's samples sit together, in the order they are voted in.
    rows = [ids for ids in prompt_ids for _ in range(n)]
    settings = SamplingSettings(max_new_tokens, temperature, top_p, top_k, greedy)

    def same(a: str, b: str) -> bool:
        return answers_match(b, a, timeout_s=grading_timeout_s)

    def graded_share() -> list[SampleRecord]:
        parts = sample_split(engine, rows, settings, batch_size=batch_size, seed=seed, split=split,
                             lockstep=synced)
        return [_grade(items[row // n], row, n, ids, cut, tokenizer, kind, same, episode)
                for part in parts if part.index >= 0
                for row, ids, cut, episode in zip(part.rows, part.samples.completions, part.samples.truncated,
                                                  _episodes(part.samples))]

    started = time.perf_counter()
    # Each rank grades its own samples (math-verify is not free either); the records are put back in row order.
    records = sorted(gathered(graded_share, split=split), key=lambda r: (r.problem_index, r.sample_index))
    metrics = compute_metrics(records, same_answer=same if kind == "math" else None)
    settings_out = {
        "n": n, "kind": kind, "greedy": greedy, "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p, "top_k": 0 if greedy else top_k, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "seed": seed, "template": template, "elapsed_s": time.perf_counter() - started,
        "chat": chat.text_as_chat, "system_prompt": chat.system_prompt, "chat_kwargs": dict(chat.template_kwargs),
    }
    return EvalResult(metrics, records, settings_out)


def _episodes(samples: Samples) -> list[Episode | None]:
    return list(samples.episodes) if samples.episodes is not None else [None] * len(samples.completions)


def _grade(problem: Problem, row: int, n: int, ids: list[int], cut: bool, tokenizer: Tokenizer, kind: Kind,
           same: Callable[[str, str], bool], episode: Episode | None = None) -> SampleRecord:
    """Row ``row``'s completion ``ids`` graded against ``problem`` (sample ``row % n`` of problem ``row // n``)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    answer = extract_answer(text, kind)
    if kind == "math":
        correct = answer is not None and same(problem.answer, answer)
    else:
        correct = answer is not None and answer == problem.answer.strip().strip("()").upper()
    return SampleRecord(row // n, row % n, answer, correct, problem.answer, text, len(ids), cut, problem.source,
                        episode)


def check_out_dir(out_dir: str | Path, *, overwrite: bool) -> None:
    """``UserError`` when ``out_dir`` is a file, or already holds results (``summary.json``/``samples.jsonl``) and
    ``overwrite`` is off."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory for summary.json and samples.jsonl")
    held = [name for name in ("summary.json", "samples.jsonl") if (out / name).exists()]
    if held and not overwrite:
        raise UserError(f"--out {out} already holds results ({', '.join(held)}): pass --overwrite to replace them, "
                        "or choose another --out")


def write_outputs(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``samples.jsonl`` (one graded sample a line) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path, samples_path = out / "summary.json", out / "samples.jsonl"
    summary_path.write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    with samples_path.open("w", encoding="utf-8") as f:
        for r in result.records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    return summary_path, samples_path


