"""What `vopd train` and `vopd check` refuse in the data and the config before step 1, each in one line naming the
row or the key, with exit code 2 and nothing written: malformed conversations, csv rows with missing cells, a YAML
key set twice, prompt + completion past a teacher's position limit, `vopd eval --template` without {problem}; and
what they say instead of failing silently: the ready `run.yaml` of `vopd sft`'s world, and a warning when a
tokenizer's chat template goes unused by the prompts.

The chat cases run on a micro tiny world (ChatML template, seconds to build: tests/test_world.py's MICRO), the
others on the micro world of conftest.py (no chat template)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_world import MICRO

from vopd.cli import main
from vopd.config import load_config
from vopd.data import encode_prompt, format_prompt, load_problems
from vopd.errors import UserError
from vopd.models import load_tokenizer
from vopd.prompts import KNOWN_ROLES, template_roles
from vopd.world.build import World, build_world, write_run_config
from vopd.world.task import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(MICRO, tmp_path_factory.mktemp("world_cache"), log=lambda _m: None)


@pytest.fixture(scope="module")
def run_yaml(world) -> Path:
    return write_run_config(world)


def refused(argv: list[str], capsys, expect: str) -> str:
    """``vopd ARGV`` exits with 2 and prints one line on stderr that contains ``expect``."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    return err[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}
BAD_CONVERSATIONS = {
    "unknown role": ({"messages": [{"role": "human", "content": "What is 2 + 3?"}]},
                     "line 2: turn 1 has the role 'human', which the chat template does not know (it knows assistant, "
                     "system, tool, user): use one of those"),
    "a text, not a list": ({"problem": "What is 7 + 1?", "messages": "What is 2 + 3?"},
                           "line 2: field 'messages' holds a text ('What is 2 + 3?'), not a conversation (a list of "
                           "{role, content} turns): write the conversation as a list, or drop the field so that the "
                           "text in 'problem' is the prompt"),
    "empty content": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " "}]},
                      "line 2: turn 2 (user) has empty content: write its text or drop the turn"),
    "system turn only": ({"messages": [{"role": "system", "content": "Be brief."}]},
                         "line 2: the conversation has no user turn (only system): the student answers a user's "
                         "request, so a prompt needs one: add the user turn"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_malformed_conversations_are_refused_naming_the_row(case, world, run_yaml, tmp_path, capsys):
    row, message = BAD_CONVERSATIONS[case]
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, row])
    out = tmp_path / "run"
    line = refused(["train", "--config", str(run_yaml), f"data.train={data}", f"output_dir={out}"], capsys,
                   f"vopd train: error: {data} {message}")
    assert not out.exists()
    assert refused(["check", "--config", str(run_yaml), f"data.train={data}"], capsys, message) == \
        line.replace("vopd train", "vopd check")


def test_roles_the_template_tests_for_are_known():
    """A template that tests a turn for another role (Llama's ipython, a developer turn) accepts it; every template
    accepts the four of the chat format."""
    template = ("{% for m in messages %}{% if m['role'] == 'ipython' %}<tool>{% elif m.role in ['developer'] %}"
                "<dev>{% endif %}{{ m['content'] }}{% endfor %}")
    assert template_roles(SimpleNamespace(chat_template=template)) == KNOWN_ROLES | {"ipython", "developer"}
    assert template_roles(SimpleNamespace(chat_template=None)) == KNOWN_ROLES


def test_csv_rows_with_missing_cells_are_refused_unless_optional(micro_world, train_overrides, tmp_path, capsys):
    """A csv row shorter than its header (often a cell with an unquoted line break, splitting one row into two) is
    refused, naming the row and the columns; a column the reader calls optional may be missing."""
    bad = tmp_path / "train.csv"
    bad.write_text("problem,answer\nWhat is 2 + 3?,5\nWhat is\n7 + 1?,8\n", encoding="utf-8")
    message = (f"{bad}: row 2: has 1 of the header's 2 cells (no 'answer'): write every cell (an empty one as nothing "
               "between two commas), and quote a cell that holds a line break")
    refused(["train", *train_overrides, f"data.train={bad}"], capsys, f"vopd train: error: {message}")
    assert not (tmp_path / "run").exists()
    model = [o for o in train_overrides if not o.startswith("output_dir=")]
    refused(["check", *model, f"data.train={bad}"], capsys, f"vopd check: error: {message}")
    # the conversation column of training rows, and a benchmark's solution column, are optional
    fine = tmp_path / "fine.csv"
    fine.write_text('problem,messages\nWhat is 2 + 3?,\n"What is\n7 + 1?"\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["check", *model, f"data.train={fine}"]) == 0
    assert f"ok  data: 2 prompts of {fine} fit" in capsys.readouterr().out
    bench = tmp_path / "bench.csv"
    bench.write_text("problem,answer,solution\nWhat is 2 + 3?,5\n", encoding="utf-8")
    assert [(p.problem, p.answer) for p in load_problems(bench)] == [("What is 2 + 3?", "5")]
    bench.write_text("problem,answer,solution\nWhat is 2 + 3?\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"row 1: has 1 of the header's 3 cells \(no 'answer', 'solution'\)"):
        load_problems(bench)


def test_a_key_set_twice_in_a_yaml_config_is_refused(micro_world, tmp_path, capsys):
    """YAML keeps the last value of a key set twice without a word: `vopd check` passed with the teacher set to the
    student. Refused, naming the key and both lines; TOML refuses it itself."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  student: {micro_world.student}\n  teacher: {micro_world.teacher}\n"
                      f"  teacher: {micro_world.student}\nrollout:\n  max_new_tokens: 12\n", encoding="utf-8")
    message = (f"config file {config} sets model.teacher twice (line 3 and line 4); YAML would keep the last one "
               "silently: delete one of them")
    refused(["check", "--config", str(config)], capsys, f"vopd check: error: {message}")
    out = tmp_path / "out"
    refused(["train", "--config", str(config), f"data.train={micro_world.train}", f"output_dir={out}"], capsys,
            f"vopd train: error: {message}")
    assert not out.exists()
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  teachers:\n    - {name: a, model: /a}\n    - name: b\n      model: /b\n"
                      "      model: /c\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"sets model.teachers\[1\].model twice \(line 5 and line 6\)"):
        load_config(nested)
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nteacher = "/a"\nteacher = "/b"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"cannot be parsed \(Cannot overwrite a value \(at line 3") as exc:
        load_config(toml)
    assert "\n" not in str(exc.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """A key written over a merge key's (``<<: *base``) is an override, not a key set twice."""
    config = tmp_path / "run.yaml"
    config.write_text("rollout: &r {max_new_tokens: 12, temperature: 1.0}\neval:\n  <<: {n: 2, limit: 3}\n"
                      "  n: 4\n", encoding="utf-8")
    cfg = load_config(config, require_paths=False)
    assert (cfg.rollout.max_new_tokens, cfg.eval.n, cfg.eval.limit) == (12, 4, 3)


def test_prompt_and_completion_must_fit_the_teachers_position_limit(micro_world, train_overrides, tmp_path, capsys):
    """The teacher scores prompt + completion too: its position limit bounds them like the student's (the same
    check, the tighter limit)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(micro_world.teacher, teacher)
    tok = load_tokenizer(str(micro_world.student))
    shortest = min(len(encode_prompt(tok, format_prompt(r["problem"]))) for r in read_jsonl(micro_world.train))
    limit = shortest + 12  # the shortest prompts fit exactly with 12 new tokens
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": limit}))
    overrides = [*train_overrides, f"model.teacher={teacher}"]
    model = [o for o in overrides if not o.startswith("output_dir=")]
    refused(["train", *overrides, f"rollout.max_new_tokens={limit}"], capsys,
            f"vopd train: error: rollout.max_new_tokens={limit} leaves no room for a prompt within the teacher's "
            f"position limit (max_position_embeddings={limit}): set rollout.max_new_tokens below {limit}")
    refused(["check", *model, f"rollout.max_new_tokens={limit}"], capsys, "vopd check: error: rollout.max_new_tokens")
    refused(["train", *overrides, "data.long_prompts=error"], capsys,
            f"tokens > {shortest} tokens (the teacher's max_position_embeddings={limit} minus "
            "rollout.max_new_tokens=12); raise the limit or set data.long_prompts=skip")
    assert not (tmp_path / "run").exists()
    capsys.readouterr()
    assert main(["check", *model]) == 0
    out = capsys.readouterr().out
    assert (f"ok  lengths: prompts up to {shortest} tokens + rollout.max_new_tokens=12 within the teacher's position "
            f"limit {limit}") in out
    assert f"prompts of {micro_world.train} fit; skipped" in out


def test_eval_template_without_problem_is_refused(micro_world, tmp_path, capsys):
    out = tmp_path / "eval"
    refused(["eval", str(micro_world.student), "--data", str(micro_world.test), "--template", "Solve it.", "--out",
             str(out)], capsys,
            "vopd eval: error: --template 'Solve it.' has no {problem}, so every problem would be asked the same "
            "prompt: put {problem} where the problem's text goes")
    assert not out.exists()


def test_no_chat_template_says_what_asked_for_one(micro_world, train_overrides, tmp_path, capsys):
    """The refusal names the real cause: data.text_as_chat (or vopd eval --chat) for a text prompt, the row for a
    conversation (the message once read "a conversation is a conversation but ...")."""
    model = [o for o in train_overrides if not o.startswith("output_dir=")]
    line = refused(["check", *model, "data.text_as_chat=true"], capsys,
                   "text prompts are rendered as a chat turn (data.text_as_chat=true; vopd eval: --chat, "
                   "--system-prompt or --chat-template-kwargs), but the tokenizer of ")
    assert line.endswith("has no chat template: set data.text_as_chat=false (vopd eval: drop those options), or use a "
                         "tokenizer with one")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"problem": "What is 7 + 1?"}, GOOD])
    line = refused(["train", *train_overrides, f"data.train={data}"], capsys,
                   f"{data} line 2: the row holds a conversation (data.messages_field), which is rendered with the "
                   "chat template, but the tokenizer of ")
    assert "is a conversation but" not in line and not (tmp_path / "run").exists()
    refused(["eval", str(micro_world.student), "--data", str(micro_world.test), "--chat"], capsys,
            "test.jsonl:line 1: text prompts are rendered as a chat turn")


def test_vopd_sft_writes_a_ready_run_config(world, run_yaml, capsys):
    """`vopd sft` writes run.yaml beside the world (its models, data, lengths and data.text_as_chat=true) and says how
    to train on it; the config loads, validates and passes the pre-flight without a warning."""
    assert run_yaml == world.root / "run.yaml"
    cfg = load_config(run_yaml)
    assert (cfg.model.student, cfg.model.teacher) == (str(world.student), str(world.teacher))
    assert (cfg.data.train, cfg.data.eval, cfg.data.text_as_chat) == (str(world.train_data), str(world.test_data), True)
    assert cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == MICRO.eval_max_new_tokens
    assert f"train on it: vopd train --config {run_yaml}" in world.summary().splitlines()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        assert main(["check", "--config", str(run_yaml)]) == 0
    assert "ok  chat template: the generation prompt adds" in capsys.readouterr().out
    assert write_run_config(world).read_text() == run_yaml.read_text()  # rewritten alike by every `vopd sft`


def test_an_unused_chat_template_is_warned_about(run_yaml, capsys):
    """A run on the world without data.text_as_chat=true trains on prompts its models never saw, and nothing fails
    (issue #25: a KL near 4.8 instead of 0.6 on the tiny world): the pre-flight says so in one line, and goes on."""
    with pytest.warns(RuntimeWarning) as caught:
        assert main(["check", "--config", str(run_yaml), "data.text_as_chat=false"]) == 0
    notes = [str(w.message) for w in caught if "chat template" in str(w.message)]
    assert notes == ["the student's and the teacher's tokenizers have a chat template, but the prompts are texts that "
                     "do not go through it: if the models were tuned on chat-rendered prompts (an instruct model, the "
                     "world of vopd sft), set data.text_as_chat=true, or they train and score prompts they never saw"]


def test_a_huge_prompt_line_is_skipped_without_tokenizing_it(micro_world, tmp_path, monkeypatch):
    """A 2.2 MB problem among ordinary rows: longer than data.max_prompt_tokens in any tokenization (more characters
    than the limit times the longest token's), so it is skipped and counted, or refused in one line with
    data.long_prompts=error, and never handed to the tokenizer (which once took 0.8 GB and 11 s to reject it)."""
    import vopd.data as data

    rows = [json.loads(line) for line in micro_world.train.read_text().splitlines()[:5]]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps({**rows[0], "problem": "7 + " * 550_000})
                    + "\n" + "".join(json.dumps(r) + "\n" for r in rows[2:]))
    tok = load_tokenizer(str(micro_world.student))
    seen: list[int] = []
    real = data.row_prompts

    def counting(row, *args, **kwargs):
        seen.append(len(row["problem"]))
        return real(row, *args, **kwargs)

    monkeypatch.setattr(data, "row_prompts", counting)
    logged: list[str] = []
    got = data.load_prompt_pairs(path, tok, field="problem", template="{problem}", max_tokens=200,
                                 long_prompts="skip", log=logged.append)
    assert len(got.student) == 5 and max(seen) < 10_000 and len(seen) == 5
    assert logged == ["skipped 1 of 6 prompts longer than 200 tokens"], logged
    with pytest.raises(UserError, match=r"huge.jsonl line 3: prompt of 2200000 characters is longer than "
                                        r"data.max_prompt_tokens=200 in any tokenization"):
        data.load_prompt_pairs(path, tok, field="problem", template="{problem}", max_tokens=200,
                               long_prompts="error", log=logged.append)
