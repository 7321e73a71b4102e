"""The trainer with a teacher server (``model.teacher=http://...``) over loopback, against real
``vopd serve-teacher`` processes: the same weights as the in-process teacher (``opd``, ``vopd-topk``, ``rb-topk``),
the full-vocabulary methods and a foreign tokenizer refused up front, and a server that dies mid-run ends the run
with one clear error while the last checkpoint stays valid."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vopd import checkpoint as ckpt
from vopd.config import load_config
from vopd.errors import UserError
from vopd.sampling import Samples
from vopd.train import train


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def servers(launch_teacher_servers):
    """Two teacher servers without a token: "main" and "victim" (to be killed)."""
    return launch_teacher_servers({"main": ([], None), "victim": ([], None)})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["opd", "vopd-topk", "rb-topk"])
def test_remote_teacher_gives_the_in_process_weights(method, servers, micro_world, train_overrides, tmp_path):
    # Sampling with generate (same seed in both runs), two steps: the second step samples from the updated student,
    # so equal step-2 weights also mean the first update was equal. Evaluation at the end runs in both.
    # eps=1 makes Adam's update ~ lr * g: with the default eps, coordinates whose gradient is ~1e-9 (rows of tokens
    # never sampled) take a full sign step, turning float rounding between the two code paths into lr-sized gaps.
    base = train_overrides + ["steps=2", f"loss.method={method}", f"data.eval={micro_world.test}", "eval.limit=2",
                              "eval.max_new_tokens=6", "optim.eps=1.0"]
    local = train(load_config(None, base + [f"output_dir={tmp_path / 'local'}"]), log=_quiet)
    url = servers["main"][1]
    logs: list[str] = []
    remote = train(load_config(None, base + [f"output_dir={tmp_path / 'remote'}", f"model.teacher={url}"]),
                   log=logs.append)
    assert any("pre-flight ok: teacher server" in m and "same tokenizer" in m for m in logs), logs
    a, b = _weights(local.output_dir / "final"), _weights(remote.output_dir / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    for x, y in zip(_metrics(local.output_dir), _metrics(remote.output_dir)):
        for key in ("loss", "kl_estimate", "grad_norm", "tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
        assert y["time_teacher"] > 0 and y["time_step"] == pytest.approx(
            sum(v for k, v in y.items() if k.startswith("time_") and k != "time_step"))
    last_local, last_remote = _metrics(local.output_dir)[-1], _metrics(remote.output_dir)[-1]
    assert "eval_kl" in last_local and "eval_kl" not in last_remote  # it needs the full teacher distribution
    assert last_remote["eval_avg_at_n"] == last_local["eval_avg_at_n"]


@pytest.mark.parametrize("method", ["vopd", "opd-full", "vopd-opt"])
def test_full_vocabulary_methods_are_refused_up_front(method, train_overrides, tmp_path):
    cfg = load_config(None, train_overrides + [f"loss.method={method}", "model.teacher=http://127.0.0.1:9"])
    with pytest.raises(UserError, match=f"loss.method={method} needs the teacher's full distribution.*vopd-topk"):
        train(cfg, log=_quiet)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_a_teacher_with_another_tokenizer_is_refused(servers, train_overrides, monkeypatch):
    from vopd.teacher import client as remote

    real_health = remote.RemoteTeacher.health

    def health(self):  # the real server's answer, as a server with another tokenizer would give it
        return {**real_health(self), "tokenizer_sha256": "0" * 64}

    monkeypatch.setattr(remote.RemoteTeacher, "health", health)
    with pytest.raises(UserError, match="uses another tokenizer than the student"):
        train(load_config(None, train_overrides + ["loss.method=opd", f"model.teacher={servers['main'][1]}"]),
              log=_quiet)


class _KillOnSecondCall:
    """A fixed sampler that kills the teacher server when step 2 starts sampling."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.calls = proc, 0

    def __call__(self, prompts: list[list[int]]) -> Samples:
        self.calls += 1
        if self.calls == 2:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        completions = [[3 + (sum(p) + 5 * j) % 190 for j in range(4)] for p in prompts]
        return Samples(completions, [[-1.0] * 4 for _ in prompts], [False] * len(prompts))


def test_server_killed_mid_run_ends_it_with_one_error_and_keeps_the_checkpoint(servers, train_overrides):
    proc, url = servers["victim"]
    cfg = load_config(None, train_overrides + [f"model.teacher={url}", "loss.method=vopd-topk", "steps=4",
                                               "save_every=1", "model.teacher_retries=1",
                                               "model.teacher_timeout_s=5",
                                               "rollout.check_sync=false"])  # a fixed sampler: not on-policy
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"teacher server at .* is unreachable after 2 tries .* --resume continues "
                                        r"from the last checkpoint, which is kept"):
        train(cfg, make_sampler=lambda *_: _KillOnSecondCall(proc), log=_quiet)
    assert time.monotonic() - t0 < 60
    good = ckpt.latest_valid_checkpoint(cfg.output_dir)
    assert good is not None and good.name == "step-00000001"
    ckpt.verify_checkpoint(good)
    assert [m["step"] for m in _metrics(Path(cfg.output_dir))] == [1]


def test_vopd_check_takes_a_teacher_url_as_train_does(servers, micro_world, capsys):
    from vopd.cli import main

    url = servers["main"][1]
    assert main(["check", f"model.student={micro_world.student}", f"model.teacher={url}",
                 "rollout.max_new_tokens=12", "loss.method=vopd-topk", "loss.top_k=8"]) == 0
    out = capsys.readouterr().out
    assert f"ok  teacher server {url} " in out and "same tokenizer" in out
    assert main(["check", f"model.student={micro_world.student}", f"model.teacher={url}", "loss.method=vopd"]) == 2
    assert "loss.method=vopd needs the teacher's full distribution" in capsys.readouterr().err
