"""A frozen teacher living in this process: a Hugging Face causal LM scored on the rollout's sequences.

What it knows: running the teacher (eval mode, no grad, its own dtype and device) over a rollout and handing the
loss its last hidden states and output layer (``TeacherHidden``: the full distribution, so it ``supports`` every
method), moved to the rollout's device; its pre-flight pairing with the student (one token->id map, output layers
that cover it, a head that reproduces the teacher's own logits). Also the student as its own teacher
(``model.teacher=self`` with LoRA: ``SelfTeacher``, the base model with its adapters off while scoring). An in-process
teacher may be sharded over the ranks after its pre-flight (``InProcessTeacher.shard``, FSDP2 by
``vopd.sharding``): its ``score`` is then a collective that every rank calls as often, in the same order
(``vopd.teacher.routing`` has a rank without rows for it join on a placeholder row). What it does not know:
optimisers, the training loop, the loss math, or HTTP (``vopd.teacher.client``).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from vopd.errors import UserError
from vopd.loss.methods import MethodSpec
from vopd.loss.scores import TeacherHidden
from vopd.models import (Model, Tokenizer, base_model, head_error, head_mismatch, last_hidden, logit_transform,
                         output_layer)
from vopd.rollout import Rollout


_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def compare_tokenizers(student_tok: Tokenizer, teacher_tok: Tokenizer) -> None:
    """Identical token->id maps and special tokens, or a UserError naming the first difference."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        for token in sorted(set(sv) | set(tv), key=lambda t: (sv.get(t, tv.get(t, -1)), t)):
            if sv.get(token) != tv.get(token):
                raise UserError(
                    f"student and teacher tokenizers differ: token {token!r} has id {sv.get(token)} in the student "
                    f"and {tv.get(token)} in the teacher ({len(sv)} vs {len(tv)} tokens); OPD needs one shared "
                    "tokenizer: pick a teacher from the student's model family"
                )
    for name in _SPECIAL:
        a, b = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if a != b:
            raise UserError(f"student and teacher {name} differ ({a!r} vs {b!r}); set the same special tokens in "
                            "both tokenizers")


def check_heads(student: Model, teacher: Model, vocab_size: int) -> None:
    """Both output layers must have at least the tokenizer's rows (extra rows are padding, sliced off)."""
    for role, model in (("student", student), ("teacher", teacher)):
        head = base_model(model).get_output_embeddings()
        rows = head.weight.shape[0]
        if rows < vocab_size:
            raise UserError(f"the {role}'s output layer has {rows} rows but the tokenizer has {vocab_size} tokens; "
                            "the model does not belong to this tokenizer")


def check_teacher_head(model: Model, tokenizer: Tokenizer, vocab_size: int, *,
                       text: str = "1 + 2 = 3. \\boxed{3}") -> str:
    """The teacher's output head (weight, bias, logit transform) reproduces its own forward's log-probs, or a
    UserError naming the architecture: the student's head is checked by ``vopd.check.self_check``."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]], device=next(model.parameters()).device)
    err = head_error(model, ids, vocab_size)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    transform = output_layer(model, vocab_size).transform
    if err > tol:  # a NaN (a broken teacher, not a head vopd misreads) is the loop's bad-step guard's to catch
        raise UserError(head_mismatch(model, err, role="teacher"))
    return f"teacher head reproduces its logits (logit transform: {transform.describe()}; max error {err:.1e})"


class SelfTeacher:
    """``model.teacher=self`` with LoRA: the live student's base model with every LoRA adapter switched off for the
    teacher's forward, i.e. the student's initial weights without a second copy in memory. The adapters are injected
    (by ``vopd.models.apply_lora``) after this object is made; ``score`` finds them each time, and leaves them, the
    model's train/eval mode and its gradients as they were."""

    full_distribution = True
    packs = True  # scores a packed rollout as packed (``vopd.packing``): the student's own forward

    def __init__(self, model: Model, vocab_size: int, *, tokenizer: Tokenizer | None = None) -> None:
        self.model, self.vocab_size, self.tokenizer = model, vocab_size, tokenizer

    @torch.no_grad()
    def score(self, rollout: Rollout, *, topk_ids: Tensor | None = None, lse: bool = False) -> TeacherHidden:
        import sys

        tuners = sys.modules.get("peft.tuners.tuners_utils")  # no LoRA without peft imported
        layers = [] if tuners is None else [m for m in base_model(self.model).modules()
                                            if isinstance(m, tuners.BaseTunerLayer)]
        was = [m.disable_adapters for m in layers]
        training = self.model.training
        device = next(self.model.parameters()).device
        try:
            for m in layers:
                m.enable_adapters(False)
            self.model.eval()
            r = rollout.to(device)
            hidden = last_hidden(self.model, r.input_ids, r.attention_mask, r.position_ids)[:, :-1]
        finally:
            for m, off in zip(layers, was):
                m.enable_adapters(not off)
            self.model.train(training)
        head = output_layer(self.model, self.vocab_size)  # never a LoRA target: the base output layer
        return TeacherHidden(hidden, head.weight.detach(), None if head.bias is None else head.bias.detach(),
                             head.transform).to(rollout.input_ids.device)

    def supports(self, spec: MethodSpec) -> str | None:
        """Every method: the whole distribution is here."""
        return None

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        return ["teacher = the student's initial weights (model.teacher=self: LoRA adapters disabled while scoring)"]

    def close(self) -> None:
        """Nothing to release: the model is the student's."""


class InProcessTeacher:
    """A frozen Hugging Face causal LM in this process. ``tokenizer``: its own tokenizer, compared with the
    student's in the pre-flight (None: the caller vouches that it is the student's)."""

    full_distribution = True
    packs = True  # scores a packed rollout as packed (``vopd.packing``), in the same forward as the student's

    def __init__(self, model: Model, vocab_size: int, *, tokenizer: Tokenizer | None = None) -> None:
        self.model = model.eval().requires_grad_(False)  # frozen: no gradient is ever taken through the teacher
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.sharded: nn.Module | None = None  # the sharded teacher's forward (``shard``); None: whole in this rank

    @property
    def collective(self) -> bool:
        """Sharded: every ``score`` is a collective (all-gathers) that every rank joins, as often, in the same order."""
        return self.sharded is not None

    def shard(self, device: torch.device, *, offload: bool = False) -> None:
        """Shard the model over the ranks (FSDP2, inference only: each unit's parameters are gathered for its forward
        and freed after it; ``offload``: its shards wait in host memory), computing on ``device``. After the
        pre-flight, which runs the whole model (``pairing_checks``)."""
        from vopd.sharding import shard_teacher

        self.sharded = shard_teacher(self.model, self.vocab_size, device, offload=offload)
        self.device = device

    @torch.no_grad()
    def score(self, rollout: Rollout, *, topk_ids: Tensor | None = None, lse: bool = False) -> TeacherHidden:
        """The teacher's last hidden states (B, L-1, D_t) and output layer: the full distribution, so ``topk_ids``
        and ``lse`` are not needed. Sharded: the output layer is a copy made in the forward (its gathered
        parameters are freed after it)."""
        r = rollout.to(self.device)
        if self.sharded is not None:
            hidden, weight, bias = self.sharded(r.input_ids, r.attention_mask, r.position_ids)
            scores = TeacherHidden(hidden[:, :-1], weight, bias, logit_transform(self.model))
            return scores.to(rollout.input_ids.device)
        hidden = last_hidden(self.model, r.input_ids, r.attention_mask, r.position_ids)[:, :-1]
        head = output_layer(self.model, self.vocab_size)
        return TeacherHidden(hidden, head.weight, head.bias, head.transform).to(rollout.input_ids.device)

    def supports(self, spec: MethodSpec) -> str | None:
        """Every method: the whole distribution is here."""
        return None

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        lines = []
        if self.tokenizer is not None:
            compare_tokenizers(student_tok, self.tokenizer)
            lines.append(f"tokenizers identical ({len(student_tok)} tokens, special tokens match)")
        check_heads(student, self.model, self.vocab_size)
        lines.append("output layers cover the tokenizer")
        return [*lines, check_teacher_head(self.model, self.tokenizer or student_tok, self.vocab_size)]

    def close(self) -> None:
        """Nothing to release: the model goes with the object."""


def in_process(teacher: object) -> InProcessTeacher | None:
    """The ``InProcessTeacher`` a teacher is, under any prompt of its own (``OwnPromptTeacher``); None for another
    placement (a server, ``self`` with LoRA). A wrapper is unwrapped through its ``inner`` (the wrapper's own
    module is not imported: it imports the teachers' protocol, which imports this module)."""
    while not isinstance(teacher, InProcessTeacher) and hasattr(teacher, "inner"):
        teacher = teacher.inner
    return teacher if isinstance(teacher, InProcessTeacher) else None
