"""Tokens, not rows (``packing``, ``micro_batch_tokens``): a step's loss, metrics and gradients are those of the same
rollout in padded micro-batches of rows, for every method, in process and over a real teacher server, with holes
in the loss mask, a teacher prompt of its own, several routed teachers and LoRA; the packed layout's own
bookkeeping (positions, taking sequences, moving scores between grids) by construction; and the bad inputs refused
in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vopd import distributed as dist
from vopd.attention import implementation, use_packed_attention
from vopd.batching import balance, cost, group
from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.methods import METHODS, method_spec
from vopd.metrics import PhaseTimer
from vopd.models import apply_lora, load_model
from vopd.packing import pack_rows, regrid, unpack
from vopd.rollout import Rollout, pack
from vopd.sampling import Samples
from vopd.step import accumulate_gradients, micro_batches
from vopd.teacher.client import RemoteTeacher
from vopd.teacher.local import InProcessTeacher
from vopd.teacher.reprompt import OwnPromptTeacher
from vopd.teacher.routing import Teachers
from vopd.teacher_config import TEACHER as ONLY

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
LENGTHS = [6, 13, 4, 9, 11, 2]


def _samples(tok, *, holes: bool = True) -> tuple[list[list[int]], Samples]:
    """Six prompts of different lengths with completions of 2..13 tokens; with ``holes`` positions 1, 4 and 5 are
    not the student's."""
    gen = torch.Generator().manual_seed(5)
    prompts = [tok(f"{i} + {2 * i} =" + " 1" * (i % 3))["input_ids"] for i in range(len(LENGTHS))]
    completions = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in LENGTHS]
    logprobs = [(-2 * torch.rand(n, generator=gen)).tolist() for n in LENGTHS]
    masks = [[j not in (1, 4, 5) for j in range(n)] for n in LENGTHS] if holes else None
    return prompts, Samples(completions, logprobs, [False] * len(prompts), masks)


@pytest.fixture(scope="module")
def pair(micro_pair):
    return micro_pair


@pytest.fixture(scope="module")
def server(launch_teacher_servers) -> str:
    return launch_teacher_servers({"packing": ([], None)})["packing"][1]


def _config(train_overrides, method: str, *extra: str):
    return load_config(None, train_overrides + [f"loss.method={method}", "batch_size=6", "micro_batch_size=2",
                                                "loss.ratio_cap=2.0", *extra])


def _step(cfg, student, teachers: Teachers, rollout: Rollout):
    """(loss, token metrics, gradients) of one step's gradient over ``rollout``."""
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", CPU)  # one process: the model itself
    got = accumulate_gradients(cfg, wrapped, teachers, rollout, CPU, PhaseTimer(CPU))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return got.loss, got.token_metrics, grads


def _assert_same(cfg_a, cfg_b, student, teachers, rollout, *, tol: float = 1e-5) -> dict[str, float]:
    """The step under ``cfg_b`` equals the step under ``cfg_a``: loss, every token metric, every gradient."""
    loss_a, metrics_a, grads_a = _step(cfg_a, student, teachers, rollout)
    loss_b, metrics_b, grads_b = _step(cfg_b, student, teachers, rollout)
    assert loss_b == pytest.approx(loss_a, rel=tol, abs=1e-7)
    shape_keys = {"pad_fraction", "micro_batches", "micro_batches_over_budget"}
    for key in set(metrics_a) - shape_keys:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-6), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=tol, atol=tol, msg=n)
    return metrics_b


@pytest.mark.parametrize("attention", ["sdpa", "vopd_packed"])
@pytest.mark.parametrize("method", METHODS)
def test_packed_equals_padded_in_process(method, attention, pair, train_overrides):
    """Both packed attention paths: transformers' block-diagonal mask over the row (sdpa as loaded) and SDPA per
    sequence (``vopd.attention``, what the pre-flight gives an SDPA model)."""
    tok, student, teacher = pair
    prompts, samples = _samples(tok)
    rollout = pack(prompts, samples, tok.pad_token_id)
    padded = _config(train_overrides, method)
    packed = _config(train_overrides, method, "packing=true")
    budget = _config(train_overrides, method, "packing=true", "micro_batch_tokens=40")
    models = (student, teacher.model)
    try:
        for model in models:
            model.set_attn_implementation(attention) if attention == "sdpa" else use_packed_attention(model)
        assert implementation(student) == attention
        metrics = _assert_same(padded, packed, student, Teachers({ONLY: teacher}), rollout)
        assert metrics["pad_fraction"] == 0.0
        metrics = _assert_same(padded, budget, student, Teachers({ONLY: teacher}), rollout)
        assert metrics["pad_fraction"] == 0.0 and metrics["micro_batches"] >= 2
    finally:
        for model in models:
            model.set_attn_implementation("sdpa")


def test_a_packed_run_resumes_exactly(micro_world, train_overrides, tmp_path):
    """kill (stop after step 2) + resume == uninterrupted, with token-budget packed micro-batches."""
    from vopd.metrics import read_metrics
    from vopd.train import Start, train

    base = train_overrides + ["steps=4", "save_every=1", "packing=true", "micro_batch_tokens=300"]
    train(load_config(None, base + [f"output_dir={tmp_path / 'full'}"]), log=lambda _m: None)
    part = load_config(None, base + [f"output_dir={tmp_path / 'part'}"])
    train(part, stop_at=2, log=lambda _m: None)
    train(part, start=Start.resume(), log=lambda _m: None)

    def rows(run):
        return [{k: v for k, v in m.items() if not k.startswith("time") and k not in ("tokens_per_s",
                                                                                     "peak_memory_mb")}
                for m in read_metrics(run / "metrics.jsonl")]

    full, resumed = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert full == resumed and [m["step"] for m in full] == [1, 2, 3, 4]
    assert all(m["pad_fraction"] == 0.0 for m in full)


def test_token_budget_rows_equal_row_micro_batches(pair, train_overrides):
    """Padded micro-batches by a token budget (sorted by length: less padding) give the row micro-batches' step."""
    tok, student, teacher = pair
    prompts, samples = _samples(tok)
    rollout = pack(prompts, samples, tok.pad_token_id)
    rows = _config(train_overrides, "vopd")
    tokens = _config(train_overrides, "vopd", "micro_batch_tokens=36")
    metrics = _assert_same(rows, tokens, student, Teachers({ONLY: teacher}), rollout)
    _, row_metrics, _ = _step(rows, student, Teachers({ONLY: teacher}), rollout)
    assert 0 < metrics["pad_fraction"] < row_metrics["pad_fraction"]


#: Every method over hidden states; over per-token numbers, the methods that need no full distribution and no
#: teacher's own top-k (a vopd server sends logits at asked ids: tests/test_ttopk.py checks that it refuses vopd-ttopk).
SERVED = [(m, "hidden") for m in ("vopd", "opd-full", "rb-topk")] + \
    [(m, "numbers") for m in METHODS
    if not method_spec(m).full_distribution and not method_spec(m).teacher_topk]


@pytest.mark.parametrize("method,form", SERVED)
def test_packed_equals_padded_over_the_server(method, form, pair, server, micro_world, train_overrides):
    """A server receives the sequences as before (the padded rows of each packed micro-batch) and its answer is
    moved onto the packed grid: the same step as padded, and as the in-process teacher."""
    tok, student, local = pair
    prompts, samples = _samples(tok)
    rollout = pack(prompts, samples, tok.pad_token_id)
    head = str(micro_world.teacher) if form == "hidden" else None
    with RemoteTeacher(server, head=head, hidden_dtype="float32") as remote:
        _assert_same(_config(train_overrides, method), _config(train_overrides, method, "packing=true"), student,
                     Teachers({ONLY: remote}), rollout, tol=1e-4)


@pytest.mark.parametrize("method", ["vopd", "vopd-topk", "rb-topk"])
def test_packed_with_a_teacher_prompt_of_its_own(method, pair, train_overrides):
    """The teacher reads each completion after its own prompt; packed, its view is packed the same way."""
    tok, student, teacher = pair
    prompts, samples = _samples(tok)
    own = [tok(f"Hint: the answer is {i}. {i} + {2 * i} =")["input_ids"] for i in range(len(prompts))]
    rollout = pack(prompts, samples, tok.pad_token_id, teacher_prompts=own)
    teachers = Teachers({ONLY: OwnPromptTeacher(teacher, tok.pad_token_id)})
    _assert_same(_config(train_overrides, method), _config(train_overrides, method, "packing=true",
                                                           "micro_batch_tokens=48"), student, teachers, rollout)


def test_packed_with_routed_teachers(pair, micro_world, train_overrides):
    """Two teachers, each scoring its own rows of every micro-batch: the part of a packed row is its sequences."""
    tok, student, teacher = pair
    other = InProcessTeacher(load_model(str(micro_world.student), role="teacher", dtype=torch.float32, device=CPU),
                             len(tok))
    prompts, samples = _samples(tok)
    routes = ["a", "b", "b", "a", "b", "a"]
    rollout = pack(prompts, samples, tok.pad_token_id, routes=routes)
    teachers = Teachers({"a": teacher, "b": other})
    for method in ("vopd", "opd-full"):
        metrics = _assert_same(_config(train_overrides, method), _config(train_overrides, method, "packing=true"),
                               student, teachers, rollout)
        assert metrics["teacher/a/tokens_frac"] > 0 and metrics["teacher/b/tokens_frac"] > 0


def test_packed_with_lora(micro_world, pair, train_overrides):
    tok, _, teacher = pair
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=CPU)
    torch.manual_seed(0)
    student = apply_lora(student, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    for p in student.parameters():  # B = 0 at init: give the adapters weight so that their gradients mean something
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    prompts, samples = _samples(tok)
    rollout = pack(prompts, samples, tok.pad_token_id)
    _assert_same(_config(train_overrides, "vopd"), _config(train_overrides, "vopd", "packing=true"), student,
                 Teachers({ONLY: teacher}), rollout)


def test_the_packed_layout(pair):
    tok, _, _ = pair
    prompts, samples = _samples(tok)
    padded = pack(prompts, samples, tok.pad_token_id)
    packed = pack_rows(padded)
    n = sum(len(p) + len(c) for p, c in zip(prompts, samples.completions))
    assert packed.input_ids.shape == (1, n) and packed.num_tokens == padded.num_tokens and packed.size == 6
    assert packed.completions() == padded.completions() == samples.completions
    assert packed.position_ids is not None and packed.position_ids[0, packed.starts[1]] == 0
    # the completion positions hold the same targets, masks and sampler log-probs on both grids
    (rs, ps), (rp, pp) = padded.completion_positions(), packed.completion_positions()
    for name in ("targets", "loss_mask", "sampler_logprobs"):
        assert torch.equal(getattr(padded, name)[rs, ps], getattr(packed, name)[rp, pp]), name
    back = unpack(packed, tok.pad_token_id)
    for name in ("input_ids", "attention_mask", "targets", "loss_mask", "sampler_logprobs"):
        assert torch.equal(getattr(back, name), getattr(padded, name)), name
    # taking sequences: the same as packing the padded rows taken
    rows = [4, 0, 2]
    taken, direct = packed.take(rows), pack_rows(padded.take(rows).select(0, 3))
    for name in ("input_ids", "targets", "loss_mask", "sampler_logprobs", "position_ids"):
        assert torch.equal(getattr(taken, name), getattr(direct, name)), name
    x = torch.randn(1, n - 1, 3)
    moved = regrid(x, (rp, pp), (rs, ps), tuple(padded.targets.shape))
    assert moved.shape == (*padded.targets.shape, 3) and torch.equal(moved[rs, ps], x[rp, pp])
    outside = torch.ones(padded.targets.shape, dtype=torch.bool)
    outside[rs, ps] = False
    assert not moved[outside].any()  # zero off the completion positions, as the loss expects


def test_micro_batches_are_balanced_and_budgeted():
    lengths = [100, 7, 55, 55, 30, 30, 12, 90, 3, 64]
    for packed in (False, True):
        g = group(lengths, 128, packed=packed)
        seen = sorted(i for grp in g.groups for i in grp)
        assert seen == list(range(len(lengths)))
        assert all(cost([lengths[i] for i in grp], packed=packed) <= 128 for grp in g.groups)
        more = group(lengths, 128, packed=packed, at_least=len(g.groups) + 3)
        assert len(more.groups) == len(g.groups) + 3
    packed = group(lengths, 128, packed=True).groups
    loads = [sum(lengths[i] for i in grp) for grp in packed]
    assert max(loads) - min(loads) <= max(lengths)  # near-equal: within one sequence
    assert group([300, 5], 128, packed=True).over_budget == 1
    shares = balance(lengths, 2)
    tokens = [sum(lengths[i] for i in s) for s in shares]
    assert sorted(i for s in shares for i in s) == list(range(10)) and abs(tokens[0] - tokens[1]) <= 30


def test_micro_batches_keep_every_rank_in_step(pair, train_overrides):
    tok, _, _ = pair
    prompts, samples = _samples(tok, holes=False)
    rollout = pack(prompts, samples, tok.pad_token_id)
    cfg = _config(train_overrides, "vopd", "packing=true", "micro_batch_tokens=200")
    micro, shape = micro_batches(cfg, rollout)
    assert len(micro) == 2 and shape.micro_batches == 2  # the variance probe's two halves, even under the budget
    assert sum(mb.num_tokens for mb in micro) == rollout.num_tokens


def test_bad_input_is_one_line(micro_world, train_overrides, tmp_path, capsys):
    from vopd.cli import main

    base = [*train_overrides, "steps=1", f"output_dir={tmp_path / 'run'}"]
    for extra, expected in (
        (["micro_batch_tokens=8"], "micro_batch_tokens=8 is below one sequence"),
        (["micro_batch_tokens=-1"], "config key micro_batch_tokens"),
    ):
        capsys.readouterr()
        code = main(["train", *base, *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_unpackable_attention_is_refused(pair, train_overrides):
    from vopd.check import batching_checks

    tok, student, _ = pair
    cfg = _config(train_overrides, "vopd", "packing=true")
    lines = batching_checks(cfg, 20, student, len(tok), None)
    assert any("packs as it pads" in line for line in lines)
    impl = student.config._attn_implementation
    try:
        student.config._attn_implementation = "paged_attention"
        with pytest.raises(UserError, match="cannot keep packed sequences apart"):
            batching_checks(cfg, 20, student, len(tok), None)
    finally:
        student.config._attn_implementation = impl


def test_per_sequence_attention_with_equal_and_unequal_lengths(pair):
    """``vopd_packed`` runs sequences of one length as one batch: a row of lengths 5, 7, 5, 3, 7 gives each
    sequence's hidden states as it has alone, with grads too."""
    from vopd.models import last_hidden

    tok, student, _ = pair
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, len(tok), (n,), generator=gen) for n in (5, 7, 5, 3, 7)]
    row = torch.cat(seqs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    try:
        assert use_packed_attention(student) and implementation(student) == "vopd_packed"
        got = last_hidden(student, row, torch.ones_like(row), pos)[0]
        alone = torch.cat([last_hidden(student, s.unsqueeze(0), torch.ones(1, len(s), dtype=torch.long))[0]
                           for s in seqs])
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        got.sum().backward()  # the per-sequence path is differentiable
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    finally:
        student.zero_grad(set_to_none=True)
        student.set_attn_implementation("sdpa")


def test_vopd_plan_plans_packed_token_budgets(micro_world):
    """`vopd plan` traces packed micro-batches under a token budget (their masks stay real data in the fake mode)."""
    from vopd.memfit import plan

    base = [f"model.student={micro_world.student}", f"model.teacher={micro_world.teacher}", "data.train=x",
            "batch_size=8", "rollout.max_new_tokens=64", "data.max_prompt_tokens=64"]
    rows = plan(load_config(None, base, require_paths=False), world_size=2, gpu_memory_gib=80)
    packed = plan(load_config(None, [*base, "packing=true", "micro_batch_tokens=1024"], require_paths=False),
                  world_size=2, gpu_memory_gib=80)
    assert rows.fits and packed.fits and packed.peak > 0
