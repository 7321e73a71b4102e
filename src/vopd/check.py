"""Pre-flight checks of a student/teacher pair, run before step 0 of every training run and as `vopd check`.

What it knows: the order of the checks (the teacher's pairing with the student first: one token->id map and the
same special tokens, else every per-token reward compares different tokens; each placement checks that its own way,
``Teacher.pairing_checks``), which sampling
settings keep the estimators unbiased (temperature 1, no top-p, no top-k: docs/estimators.md, "Background"), how to self-check the
hidden-state path (teacher = student must give KL = 0, and the chunked log p(y) must equal the model's own forward),
and the limits a config must respect that only the models reveal: ``loss.top_k`` within the real vocabulary
(``len(tokenizer)``), prompt + ``rollout.max_new_tokens`` within the position limit of the student and of each
teacher in this process (``config.max_position_embeddings`` or its equivalent; ``prompt_budget``), and with
``data.train`` set, which prompts fit; it warns when a tokenizer's chat template goes unused by the prompts.
What it does not know: training. Each failed check is a ``UserError`` naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from typing import TYPE_CHECKING, Callable

import torch

from vopd.errors import UserError
from vopd.sampling import biasing_settings

if TYPE_CHECKING:
    from vopd.config import TrainConfig
    from vopd.data import PromptSet
    from vopd.loss.methods import MethodSpec
    from vopd.loss.plan import LossPlan
    from vopd.models import Model, Tokenizer
    from vopd.teacher.base import Teacher
    from vopd.teacher.routing import Teachers

def check_sampling(*, temperature: float, top_p: float, top_k: int, allow_biased: bool) -> list[str]:
    """Refuse sampling settings that bias every estimator unless explicitly allowed; returns warnings to log."""
    problems = biasing_settings(temperature=temperature, top_p=top_p, top_k=top_k)
    if problems and not allow_biased:
        raise UserError(
            f"{', '.join(problems)} makes the samples come from a different distribution than the student's, which "
            "biases every OPD estimator; use temperature=1.0, top_p=1.0, top_k=0, or set "
            "rollout.allow_biased_sampling=true to proceed anyway"
        )
    return [f"biased sampling allowed by override: {', '.join(problems)}"] if problems else []


@torch.no_grad()
def self_check(student: Model, tokenizer: Tokenizer, vocab_size: int, *, text: str = "1 + 2 = 3. \\boxed{3}") -> dict[str, float]:
    """KL(student || student) through the chunked path must be ~0, and its log p(y) must equal the model's own
    forward (a model whose logits are not ``transform(hidden @ W.T + b)`` with the transform vopd reads from its
    config — ``vopd.models.logit_transform``: softcapping, logit scaling — fails here)."""
    from vopd.loss.chunked import fused_distillation_loss
    from vopd.loss.scores import TeacherHidden
    from vopd.models import head_mismatch, last_hidden, output_layer

    device = next(student.parameters()).device
    ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]], device=device)
    if ids.shape[1] < 2:
        raise UserError("self-check text tokenised to fewer than 2 tokens; the tokenizer looks broken")
    attention = torch.ones_like(ids)
    was_training = student.training
    student.eval()
    try:
        hidden = last_hidden(student, ids, attention)[:, :-1]
        head = output_layer(student, vocab_size)
        targets, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
        out = fused_distillation_loss(hidden, head.weight, targets, mask,
                                      TeacherHidden(hidden, head.weight, head.bias, head.transform), method="vopd",
                                      student_bias=head.bias, student_transform=head.transform)
        logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1, :vocab_size].float()
        ref = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    finally:
        student.train(was_training)
    assert out.kl is not None  # vopd reports the exact KL_t
    kl = float(out.kl.abs().max())
    logp_err = float((out.logp - ref).abs().max())
    tol = 1e-4 if hidden.dtype == torch.float32 else 5e-2
    if not (math.isfinite(kl) and math.isfinite(logp_err)):  # NaN compares false with any tolerance
        raise UserError("self-check failed: the student's log-probs are not finite (its weights hold inf or nan): "
                        "load an intact student (model.student)")
    if kl > tol:
        raise UserError(f"self-check failed: KL(student || student) = {kl:.2e} (should be 0); please report this")
    if logp_err > tol:
        raise UserError(head_mismatch(student, logp_err, role="student"))
    return {"self_kl_max": kl, "logp_max_error": logp_err}


#: Config keys of a model's position limit: transformers' name (most configs map theirs onto it), then others'.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(model: Model) -> tuple[int, str] | None:
    """(the longest sequence the model's positions cover, the config key that declares it), if it declares one."""
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        limit = getattr(config, key, None)
        if type(limit) is int and limit > 0:
            return limit, key
    return None


def _whose(teachers: Teachers | None, name: str) -> str:
    """A teacher's possessive in messages: by name when rows are routed to several."""
    return f"teacher {name}'s" if teachers is not None and teachers.routed else "the teacher's"


def tightest_limit(student: Model, teachers: Teachers | None) -> tuple[int, str, str] | None:
    """(limit, its config key, whose) of the smallest position limit among the student's and those of the teachers
    whose models are in this process or whose server states it (``position_limit()``: a stock vLLM server's
    ``max_model_len``; a vopd server's is not known here), the student's on a tie; None when none declares one."""
    from vopd.teacher.local import in_process

    models = [("the student's", student)]
    for name, teacher in teachers or ():
        local = in_process(teacher)
        if local is not None:
            models.append((_whose(teachers, name), local.model))
    found = [(*limit, whose) for whose, model in models if (limit := position_limit(model)) is not None]
    for name, teacher in teachers or ():  # a server that states its own limit (stock vLLM: --max-model-len)
        stated = getattr(teacher, "position_limit", None)
        if callable(stated):
            found.append((*stated(), _whose(teachers, name)))
    return min(found, key=lambda entry: entry[0], default=None)


def prompt_budget(cfg: TrainConfig, student: Model, teachers: Teachers | None = None) -> tuple[int, str]:
    """(the longest usable prompt in tokens, what sets it, for messages): ``data.max_prompt_tokens``, or less when a
    prompt that long plus ``rollout.max_new_tokens`` (and the evaluation's) would pass the position limit of the
    student or of a teacher in this process (the teacher scores prompt + completion too). ``UserError`` when the
    completions alone do not fit."""
    tightest = tightest_limit(student, teachers)
    completion, completion_key = cfg.rollout.completion_tokens  # a whole episode with rollout.env
    longest = max(completion, cfg.eval_max_new_tokens if cfg.data.eval else 0)
    if tightest is None or cfg.data.max_prompt_tokens + longest <= tightest[0]:
        return cfg.data.max_prompt_tokens, f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}"
    limit, name, whose = tightest
    key = completion_key if longest == completion else "eval.max_new_tokens"
    if longest >= limit:
        raise UserError(f"{key}={longest} leaves no room for a prompt within {whose} position limit "
                        f"({name}={limit}): set {key} below {limit}")
    room = limit - longest
    return room, f"{room} tokens ({whose} {name}={limit} minus {key}={longest})"


def check_top_k(cfg: TrainConfig, vocab: int) -> None:
    """``loss.top_k`` of a top-k method must not exceed the real vocabulary (the tokenizer's, not the config's)."""
    from vopd.loss.methods import method_spec

    if method_spec(cfg.loss.method).topk and cfg.loss.top_k > vocab:
        raise UserError(f"loss.top_k={cfg.loss.top_k} exceeds the vocabulary of {vocab} tokens ({cfg.loss.method} "
                        f"takes the top k of it): set loss.top_k <= {vocab}")


def check_placement(cfg: TrainConfig, teacher: Teacher, name: str = "", spec: MethodSpec | None = None) -> None:
    """The run's method must be one this teacher's placement can serve (``Teacher.supports``: e.g. a teacher server
    without its output layer here sends per-token numbers only, so the full-vocabulary methods are refused, and
    rb-topk needs a server that sends the teacher's log-sum-exp): a one-line ``UserError`` with the placement's
    reason and fix, before step 1. Teacher ``name`` of ``model.teachers``: its own keys are named."""
    from vopd.loss.methods import method_spec

    reason = teacher.supports(spec or method_spec(cfg.loss.method))
    if reason is not None:
        if name:  # several teachers: say which one the reason is about
            reason = f"teacher {name}: {reason}"
        raise UserError(reason)


def preflight(student: Model, student_tok: Tokenizer, teachers: Teachers, cfg: TrainConfig, *,
              prompts: PromptSet | None = None, plan: LossPlan | None = None) -> list[str]:
    """All checks for a training config, for any teacher placement and any number of teachers; returns
    human-readable lines of what passed. Each teacher checks its pairing with the student
    (``Teacher.pairing_checks``: one token->id map for all) and its stop tokens and chat template, then the
    student-side checks run once. ``prompts``: the training prompts already read (``training_prompts``), so the
    file is not read again for the template checks; ``plan``: the run's loss, whose method every teacher must
    serve (default: ``cfg.loss.method``'s)."""
    from vopd.prompts import unused_template

    lines = []
    chatting = uses_chat_template(cfg) if prompts is None else prompts.chat
    for name, teacher in teachers:
        shown = name if teachers.routed else ""  # one teacher: its lines and errors carry no name
        check_placement(cfg, teacher, shown, None if plan is None else plan.spec)
        mine = [*teacher.pairing_checks(student, student_tok),
                *chat_checks(student_tok, teacher.tokenizer, cfg, chatting)]
        lines += [f"teacher {shown}: {line}" for line in mine] if shown else mine
    if not chatting and (note := unused_template([("the student's", student_tok),
                                                  *((_whose(teachers, n), t.tokenizer) for n, t in teachers)])):
        warnings.warn(note, RuntimeWarning, stacklevel=2)  # a warning: text prompts on a chat model may be meant
    longest = max(map(len, prompts.student)) if prompts is not None and prompts.student else \
        prompt_budget(cfg, student, teachers)[0]
    if cfg.rollout.env:  # multi-turn: both templates render an episode with tools alike (vopd.agent_checks)
        from vopd.agent_checks import agent_checks
        from vopd.env import load_env, tools_of
        from vopd.prompts import chat_options

        lines += agent_checks(student_tok, [(n if teachers.routed else "", t.tokenizer) for n, t in teachers],
                              tools_of(load_env(cfg.rollout.env), cfg.rollout.env), chat_options(cfg.data))
    return [*lines, *student_checks(student, student_tok, len(student_tok), cfg, teachers),
            *batching_checks(cfg, longest, student, len(student_tok), teachers)]


def training_prompts(cfg: TrainConfig, tok: Tokenizer, student: Model, teachers: Teachers,
                     log: Callable[[str], None]) -> PromptSet:
    """The training prompts (``data.*``) that fit ``prompt_budget``, with each teacher's own prompt and each row's
    teacher when configured: what ``vopd train`` trains on and ``vopd check`` reports."""
    from vopd.data import load_prompt_pairs
    from vopd.env import env_chat, load_env, tools_of
    from vopd.prompts import chat_options, has_chat_template, teacher_prompts

    budget, limit_name = prompt_budget(cfg, student, teachers)  # data.max_prompt_tokens, or less: a position limit
    single = teachers.single
    chat = chat_options(cfg.data)
    if cfg.rollout.env:  # an episode's rows go through the template with the environment's tools declared
        if not has_chat_template(tok):
            raise UserError(f"rollout.env={cfg.rollout.env} renders every turn with the chat template, but the "
                            f"student's tokenizer ({cfg.model.student}) has none: use a tokenizer with one, or "
                            "rollout.env='' (single turn)")
        chat = env_chat(chat, tools_of(load_env(cfg.rollout.env), cfg.rollout.env))
    return load_prompt_pairs(
        cfg.data.train, tok, field=cfg.data.prompt_field, template=cfg.data.template, max_tokens=budget,
        long_prompts=cfg.data.long_prompts, log=log, limit_name=limit_name, messages_field=cfg.data.messages_field,
        chat=chat, route_field=cfg.data.teacher_field, teacher_names=teachers.names,
        keep_messages=bool(cfg.rollout.env),
        # every teacher reads its prompt alike (TrainConfig.validate): the first one's options serve all rows
        teacher=teacher_prompts(cfg.model.teacher_configs[0], cfg.data, tok,
                                None if single is None else single.tokenizer))


def uses_chat_template(cfg: TrainConfig) -> bool:
    """Whether training prompts go through the chat template: ``data.text_as_chat``, ``rollout.env``, or a
    conversation row in ``data.train``."""
    if cfg.data.text_as_chat or cfg.rollout.env:  # an environment's episodes are always chat-rendered
        return True
    if not cfg.data.train:
        return False
    from vopd.data import training_rows

    return any(row.get(cfg.data.messages_field) not in (None, "")
               for _where, row in training_rows(cfg.data.train, cfg.data.messages_field))


def chat_checks(student_tok: Tokenizer, teacher_tok: Tokenizer | None, cfg: TrainConfig,
                chatting: bool) -> list[str]:
    """Stop tokens and chat templates (docs/real_models.md): the student's template can open an assistant turn; a
    teacher whose tokenizer this placement holds stops on the same tokens and, when prompts go through the chat
    template, renders a probe conversation to the same ids (the first differing token named otherwise)."""
    from vopd.prompts import chat_options, compare_rendering, compare_stop_tokens, require_chat_template, \
        stop_token_ids

    chat = chat_options(cfg.data)
    if teacher_tok is None:
        lines = [f"completions stop on {student_tok.convert_ids_to_tokens(stop_token_ids(student_tok))} (the "
                 "teacher's tokenizer is not here to compare)"]
    else:
        lines = [compare_stop_tokens(student_tok, teacher_tok)]
    if chatting:
        lines.append(require_chat_template(student_tok, chat))
        if any(t.own_template for t in cfg.model.teacher_configs):  # per-model rendering: the templates may differ
            lines.append("the teacher renders its prompts with its own chat template (model.teachers[].own_template)")
        elif teacher_tok is not None:
            lines.append(compare_rendering(student_tok, teacher_tok, chat))
    return lines


def student_checks(student: Model, student_tok: Tokenizer, vocab: int, cfg: TrainConfig,
                   teachers: Teachers | None = None) -> list[str]:
    """The checks that need only the student and the config (sampling settings, self-check, lengths: within the
    teachers' position limits too), shared by the in-process and the remote-teacher pre-flights; biased-sampling
    overrides are warned about here."""
    check_top_k(cfg, vocab)
    budget, limit_name = prompt_budget(cfg, student, teachers)
    notes = check_sampling(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                           allow_biased=cfg.rollout.allow_biased_sampling)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    sc = self_check(student, student_tok, vocab)
    tightest = tightest_limit(student, teachers)
    return [
        f"lengths: prompts up to {budget} tokens + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
        + (f"within {tightest[2]} position limit {tightest[0]}" if tightest else "(no model here declares a position "
           "limit)")
        + ("" if limit_name.startswith("data.") else " (prompts limited by the position limit)"),
        "sampling settings: " + ("; ".join(notes) if notes else "temperature 1, no top-p/top-k (unbiased)"),
        f"self-check: KL(student||student) max {sc['self_kl_max']:.1e}, chunked vs model log p max error "
        f"{sc['logp_max_error']:.1e}",
    ]


def batching_checks(cfg: TrainConfig, longest: int, student: Model, vocab: int,
                    teachers: Teachers | None) -> list[str]:
    """``micro_batch_tokens`` holds one whole sequence (the ``longest`` prompt + ``rollout.max_new_tokens``), and with
    ``packing`` the student and every in-process teacher pack two probe sequences as they pad them (their family
    and attention implementation honour transformers' packed-sequence support; docs/scaling.md)."""
    from vopd.attention import implementation, use_packed_attention
    from vopd.models import PACKING_ATTENTION, packing_error
    from vopd.teacher.local import in_process

    lines = []
    completion, key = cfg.rollout.completion_tokens
    need = longest + completion
    if cfg.micro_batch_tokens:
        if cfg.micro_batch_tokens < need:
            raise UserError(f"micro_batch_tokens={cfg.micro_batch_tokens} is below one sequence (prompts up to "
                            f"{longest} tokens + {key}={completion} = {need}): set "
                            f"micro_batch_tokens >= {need}, or 0 for micro_batch_size rows")
        lines.append(f"micro-batches: up to {cfg.micro_batch_tokens} token slots each (one sequence needs up to "
                     f"{need})")
    if not cfg.packing:
        return lines
    models = [("student", student)]
    for name, teacher in ([] if teachers is None else teachers):
        local = in_process(teacher)
        if local is not None:
            models.append((f"teacher {name}", local.model))
    for role, model in models:
        kind = type(model).__name__
        use_packed_attention(model)  # SDPA per sequence, not over the whole row (vopd.attention)
        attention = implementation(model)
        if attention not in PACKING_ATTENTION:
            raise UserError(f"packing: the {role} ({kind}) runs attention {attention!r}, which cannot keep packed "
                            f"sequences apart; load it with one of {', '.join(PACKING_ATTENTION)}, or set "
                            "packing=false")
        err = packing_error(model, vocab)
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
        if not err <= tol:
            raise UserError(f"packing: the {role} ({kind}, attention {attention}) does not pack: two probe sequences "
                            f"packed into one row differ from the same sequences padded by {err:.2g} (relative); "
                            "its family does not honour transformers' packed-sequence positions: set packing=false")
        lines.append(f"packing: the {role} ({kind}, attention {attention}) packs as it pads (max relative error "
                     f"{err:.1e})")
    return lines


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/TOML training config")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="also plan the run's memory on GPUs of "
                        "this many GiB (vopd plan's verdict; docs/scaling.md, \"Will it fit?\")")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="with --gpu-memory-gib: the number of GPUs (default: $WORLD_SIZE, else 1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.student=PATH")


def memory_verdict(cfg: TrainConfig, *, world_size: int, gpu_memory_gib: float) -> tuple[bool, list[str]]:
    """``vopd plan``'s verdict as check lines: (fits, lines)."""
    from vopd.memfit import GIB, plan, verdict_line

    if world_size < 1 or not gpu_memory_gib > 0:
        raise UserError(f"--world-size {world_size} --gpu-memory-gib {gpu_memory_gib}: both must be > 0")
    v = plan(cfg, world_size=world_size, gpu_memory_gib=gpu_memory_gib)
    lines = [f"{'ok  ' if v.fits else 'FAIL '}memory: {verdict_line(v)} (vopd plan shows the categories)"]
    lines += [f"     {p}" for p in v.problems]
    lines += [f"     would fit with {a.change} ({a.peak / GIB:.1f} GiB)" for a in v.advice if a.fits]
    return v.fits, lines


def cli_main(args: argparse.Namespace) -> int:
    from vopd.config import load_config
    from vopd.models import load_student, resolve_device
    from vopd.teacher.routing import open_teachers

    cfg = load_config(args.config, args.overrides, require_paths=False)  # no training data needed to check models
    for key, value in (("model.student", cfg.model.student),
                       ("model.teacher", ",".join(t.model for t in cfg.model.teacher_configs if t.model))):
        if not value:
            raise UserError(f"config key {key} is required: set it to a local model directory ({key}=PATH)")
    device = resolve_device(cfg.model.device)
    tok, student = load_student(cfg.model, device)
    teachers = open_teachers(cfg, vocab_size=len(tok), device=device, student=student, student_tok=tok)
    try:
        for line in preflight(student, tok, teachers, cfg):
            print(f"ok  {line}")
    finally:
        teachers.close()
    if cfg.data.train:  # the prompts that fit, as `vopd train` will load them (data.long_prompts=error refuses here)
        notes: list[str] = []
        found = training_prompts(cfg, tok, student, teachers, notes.append)
        routed = "" if found.routes is None else " (rows per teacher: " + ", ".join(
            f"{n} {found.routes.count(n)}" for n in teachers.names) + ")"
        print(f"ok  data: {len(found.student)} prompts of {cfg.data.train} fit" + ("" if found.teacher is None else
              " (the teacher reads each completion after its own prompt)") + routed + "".join(f"; {n}" for n in notes))
    if getattr(args, "gpu_memory_gib", None) is not None:  # (callers may build the namespace without it)
        fits, lines = memory_verdict(cfg, world_size=args.world_size, gpu_memory_gib=args.gpu_memory_gib)
        print("\n".join(lines))
        return 0 if fits else 1
    return 0
