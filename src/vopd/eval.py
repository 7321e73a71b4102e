"""Evaluation: sample n completions per problem, grade them, report Avg@n, Pass@n and Maj@n; the `vopd eval` command.

What it knows: the authors' evaluation protocol (docs/evaluation.md, "Background: the authors' protocol": 8 samples at temperature
0.6, last boxed answer, math-verify; multiple choice at top-p 0.95, top-k 20 with a JSON letter), how the three
metrics follow from graded samples (``compute_metrics``, a pure function), and what a training run evaluates
(``evaluate_student``: accuracy on ``data.eval`` and the exact held-out KL to the teacher, ``heldout_kl`` of
``vopd.heldout``, importable from here too). What it does not know: how answers are extracted and compared
(``vopd.grading``), file formats and field names (``vopd.data``), how tokens are drawn (``vopd.sampling``), how the
held-out KL is computed (``vopd.heldout``), or how models are loaded (``vopd.models``).

Metrics, for P problems with n samples each (c_ij = 1 when sample j of problem i is correct):
  Avg@n  = (1 / sum_i n_i) * sum_ij c_ij          mean accuracy over all samples
  Pass@n = (1 / P) * sum_i max_j c_ij              share of problems with at least one correct sample
  Maj@n  = (1 / P) * sum_i c_i,maj                 the majority answer's grade; samples without an answer do not
                                                   vote, equivalent answers (1/2, 0.5) vote together, ties go to
                                                   the answer seen first (lowest sample index)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

from vopd.data import MCQ_PROMPT_TEMPLATE, PROMPT_TEMPLATE, Problem, load_problems
from vopd.errors import UserError
from vopd.grading import DEFAULT_TIMEOUT_S, answers_match, extract_answer
from vopd.heldout import heldout_kl
from vopd.prompts import ChatOptions, chat_options, render_prompt, template_kwargs_json

if TYPE_CHECKING:
    import torch

    from vopd.config import TrainConfig
    from vopd.models import Model, Tokenizer
    from vopd.teacher.base import Teacher

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
    model: Model,
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
) -> EvalResult:
    """Sample ``n`` completions per problem and grade them.

    ``greedy=True`` (or ``temperature=0``) decodes greedily and needs ``n=1``. ``template`` defaults to the paper's
    prompt for math and ``MCQ_PROMPT_TEMPLATE`` for multiple choice; ``chat`` renders the templated text through the
    chat template (``ChatOptions.text_as_chat``, as training does: ``vopd.prompts.render_prompt``), and generation
    stops on EOS or the template's end of turn. Samples are reproducible for a given ``seed``,
    ``batch_size`` and device; the caller's torch RNG state is left as it was. ``autocast``, ``synced``: as
    ``vopd.sampling.generate``'s (a student stored as float32 masters, evaluated in its compute dtype; a student
    sharded over the ranks, evaluated by every rank in step).
    """
    import torch
    from tqdm import tqdm

    from vopd.sampling import generate

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
    template = template or (PROMPT_TEMPLATE if kind == "math" else MCQ_PROMPT_TEMPLATE)
    prompt_ids = [render_prompt(tokenizer, p.problem, template=template, chat=chat, where=p.source) for p in items]
    # Sample j of problem i is row i * n + j: a problem's samples sit together, in the order they are voted in.
    rows = [ids for ids in prompt_ids for _ in range(n)]

    device = next(model.parameters()).device
    started = time.perf_counter()
    completions: list[list[int]] = []
    truncated: list[bool] = []
    # Fork the RNG: evaluation inside a training run must not shift the trainer's random stream.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(rows), batch_size), desc="eval", unit="batch", disable=not progress):
            out = generate(
                model, tokenizer, rows[start : start + batch_size], max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, batch_size=batch_size,
                autocast=autocast, synced=synced,
            )
            completions += out.completions
            truncated += out.truncated

    def same(a: str, b: str) -> bool:
        return answers_match(b, a, timeout_s=grading_timeout_s)

    records = []
    for row, (ids, cut) in enumerate(zip(completions, truncated)):
        problem = items[row // n]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        answer = extract_answer(text, kind)
        if kind == "math":
            correct = answer is not None and same(problem.answer, answer)
        else:
            correct = answer is not None and answer == problem.answer.strip().strip("()").upper()
        records.append(SampleRecord(row // n, row % n, answer, correct, problem.answer, text, len(ids), cut,
                                    problem.source))
    metrics = compute_metrics(records, same_answer=same if kind == "math" else None)
    settings = {
        "n": n, "kind": kind, "greedy": greedy, "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p, "top_k": 0 if greedy else top_k, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "seed": seed, "template": template, "elapsed_s": time.perf_counter() - started,
        "chat": chat.text_as_chat, "system_prompt": chat.system_prompt, "chat_kwargs": dict(chat.template_kwargs),
    }
    return EvalResult(metrics, records, settings)


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


# ---------------------------------------------------------------------------------------------------------------
# CLI

#: Sampling settings of the authors' protocol where the command line leaves them out.
PROTOCOL_DEFAULTS: dict[str, dict[str, float]] = {
    "math": {"top_p": 1.0, "top_k": 0},
    "mcq": {"top_p": 0.95, "top_k": 20},
}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vopd eval``."""
    a = parser.add_argument
    a("model", help="local Hugging Face model directory (nothing is downloaded)")
    a("--data", required=True, help="local benchmark file: .jsonl, .json, .csv or .parquet")
    a("--kind", choices=["auto", "math", "mcq"], default="auto", help="auto: mcq when rows have choices")
    a("--n", type=int, default=8, help="samples per problem (default 8)")
    a("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6)")
    a("--top-p", type=float, default=None, help="nucleus sampling (default: 1.0 for math, 0.95 for mcq)")
    a("--top-k", type=int, default=None, help="top-k sampling, 0 = off (default: 0 for math, 20 for mcq)")
    a("--greedy", action="store_true", help="greedy decoding (sets --n 1)")
    a("--max-new-tokens", type=int, default=4096, help="completion length limit (default 4096)")
    a("--batch-size", type=int, default=64, help="sequences per generate call (default 64)")
    a("--limit", type=int, default=None, help="evaluate only the first N problems")
    a("--seed", type=int, default=0, help="sampling seed (default 0)")
    a("--out", default=None, help="directory for summary.json and samples.jsonl (default: print only); refused when "
      "it already holds results, unless --overwrite")
    a("--overwrite", action="store_true", help="replace the results already in --out")
    a("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    a("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
      help="auto: bfloat16 on cuda, float32 on cpu")
    a("--template", default=None, help="prompt template with {problem} (default: the paper's / the mcq prompt)")
    a("--chat", action="store_true", help="render each templated prompt as a user turn through the tokenizer's chat "
      "template (as data.text_as_chat in training); completions also stop on its end-of-turn token")
    a("--system-prompt", default="", help="system turn for --chat prompts")
    a("--chat-template-kwargs", default="{}", help='JSON object of chat template variables, e.g. '
      '\'{"enable_thinking": false}\'')
    a("--grading-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per symbolic comparison")
    for name in ("problem", "answer", "solution", "choices"):
        a(f"--field-{name}", default=None, help=f"name of the {name} field in the data file")


def cli_main(args: argparse.Namespace) -> int:
    """``vopd eval``: load, evaluate, print the summary, write it (and the samples) to ``--out``."""
    if args.template is not None and "{problem}" not in args.template:  # else every problem gets the same prompt
        raise UserError(f"--template {args.template!r} has no {{problem}}, so every problem would be asked the same "
                        "prompt: put {problem} where the problem's text goes")
    if args.out:  # before the (long) evaluation: where its results go must be free
        check_out_dir(args.out, overwrite=args.overwrite)
    kwargs = template_kwargs_json(args.chat_template_kwargs)
    chat = ChatOptions(args.system_prompt, kwargs, args.chat or bool(args.system_prompt) or bool(kwargs))
    problems = load_problems(
        args.data, kind=args.kind, problem_field=args.field_problem, answer_field=args.field_answer,
        solution_field=args.field_solution, choices_field=args.field_choices, limit=args.limit,
    )
    kind = problems[0].kind
    defaults = PROTOCOL_DEFAULTS[kind]
    top_p = defaults["top_p"] if args.top_p is None else args.top_p
    top_k = int(defaults["top_k"] if args.top_k is None else args.top_k)
    greedy = args.greedy or args.temperature == 0
    from vopd.models import load_model, load_tokenizer, resolve_device, torch_dtype

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.tokenizer or args.model, role="evaluated")
    model = load_model(args.model, role="evaluated", dtype=torch_dtype(args.dtype, device), device=device).eval()
    result = evaluate(
        model, tokenizer, problems, n=1 if greedy else args.n, temperature=args.temperature, top_p=top_p,
        top_k=top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, kind=kind,
        greedy=greedy, template=args.template, grading_timeout_s=args.grading_timeout, progress=True, chat=chat,
    )
    result.settings.update(model=str(args.model), data=str(args.data))
    m, n = result.metrics, result.settings["n"]
    print(f"Avg@{n} {m.avg_at_n:.4f}  Pass@{n} {m.pass_at_n:.4f}  Maj@{n} {m.maj_at_n:.4f}  "
          f"({m.num_problems} problems, {m.num_samples} samples)")
    print(json.dumps(result.summary(), indent=2))
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------- evaluation inside a training run

def evaluate_student(student: Model, teacher: Teacher | None, tok: Tokenizer, cfg: TrainConfig,
                     vocab: int, *, autocast: torch.dtype | None = None, synced: bool = False) -> dict[str, float]:
    """Accuracy on ``data.eval`` (Avg/Pass/Maj@n) and the exact held-out KL on fresh temperature-1 samples. The KL
    needs the teacher's full distribution and one teacher for every problem: with a teacher that sends per-token
    numbers, or several teachers (``teacher`` None: held-out rows are not routed), ``eval_kl`` is left out.
    ``autocast``: the student's (``vopd.precision.Precision.autocast``): float32 masters run in the compute dtype.
    ``synced``: the student is sharded (FSDP2): every rank evaluates, in step (``vopd.sampling.generate``)."""
    problems = load_problems(cfg.data.eval, kind="math", problem_field=cfg.data.prompt_field,
                             answer_field=cfg.data.answer_field, limit=cfg.eval.limit or None)
    result = evaluate(student, tok, problems, n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                      max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.rollout.batch_size, seed=cfg.seed,
                      greedy=cfg.eval.greedy, template=cfg.data.template, chat=chat_options(cfg.data),
                      autocast=autocast, synced=synced)
    m = result.metrics
    out = {"eval_avg_at_n": m.avg_at_n, "eval_pass_at_n": m.pass_at_n, "eval_maj_at_n": m.maj_at_n}
    if teacher is not None and teacher.full_distribution:
        out["eval_kl"] = heldout_kl(student, teacher, tok, [p.problem for p in problems], cfg, vocab,
                                    autocast=autocast, synced=synced)
    return out
