"""The validation primitives of the training config and the shapes of its names (no config classes).

What it knows: how a broken rule is reported (``check``: one ``UserError`` naming the key, its value and the rule),
the shapes of a device name and of a teacher name, the dtype names and the one rule that resolves ``auto`` on a
device (``resolve_dtype``), and which teacher places are servers (``is_remote``). It imports nothing of vopd but its
errors, so the config classes (``vopd.config``, ``vopd.config_sections``, ``vopd.teacher_config``) and the torch
side (``vopd.models``) can share it. What it does NOT know: the config classes, their defaults, loading, torch, or
what the options do.
"""

from __future__ import annotations

import re
from typing import Literal

from vopd.errors import UserError

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
TEACHER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
#: The dtype of the trained weights and their AdamW states (``model.master_dtype``, ``vopd.precision``).
MasterDtype = Literal["float32", "bfloat16", "float16"]


def resolve_dtype(dtype: str, device: str) -> str:
    """The concrete dtype name for ``dtype`` on ``device`` (a resolved device string, e.g. "cuda:0" or "cpu"): the
    one place of the 'auto' rule (``vopd.precision.torch_dtype`` looks the result up as a torch dtype)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def is_remote(where: str) -> bool:
    """A teacher's ``model`` names a teacher server (a URL) rather than a model directory or ``self``."""
    return where.startswith(("http://", "https://"))


def check(ok: bool, key: str, value: object, rule: str) -> None:
    """Raise ``UserError`` ("config key KEY=VALUE is invalid: it must be RULE") unless ``ok``."""
    if not ok:
        raise UserError(f"config key {key}={value!r} is invalid: it must be {rule}")
