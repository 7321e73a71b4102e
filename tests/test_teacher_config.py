"""The one teacher config (``model.teachers`` entries, ``vopd.teacher_config``): the shorthand, the old spellings
(mapped with a notice, errors named as written) and runs saved with the old keys resuming."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest

from vopd.config import config_to_dict, load_config
from vopd.errors import UserError
from vopd.rundir import config_differences, prepare_output_dir
from vopd.teacher_config import TEACHER, TeacherConfig

BASE = ["model.student=/s", "data.train=/d.jsonl"]


def test_the_shorthand_is_one_entry_at_its_defaults() -> None:
    cfg = load_config(None, [*BASE, "model.teacher=/t"])
    assert cfg.model.teachers == [] and cfg.model.teacher_configs == [TeacherConfig(name=TEACHER, model="/t")]


def test_old_and_new_spellings_give_the_same_teachers() -> None:
    old = load_config(None, [*BASE, "model.teacher=http://h:1", "model.teacher_head=/ckpt", "model.teacher_dtype=float32",
                             "model.teacher_retries=1", "model.teacher_overlap=false",
                             "data.teacher_prompt_field=solution"])
    new = load_config(None, [*BASE, "model.teachers=[{model: 'http://h:1', head: /ckpt, dtype: float32, retries: 1, "
                                    "overlap: false, prompt_field: solution}]"])
    assert old.model.teacher_configs == new.model.teacher_configs == new.model.teachers
    assert old == new  # the old keys are moved, not kept
    # Several teachers, routed: the old table {name: place} and the heads by name.
    old = load_config(None, [*BASE, "model.teachers={a: 'http://h:1', b: /b}", "model.teacher_heads={a: /ha}",
                             "model.teacher_timeout_s=5", "data.teacher_field=domain"])
    new = load_config(None, [*BASE, "model.teachers=[{name: a, model: 'http://h:1', head: /ha, timeout_s: 5}, "
                                    "{name: b, model: /b, timeout_s: 5}]", "data.teacher_field=domain"])
    assert old == new and [t.name for t in new.model.teacher_configs] == ["a", "b"]


def test_each_old_key_gets_one_notice_naming_its_new_spelling(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vopd.config"):
        for _ in range(2):
            load_config(None, [*BASE, "model.teacher=/t", "model.teacher_dtype=bfloat16"])
    notices = [r.getMessage() for r in caplog.records if "model.teacher_dtype" in r.getMessage()]
    assert len(notices) <= 1  # once per process (an earlier test may have logged it already)
    from vopd.teacher_config import notice

    assert notice("model.teacher_dtype") == ("config key model.teacher_dtype is an old spelling: it now reads "
                                             "model.teachers[].dtype (each teacher's own); see docs/config.md")


def test_errors_name_the_key_as_written() -> None:
    with pytest.raises(UserError, match=r"^config key model.teacher_timeout_s=0.0 is invalid"):
        load_config(None, [*BASE, "model.teacher=/t", "model.teacher_timeout_s=0"])
    with pytest.raises(UserError, match=r"^config key model.teachers\[0\].timeout_s=0.0 is invalid"):
        load_config(None, [*BASE, "model.teachers=[{model: /t, timeout_s: 0}]"])
    with pytest.raises(UserError, match=r"names 'a' twice"):
        load_config(None, [*BASE, "model.teachers=[{name: a, model: /t}, {name: a, model: /u}]",
                           "data.teacher_field=f"])
    with pytest.raises(UserError, match=r"data.teacher_field is required with model.teachers"):
        load_config(None, [*BASE, "model.teachers=[{name: a, model: /t}, {name: b, model: /u}]"])
    with pytest.raises(UserError, match=r"reads its own prompt differently"):
        load_config(None, [*BASE, "model.teachers=[{name: a, model: /t, prompt_field: x}, {name: b, model: /u}]",
                           "data.teacher_field=f"])
    with pytest.raises(UserError, match=r"model.teachers\[0\].model is required"):
        load_config(None, [*BASE, "model.teachers=[{name: a}]"])


def test_toml_tables_of_teachers(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model]\nstudent = "/s"\n[data]\ntrain = "/d"\nteacher_field = "domain"\n'
                    '[[model.teachers]]\nname = "math"\nmodel = "/m"\n[[model.teachers]]\nname = "code"\n'
                    'model = "http://h:1"\nhead = "/c"\n')
    cfg = load_config(path)
    assert [(t.name, t.model, t.head) for t in cfg.model.teachers] == [("math", "/m", ""), ("code", "http://h:1", "/c")]


def _old_spelling(cfg_dict: dict) -> dict:
    """``cfg_dict`` (one teacher, the shorthand) as an earlier vopd saved it: every old teacher key, no list."""
    old = copy.deepcopy(cfg_dict)
    entry = old["model"].pop("teachers")[0] if old["model"]["teachers"] else {"model": old["model"]["teacher"]}
    old["model"].update(teacher=entry["model"], teacher_head=entry.get("head", ""), teacher_heads={},
                        teacher_hidden_dtype=entry.get("hidden_dtype", "auto"), teacher_dtype=entry.get("dtype", "auto"),
                        teacher_timeout_s=entry.get("timeout_s", 60.0), teacher_retries=entry.get("retries", 3),
                        teachers={}, teacher_overlap=entry.get("overlap", True))
    old["data"].update(teacher_prompt_field="", teacher_system_prompt="", teacher_own_template=False)
    return old


def test_a_run_saved_with_the_old_keys_resumes(tmp_path: Path) -> None:
    now = config_to_dict(load_config(None, [*BASE, "model.teacher=/t"]))
    saved = _old_spelling(now)
    assert "teacher_dtype" in saved["model"] and "teacher_prompt_field" in saved["data"]
    assert config_differences(saved, now) == []
    # The same run written as a list entry is the same run; the patience of a server may change on resume.
    listed = config_to_dict(load_config(None, [*BASE, "model.teachers=[{model: /t, retries: 9}]"]))
    assert config_differences(saved, listed) == []
    # A real difference is still one, named in today's spelling.
    changed = config_to_dict(load_config(None, [*BASE, "model.teachers=[{model: /t, dtype: float32}]"]))
    assert config_differences(saved, changed) == [f"model.teachers.{TEACHER}.dtype"]
    # Through the run directory: the marker written by the old version, resumed by the new one.
    out = tmp_path / "run"
    prepare_output_dir(out, saved, resume=False, overwrite=False)
    assert prepare_output_dir(out, now, resume=True, overwrite=False) is None
    with pytest.raises(UserError, match=r"model.teachers.teacher.dtype \('auto' -> 'float32'\)"):
        prepare_output_dir(out, changed, resume=True, overwrite=False)
