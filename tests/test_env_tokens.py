"""Tokens the student did not sample (an environment's tool output, the chat template's framing between turns) are
context, never loss: for every method, padded and packed, changing the teacher's scores at those positions changes
nothing (loss, gradients, token metrics all equal, bit for bit), while changing them at one sampled position does
change the loss (so the check can fail). Then on real calculator episodes: every method equals the hand-masked
tokens, and a teacher prompt of its own, several teachers and a teacher server work on them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vopd import distributed as dist
from vopd.config import load_config
from vopd.loss.methods import METHODS
from vopd.loss.scores import TeacherHidden
from vopd.metrics import PhaseTimer
from vopd.rollout import Rollout, pack
from vopd.sampling import Samples
from vopd.step import accumulate_gradients
from vopd.teacher.routing import Teachers
from vopd.teacher_config import TEACHER as ONLY

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


class _Scrambled:
    """The in-process teacher with its hidden states replaced by noise at the positions ``where(rollout)`` selects:
    every other attribute is the wrapped teacher's."""

    def __init__(self, teacher, where) -> None:
        self.teacher, self.where = teacher, where

    def __getattr__(self, name: str):
        return getattr(self.teacher, name)

    def score(self, rollout: Rollout, **kw) -> TeacherHidden:
        got = self.teacher.score(rollout, **kw)
        assert isinstance(got, TeacherHidden)
        at = self.where(rollout)
        noise = 50.0 * torch.randn(got.hidden.shape, generator=torch.Generator().manual_seed(7))
        return replace(got, hidden=torch.where(at.unsqueeze(-1), noise, got.hidden))


def _episodes(tok) -> tuple[list[list[int]], Samples]:
    """Four agent-like sequences: a sampled turn, environment tokens, a second sampled turn (rows end at different
    turns: the last has one turn only)."""
    gen = torch.Generator().manual_seed(5)
    prompts = [tok(f"{i} * {3 * i} =")["input_ids"] for i in range(4)]
    turns = [(5, 4, 6), (7, 3, 2), (3, 6, 8), (9, 0, 0)]  # (sampled, environment, sampled) tokens per row
    completions, logprobs, masks = [], [], []
    for a, e, b in turns:
        n = a + e + b
        completions.append(torch.randint(3, len(tok), (n,), generator=gen).tolist())
        logprobs.append([(-2 * torch.rand(1, generator=gen)).item() if j < a or j >= a + e else 0.0
                         for j in range(n)])
        masks.append([j < a or j >= a + e for j in range(n)])
    return prompts, Samples(completions, logprobs, [False] * 4, masks)


def _step(cfg, student, teacher, rollout: Rollout):
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", CPU)
    got = accumulate_gradients(cfg, wrapped, Teachers({ONLY: teacher}), rollout, CPU, PhaseTimer(CPU))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return got.loss, got.token_metrics, grads


def _first_sampled(rollout: Rollout) -> torch.Tensor:
    at = torch.zeros_like(rollout.loss_mask)
    first = rollout.loss_mask.nonzero()[0]
    at[first[0], first[1]] = True
    return at


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", METHODS)
def test_environment_positions_get_no_gradient(method, packing, micro_pair, train_overrides):
    tok, student, teacher = micro_pair
    prompts, samples = _episodes(tok)
    rollout = pack(prompts, samples, tok.pad_token_id)
    cfg = load_config(None, train_overrides + [f"loss.method={method}", "batch_size=4", "micro_batch_size=4",
                                               "grad_noise=false", "loss.ratio_cap=2.0", f"packing={str(packing).lower()}"])
    loss, metrics, grads = _step(cfg, student, teacher, rollout)
    loss_s, metrics_s, grads_s = _step(cfg, student, _Scrambled(teacher, lambda r: ~r.loss_mask), rollout)
    assert loss == loss_s and metrics == metrics_s
    assert grads.keys() == grads_s.keys() and all(torch.equal(grads[n], grads_s[n]) for n in grads)
    assert metrics["tokens"] == sum(sum(m) for m in samples.loss_masks or [])
    # The same noise at one sampled position does move the loss: the positions above were really scored.
    loss_one, _, _ = _step(cfg, student, _Scrambled(teacher, _first_sampled), rollout)
    assert loss_one != loss


@pytest.fixture(scope="module")
def calculator_episodes(tool_world):
    """(tokenizer, student, teacher, prompts, Samples): real calculator episodes of the tool-format student (Hugging
    Face turns at temperature 1, seeded), with at least one tool answer among them."""
    from vopd.env.calculator import Calculator
    from vopd.env.calls import EnvCalls
    from vopd.episodes import HfTurns, Limits, run_episodes
    from vopd.models import load_model, load_tokenizer
    from vopd.teacher.local import InProcessTeacher

    student_dir, teacher_dir, _ = tool_world
    tok = load_tokenizer(str(student_dir))
    student = load_model(str(student_dir), role="student", dtype=torch.float32, device=CPU)
    teacher = InProcessTeacher(load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=CPU), len(tok))
    first = [[{"role": "user", "content": f"What is {a} * {b}?"}] for a, b in [(12, 34), (3, 7), (45, 6), (8, 9)] * 2]
    kwargs = {"tools": Calculator.tools}
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs)
               for m in first]
    envs = [Calculator() for _ in first]
    torch.manual_seed(0)
    out = run_episodes(prompts, first, envs, [f"row {i}" for i in range(len(first))], tok, kwargs,
                       HfTurns(student, tok, temperature=1.0, top_p=1.0, top_k=0, batch_size=8),
                       Limits(max_turns=3, turn_tokens=10, total_tokens=80), EnvCalls("calculator", 10, 1000))
    assert out.episodes is not None and any(e.env_tokens for e in out.episodes)
    return tok, student, teacher, prompts, out


@pytest.mark.parametrize("method", METHODS)
def test_calculator_episodes_train_on_the_students_tokens_only(method, calculator_episodes, train_overrides):
    """Real multi-turn sequences: the loss, gradients and metrics equal those of the same tokens with the
    environment's positions taken out of the mask by hand, and the teacher's scores there do not matter."""
    from test_mask_holes import _assert_holes_excluded

    tok, student, teacher, prompts, samples = calculator_episodes
    cfg = load_config(None, train_overrides + [f"loss.method={method}", "batch_size=8", "micro_batch_size=8",
                                               "grad_noise=false", "loss.ratio_cap=2.0"])
    _assert_holes_excluded(cfg, student, teacher, prompts, samples, tok.pad_token_id)
    rollout = pack(prompts, samples, tok.pad_token_id)
    loss, metrics, grads = _step(cfg, student, teacher, rollout)
    loss_s, metrics_s, grads_s = _step(cfg, student, _Scrambled(teacher, lambda r: ~r.loss_mask), rollout)
    assert loss == loss_s and metrics == metrics_s and all(torch.equal(grads[n], grads_s[n]) for n in grads)


def _grads_close(a, b, tol=1e-5) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=tol, msg=n)


def test_calculator_episodes_with_a_teacher_prompt_of_its_own(calculator_episodes, train_overrides):
    """The teacher reads each episode after its own prompt: its scores at the environment's positions of its own
    view still change nothing, and its prompt does change the loss."""
    from vopd.teacher.reprompt import OwnPromptTeacher

    tok, student, teacher, prompts, samples = calculator_episodes
    own = [tok.apply_chat_template([{"role": "system", "content": "Use the calculator."},
                                    {"role": "user", "content": f"Row {i}."}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for i in range(len(prompts))]
    rollout = pack(prompts, samples, tok.pad_token_id, teacher_prompts=own)
    cfg = load_config(None, train_overrides + ["loss.method=vopd", "batch_size=8", "micro_batch_size=8",
                                               "grad_noise=false"])
    loss, metrics, grads = _step(cfg, student, OwnPromptTeacher(teacher, tok.pad_token_id), rollout)
    loss_s, metrics_s, grads_s = _step(
        cfg, student, OwnPromptTeacher(_Scrambled(teacher, lambda r: ~r.loss_mask), tok.pad_token_id), rollout)
    assert loss == loss_s and metrics == metrics_s and all(torch.equal(grads[n], grads_s[n]) for n in grads)
    plain, _, _ = _step(cfg, student, teacher, pack(prompts, samples, tok.pad_token_id))
    assert plain != loss


def test_calculator_episodes_routed_to_several_teachers(calculator_episodes, train_overrides):
    """Rows routed to two names of the same teacher give the one teacher's loss and gradients (the routing keeps
    each row's mask with holes), with per-teacher token shares that add up to the student's tokens."""
    tok, student, teacher, prompts, samples = calculator_episodes
    routes = ["a" if i % 2 else "b" for i in range(len(prompts))]
    cfg = load_config(None, train_overrides + ["loss.method=vopd", "batch_size=8", "micro_batch_size=8",
                                               "grad_noise=false"])
    one = _step(cfg, student, teacher, pack(prompts, samples, tok.pad_token_id))
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", CPU)
    got = accumulate_gradients(cfg, wrapped, Teachers({"a": teacher, "b": teacher}, routed=True),
                               pack(prompts, samples, tok.pad_token_id, routes=routes), CPU, PhaseTimer(CPU))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    assert got.loss == pytest.approx(one[0], rel=1e-6)
    _grads_close(grads, one[2], 1e-7)
    frac = [got.token_metrics[f"teacher/{n}/tokens_frac"] for n in ("a", "b")]
    assert all(f > 0 for f in frac) and sum(frac) == pytest.approx(1.0)
    assert got.token_metrics["tokens"] == one[1]["tokens"] == sum(sum(m) for m in samples.loss_masks or [])


def test_calculator_episodes_over_a_teacher_server(calculator_episodes, tool_world, launch_teacher_servers,
                                                   train_overrides):
    """A real ``vopd serve-teacher`` sending hidden states scores the episodes as the in-process teacher does."""
    from vopd.teacher.client import RemoteTeacher

    tok, student, teacher, prompts, samples = calculator_episodes
    _, teacher_dir, _ = tool_world
    url = launch_teacher_servers({"tools": ([], None, teacher_dir)})["tools"][1]
    rollout = pack(prompts, samples, tok.pad_token_id)
    for method in ("opd", "vopd", "rb-topk"):
        cfg = load_config(None, train_overrides + [f"loss.method={method}", "batch_size=8", "micro_batch_size=8",
                                                   "grad_noise=false"])
        with RemoteTeacher(url, head=str(teacher_dir), hidden_dtype="float32") as remote:
            loss, metrics, grads = _step(cfg, student, remote, rollout)
        loss_l, metrics_l, grads_l = _step(cfg, student, teacher, rollout)
        assert loss == pytest.approx(loss_l, rel=1e-5) and metrics["tokens"] == metrics_l["tokens"]
        _grads_close(grads, grads_l)
