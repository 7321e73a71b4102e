"""Live tensor memory, by category, while some code runs: the tracker behind ``vopd plan`` (``vopd.memplan``), on fake
tensors at real shapes or on real tensors at tiny ones.

What it knows: every storage that an operator reads or writes while the trace is active (PyTorch's dispatcher sees
each op, ``TorchDispatchMode``), counted once however many views share it, for as long as it lives (a weak
reference per storage), and resized in place (FSDP2 frees and re-allocates its gathered parameters with
``UntypedStorage.resize_``, which no operator sees: it is patched while the trace is active, as PyTorch's own
``MemTracker`` does). A storage gets the category of the phase it first appears in (``phase``); ``retag`` moves
known tensors (gradients after a backward, optimizer states after a step) to their category. ``peak`` is the most
bytes live at once, and ``at_peak`` what was live then, by category.

What it does not know: memory no operator touches (an allocator's cache and fragmentation, CUDA graphs, NCCL
buffers, the CUDA context: ``vopd.memplan`` adds a margin for them), host versus device (everything traced is
assumed on the device), or what the code is for.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemTrace(TorchDispatchMode):
    """``with MemTrace() as trace:`` ... ``trace.peak`` (bytes), ``trace.at_peak`` ({category: bytes}).

    Activate it again later (``with trace:``) to go on counting: storages that die in between are released by their
    weak references, storages born in between are counted when an op first touches them."""

    def __init__(self, classify: Callable[[Tensor | None, str], str] | None = None) -> None:
        """``classify(tensor, phase)``: the category of a storage first seen in ``phase`` (``tensor`` None: grown by
        ``resize_``, i.e. FSDP2's gathered parameters); default: the phase."""
        super().__init__()
        self.classify = classify or (lambda _t, phase: phase)
        self.tag = "other"
        self.live: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, category)
        self.by_tag: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self._resize: Any = None

    # -- bookkeeping
    def _set(self, key: int, nbytes: int, tag: str) -> None:
        old = self.live.get(key)
        if old is not None:
            self.current -= old[0]
            self.by_tag[old[1]] -= old[0]
        self.live[key] = (nbytes, tag)
        self.current += nbytes
        self.by_tag[tag] = self.by_tag.get(tag, 0) + nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = {k: v for k, v in self.by_tag.items() if v}

    def _free(self, key: int) -> None:
        old = self.live.pop(key, None)
        self._refs.pop(key, None)
        if old is not None:
            self.current -= old[0]
            self.by_tag[old[1]] -= old[0]

    def _watch(self, st: torch.UntypedStorage, key: int) -> None:
        """Release ``key`` when its storage dies."""
        def release(_ref: object, k: int = key) -> None:
            self._free(k)

        self._refs[key] = weakref.ref(st, release)

    def _see(self, t: Tensor, tag: str | None = None) -> None:
        try:
            st = _local(t).untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own (sparse, nested)
            return
        key = st._cdata
        if key in self.live:
            if tag is not None:
                self._set(key, self.live[key][0], tag)
            return
        self._watch(st, key)
        self._set(key, st.nbytes(), tag or self.classify(t, self.tag))

    # -- the public calls
    def add(self, tensors: Iterable[Tensor], tag: str) -> None:
        """Count ``tensors`` (already live) under ``tag`` from now on, whether or not an op has touched them yet."""
        for t in tensors:
            self._see(t, tag)

    retag = add

    @contextlib.contextmanager
    def phase(self, tag: str) -> Iterator[None]:
        """Storages first seen inside the block are counted under ``tag``."""
        before, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = before

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.current, {k: v for k, v in self.by_tag.items() if v}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._see(t)
        return out

    def __enter__(self) -> "MemTrace":
        self._resize = torch.UntypedStorage.resize_
        trace, original = self, self._resize

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = original(st, size)
            key = st._cdata
            if key in trace.live:
                trace._set(key, size, trace.classify(None, trace.tag) if size else trace.live[key][1])
            elif size:
                trace._watch(st, key)
                trace._set(key, size, trace.classify(None, trace.tag))
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (what this rank holds), any other tensor as it is."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, Tensor) else t
