"""One teacher of a run (``TeacherConfig``, an entry of ``model.teachers``), its rules, and the old spellings.

What it knows: every option of one frozen teacher (its name, where it is: a local model directory, the URL of a
teacher server and the server's kind, or ``self``; its dtypes, the output layer a server's hidden states are projected
with and the generate server it is checked against, the remote patience, overlapped scoring, whether an in-process
teacher is sharded over the ranks and offloaded to host memory, and how it reads a prompt of its own), the rules of
one entry and of the list, and how the keys of earlier vopd versions (``model.teacher_*``, ``model.teachers={name:
PATH}``, ``model.teacher_heads``, ``data.teacher_prompt_field``/``teacher_system_prompt``/``teacher_own_template``)
map onto entries (``migrate``: with one notice per old key, and the old spelling of each moved key so that an error
names the key as it was written). The one-teacher shorthand ``model.teacher=PATH`` is the entry ``{name: teacher,
model: PATH}`` (``entries``). What it does NOT know: the other config sections (``vopd.config_sections``;
``vopd.config`` calls this module), loading files, or how a teacher is opened and scores (``vopd.teacher``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from vopd.config_io import option
from vopd.config_rules import TEACHER_NAME_RE, Dtype, check, is_remote
from vopd.errors import UserError

#: The name of the one teacher of the shorthand ``model.teacher=PATH`` (no routing; metrics carry no teacher names).
TEACHER = "teacher"
#: A teacher's ``model`` naming the student's own initial weights (self-distillation); here, where neither the
#: teachers (``vopd.teacher.base`` re-exports it) nor the sharding of a teacher (``vopd.sharding``) import the other.
SELF = "self"
#: The teacher servers a URL may name; "vopd": a ``vopd serve-teacher`` server, "vllm": a stock vLLM server,
#: "sglang": a stock SGLang server (docs/teacher_server.md).
ServerKind = Literal["vopd", "vllm", "sglang"]
#: The kinds that are stock servers (several replicas of one teacher, request_seqs and request_mb).
STOCK = ("vllm", "sglang")
HiddenDtype = Literal["auto", "float32", "bfloat16"]
#: Whether an in-process teacher is sharded over the torchrun ranks (words, not booleans: YAML reads yes/no/on/off
#: as booleans, and "auto" is a third case).
Shard = Literal["auto", "always", "never"]


@dataclass
class TeacherConfig:
    """[model.teachers] One frozen teacher (same tokenizer as the student): where it is and how it is asked."""

    name: str = option(TEACHER, "Name of the teacher (letters, digits, '_', '.' or '-'); the value of "
                       "data.teacher_field that routes a row to it, and its metric names (teacher/NAME/...).")
    model: str = option(
        "", "Required. Local Hugging Face directory of the frozen teacher. Or the URL of a teacher server "
        "(http://host:port; methods opd, vopd-topk, opd-topk, rb-topk, or every method with head). Or `self`: the "
        "student's initial weights (with LoRA: the base model with its adapters disabled; else a frozen copy).")
    server: ServerKind = option(
        "vopd", "With a URL: the kind of server; vopd = a `vopd serve-teacher` server; vllm = a stock vLLM server "
        "(`vllm serve`): with head, a pooling-runner server (every method exact), else a generate server (opd, "
        "vopd-ttopk); sglang = a stock SGLang server: with head, started with --enable-return-hidden-states (every "
        "method exact), else its input log-probs (opd, vopd-ttopk). Several replicas of one stock teacher: "
        "model=URL1,URL2 (comma-separated; requests spread over them, an unreachable one skipped).")
    head: str = option(
        "", "Teacher server only: local directory of the checkpoint the server serves (config.json + safetensors). "
        "Only its output layer is loaded here; the server sends hidden states, and every method is exact remotely "
        "(docs/teacher_server.md, \"Protocol 3\").")
    head_reference: str = option(
        "", "Stock vLLM pooling teacher only (server=vllm with head): URL of a generate-route vLLM server of the same "
        "model (http://HOST:PORT, started without --runner pooling). The pre-flight scores one probe sequence both "
        "ways (the pooling route's hidden states through head, and that server's prompt_logprobs) and refuses a "
        "head of another checkpoint than the served one. Empty: the head is checked for its width only "
        "(docs/teacher_server.md, \"Stock vLLM servers\").")
    dtype: Dtype = option("auto", "Teacher weights dtype (in process); auto = bfloat16 on CUDA, float32 on CPU.")
    hidden_dtype: HiddenDtype = option(
        "auto", "Hidden states from a teacher server (with head): auto (bfloat16 when the server's weights are half "
        "precision, else float32), float32 or bfloat16 (half the bytes).")
    timeout_s: float = option(60.0, "Teacher server only: seconds to wait for one scoring request.")
    retries: int = option(
        3, "Teacher server only: retries of a failed request (connection error, timeout, 5xx), with back-off.")
    request_seqs: int = option(
        64, "Stock server only (server=vllm or sglang): the most sequences in one request (a vopd server states its "
        "own limits).")
    request_mb: float = option(
        64.0, "Stock server only (server=vllm or sglang): the most megabytes of one request's body and of its answer.")
    overlap: bool = option(
        True, "Teacher server only: score the next micro-batch on a background thread while the student trains on "
        "this one (the same step's rollouts: identical numbers, less waiting). In-process teachers score inline.")
    shard: Shard = option(
        "auto", "In-process teacher under torchrun: shard its weights over the ranks (FSDP2, inference only: each "
        "block is gathered for its forward and freed after it). auto = when the student is sharded "
        "(distributed.strategy=fsdp2); always = also under ddp; never = a whole copy in every rank.")
    offload: bool = option(
        False, "Sharded teacher only: keep its shards in host memory; each block is copied to the GPU for its forward "
        "(less GPU memory, a host-to-GPU copy of the teacher per forward).")
    prompt_field: str = option(
        "", "Record field holding the teacher's own prompt (a text or a conversation, e.g. with the reference "
        "solution): the teacher scores the student's completion after it. Empty: the student's prompt.")
    system_prompt: str = option("", "System turn of the teacher's rendering only (instead of data.system_prompt).")
    own_template: bool = option(
        False, "Render the teacher's prompts with the teacher tokenizer's own chat template (student and teacher "
        "templates may then differ); local teachers only, one teacher only.")

    @property
    def remote(self) -> bool:
        """Scored by a teacher server (``model`` is a URL), in another process."""
        return is_remote(self.model)

    @property
    def prompt_options(self) -> tuple[str, str, bool]:
        """What the teacher's own prompt is made of (prompt field, system prompt, own template)."""
        return self.prompt_field, self.system_prompt, self.own_template

    def validate(self, key: str) -> None:
        """The rules of one entry; ``key`` is its dotted place (``model.teachers[0]``), for the messages."""
        check(bool(TEACHER_NAME_RE.match(self.name)), f"{key}.name", self.name,
              "a name of letters, digits, '_', '.' or '-' (names appear in metric names)")
        if self.head and not self.remote:
            raise UserError(f"config key {key}.head is for a teacher server, but {key}.model={self.model!r} is loaded "
                            f"here whole (every method works already): remove {key}.head")
        if self.own_template and self.remote:
            raise UserError(f"config key {key}.own_template=true needs the teacher's tokenizer, which a teacher server "
                            f"does not share: set {key}.own_template=false (the student's template) or use a local "
                            "teacher")
        for name, set_ in (("shard=always", self.shard == "always"), ("offload=true", self.offload)):
            if self.remote and set_:
                raise UserError(f"config key {key}.{name} is for a teacher loaded in this process, but {key}.model="
                                f"{self.model!r} is a teacher server, which holds its own weights: remove it")
        if self.offload and self.shard == "never":
            raise UserError(f"config key {key}.offload=true keeps a sharded teacher's shards in host memory, but "
                            f"{key}.shard=never: set shard=auto or always, or offload=false")
        urls = self.model.split(",")
        if self.remote and len(urls) > 1 and self.server not in STOCK:
            raise UserError(f"config key {key}.model={self.model!r} lists several servers, which only a stock vLLM "
                            f"or SGLang teacher takes (replicas): set {key}.server=vllm (or sglang) or give one URL")
        if self.remote:
            for url in urls:
                check(is_remote(url.strip()) and " " not in url.strip(), f"{key}.model", self.model,
                      "a URL http://HOST:PORT, or several separated by commas (no spaces needed)")
        if self.server != "vopd" and not self.remote:
            raise UserError(f"config key {key}.server={self.server} names a kind of teacher server, but {key}.model="
                            f"{self.model!r} is not a URL: set {key}.model=http://HOST:PORT or remove {key}.server")
        if self.head_reference and not (self.server == "vllm" and self.remote and self.head):
            raise UserError(f"config key {key}.head_reference checks the output layer of a stock vLLM pooling "
                            f"teacher, but {key} is not one (it needs server=vllm, a URL as model, and head=DIR): "
                            f"set those or remove {key}.head_reference")
        if self.head_reference:
            check(is_remote(self.head_reference) and not set(" ,") & set(self.head_reference),
                  f"{key}.head_reference", self.head_reference, "one URL http://HOST:PORT of a generate-route server")
        check(self.request_seqs >= 1, f"{key}.request_seqs", self.request_seqs, ">= 1")
        check(self.request_mb > 0, f"{key}.request_mb", self.request_mb, "> 0")
        check(self.timeout_s > 0, f"{key}.timeout_s", self.timeout_s, "> 0")
        check(self.retries >= 0, f"{key}.retries", self.retries, ">= 0")


def entries(teacher: str, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
    """The run's teachers: the list ``model.teachers``, or the shorthand ``model.teacher=PATH`` as its one entry."""
    return teachers or [TeacherConfig(name=TEACHER, model=teacher)]


def check_teachers(teacher: str, teachers: list[TeacherConfig], teacher_field: str) -> None:
    """The list's rules and its routing by ``data.teacher_field`` (a cross-section rule): the shorthand or the list,
    never both; distinct names; several teachers need the routing field, and share one prompt of their own."""
    if teacher and teachers:
        raise UserError(f"config keys model.teacher={teacher!r} and model.teachers are both set: keep one "
                        "(model.teacher is the shorthand of one teacher)")
    if teacher and not teachers:  # the shorthand's one entry, its keys named as written (model.teacher_server)
        try:
            entries(teacher, [])[0].validate("model.teachers[0]")
        except UserError as exc:
            raise UserError(str(exc).replace("model.teachers[0].model", "model.teacher")
                            .replace("model.teachers[0].", "model.teacher_")) from None
    for i, t in enumerate(teachers):
        t.validate(f"model.teachers[{i}]")
    names = [t.name for t in teachers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"config key model.teachers names {repeated[0]!r} twice: give each teacher its own name")
    if not teacher_field:
        if len(teachers) > 1:
            raise UserError("config key data.teacher_field is required with model.teachers: set it to the record "
                            f"field that names each row's teacher (one of {sorted(names)})")
        return
    if not teachers:
        raise UserError(f"config key data.teacher_field={teacher_field!r} routes rows to teachers, but model.teachers "
                        "is empty: set model.teachers=[{name: NAME, model: PATH}, ...] or data.teacher_field=''")
    if any(t.own_template for t in teachers):
        raise UserError("model.teachers[].own_template=true is not supported with data.teacher_field (each teacher "
                        "would render with its own template): render with the student's template (false)")
    for i, t in enumerate(teachers[1:], 1):  # one rendering of the teacher's prompt per row, whoever scores it
        if t.prompt_options != teachers[0].prompt_options:
            raise UserError(f"config key model.teachers[{i}] ({t.name}) reads its own prompt differently from "
                            f"model.teachers[0] ({teachers[0].name}): give every teacher the same prompt_field, "
                            "system_prompt and own_template")


# ---------------------------------------------------------------------------------------- the old spellings

#: Keys of earlier versions that every teacher took alike -> (its field of ``TeacherConfig``, its type).
_EACH: dict[str, tuple[str, Any]] = {
    "model.teacher_dtype": ("dtype", str), "model.teacher_hidden_dtype": ("hidden_dtype", str),
    "model.teacher_timeout_s": ("timeout_s", float), "model.teacher_retries": ("retries", int),
    "model.teacher_overlap": ("overlap", bool), "model.teacher_server": ("server", str), "data.teacher_prompt_field": ("prompt_field", str),
    "data.teacher_system_prompt": ("system_prompt", str), "data.teacher_own_template": ("own_template", bool),
}
#: Shorthands of one entry's option beside ``model.teacher`` (moved onto the entries as the old keys are, but
#: today's spelling: no notice). ``model.teacher_server=vllm``: the shorthand's teacher is a stock vLLM server.
SHORTHANDS = frozenset({"model.teacher_server"})
#: Every old key with its type (``apply_overrides`` reads ``key=value`` of these as it did).
OLD_KEYS: dict[str, Any] = {"model.teacher_head": str, "model.teacher_heads": dict[str, str],
                            **{k: tp for k, (_f, tp) in _EACH.items()}}


def _new_spelling(old: str) -> str:
    if old == "model.teachers":
        return "model.teachers=[{name: NAME, model: PATH}, ...] (a list of teachers)"
    if old in ("model.teacher_head", "model.teacher_heads"):
        return "model.teachers[].head (each teacher's own: model.teachers=[{name: NAME, model: URL, head: DIR}])"
    return f"model.teachers[].{_EACH[old][0]} (each teacher's own)"


def notice(old: str) -> str:
    """The one-line notice for old key ``old``."""
    return f"config key {old} is an old spelling: it now reads {_new_spelling(old)}; see docs/config.md"


def _pop(d: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    section, _, key = dotted.partition(".")
    table = d.get(section)
    if isinstance(table, dict) and key in table:
        return True, table.pop(key)
    return False, None


def migrate(d: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """``d`` (a config dict, not changed) with the old teacher keys moved onto ``model.teachers`` entries; the old
    keys it held (for a notice each); and the old spelling of each moved key (``model.teachers[0].head`` ->
    ``model.teacher_head``), so that a later error can name the key as written (``respell``). A dict without old
    keys comes back equal. The old rules that have no new form (a head for an unknown name) are refused here."""
    d = copy.deepcopy(d)
    if isinstance(d.get("model"), dict) and d["model"].get("teachers") == {}:
        del d["model"]["teachers"]  # the old default: no teachers by name
    found = {k: v for k, (ok, v) in ((k, _pop(d, k)) for k in OLD_KEYS) if ok}
    model = d.setdefault("model", {}) if found else d.get("model")
    old_dict = isinstance(model, dict) and isinstance(model.get("teachers"), dict)
    if not (old_dict or found) or not isinstance(model, dict):
        return d, list(found), {}  # nothing to move (or no table to move it into: the type check names it)
    used = ["model.teachers"] if old_dict and model["teachers"] else []
    spelled: dict[str, str] = {}
    if old_dict:  # {name: where}: several teachers, routed per row
        places = model.pop("teachers")
        data = d.get("data")
        if places and not (isinstance(data, dict) and data.get("teacher_field")):
            raise UserError("config key data.teacher_field is required with model.teachers: set it to the record "
                            f"field that names each row's teacher (one of {sorted(places)})")
        model["teachers"] = [{"name": n, "model": p} for n, p in places.items()]
        for i, n in enumerate(places):
            spelled |= {f"model.teachers[{i}].model": f"model.teachers.{n}", f"model.teachers[{i}].name": "model.teachers"}
    elif not model.get("teachers"):  # the shorthand (or nothing yet) becomes the one entry the old keys apply to
        model["teachers"] = [{"name": TEACHER, "model": model.pop("teacher", "")}]
        spelled["model.teachers[0].model"] = "model.teacher"
    teachers = model["teachers"]
    if not isinstance(teachers, list) or not all(isinstance(t, dict) for t in teachers):
        return d, used + list(found), spelled  # not a list of tables: the type check names it
    head, heads = found.pop("model.teacher_head", ""), found.pop("model.teacher_heads", None) or {}
    used += [k for k, v in (("model.teacher_head", head), ("model.teacher_heads", heads)) if v]
    if head:
        if old_dict or len(teachers) > 1:
            raise UserError("config key model.teacher_head is for model.teacher; with model.teachers set "
                            "model.teachers[].head=DIR for each server teacher")
        teachers[0]["head"] = head
        spelled["model.teachers[0].head"] = "model.teacher_head"
    names = [t.get("name", TEACHER) for t in teachers]
    for name, where in dict(heads).items():
        if name not in names:
            raise UserError(f"model.teacher_heads names {name!r}, which is not a teacher of model.teachers "
                            f"({sorted(names)}); fix the name")
        teachers[names.index(name)]["head"] = where
        spelled[f"model.teachers[{names.index(name)}].head"] = f"model.teacher_heads.{name}"
    for old, value in found.items():  # the keys every teacher took alike
        if old not in SHORTHANDS:
            used.append(old)
        for i, t in enumerate(teachers):
            t.setdefault(_EACH[old][0], value)
            spelled[f"model.teachers[{i}].{_EACH[old][0]}"] = old
    return d, used, spelled


def respell(message: str, spelled: dict[str, str]) -> str:
    """``message`` with each moved key named as it was written (the longest keys first)."""
    for new in sorted(spelled, key=len, reverse=True):
        message = message.replace(new, spelled[new])
    return message


def canonical(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict in today's form, for comparing runs (``vopd.rundir``): the old keys migrated, the
    shorthand ``model.teacher`` as its entry, every entry with every key (defaults filled in)."""
    d, _used, _spelled = migrate(d)
    model = d.get("model")
    if not isinstance(model, dict):
        return d
    teachers = model.get("teachers") or []
    if not teachers and model.get("teacher"):
        teachers = [{"name": TEACHER, "model": model["teacher"]}]
    model["teacher"] = ""
    defaults = dataclasses.asdict(TeacherConfig())
    model["teachers"] = [{**defaults, **t} if isinstance(t, dict) else t for t in teachers]
    return d
