"""The validation primitives of the training config, and its teacher rules (which teachers a run names, and how).

What it knows: how a broken rule is reported (``check``: one ``UserError`` naming the key, its value and the rule),
the shapes of a device name and of a teacher name, and the rules of ``model.teacher``/``model.teachers``/
``model.teacher_head(s)`` and of routing rows to several teachers by ``data.teacher_field``. It takes plain values,
not the config classes: ``vopd.config`` calls it from each section's ``validate`` (and the cross-section rules from
``TrainConfig.validate``), so this module imports nothing of vopd but its errors. What it does NOT know: the config
classes, their defaults, loading, or what the options do.
"""

from __future__ import annotations

import re

from vopd.errors import UserError

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
TEACHER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_REMOTE = ("http://", "https://")


def check(ok: bool, key: str, value: object, rule: str) -> None:
    """Raise ``UserError`` ("config key KEY=VALUE is invalid: it must be RULE") unless ``ok``."""
    if not ok:
        raise UserError(f"config key {key}={value!r} is invalid: it must be {rule}")


def check_teacher_heads(teacher: str, teachers: dict[str, str], teacher_heads: dict[str, str], teacher_head: str,
                        teacher_hidden_dtype: str) -> None:
    """model.teacher_head(s) name the checkpoints of teacher servers (their output layers project hidden states)."""
    check(teacher_hidden_dtype in ("auto", "float32", "bfloat16"), "model.teacher_hidden_dtype",
          teacher_hidden_dtype, "auto, float32 or bfloat16")
    if teacher_head:
        if teachers:
            raise UserError("config key model.teacher_head is for model.teacher; with model.teachers set "
                            "model.teacher_heads={name: DIR} for each server teacher")
        if not teacher.startswith(_REMOTE):
            raise UserError(f"config key model.teacher_head is for a teacher server, but model.teacher={teacher!r} "
                            "is loaded here whole (every method works already): remove model.teacher_head")
    for name in teacher_heads:
        if name not in teachers:
            raise UserError(f"model.teacher_heads names {name!r}, which is not a teacher of model.teachers "
                            f"({sorted(teachers)}); fix the name")
        if not teachers[name].startswith(_REMOTE):
            raise UserError(f"model.teacher_heads.{name} is for a teacher server, but model.teachers.{name}="
                            f"{teachers[name]!r} is loaded here whole: remove it from model.teacher_heads")


def check_teachers(teacher: str, teachers: dict[str, str]) -> None:
    """model.teacher or model.teachers (several), never both; the teachers' names and places."""
    if not teachers:
        return
    if teacher:
        raise UserError(f"config keys model.teacher={teacher!r} and model.teachers are both set: keep one "
                        "(model.teachers routes rows to several teachers by data.teacher_field)")
    for name, where in teachers.items():
        check(bool(TEACHER_NAME_RE.match(name)), "model.teachers", name,
              "keyed by names of letters, digits, '_', '.' or '-' (they appear in metric names)")
        check(isinstance(where, str) and bool(where.strip()), f"model.teachers.{name}", where,
              "a local model directory, a server URL or self")


def check_teacher_routing(teachers: dict[str, str], teacher_field: str, teacher_own_template: bool) -> None:
    """data.teacher_field routes rows to model.teachers: one needs the other (a cross-section rule)."""
    if not teachers:
        if teacher_field:
            raise UserError(f"config key data.teacher_field={teacher_field!r} routes rows to teachers, but "
                            "model.teachers is empty: set model.teachers={name: PATH, ...} or data.teacher_field=''")
        return
    if not teacher_field:
        raise UserError("config key data.teacher_field is required with model.teachers: set it to the record field "
                        f"that names each row's teacher (one of {sorted(teachers)})")
    if teacher_own_template:
        raise UserError("data.teacher_own_template=true is not supported with model.teachers (each teacher would "
                        "render with its own template): render with the student's template (false)")
