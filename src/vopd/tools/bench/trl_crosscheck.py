"""The loss cross-check of `vopd bench trl`: vopd's ``opd-full`` loss against TRL's reverse KL on one fixed batch.

What it knows: one batch of the student's own samples (natural lengths: EOS ends a completion, shorter rows are
padded), and on it vopd's chunked ``opd-full`` loss, TRL's ``DistillationTrainer.compute_loss`` (TRL's layout) and
GKD's dense ``generalized_jsd_loss``: their values and their gradients w.r.t. the student's parameters (max |gradient
difference| / max |gradient|); and the report's lines for the result.

What it does not know: timing, memory, processes or rounds (``vopd.tools.bench.trl``); loading the models and the prompts,
and TRL's trainer settings, which it takes from ``vopd.tools.bench.trl_cases``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from vopd.tools.bench.trl_cases import load_pair, prompt_texts, trl_args


def crosscheck(case: dict[str, Any]) -> dict[str, Any]:
    """vopd ``opd-full`` vs TRL's reverse KL on one fixed batch of the student's own samples (natural lengths: EOS
    ends a completion, shorter rows are padded). Convention on every side: the per-token KL(student || teacher) at
    every completion position (EOS included), averaged over all completion tokens of the batch."""
    import torch
    from datasets import Dataset
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer

    from vopd.loss.chunked import chunked_distillation_loss
    from vopd.data import encode_prompt
    from vopd.models import last_hidden, output_layer
    from vopd.rollout import pack
    from vopd.sampling import generate
    from vopd.teacher.local import InProcessTeacher

    tok, student, teacher = load_pair(case)
    vocab, pad = len(tok), tok.pad_token_id
    prompts = [encode_prompt(tok, p) for p in prompt_texts(case["data"], case["batch_size"])]
    torch.manual_seed(case["seed"])
    r = pack(prompts, generate(student, tok, prompts, max_new_tokens=case["max_new_tokens"]), pad)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    scores = InProcessTeacher(teacher, vocab).score(r)
    head = output_layer(student, vocab)
    ours = chunked_distillation_loss(last_hidden(student, r.input_ids, r.attention_mask)[:, :-1], head.weight,
                                     scores.hidden, scores.weight, r.targets, r.loss_mask, method="opd-full",
                                     student_bias=head.bias, teacher_bias=scores.bias,
                                     student_transform=head.transform, teacher_transform=scores.transform).loss

    # TRL's layout: prompts left-padded, completions right-padded, completion_mask (its key) 1 up to and with EOS.
    p_w, c_w = max(r.prompt_lengths), max(r.completion_lengths)
    inputs = {k: torch.full((r.size, w), fill, dtype=torch.long) for k, w, fill in (
        ("prompt_ids", p_w, pad), ("prompt_mask", p_w, 0), ("completion_ids", c_w, pad), ("completion_mask", c_w, 0))}
    for i, (pl, cl) in enumerate(zip(r.prompt_lengths, r.completion_lengths)):
        inputs["prompt_ids"][i, p_w - pl:], inputs["prompt_mask"][i, p_w - pl:] = r.input_ids[i, :pl], 1
        inputs["completion_ids"][i, :cl], inputs["completion_mask"][i, :cl] = r.input_ids[i, pl:pl + cl], 1
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    with tempfile.TemporaryDirectory() as out:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trl_args(case, Path(out), 1),
                                      train_dataset=Dataset.from_list([{"prompt": "x"}]), processing_class=tok)
        trl = trainer.compute_loss(trainer.model, inputs)

    # GKD's dense loss: full logits of both models, -100 labels off the completion tokens, beta=1, batchmean.
    logits = student(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1, :vocab]
    with torch.no_grad():
        t_logits = teacher(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1, :vocab]
    gkd = GKDTrainer.generalized_jsd_loss(logits, t_logits, labels=r.targets.masked_fill(~r.loss_mask, -100),
                                          beta=1.0, temperature=1.0, reduction="batchmean")

    g_ours = torch.autograd.grad(ours, params)
    scale = max(float(g.abs().max()) for g in g_ours)
    res = {"tokens": r.num_tokens, "sequences": r.size, "min_len": min(r.completion_lengths),
           "max_len": max(r.completion_lengths), "opd_full": float(ours.detach())}
    for name, loss in (("trl", trl), ("gkd", gkd)):  # value, and max |gradient difference| / max |gradient|
        diff = max(float((a - b).abs().max()) for a, b in zip(g_ours, torch.autograd.grad(loss, params)))
        res.update({name: float(loss.detach()), f"grad_rel_diff_{name}": diff / scale})
    return res


def crosscheck_lines(c: dict[str, Any]) -> list[str]:
    """The report's lines for a ``crosscheck`` result."""
    lines = [f"loss cross-check on one fixed batch ({c['sequences']} sampled sequences, completion lengths "
             f"{c['min_len']}-{c['max_len']}, {c['tokens']} completion tokens; token-mean reverse "
             "KL(student || teacher)):", f"  vopd opd-full (chunked)  {c['opd_full']:.8f}"]
    for key, name in (("trl", "TRL DistillationTrainer.compute_loss, beta=1"),
                      ("gkd", "TRL GKDTrainer.generalized_jsd_loss, beta=1, batchmean, -100 labels")):
        lines.append(f"  {name}  {c[key]:.8f}  |diff| {abs(c[key] - c['opd_full']):.1e}  "
                     f"max |grad diff| / max |grad| {c['grad_rel_diff_' + key]:.1e}")
    return lines
