"""A teacher prompt of its own, and self-distillation (``model.teacher=self``).

The teacher reads the student's completion after its own rendering of the row (alignment by completion tokens): that
changes the teacher's scores and nothing on the student's side. ``teacher=self`` scores with the student's initial
weights: KL = 0 and a zero gradient at step 0 with the same prompt, a nonzero gradient once the prompts differ, and
with LoRA the base model with its adapters off (so the teacher stays put while the student moves).
"""

from __future__ import annotations

import json

import pytest
import torch

from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.chunked import fused_distillation_loss
from vopd.loss.scores import TeacherNumbers
from vopd.models import last_hidden, load_model, load_tokenizer, output_layer
from vopd.prompts import ChatOptions, render_prompt
from vopd.rollout import pack
from vopd.sampling import Samples
from vopd.teacher.local import InProcessTeacher
from vopd.teacher.reprompt import OwnPromptTeacher
from vopd.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(micro_world):
    tok = load_tokenizer(str(micro_world.teacher))
    teacher = load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=torch.device("cpu"))
    student_prompts = [render_prompt(tok, p) for p in ("Let a = 3. What is a + 4?", "Let b = 9. What is b - 2?")]
    teacher_prompts = [render_prompt(tok, p) for p in ("Hint: 3 + 4 = 7. What is 3 + 4?", "Hint: the answer is 7.")]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in (5, 3)]
    samples = Samples(completions, [[-1.0] * len(c) for c in completions], [True, True])
    return tok, teacher, student_prompts, teacher_prompts, samples


class NumbersTeacher:
    """What a teacher server sends (TeacherNumbers), computed from an in-process teacher's full logits."""

    full_distribution = False
    tokenizer = None

    def __init__(self, inner: InProcessTeacher) -> None:
        self.inner = inner

    def score(self, rollout, *, topk_ids=None, lse=False):
        s = self.inner.score(rollout)
        z = s.hidden @ s.weight.T
        return TeacherNumbers(z.log_softmax(-1).gather(-1, rollout.targets.unsqueeze(-1)).squeeze(-1),
                              topk_ids, None if topk_ids is None else z.gather(-1, topk_ids),
                              z.logsumexp(-1) if lse else None)


def test_own_prompt_changes_the_teacher_scores_and_nothing_else(setup):
    tok, teacher, prompts, own, samples = setup
    plain = pack(prompts, samples, tok.pad_token_id)
    mine = pack(prompts, samples, tok.pad_token_id, teacher_prompts=own)
    for name in ("input_ids", "attention_mask", "targets", "loss_mask", "sampler_logprobs"):
        assert torch.equal(getattr(plain, name), getattr(mine, name)), name  # the student's side: byte-identical
    inner = InProcessTeacher(teacher, len(tok))
    wrapped = OwnPromptTeacher(inner, tok.pad_token_id)
    assert torch.equal(wrapped.score(plain).hidden, inner.score(plain).hidden)  # no teacher prompts: pass-through
    got = wrapped.score(mine)
    mask = mine.loss_mask.bool()
    assert got.hidden.shape[:2] == mine.targets.shape and got.hidden[~mask].abs().max() == 0
    # the same numbers as the teacher's own sequence (its prompt + the completion), completion token by token
    ref = inner.score(pack(own, samples, tok.pad_token_id))
    for i, (p_s, p_t, c) in enumerate(zip(mine.prompt_lengths, map(len, own), mine.completion_lengths)):
        torch.testing.assert_close(got.hidden[i, p_s - 1:p_s - 1 + c], ref.hidden[i, p_t - 1:p_t - 1 + c])
    hs = last_hidden(teacher, mine.input_ids, mine.attention_mask)[:, :-1].detach()  # any student
    w = output_layer(teacher, len(tok)).weight.detach()
    a = fused_distillation_loss(hs, w, mine.targets, mine.loss_mask, got, method="vopd")
    b = fused_distillation_loss(hs, w, plain.targets, plain.loss_mask, inner.score(plain), method="vopd")
    assert (a.logq - b.logq)[mask].abs().max() > 1e-2 and torch.equal(a.logp, b.logp)

    # a teacher that sends numbers (a server): the student's top-k ids asked on its own grid, answers moved back
    ids = torch.randint(0, len(tok), mine.targets.shape + (4,), generator=torch.Generator().manual_seed(1))
    ids[~mask] = 0
    numbers = OwnPromptTeacher(NumbersTeacher(inner), tok.pad_token_id).score(mine, topk_ids=ids, lse=True)
    z = got.hidden @ got.weight.T
    torch.testing.assert_close(numbers.logq[mask], z.log_softmax(-1).gather(-1, mine.targets.unsqueeze(-1))[mask, 0])
    torch.testing.assert_close(numbers.topk_logits[mask], z.gather(-1, ids)[mask])
    torch.testing.assert_close(numbers.lse[mask], z.logsumexp(-1)[mask])
    assert torch.equal(numbers.topk_ids, ids)


def _run(overrides, tmp_path, name):
    result = train(load_config(None, overrides + [f"output_dir={tmp_path / name}"]), log=lambda _m: None)
    return [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def _self(train_overrides, micro_world):
    """The micro world's SFT'd teacher as the student (its predictions depend on the prompt), taught by itself."""
    return [o for o in train_overrides if not o.startswith(("model.teacher=", "model.student="))] + [
        f"model.student={micro_world.teacher}", "model.teacher=self"]


def test_teacher_self_is_the_student_until_the_prompts_differ(micro_world, train_overrides, tmp_path):
    base = _self(train_overrides, micro_world) + ["steps=1", "loss.method=vopd", "rollout.max_new_tokens=8"]
    same = _run(base, tmp_path, "same")[0]
    assert abs(same["kl_estimate"]) < 1e-5 and same["kl_mean"] < 1e-5 and same["grad_norm"] < 1e-5
    hinted = _run(base + ["data.teacher_prompt_field=solution"], tmp_path, "hinted")[0]
    assert hinted["kl_mean"] > 1e-3 and hinted["grad_norm"] > 1e-3


def test_teacher_self_with_lora_scores_with_the_adapters_off(setup, micro_world, train_overrides, tmp_path):
    from vopd.models import apply_lora
    from vopd.teacher.base import open_teacher
    from vopd.teacher_config import TeacherConfig

    tok, _, prompts, _, samples = setup
    rollout = pack(prompts, samples, tok.pad_token_id)
    base = load_model(str(micro_world.teacher), role="student", dtype=torch.float32, device=torch.device("cpu"))
    reference = InProcessTeacher(load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32,
                                            device=torch.device("cpu")), len(tok)).score(rollout).hidden
    teacher = open_teacher(TeacherConfig(model="self"), vocab_size=len(tok), device=torch.device("cpu"), student=base, student_tok=tok,
                           lora=True)
    student = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])  # after, as `vopd train`
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))  # the student has moved away
    student.train()
    live = last_hidden(student, rollout.input_ids, rollout.attention_mask)[:, :-1].detach()
    got = teacher.score(rollout).hidden
    torch.testing.assert_close(got, reference)  # the base weights: the adapters were off while scoring
    assert (live - reference).abs().max() > 1e-2
    again = last_hidden(student, rollout.input_ids, rollout.attention_mask)[:, :-1].detach()
    assert torch.equal(again, live) and student.training  # adapters back on, train mode kept
    assert all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)

    # in a run: KL = 0 and no gradient at step 1 (B = 0: the student is its base)
    lines = _run(_self(train_overrides, micro_world) + ["steps=1", "loss.method=opd-full", "lora.enabled=true",
                                                        "lora.r=4", "lora.alpha=8"], tmp_path, "lora")
    assert lines[0]["kl_mean"] < 1e-5 and lines[0]["grad_norm"] < 1e-5


def test_teacher_prompt_refusals(micro_world, train_overrides, tmp_path):
    with pytest.raises(UserError, match=r"line 1: no teacher prompt in field 'hint' .*data.teacher_prompt_field"):
        _run(train_overrides + ["data.teacher_prompt_field=hint"], tmp_path, "nohint")
    from vopd.prompts import teacher_prompts

    cfg = load_config(None, ["data.teacher_own_template=true"], require_paths=False)
    with pytest.raises(UserError, match="teacher_own_template=true needs the teacher's tokenizer"):
        teacher_prompts(cfg.model.teacher_configs[0], cfg.data, object(), None)
    cfg = load_config(None, ["data.teacher_system_prompt=Know the answer.", "data.system_prompt=Be brief."],
                      require_paths=False)
    chat = teacher_prompts(cfg.model.teacher_configs[0], cfg.data, "student-tok", "teacher-tok")
    assert chat.chat == ChatOptions("Know the answer.") and chat.tokenizer == "student-tok" and chat.field == ""


# --- a teacher prompt of its own over a real teacher server ---------------------------------------------------------

@pytest.fixture(scope="module")
def server(launch_teacher_servers):
    return launch_teacher_servers({"own": ([], None)})["own"][1]


def _step_gradient(cfg, student, vocab, teacher, rollout, monkeypatch):
    """One step's gradient (``vopd.step.accumulate_gradients``, one process) with ``teacher`` scoring: (gradients,
    token metrics, what the student's side fed the loss: its inputs and masks, hidden states and targets)."""
    import dataclasses

    from vopd import distributed as dist
    from vopd import step as step_module
    from vopd.metrics import PhaseTimer
    from vopd.teacher.routing import Teachers
    from vopd.teacher_config import TEACHER as ONLY

    cpu = torch.device("cpu")
    seen: list[torch.Tensor] = []
    engine = dist.wrap(student, vocab, "ddp", cpu)  # one process: the model itself

    def spy_forward(ids, mask):
        seen.extend([ids.clone(), mask.clone()])
        return engine.forward(ids, mask)

    def spy_loss(hidden, weight, targets, mask, scores, **kwargs):
        seen.extend([hidden.detach().clone(), targets.clone(), mask.clone()])
        return fused_distillation_loss(hidden, weight, targets, mask, scores, **kwargs)

    monkeypatch.setattr(step_module, "fused_distillation_loss", spy_loss)
    got = step_module.accumulate_gradients(cfg, dataclasses.replace(engine, forward=spy_forward),
                                           Teachers({ONLY: teacher}), rollout, cpu, PhaseTimer(cpu))
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return grads, {**got.token_metrics, "loss": got.loss}, seen


@pytest.mark.parametrize("method", ["opd", "vopd-topk"])
def test_own_prompt_over_a_teacher_server_equals_the_in_process_teacher(method, setup, server, micro_world,
                                                                         train_overrides, monkeypatch, request):
    from vopd.teacher.client import RemoteTeacher

    tok, teacher, prompts, own, samples = setup
    plain = pack(prompts, samples, tok.pad_token_id)
    mine = pack(prompts, samples, tok.pad_token_id, teacher_prompts=own)
    assert [len(p) for p in own] != [len(p) for p in prompts]  # the two grids differ: alignment is by completion
    mask = mine.loss_mask.bool()
    local = OwnPromptTeacher(InProcessTeacher(teacher, len(tok)), tok.pad_token_id)
    remote = OwnPromptTeacher(RemoteTeacher(server), tok.pad_token_id)
    request.addfinalizer(remote.close)

    # the scores: log q(y_t), logits at asked ids and the lse, each on the student's grid, as the in-process teacher's
    ids = torch.randint(0, len(tok), mine.targets.shape + (8,), generator=torch.Generator().manual_seed(3))
    got = remote.score(mine, topk_ids=ids, lse=True)
    ref = local.score(mine)
    z = ref.hidden @ ref.weight.T
    logq = z.log_softmax(-1).gather(-1, mine.targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.logq, logq * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.topk_logits[mask], z.gather(-1, ids)[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.lse[mask], z.logsumexp(-1)[mask], atol=1e-5, rtol=0)
    assert (got.logq - remote.score(plain).logq)[mask].abs().min() > 1e-3  # the own prompt changed every score

    # one step's gradient (two micro-batches): the server's equals the in-process one, the own prompt changed it,
    # and the student's side of the step (its inputs, hidden states, targets, completion mask) is byte-identical
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=torch.device("cpu"))
    cfg = load_config(None, train_overrides + [f"loss.method={method}", "micro_batch_size=1", "grad_noise=false",
                                               "loss.ratio_cap=0"])
    runs = {name: _step_gradient(cfg, student, len(tok), t, r, monkeypatch)
            for name, t, r in (("local", local, mine), ("remote", remote, mine), ("plain", remote, plain))}
    (g_local, m_local, s_local), (g_remote, m_remote, s_remote), (g_plain, m_plain, s_plain) = runs.values()
    for name in g_local:
        torch.testing.assert_close(g_remote[name], g_local[name], atol=1e-5, rtol=0, msg=name)
    for key in ("loss", "kl_estimate", "reward_var"):
        assert m_remote[key] == pytest.approx(m_local[key], abs=1e-5), key
    assert len(s_local) == 10 and all(torch.equal(a, b) and torch.equal(a, c)
                                      for a, b, c in zip(s_local, s_remote, s_plain))
    assert max(float((g_remote[n] - g_plain[n]).abs().max()) for n in g_plain) > 1e-3
    assert m_remote["kl_estimate"] != pytest.approx(m_plain["kl_estimate"], abs=1e-3)


def test_a_run_with_own_prompts_and_a_teacher_server_equals_the_in_process_run(server, train_overrides, tmp_path):
    # The trainer's own wiring (data.teacher_prompt_field -> OwnPromptTeacher around the server's client), two steps
    # sampled with generate: equal step-2 metrics and final weights mean the first update was equal too.
    from safetensors.torch import load_file

    base = train_overrides + ["steps=2", "loss.method=vopd-topk", "optim.eps=1.0"]
    own, remote = "data.teacher_prompt_field=solution", f"model.teacher={server}"
    runs = {name: _run(base + extra, tmp_path, name)
            for name, extra in (("local", [own]), ("remote", [own, remote]), ("plain", [remote]))}
    for x, y in zip(runs["local"], runs["remote"]):
        for key in ("loss", "kl_estimate", "grad_norm", "tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    first, plain = runs["remote"][0], runs["plain"][0]  # the same rollouts at step 1, another teacher view
    assert first["tokens"] == plain["tokens"] and abs(first["kl_estimate"] - plain["kl_estimate"]) > 1e-3
    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("local", "remote"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
