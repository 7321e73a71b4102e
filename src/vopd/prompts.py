"""Prompt rendering: how a row's prompt becomes token ids (the one way SFT, rollouts, the teacher and evaluation
render it), and which tokens end a completion.

What it knows: a prompt is a text or a conversation. A text goes into the authors' template (``{problem}`` replaced
literally, docs/tiny_world.md) and is tokenised with the tokenizer's special prefix (BOS); with
``ChatOptions.text_as_chat`` it becomes a one-turn conversation instead. A conversation (OpenAI/HF chat format: a list
of ``{role, content}``; every turn, assistant turns included, is context) is rendered with the tokenizer's chat
template and ``add_generation_prompt=True``, with an optional system prompt and template switches such as
``enable_thinking`` (``ChatOptions``), exactly as ``apply_chat_template`` tokenises it. A completion ends at EOS or at
the end-of-turn token the chat template writes after an assistant turn (``stop_token_ids``: e.g. ``<|im_end|>``);
that token is part of the completion, so the teacher scores it like any other. A conversation's roles are those
every chat format knows (``KNOWN_ROLES``) and those its chat template tests for (``template_roles``). The one-line
refusals: a prompt that needs a chat template (a conversation, or a text with ``text_as_chat``) with a tokenizer that
has none (saying which of the two asked for it), a template that renders nothing for the generation prompt, a
malformed conversation (not a list, a turn without string role and content, a role the template does not know,
empty content, no user turn, a final assistant turn), a conversation field holding a text, two tokenizers that render
the same conversation to different ids or stop on different tokens (docs/real_models.md). What it does not know:
files (``vopd.data`` reads rows), models, sampling.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Protocol, TypeAlias, Union

from vopd.errors import UserError

#: A Hugging Face tokenizer (``vopd.models.Tokenizer``; that module cannot be imported here: it imports vopd.config,
#: which imports this one through vopd.config_sections).
Tokenizer: TypeAlias = Any
#: One chat turn: {"role": "system" | "user" | "assistant" | ..., "content": text}.
Message: TypeAlias = dict[str, str]
#: A row's prompt: a text, or a conversation.
Prompt: TypeAlias = Union[str, list[Message]]

#: The authors' prompt, docs/tiny_world.md and docs/evaluation.md. ``{problem}`` is replaced literally (no str.format,
#: so LaTeX braces in problems and in ``\boxed{}`` need no escaping).
PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."

#: The assistant text of the probe conversation that finds a template's end-of-turn token.
_MARKER = "vopd-end-of-turn-probe"

#: The roles of the OpenAI/HF chat format; a template may know more (``template_roles``: e.g. developer, ipython).
KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool"})
#: A template's test of a turn's role: ``message['role'] == 'x'``, ``m.role != "x"``, ``role in ['x', 'y']``.
_ROLE_TEST = re.compile(r"""role['"]?\]?\s*(?:==|!=|(?:not\s+)?in)\s*(\[[^\]]*\]|\([^)]*\)|'[^']*'|"[^"]*")""")
_QUOTED = re.compile(r"'([A-Za-z_][\w-]*)'|\"([A-Za-z_][\w-]*)\"")


@dataclass(frozen=True)
class ChatOptions:
    """How conversations are rendered (config keys ``data.system_prompt``, ``data.chat_template_kwargs``,
    ``data.text_as_chat``). ``system_prompt``: a system turn put first unless the conversation has one;
    ``template_kwargs``: extra variables for the chat template (``{"enable_thinking": False}``); ``text_as_chat``:
    render text prompts as one user turn (after the text template) through the chat template too."""

    system_prompt: str = ""
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    text_as_chat: bool = False


class _ChatKeys(Protocol):
    system_prompt: str
    chat_template_kwargs: dict[str, Any]
    text_as_chat: bool


def chat_options(data: _ChatKeys) -> ChatOptions:
    """The ``ChatOptions`` of a config's ``[data]`` section (``vopd.config.DataConfig``)."""
    return ChatOptions(data.system_prompt, dict(data.chat_template_kwargs), data.text_as_chat)


def template_kwargs_json(text: str) -> dict[str, Any]:
    """Chat template variables from a JSON object given on a command line (``--chat-template-kwargs``)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        value = exc.msg
    if not isinstance(value, dict):
        raise UserError(f"--chat-template-kwargs={text!r} is not a JSON object ({value}); write e.g. "
                        '\'{"enable_thinking": false}\'')
    return value


def format_prompt(problem: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt text for one problem."""
    return template.replace("{problem}", problem)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids of a text: the tokenizer's special prefix (BOS) + the prompt's tokens. Completions are encoded
    separately (``encode_completion``) so no merge crosses the prompt/completion boundary: what SFT trains on is what
    the sampler continues from."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_completion(tokenizer: Tokenizer, completion: str, *, add_eos: bool = True) -> list[int]:
    """Completion ids, followed by EOS when ``add_eos``."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set one (tokenizer.eos_token = ...) and save it again")
        ids.append(tokenizer.eos_token_id)
    return ids


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _name(tokenizer: Tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


@functools.lru_cache(maxsize=16)
def _roles_in(template: str) -> frozenset[str]:
    found = {name for test in _ROLE_TEST.finditer(template) for pair in _QUOTED.findall(test.group(1))
             for name in pair if name}
    return KNOWN_ROLES | found


def template_roles(tokenizer: Tokenizer) -> frozenset[str]:
    """The roles a conversation may use with ``tokenizer``: ``KNOWN_ROLES`` and the roles its chat template tests a
    turn for (a template renders an unknown role as it renders any other, or fails, so a typo such as "human" would
    otherwise reach the model as a turn it never saw)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # several named templates
        template = " ".join(str(t) for t in template.values())
    return _roles_in(template) if isinstance(template, str) else KNOWN_ROLES


def check_messages(value: object, where: str, roles: Collection[str] = KNOWN_ROLES) -> list[Message]:
    """A conversation as vopd accepts it (turns with ``roles`` and text, a user turn, not ending with the assistant's),
    or a one-line ``UserError`` saying what is wrong with it at ``where``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{where}: a conversation must be a non-empty list of {{role, content}} turns, got "
                        f"{type(value).__name__ if value else 'an empty one'}")
    messages: list[Message] = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) or \
                not isinstance(turn.get("content"), str):
            raise UserError(f"{where}: turn {i} must be an object with string fields 'role' and 'content', got "
                            f"{str(turn)[:80]!r}")
        if turn["role"] not in roles:
            raise UserError(f"{where}: turn {i} has the role {turn['role']!r}, which the chat template does not know "
                            f"(it knows {', '.join(sorted(roles))}): use one of those")
        if not turn["content"].strip():
            raise UserError(f"{where}: turn {i} ({turn['role']}) has empty content: write its text or drop the turn")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: the conversation has no user turn (only {', '.join(m['role'] for m in messages)}): "
                        "the student answers a user's request, so a prompt needs one: add the user turn")
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{where}: the conversation ends with an assistant turn; the student writes the next "
                        "assistant turn, so a prompt must end with a user (or tool) turn: drop the final answer")
    return messages


def _no_template(tokenizer: Tokenizer, where: str, as_text: bool) -> UserError:
    """A chat template is needed and ``tokenizer`` has none: said with what asked for it, a text prompt rendered as a
    chat turn (``as_text``: data.text_as_chat, ``vopd eval --chat``) or a conversation (at ``where``, if known)."""
    head, name = f"{where}: " if where else "", _name(tokenizer)
    if as_text:
        return UserError(f"{head}text prompts are rendered as a chat turn (data.text_as_chat=true; vopd eval: --chat, "
                         f"--system-prompt or --chat-template-kwargs), but the tokenizer of {name} has no chat "
                         "template: set data.text_as_chat=false (vopd eval: drop those options), or use a tokenizer "
                         "with one")
    return UserError(f"{head}{'the row holds' if where else 'the data holds'} a conversation (data.messages_field), "
                     f"which is rendered with the chat template, but the tokenizer of {name} has none: use a "
                     "tokenizer with one (an instruct model's), or give text prompts (data.prompt_field)")


def chat_ids(tokenizer: Tokenizer, messages: list[Message], *, add_generation_prompt: bool,
             kwargs: Mapping[str, Any] | None = None, where: str = "", as_text: bool = False) -> list[int]:
    """``apply_chat_template(messages, tokenize=True)`` as a list of ids, with one-line errors naming ``where``;
    ``as_text``: the messages are a text prompt's chat turn (for the message when there is no template)."""
    if not has_chat_template(tokenizer):
        raise _no_template(tokenizer, where, as_text)
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False, **dict(kwargs or {}))
    except Exception as exc:  # jinja's TemplateError (e.g. "System role not supported") and friends
        raise UserError(f"the chat template of {_name(tokenizer)} cannot render {where or 'a conversation'}: "
                        f"{' '.join(str(exc).split())[:200]}") from None
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def _with_system(messages: list[Message], chat: ChatOptions) -> list[Message]:
    if chat.system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": chat.system_prompt}, *messages]
    return messages


def render_prompt(tokenizer: Tokenizer, prompt: Prompt, *, template: str = PROMPT_TEMPLATE,
                  chat: ChatOptions = ChatOptions(), where: str = "prompt") -> list[int]:
    """The prompt ids of one row: the one rendering SFT, rollouts, the teacher and evaluation use. A text is
    ``encode_prompt(format_prompt(text, template))`` (or, with ``chat.text_as_chat``, a user turn); a conversation
    is rendered by the chat template with the generation prompt (``chat`` options applied)."""
    if isinstance(prompt, str) and not chat.text_as_chat:
        return encode_prompt(tokenizer, format_prompt(prompt, template))
    return chat_ids(tokenizer, prompt_messages(tokenizer, prompt, template=template, chat=chat, where=where),
                    add_generation_prompt=True, kwargs=chat.template_kwargs, where=where,
                    as_text=isinstance(prompt, str))


def prompt_messages(tokenizer: Tokenizer, prompt: Prompt, *, template: str = PROMPT_TEMPLATE,
                    chat: ChatOptions = ChatOptions(), where: str = "prompt") -> list[Message]:
    """The conversation a prompt is rendered from through the chat template (a text: one user turn after the text
    template), the system prompt of ``chat`` put first: what a multi-turn episode starts from (``vopd.episodes``)."""
    messages = [{"role": "user", "content": format_prompt(prompt, template)}] if isinstance(prompt, str) else \
        check_messages(prompt, where, template_roles(tokenizer))
    return _with_system(messages, chat)


@dataclass(frozen=True)
class TeacherPrompts:
    """How a row's prompt for the teacher is rendered (a teacher's ``prompt_field``/``system_prompt``/
    ``own_template``, ``vopd.teacher_config.TeacherConfig``): the row's ``field`` (empty: the student's prompt),
    ``chat`` options, and the tokenizer whose chat template renders it (the teacher's own with ``own_template``, else
    the student's)."""

    field: str
    chat: ChatOptions
    tokenizer: Tokenizer


def teacher_prompts(teacher: Any, data: Any, student_tok: Tokenizer,
                    teacher_tok: Tokenizer | None) -> TeacherPrompts | None:
    """The ``TeacherPrompts`` a teacher's options (``vopd.teacher_config.TeacherConfig``) ask for, with the student's
    chat options from ``[data]`` (``vopd.config.DataConfig``), or None when the teacher reads the student's
    prompts."""
    if not (teacher.prompt_field or teacher.system_prompt or teacher.own_template):
        return None
    if teacher.own_template and teacher_tok is None:  # the old key's words: the text callers and tests know
        raise UserError("data.teacher_own_template=true needs the teacher's tokenizer, which a teacher server does not "
                        "share; set model.teachers[].own_template=false (the student's template) or use a local "
                        "teacher")
    chat = ChatOptions(teacher.system_prompt or data.system_prompt, dict(data.chat_template_kwargs),
                       data.text_as_chat)
    return TeacherPrompts(teacher.prompt_field, chat, teacher_tok if teacher.own_template else student_tok)


class RenderChecks:
    """``require_chat_template`` once per (tokenizer, options) over a file's rows, its line sent to ``log``; a
    refusal names the first row that needed the template (``where``)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.done: list[tuple[int, ChatOptions]] = []

    def __call__(self, tokenizer: Tokenizer, chat: ChatOptions, role: str, where: str = "") -> None:
        if (id(tokenizer), chat) not in self.done:
            self.log(role + require_chat_template(tokenizer, chat, where))
            self.done.append((id(tokenizer), chat))


def row_prompts(row: Mapping[str, Any], tokenizer: Tokenizer, *, field: str, messages_field: str, template: str,
                chat: ChatOptions, teacher: TeacherPrompts | None, where: str, checks: RenderChecks) -> list[list[int]]:
    """[the student's prompt ids] of a data row, plus the teacher's own when ``teacher`` is given. The prompt is the
    row's conversation (``messages_field``) or its text (``field``); the teacher's is its ``teacher.field`` (or the
    same prompt) rendered with ``teacher.chat`` and ``teacher.tokenizer``."""
    prompt: Any = row.get(messages_field)
    if isinstance(prompt, str) and prompt.strip():  # as a text prompt it would replace the row's text unread
        raise UserError(f"{where}: field {messages_field!r} holds a text ({prompt[:40]!r}), not a conversation (a list "
                        f"of {{role, content}} turns): write the conversation as a list, or drop the field so that the "
                        f"text in {field!r} is the prompt")
    if prompt is None or isinstance(prompt, str):  # no conversation ("" is an empty csv cell): the row's text
        prompt = row.get(field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: no text in field {field!r} and no conversation in field {messages_field!r} (the "
                            f"row has fields {sorted(row)}); set data.prompt_field (or data.messages_field) to the "
                            "field that holds the prompt")
    todo = [(prompt, tokenizer, chat, "")]
    if teacher is not None:
        own = row.get(teacher.field) if teacher.field else prompt
        if own is None or (isinstance(own, str) and not own.strip()):
            raise UserError(f"{where}: no teacher prompt in field {teacher.field!r} (the row has fields "
                            f"{sorted(row)}); set model.teachers[].prompt_field (data.teacher_prompt_field) to the "
                            "field that holds it")
        todo.append((own, teacher.tokenizer, teacher.chat, "teacher "))
    out = []
    for text, tok, options, role in todo:
        if options.text_as_chat or not isinstance(text, str):
            checks(tok, options, role, where)  # a template that can start an assistant turn, checked once
        out.append(render_prompt(tok, text, template=template, chat=options, where=where))
    return out


def require_chat_template(tokenizer: Tokenizer, chat: ChatOptions, where: str = "") -> str:
    """Before rendering conversations with ``tokenizer``: it has a chat template, and the template's generation
    prompt adds tokens (else the model is never told that its turn starts). ``where``: the first row that needs it,
    for the refusal. Returns a line for the log."""
    probe = _with_system([{"role": "user", "content": "1 + 2 = ?"}], chat)
    with_prompt = chat_ids(tokenizer, probe, add_generation_prompt=True, kwargs=chat.template_kwargs, where=where,
                           as_text=chat.text_as_chat)
    without = chat_ids(tokenizer, probe, add_generation_prompt=False, kwargs=chat.template_kwargs, where=where,
                       as_text=chat.text_as_chat)
    if with_prompt == without:
        raise UserError(f"the chat template of {_name(tokenizer)} renders nothing for the generation prompt "
                        "(add_generation_prompt=True adds no tokens), so a completion would not start an assistant "
                        "turn; use a chat template that opens the assistant turn")
    stops = stop_token_ids(tokenizer)
    return (f"chat template: the generation prompt adds {len(with_prompt) - len(without)} tokens; completions stop "
            f"on {tokenizer.convert_ids_to_tokens(stops)}")


def unused_template(tokenizers: list[tuple[str, Tokenizer | None]]) -> str | None:
    """For a run whose prompts do not go through the chat template: a one-line warning naming the tokenizers (whose,
    tokenizer) that have one anyway, else None. A model tuned on prompts rendered by its template (an instruct model,
    the tiny world of `vopd sft`) trains on prompts it never saw without it, and nothing fails: the KL just stays
    high."""
    having = list(dict.fromkeys(who for who, tok in tokenizers if tok is not None and has_chat_template(tok)))
    if not having:
        return None
    return (f"{' and '.join(having)} tokenizer{'s have' if len(having) > 1 else ' has'} a chat template, but the "
            "prompts are texts that do not go through it: if the models were tuned on chat-rendered prompts (an "
            "instruct model, the world of vopd sft), set data.text_as_chat=true, or they train and score prompts "
            "they never saw")


def end_of_turn_ids(tokenizer: Tokenizer) -> list[int]:
    """The special token the chat template writes right after an assistant turn's text (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, or EOS), as a one-element list; [] without a chat template or
    when the template writes no special token there."""
    if not has_chat_template(tokenizer):
        return []
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1 + 2 = ?"},
                                              {"role": "assistant", "content": _MARKER}], tokenize=False)
    except Exception:  # a template that cannot render this probe; its conversations will fail with a clear error
        return []
    if not isinstance(text, str) or _MARKER not in text:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    suffix = tokenizer(text.split(_MARKER, 1)[1], add_special_tokens=False)["input_ids"]
    return next(([int(i)] for i in suffix if i in special), [])


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a completion: EOS, then the chat template's end-of-turn token (when it is another one)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return ids + [i for i in end_of_turn_ids(tokenizer) if i not in ids]


def _show(tokenizer: Tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids[at])) if at < len(ids) else "the end"


def compare_stop_tokens(student_tok: Tokenizer, teacher_tok: Tokenizer) -> str:
    """Student and teacher end a completion on the same tokens, or a ``UserError`` naming both sets."""
    stops = stop_token_ids(student_tok), stop_token_ids(teacher_tok)
    if stops[0] != stops[1]:
        raise UserError(f"student and teacher stop on different tokens ({student_tok.convert_ids_to_tokens(stops[0])} "
                        f"vs {teacher_tok.convert_ids_to_tokens(stops[1])}: EOS and the chat template's end of turn); "
                        "give both tokenizers the same chat template")
    return f"student and teacher stop on the same tokens {student_tok.convert_ids_to_tokens(stops[0])}"


def compare_rendering(student_tok: Tokenizer, teacher_tok: Tokenizer, chat: ChatOptions) -> str:
    """Student and teacher render one probe conversation (system prompt, an earlier exchange, a question) to the same
    ids, or a ``UserError`` showing the first differing token. Returns a line for the log."""
    probe = _with_system([{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"},
                          {"role": "user", "content": "And 2 + 2?"}], chat)
    a = chat_ids(student_tok, probe, add_generation_prompt=True, kwargs=chat.template_kwargs,
                 where="the pre-flight's probe conversation (student)", as_text=chat.text_as_chat)
    b = chat_ids(teacher_tok, probe, add_generation_prompt=True, kwargs=chat.template_kwargs,
                 where="the pre-flight's probe conversation (teacher)", as_text=chat.text_as_chat)
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise UserError(f"student and teacher chat templates render the same conversation differently: first "
                        f"difference at token {at} ({_show(student_tok, a, at)} vs {_show(teacher_tok, b, at)}); the "
                        "teacher would score prompts in a format it was not trained on: give both tokenizers the same "
                        "chat template")
    return f"student and teacher chat templates agree ({len(a)}-token probe conversation)"


def encode_example(tokenizer: Tokenizer, prompt: Prompt, answer: str, *, template: str = PROMPT_TEMPLATE,
                   chat: ChatOptions = ChatOptions(), where: str = "row") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a supervised example: ``answer`` continues ``prompt``, rendered as sampling
    renders it (``render_prompt``) and ended as a sampled completion ends. A text prompt's answer ends with EOS; a
    conversation's (or ``text_as_chat``) is the chat template's rendering of the assistant turn, cut after its
    end-of-turn token."""
    prompt_ids = render_prompt(tokenizer, prompt, template=template, chat=chat, where=where)
    if isinstance(prompt, str) and not chat.text_as_chat:
        return prompt_ids, encode_completion(tokenizer, answer)
    turns = [{"role": "user", "content": format_prompt(prompt, template)}] if isinstance(prompt, str) else \
        check_messages(prompt, where, template_roles(tokenizer))
    full = chat_ids(tokenizer, _with_system(turns, chat) + [{"role": "assistant", "content": answer}],
                    add_generation_prompt=False, kwargs=chat.template_kwargs, where=where,
                    as_text=isinstance(prompt, str))
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(f"{where}: the chat template renders the conversation with its answer so that the prompt is "
                        "not a prefix of it; vopd cannot tell the answer's tokens apart")
    completion = full[len(prompt_ids):]
    stops = set(stop_token_ids(tokenizer))
    end = next((i + 1 for i, t in enumerate(completion) if t in stops), len(completion))
    return prompt_ids, completion[:end]
