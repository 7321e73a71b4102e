"""Every common decoder family, as tiny random models built in code (tests/tiny_families.py; nothing downloaded).

Per family: the pre-flight passes, one training step runs for a sampled method (vopd, with LoRA on its default
targets) and a full-vocabulary one (opd-full, all weights, packed micro-batches), every family packs two sequences
into one row as it pads them (each attention path), and the exported final model reloads with
``from_pretrained`` with the output layer untouched by LoRA. Default LoRA targets cover the attention and MLP
projections whatever the family calls them, never the output layer. An architecture vopd cannot read gets a
one-line error naming what it lacks.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import FAMILIES, make, save_pair

from vopd.config import load_config
from vopd.errors import UserError
from vopd.models import ALL_LINEAR, apply_lora, last_hidden, load_tokenizer, output_layer
from vopd.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(micro_world):
    return load_tokenizer(str(micro_world.student))


#: family -> (student output rows, teacher output rows) past the tokenizer's 200 (None: exactly the tokenizer)
ROWS = {"qwen3": (256, 320)}  # padded vocabularies, different in the two models


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_exports_and_reloads(family, tok, micro_world, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = ROWS.get(family, (None, None))
    student, teacher = save_pair(tmp_path, family, tok, student_rows=rows[0], teacher_rows=rows[1])
    initial = AutoModelForCausalLM.from_pretrained(student, local_files_only=True)
    base = [f"model.student={student}", f"model.teacher={teacher}", f"data.train={micro_world.train}",
            "rollout.max_new_tokens=6", "batch_size=2", "micro_batch_size=2", "steps=1", "progress=false",
            "loss.top_k=8", "optim.lr=1e-2", "save_every=0"]
    for method, lora, packing in (("vopd", True, False), ("opd-full", False, True)):
        logged: list[str] = []
        out = tmp_path / f"run-{method}"
        result = train(load_config(None, base + [f"loss.method={method}", f"lora.enabled={str(lora).lower()}",
                                                 f"packing={str(packing).lower()}", f"output_dir={out}"]),
                       log=logged.append)
        assert any("pre-flight ok: self-check" in line for line in logged), logged
        assert any("packs as it pads" in line for line in logged) == packing, logged
        metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert result.steps_done == 1 and result.skipped_steps == 0
        assert metrics["grad_norm"] > 0 and all(map(torch.isfinite, torch.tensor([metrics["loss"]])))
        final = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
        assert type(final) is type(initial)
        changed = [k for k, v in final.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
        assert changed, f"{family} {method}: the exported model equals the initial one"
        if lora:  # LoRA trained the body only: the output layer (read by the fused head) is exactly as it was
            torch.testing.assert_close(final.get_output_embeddings().weight, initial.get_output_embeddings().weight,
                                       rtol=0, atol=0)
            assert all(not k.startswith(("lm_head", "model.embed_tokens")) for k in changed), changed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_lora_targets_cover_the_body_and_never_the_head(family):
    model = make(family, 64)
    wrapped = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=[ALL_LINEAR])
    targets = {name.rsplit(".", 1)[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"} if family != "phi3" else {"qkv_proj", "o_proj"}
    mlp = {"gate_up_proj", "down_proj"} if family == "phi3" else ({"gate_proj", "up_proj", "down_proj"}
                                                                  if not family.endswith("moe") else set())
    assert attention | mlp <= targets, (family, sorted(targets))
    assert not targets & {"lm_head", "embed_tokens"}
    assert not hasattr(wrapped.get_base_model().get_output_embeddings(), "lora_A")


def test_lora_target_refusals_are_one_line(tok):
    model = make("phi3", len(tok))
    for targets, match in (([ALL_LINEAR, "q_proj"], "mixes all-linear with module names"),
                           (["q_proj", "v_proj"], r"\['q_proj', 'v_proj'\] not found in the student \(Phi3ForCausalLM\)"
                                                  r"; its linear layers are .*qkv_proj"),
                           (["lm_head"], "may not include the output layer")):
        with pytest.raises(UserError, match=match) as exc:
            apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=targets)
        assert "\n" not in str(exc.value)


def test_unsupported_architectures_get_a_one_line_error_naming_what_is_missing(tok):
    """No decoder body to take hidden states from, or no linear output layer: refused before any work, by name."""
    from transformers import LlamaForCausalLM

    class NoBodyForCausalLM(LlamaForCausalLM):
        def get_decoder(self):
            return self

    class NoHeadForCausalLM(LlamaForCausalLM):
        def get_output_embeddings(self):
            return None

    base = make("llama", len(tok))
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(UserError, match=r"^NoBodyForCausalLM does not expose its decoder body .*not supported$"):
        last_hidden(NoBodyForCausalLM(base.config), ids, torch.ones_like(ids))
    with pytest.raises(UserError, match=r"^NoHeadForCausalLM has no linear output layer"):
        output_layer(NoHeadForCausalLM(base.config), len(tok))


#: Families whose layers may attend within a sliding window: probed with a window shorter than the probe sequences.
WINDOWED = {"mistral": {"sliding_window": 4}, "gemma2": {"sliding_window": 4}, "gemma3": {"sliding_window": 4},
            "qwen2": {"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 0}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_packs_as_it_pads(family):
    """``packing``: two sequences packed into one row give the hidden states they give padded (``packing_error``,
    relative), through each attention path a run can take: transformers' mask over the row (eager, sdpa) and SDPA
    per sequence (``vopd.attention``); with a sliding window shorter than the sequences where the family has one."""
    from vopd.attention import implementation, use_packed_attention
    from vopd.models import packing_error

    for options in ({}, *([WINDOWED[family]] if family in WINDOWED else [])):
        model = make(family, 200, layers=2, **options)
        for attention in ("eager", "sdpa", "vopd_packed"):
            if attention == "vopd_packed":
                model.set_attn_implementation("sdpa")
                assert use_packed_attention(model)
            else:
                model.set_attn_implementation(attention)
            assert implementation(model) == attention
            err = packing_error(model, 200)
            assert err <= 1e-5, (family, options, attention, err)
