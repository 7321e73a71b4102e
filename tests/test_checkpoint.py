"""Checkpoints in one process: full and LoRA round trips (the sharded layout vopd writes, and the full layout it
still reads), merged and streamed exports, RNG, pruning, corruption, a killed writer, run directories. Several ranks:
test_sharded_checkpoints.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from legacy_checkpoint import write_full_checkpoint
from vopd import checkpoint_legacy
from vopd.checkpoint import (
    MANIFEST,
    latest_valid_checkpoint,
    list_checkpoints,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)
from vopd.checkpoint_sharded import load_checkpoint, save_checkpoint
from vopd.errors import UserError
from vopd.export import export_merged, export_streamed
from vopd.rundir import RUN_MARKER, prepare_output_dir

transformers = pytest.importorskip("transformers")

CONFIG = {"loss": {"method": "vopd", "top_k": 100}, "optim": {"lr": 1e-5}, "steps": 10, "output_dir": "x",
          "eval": {"n": 1}, "loggers": []}


def tiny_model(seed: int = 0, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
    )
    return transformers.Qwen3ForCausalLM(config)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(62)} | {"<unk>": 62, "<eos>": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def optimizer_and_scheduler(model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, ids: torch.Tensor) -> None:
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def save(out: Path, step: int, model, keep_last: int = 10, **kwargs) -> Path:
    return save_checkpoint(out, step, model=model, trainer_state={"step": step, "position": 3 * step},
                           config=CONFIG, keep_last=keep_last, **kwargs)


def test_full_round_trip(tmp_path: Path) -> None:
    model, ids = tiny_model(0), torch.randint(0, 64, (2, 9))
    optimizer, scheduler = optimizer_and_scheduler(model)
    for _ in range(2):
        train_step(model, optimizer, scheduler, ids)
    state = {"step": 2, "position": 17, "metrics": {"loss": float("nan")}, "bad_steps": 0}
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, trainer_state=state,
                           config=CONFIG, keep_last=2)
    expected_draws = draws()
    train_step(model, optimizer, scheduler, ids)  # the reference continues from the saved state
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    assert path == tmp_path / "checkpoints" / "step-00000002"
    manifest = json.loads((path / MANIFEST).read_text())
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert listed == on_disk
    assert listed == {"shards/.metadata", "shards/__0_0.distcp", "optimizer_scalars.pt", "scheduler.pt",
                      "trainer_state.json", "rng.pt", "config.yaml"}
    assert [f.get("rank") for f in manifest["files"] if f["path"] == "shards/__0_0.distcp"] == [0]
    assert manifest["layout"] == "sharded" and manifest["version"] == 2 and manifest["world_size"] == 1
    verify_checkpoint(path)

    # A fresh process-like state: other weights, fresh optimizer/scheduler, RNGs moved on.
    model2 = tiny_model(1)
    optimizer2, scheduler2 = optimizer_and_scheduler(model2)
    draws()
    loaded = load_checkpoint(path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert json.dumps(loaded) == json.dumps(state)  # NaN survives
    assert draws() == expected_draws
    assert scheduler2.last_epoch == 2 and scheduler2.get_last_lr() == pytest.approx([1e-2 / 3])
    train_step(model2, optimizer2, scheduler2, ids)
    for key, value in model2.state_dict().items():
        torch.testing.assert_close(value, expected_weights[key], rtol=0, atol=0)


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = draws()
    draws()
    set_rng_state(state)
    assert draws() == first


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_moe_weights_round_trip_in_both_layouts_and_the_streamed_export(tmp_path: Path) -> None:
    # transformers stores fused MoE experts under other names than in memory. The sharded layout keeps the names in
    # memory; the full layout and the exports hold the files' names, so they go through transformers' conversions.
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    full = write_full_checkpoint(tmp_path / "full", 1, model=model, trainer_state={"step": 1}, config=CONFIG)
    for path, load in ((save(tmp_path / "sharded", 1, model), load_checkpoint),
                       (full, checkpoint_legacy.load_checkpoint)):
        torch.manual_seed(1)
        model2 = transformers.Qwen3MoeForCausalLM(config)
        load(path, model=model2)
        _same_weights(model, model2)
    # The streamed export, here one file per layer, writes the names and values save_pretrained writes.
    model.save_pretrained(tmp_path / "hf")
    export_streamed(model, None, tmp_path / "streamed", file_bytes=1)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    # embeddings | layer 0 | layer 1 | final norm | output layer
    assert sorted(index["weight_map"]) == sorted(hf) and len(set(index["weight_map"].values())) == 5
    files = set(index["weight_map"].values())
    streamed = {k: v for f in files for k, v in load_file(tmp_path / "streamed" / f).items()}
    assert all(torch.equal(streamed[k], hf[k]) for k in hf)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text())
    _same_weights(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed"))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_round_trip_and_merged_export(tmp_path: Path, use_dora: bool) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora)
    model = peft.get_peft_model(tiny_model(0), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter
            torch.nn.init.normal_(param, std=0.3)
    ids = torch.randint(0, 64, (2, 9))
    optimizer, scheduler = optimizer_and_scheduler(model)
    train_step(model, optimizer, scheduler, ids)
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    path = save(tmp_path / "run", 1, model, optimizer=optimizer, scheduler=scheduler)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(path / "shards").read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights)  # the adapter only

    model2 = peft.get_peft_model(tiny_model(0), lora)  # same base, untrained adapter
    optimizer2, scheduler2 = optimizer_and_scheduler(model2)
    load_checkpoint(path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, reference, rtol=0, atol=0)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, tiny_tokenizer(), tmp_path / "merged")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the live model"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference, rtol=1e-4, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == "<eos>"
    if use_dora:  # the streamed export (FSDP2's) merges plain LoRA only: a run cannot configure DoRA
        with pytest.raises(UserError, match="plain LoRA linear layers only"):
            export_streamed(model, None, tmp_path / "streamed")
    else:  # the same merge, one tensor at a time
        export_streamed(model, tiny_tokenizer(), tmp_path / "streamed")
        _same_weights(merged, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed"))

    # A full-model checkpoint does not load into a LoRA model (and vice versa).
    with pytest.raises(UserError, match="holds a full model but the model to resume is a LoRA adapter.*lora.enabled"):
        load_checkpoint(save(tmp_path / "full", 1, tiny_model(0)), model=model2)
    with pytest.raises(UserError, match="lora.enabled"):
        checkpoint_legacy.load_checkpoint(write_full_checkpoint(tmp_path / "v1", 1, model=tiny_model(0), trainer_state={
            "step": 1}, config=CONFIG), model=model2)


def test_keep_last_prunes_and_resave_replaces(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    save(tmp_path, 4, model, keep_last=1)  # re-saving a step replaces it; the one just written is never pruned
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")], "temp dirs left behind"
    with pytest.raises(UserError, match="keep_last"):
        save(tmp_path, 5, model, keep_last=0)


def _flipped(blob: bytes) -> bytes:
    """The same bytes with one in the middle changed: the size is the same."""
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0xFF
    return bytes(flipped)


def test_corrupt_checkpoint_falls_back(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, _ = optimizer_and_scheduler(model)
    first, second = (save(tmp_path, s, model, optimizer=optimizer) for s in (1, 2))
    (second / "rng.pt").write_bytes((second / "rng.pt").read_bytes()[:-10])  # truncated

    with pytest.raises(UserError) as info:
        verify_checkpoint(second)
    message = str(info.value)
    assert "step-00000002 is corrupt (file rng.pt:" in message and f"last valid one is {first}" in message
    assert latest_valid_checkpoint(tmp_path) == first
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(second, model=model)

    # Same size, different bytes: only the sha256 catches it. A shard file is hashed by the rank that reads it:
    # at loading (any other file: by every check).
    shard = first / "shards" / "__0_0.distcp"
    pristine = shard.read_bytes()
    shard.write_bytes(_flipped(pristine))
    assert latest_valid_checkpoint(tmp_path, shards=()) == first
    fresh = tiny_model(1)
    with pytest.raises(UserError, match=r"file shards/__0_0.distcp: sha256 .*no valid checkpoint is left"):
        load_checkpoint(first, model=fresh, optimizer=optimizer_and_scheduler(fresh)[0])
    assert latest_valid_checkpoint(tmp_path) is None
    shard.unlink()  # a shard file gone: every check sees it (sizes and presence are checked for every file)
    with pytest.raises(UserError, match=r"file shards/__0_0.distcp: missing\); no valid checkpoint is left"):
        verify_checkpoint(first, shards=())
    shard.write_bytes(pristine)
    scalars = first / "optimizer_scalars.pt"
    scalars.write_bytes(_flipped(scalars.read_bytes()))
    with pytest.raises(UserError, match=r"file optimizer_scalars.pt: sha256 .*no valid checkpoint is left"):
        verify_checkpoint(first, shards=())
    assert latest_valid_checkpoint(tmp_path, shards=()) is None

    # A directory without a manifest is not a checkpoint at all.
    (second / MANIFEST).unlink()
    assert list_checkpoints(tmp_path) == [first]
    with pytest.raises(UserError, match="manifest.json: missing"):
        verify_checkpoint(second)


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch, transformers
    import vopd.checkpoint_sharded as ck
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    optimizer = torch.optim.AdamW(model.parameters())
    save = lambda step: ck.save_checkpoint(sys.argv[1], step, model=model, optimizer=optimizer,
                                           trainer_state={"step": step}, config={"steps": 9}, keep_last=5)
    save(1)
    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):  # write one tensor of the next checkpoint, then hang mid-checkpoint
        real_save(obj, f, *args, **kwargs)
        print("WRITING", flush=True)
        time.sleep(120)
    torch.save = slow_save
    save(2)
""")


def test_writer_killed_mid_checkpoint_leaves_previous_valid(tmp_path: Path) -> None:
    import vopd

    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    out = tmp_path / "run"
    src = str(Path(vopd.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()  # blocks until step 2 is half written (or the script died)
        assert line.startswith("WRITING"), f"writer did not reach the second checkpoint: {line!r}"
        partial = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step-00000002")]
        assert len(partial) == 1 and (partial[0] / "shards").is_dir() and not (partial[0] / MANIFEST).exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    first = out / "checkpoints" / "step-00000001"
    assert list_checkpoints(out) == [first] and latest_valid_checkpoint(out) == first
    verify_checkpoint(first)
    assert partial[0].exists()  # left by the dead writer; ignored, then cleaned by the next save
    save(out, 3, tiny_model())
    assert not partial[0].exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000003"]


def test_prepare_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert prepare_output_dir(out, CONFIG, resume=False, overwrite=False) is None
    assert (out / RUN_MARKER).is_file()
    with pytest.raises(UserError, match="already holds a vopd run"):
        prepare_output_dir(out, CONFIG, resume=False, overwrite=False)
    # Resume before any checkpoint: start fresh; after one: that one.
    assert prepare_output_dir(out, CONFIG, resume=True, overwrite=False) is None
    checkpoint = save(out, 5, tiny_model())
    longer = {**CONFIG, "steps": 50, "loggers": ["wandb"], "eval": {"n": 4}}  # may change on resume
    assert prepare_output_dir(out, longer, resume=True, overwrite=False) == checkpoint

    changed = {**CONFIG, "loss": {"method": "opd", "top_k": 100}, "optim": {"lr": 2e-5}}
    with pytest.raises(UserError) as info:
        prepare_output_dir(out, changed, resume=True, overwrite=False)
    assert "loss.method ('vopd' -> 'opd')" in str(info.value) and "optim.lr" in str(info.value)
    assert "steps" not in str(info.value).split("differs in")[1].split(";")[0]
    with pytest.raises(UserError, match="exclude each other"):
        prepare_output_dir(out, CONFIG, resume=True, overwrite=True)

    # Overwrite moves the old run aside, never deletes it.
    assert prepare_output_dir(out, changed, resume=False, overwrite=True) is None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and list_checkpoints(moved[0])[0].name == "step-00000005"
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER]

    # A directory that is not a vopd run is never touched.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for flags in ({"resume": False, "overwrite": True}, {"resume": True, "overwrite": False}):
        with pytest.raises(UserError, match="holds no vopd run"):
            prepare_output_dir(other, CONFIG, **flags)
    assert (other / "notes.txt").read_text() == "keep me"


def test_resume_refuses_when_every_checkpoint_is_corrupt(tmp_path: Path) -> None:
    prepare_output_dir(tmp_path, CONFIG, resume=False, overwrite=False)
    path = save(tmp_path, 1, tiny_model())
    (path / "config.yaml").write_text("tampered")
    with pytest.raises(UserError, match="none of its checkpoints is valid"):
        prepare_output_dir(tmp_path, CONFIG, resume=True, overwrite=False)


def test_every_file_of_a_checkpoint_is_in_its_manifest(tmp_path: Path) -> None:
    model = tiny_model()
    path = save(tmp_path, 1, model)
    extra = path / "shards" / "__1_0.distcp"  # as if a rank had written it after the manifest
    extra.write_bytes(b"not a checkpoint file")
    with pytest.raises(UserError, match=r"file shards/__1_0.distcp: not listed in the manifest"):
        verify_checkpoint(path)
    with pytest.raises(UserError, match="not listed in the manifest"):
        load_checkpoint(path, model=tiny_model(1))
    extra.unlink()
    verify_checkpoint(path)
    # A checkpoint renamed to another step is not that step's.
    moved = path.with_name("step-00000007")
    os.rename(path, moved)
    with pytest.raises(UserError, match=r"file manifest.json: its step 1 is not the directory's \(step-00000007\)"):
        verify_checkpoint(moved)
    # A manifest pointing outside the checkpoint is refused before anything is read.
    os.rename(moved, path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"].append({"path": "../elsewhere", "size": 0, "sha256": ""})
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"file \.\./elsewhere: a path outside the checkpoint"):
        verify_checkpoint(path)


def test_the_trainer_state_is_checked_before_anything_is_loaded(tmp_path: Path) -> None:
    path = save(tmp_path, 1, tiny_model(0))
    model = tiny_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def refuse(state: dict) -> None:
        assert state == {"step": 1, "position": 3}
        raise UserError("not this run's")

    with pytest.raises(UserError, match="not this run's"):
        load_checkpoint(path, model=model, check_state=refuse)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights loaded before the check"


def test_a_checkpoint_saved_without_a_state_the_resume_needs_names_options_that_exist(tmp_path: Path) -> None:
    """Saved without optimizer and scheduler (``save_checkpoint`` allows it): a load that needs them is refused with
    the options that help (there is no option to resume without them)."""
    path = save(tmp_path, 1, tiny_model(0))
    model = tiny_model(1)
    optimizer, scheduler = optimizer_and_scheduler(model)
    fix = r"a resume needs it: resume from another checkpoint \(--resume-from\), or start a new run \(--overwrite or " \
          r"another output_dir\)$"
    with pytest.raises(UserError, match=r"has no optimizer state: it was saved without one, and " + fix):
        load_checkpoint(path, model=model, optimizer=optimizer)
    with pytest.raises(UserError, match=r"has no scheduler.pt: it was saved without one, and " + fix):
        load_checkpoint(path, model=model, scheduler=scheduler)


def _run_with_history(out: Path, steps: list[int], final_at: int | None = None) -> None:
    prepare_output_dir(out, CONFIG, resume=False, overwrite=False)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in steps))
    if final_at is not None:
        (out / "final").mkdir()
        (out / "final" / "trainer_state.json").write_text(json.dumps({"step": final_at}))


def test_a_checkpoint_of_another_run_is_refused_by_the_resume_rule(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    _run_with_history(mine, [1])
    save(mine, 1, tiny_model())
    prepare_output_dir(theirs, CONFIG, resume=False, overwrite=False)
    other = save_checkpoint(theirs, 1, model=tiny_model(), trainer_state={"step": 1}, keep_last=2,
                            config={**CONFIG, "loss": {"method": "opd", "top_k": 100}, "steps": 99})
    with pytest.raises(UserError) as info:
        prepare_output_dir(mine, CONFIG, resume=True, overwrite=False, resume_from=other)
    message = str(info.value)
    assert "is not from this run: its config differs in loss.method ('opd' -> 'vopd');" in message
    assert "steps" not in message.split("differs in")[1]  # steps may change on resume: the same rule as the marker
    assert len(message.splitlines()) == 1


def test_resume_never_replaces_newer_work_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run_with_history(out, [1, 2, 3], final_at=3)
    first, second, third = (save(out, s, tiny_model()) for s in (1, 2, 3))
    with pytest.raises(UserError, match=r"from checkpoint step-00000001: it would replace newer work \(step-00000002, "
                                        r"step-00000003, final\); .*pass --discard-newer"):
        prepare_output_dir(out, CONFIG, resume=True, overwrite=False, resume_from=first)
    # The newest checkpoint with final/ at its step: nothing newer.
    assert prepare_output_dir(out, CONFIG, resume=True, overwrite=False) == third
    # final/ from a later step than the newest checkpoint (the last steps were bad), or of unknown step: newer.
    (out / "final" / "trainer_state.json").write_text(json.dumps({"step": 4}))
    with pytest.raises(UserError, match=r"step-00000003: it would replace newer work \(final\)"):
        prepare_output_dir(out, CONFIG, resume=True, overwrite=False)
    (out / "final" / "trainer_state.json").unlink()
    with pytest.raises(UserError, match=r"newer work \(final\)"):
        prepare_output_dir(out, CONFIG, resume=True, overwrite=False)

    assert prepare_output_dir(out, CONFIG, resume=True, overwrite=False, resume_from=second,
                              discard_newer=True) == second
    [aside] = out.glob("discarded-*")
    assert [p.name for p in list_checkpoints(aside)] == ["step-00000003"] and (aside / "final").is_dir()
    assert (aside / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()  # a copy; truncated later
    assert list_checkpoints(out) == [first, second] and not (out / "final").exists()


def test_a_history_without_a_checkpoint_does_not_start_over_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run_with_history(out, [1, 2])  # its checkpoints were deleted, or it was killed before the first one
    with pytest.raises(UserError, match=r"from scratch \(no checkpoint was saved\): it would replace newer work "
                                        r"\(metrics.jsonl\); .*--discard-newer .*continue from scratch"):
        prepare_output_dir(out, CONFIG, resume=True, overwrite=False)
    assert prepare_output_dir(out, CONFIG, resume=True, overwrite=False, discard_newer=True) is None
    [aside] = out.glob("discarded-*")
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # An empty history is no history: a run killed before its first logged step resumes from scratch.
    (out / "metrics.jsonl").write_text("")
    assert prepare_output_dir(out, CONFIG, resume=True, overwrite=False) is None


def test_a_run_saved_before_an_upgrade_added_keys_still_resumes() -> None:
    """A key the saved config lacks counts as its default: an upgrade that adds keys does not strand older runs,
    but setting the new key to another value is still a difference."""
    import copy

    from vopd.config import TrainConfig, config_to_dict
    from vopd.rundir import config_differences

    now = config_to_dict(TrainConfig())
    before = copy.deepcopy(now)
    del before["rollout"]["engine"], before["vllm"]  # as written by a vopd without the vLLM engine
    assert config_differences(before, now) == []
    changed = copy.deepcopy(now)
    changed["rollout"]["engine"] = "vllm"
    assert config_differences(before, changed) == ["rollout.engine"]
