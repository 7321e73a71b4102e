"""Several teachers routed per row (``model.teachers`` + ``data.teacher_field``) and overlapped scoring with a real
teacher server (``model.teacher_overlap``): the routed update is the one of scoring each subset with its teacher by
hand, per-teacher metrics are exact and documented, bad routing is refused before step 0, and overlap changes the
waiting, not a bit of the update; a server killed mid-run still ends it loudly with the last checkpoint intact."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vopd import checkpoint as ckpt
from vopd import distributed as dist
from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.chunked import fused_distillation_loss
from vopd.metrics import PhaseTimer
from vopd.models import load_model, load_tokenizer
from vopd.rollout import pack
from vopd.sampling import Samples
from vopd.step import accumulate_gradients
from vopd.teacher.local import InProcessTeacher
from vopd.teacher.routing import Teachers
from vopd.train import train
from vopd.world.task import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _quiet(_msg: str) -> None:
    pass


class FixedSampler:
    """Completions that are a function of the prompt alone (so two runs see the same rollouts)."""

    def __call__(self, prompts: list[list[int]]) -> Samples:
        completions = []
        for p in prompts:
            h = sum(p) * 31 + len(p)
            completions.append([3 + (h * (j + 7) + 11 * j) % 190 for j in range(3 + h % 7)])
        return Samples(completions, [[-1.0] * len(c) for c in completions], [False] * len(prompts))


@pytest.fixture(scope="module")
def routed_file(micro_world, tmp_path_factory) -> Path:
    """The micro world's training rows, each naming its teacher in ``domain`` ("arith" or "other", alternating)."""
    path = tmp_path_factory.mktemp("routed") / "train.jsonl"
    rows = read_jsonl(micro_world.train)
    path.write_text("".join(json.dumps({**r, "domain": "arith" if i % 3 else "other"}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def _routed(overrides: list[str], micro_world, routed_file: Path) -> list[str]:
    # Teacher "other" is the micro world's student: a different model with the same tokenizer.
    return [o for o in overrides if not o.startswith(("model.teacher=", "data.train="))] + [
        f"model.teachers={{arith: {micro_world.teacher}, other: {micro_world.student}}}",
        "data.teacher_field=domain", f"data.train={routed_file}"]


def test_two_teachers_give_the_update_of_each_subset_scored_by_hand(micro_world, train_overrides):
    tok = load_tokenizer(str(micro_world.student))
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=CPU)
    teachers = {name: InProcessTeacher(load_model(str(path), role="teacher", dtype=torch.float32, device=CPU),
                                       len(tok)) for name, path in (("a", micro_world.teacher),
                                                                    ("b", micro_world.student))}
    prompts = [tok(f"{i} + {i} =")["input_ids"] for i in range(6)]
    routes = ["a", "b", "b", "a", "b", "b"]
    rollout = pack(prompts, FixedSampler()(prompts), tok.pad_token_id, routes=routes)
    cfg = load_config(None, train_overrides + ["loss.method=vopd", "batch_size=6", "micro_batch_size=3", "loss.ratio_cap=0",
                                               "grad_noise=false"])
    engine = dist.wrap(student, len(tok), "ddp", CPU)  # one process: the model itself
    got = accumulate_gradients(cfg, engine, Teachers(teachers), rollout, CPU, PhaseTimer(CPU))
    routed = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    # By hand: each teacher's rows in one batch, the global token count as the normalizer, the two losses summed.
    total = float(rollout.num_tokens)
    by_hand: dict[str, float] = {}
    for name, teacher in teachers.items():
        sub = rollout.take([i for i, r in enumerate(routes) if r == name])
        out = student.model(input_ids=sub.input_ids, attention_mask=sub.attention_mask)
        hidden = out.last_hidden_state[:, :-1]
        loss = fused_distillation_loss(hidden, student.lm_head.weight, sub.targets, sub.loss_mask,
                                       teacher.score(sub), method="vopd", normalizer=total)
        loss.loss.backward()
        m = sub.loss_mask.float()
        by_hand[name] = float(-(loss.reward * m).sum() / m.sum())
        assert got.token_metrics[f"teacher/{name}/tokens_frac"] == pytest.approx(float(m.sum()) / total)
        assert got.token_metrics[f"teacher/{name}/kl_estimate"] == pytest.approx(by_hand[name], rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(routed[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert by_hand["a"] != pytest.approx(by_hand["b"])  # two different teachers: the routing mattered


def test_a_routed_run_logs_documented_per_teacher_metrics(micro_world, train_overrides, routed_file):
    logs: list[str] = []
    cfg = load_config(None, _routed(train_overrides, micro_world, routed_file) + ["steps=2", "loss.method=opd"])
    result = train(cfg, log=logs.append)
    assert any(line.startswith("pre-flight ok: teacher arith: ") for line in logs), logs
    assert any(line.startswith("pre-flight ok: teacher other: ") for line in logs), logs
    last = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()][-1]
    fracs = [last[f"teacher/{n}/tokens_frac"] for n in ("arith", "other")]
    assert sum(fracs) == pytest.approx(1.0) and min(fracs) > 0
    documented = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    for key in last:
        if key.startswith("teacher/"):
            generic = "teacher/<name>/" + key.split("/", 2)[2]
            assert f"`{generic}`" in documented, f"metric {generic} is not defined in docs/metrics.md"


@pytest.mark.parametrize("row,message", [
    ({"domain": "chemistry"}, r"domain='chemistry' names no teacher of model.teachers \(\['arith', 'other'\]\)"),
    ({}, r"no field 'domain' naming the row's teacher \(data.teacher_field\)"),
])
def test_a_row_without_a_known_teacher_is_refused_before_step_0(row, message, micro_world, train_overrides,
                                                                 routed_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = routed_file.read_text().splitlines()
    fixed = {k: v for k, v in json.loads(rows[2]).items() if k != "domain"} | row
    bad.write_text("\n".join([*rows[:2], json.dumps(fixed), *rows[3:]]) + "\n")
    cfg = load_config(None, _routed(train_overrides, micro_world, routed_file) + [f"data.train={bad}"])
    with pytest.raises(UserError, match=f"{bad} line 3: {message}"):
        train(cfg, log=_quiet)
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("overrides,message", [
    (["model.teacher=X", "model.teachers={a: X}", "data.teacher_field=d"], "are both set: keep one"),
    (["model.teachers={a: X}"], "data.teacher_field is required with model.teachers"),
    (["data.teacher_field=d"], "routes rows to teachers, but model.teachers is empty"),
    (["model.teachers={'a b': X}", "data.teacher_field=d"], "letters, digits"),
])
def test_routing_config_errors_are_one_line(overrides, message):
    base = ["model.student=S", "data.train=T"] + ([] if any(o.startswith("model.teacher") for o in overrides)
                                                 else ["model.teacher=X"])
    with pytest.raises(UserError, match=message) as err:
        load_config(None, base + overrides)
    assert "\n" not in str(err.value)


# --- overlapped scoring against a real teacher server -------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(launch_teacher_servers):
    return launch_teacher_servers({"main": ([], None), "victim": ([], None)})


def _weights_and_metrics(out: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    from safetensors.torch import load_file

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(out / "final" / "model.safetensors")), lines


def test_overlapped_scoring_gives_bit_identical_updates(servers, train_overrides, tmp_path):
    url = servers["main"][1]
    base = train_overrides + [f"model.teacher={url}", "loss.method=opd", "steps=2", "batch_size=8",
                              "micro_batch_size=2", "rollout.check_sync=false"]
    runs = {}
    for overlap in ("true", "false"):
        cfg = load_config(None, base + [f"model.teacher_overlap={overlap}", f"output_dir={tmp_path / overlap}"])
        train(cfg, make_sampler=lambda *_: FixedSampler(), log=_quiet)
        runs[overlap] = _weights_and_metrics(tmp_path / overlap)
    (wa, ma), (wb, mb) = runs["true"], runs["false"]
    assert all("teacher_hidden_s" in m for m in ma) and not any("teacher_hidden_s" in m for m in mb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for x, y in zip(ma, mb):
        for key in ("loss", "kl_estimate", "grad_norm", "reward_var"):
            assert x[key] == y[key], key


class _KillOnSecondCall(FixedSampler):
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.calls = proc, 0

    def __call__(self, prompts: list[list[int]]) -> Samples:
        self.calls += 1
        if self.calls == 2:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        return super().__call__(prompts)


def test_a_server_killed_under_overlap_still_ends_the_run_loudly(servers, train_overrides):
    proc, url = servers["victim"]
    cfg = load_config(None, train_overrides + [f"model.teacher={url}", "loss.method=opd", "steps=4", "save_every=1",
                                               "batch_size=8", "micro_batch_size=2", "model.teacher_retries=1",
                                               "model.teacher_timeout_s=5", "rollout.check_sync=false"])
    assert cfg.model.teacher_configs[0].overlap
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"teacher server at .* is unreachable after 2 tries .* --resume continues "
                                        r"from the last checkpoint, which is kept"):
        train(cfg, make_sampler=lambda *_: _KillOnSecondCall(proc), log=_quiet)
    assert time.monotonic() - t0 < 60
    good = ckpt.latest_valid_checkpoint(cfg.output_dir)
    assert good is not None and good.name == "step-00000001"
    ckpt.verify_checkpoint(good)


def test_the_overlap_benchmark_runs_both_modes_against_a_real_server(capsys):
    from vopd.cli import main

    assert main(["bench", "teacher-overlap", "--repeats", "1", "--batch", "4", "--completion-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "gradients bit-identical: yes" in out
    rows = [line for line in out.splitlines() if line.startswith(("| in process", "| server"))]
    assert len(rows) == 3 and all(float(r.split("|")[2]) > 0 for r in rows)
    assert float(out.split("max gradient difference ")[1].split()[0]) < 1e-5


def test_vopd_check_runs_the_pre_flight_of_every_teacher_and_counts_rows(micro_world, routed_file, capsys):
    from vopd.cli import main

    assert main(["check", f"model.student={micro_world.student}", f"data.train={routed_file}",
                 f"model.teachers={{arith: {micro_world.teacher}, other: {micro_world.student}}}",
                 "data.teacher_field=domain", "rollout.max_new_tokens=12"]) == 0
    out = capsys.readouterr().out
    assert "ok  teacher arith: tokenizers identical" in out and "ok  teacher other: tokenizers identical" in out
    rows = len(routed_file.read_text().splitlines())
    arith = sum(1 for i in range(rows) if i % 3)
    assert f"(rows per teacher: arith {arith}, other {rows - arith})" in out
