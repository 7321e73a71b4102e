"""Micro-batches by tokens, not rows: which of a rank's sequences run together, and which rank takes which.

``micro_batch_tokens: N`` (0: ``micro_batch_size`` rows in sampling order, as before) gives each micro-batch a
budget of N token slots: padded, a micro-batch of r rows costs r x its longest sequence; packed (``packing: true``),
the sum of its sequences' lengths. Sequences are sorted longest first and dealt so that micro-batches carry
near-equal costs (padded: consecutive runs of the sorted lengths, which waste the least padding; packed: each to the
least loaded micro-batch). A sequence longer than the budget runs alone (counted in ``micro_batches_over_budget``,
docs/metrics.md): refusing it would end a run over one long completion. Under torchrun every rank runs as many
micro-batches (the forwards of FSDP2 and of a sharded teacher are collectives): the count is the largest any rank
needs, and a rank with fewer sequences than that runs a placeholder without loss tokens. Before that, the step's
sequences are balanced over the ranks by tokens (``balance``; cf. verl's sequence-length balancing).

None of this changes a gradient: every micro-batch divides by the global token count (docs/estimators.md), so the
step's gradient is the same sum in any grouping, up to float order. What it knows: lengths, budgets and
assignments. What it does not know: tensors, models, the loss, or how a micro-batch is packed (``vopd.packing``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grouping:
    """A rank's micro-batches: ``groups[m]`` the sequences (indices into the rank's rollout) of micro-batch m, an
    empty group a placeholder; ``over_budget`` the number of sequences longer than the budget (each alone)."""

    groups: list[list[int]]
    over_budget: int = 0


def cost(lengths: list[int], *, packed: bool) -> int:
    """Token slots a micro-batch of sequences of ``lengths`` occupies."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def _order(lengths: list[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _least_loaded(lengths: list[int], bins: int) -> list[list[int]]:
    """Each sequence, longest first, to the micro-batch with the fewest tokens so far (LPT)."""
    groups: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    for i in _order(lengths):
        b = min(range(bins), key=lambda j: (load[j], j))
        groups[b].append(i)
        load[b] += lengths[i]
    return groups


def _runs(lengths: list[int], budget: int) -> list[list[int]]:
    """Padded: consecutive runs of the longest-first order, each as long as the budget allows."""
    groups: list[list[int]] = []
    for i in _order(lengths):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _fits(groups: list[list[int]], lengths: list[int], budget: int, packed: bool) -> bool:
    return all(len(g) <= 1 or cost([lengths[i] for i in g], packed=packed) <= budget for g in groups)


def group(lengths: list[int], budget: int, *, packed: bool, at_least: int = 0) -> Grouping:
    """The fewest micro-batches (at least ``at_least``) within ``budget`` token slots each, near-equal in tokens;
    a sequence longer than the budget alone. Micro-batches are returned in the order of their first sequence in
    the rollout (which keeps the longest from all coming first, so the variance probe's first half is a mix)."""
    if budget < 1:
        raise ValueError(f"budget {budget} < 1")
    over = sum(n > budget for n in lengths)
    if packed:
        bins = max(at_least, 1, -(-sum(lengths) // budget))
        groups = _least_loaded(lengths, bins)
        while not _fits(groups, lengths, budget, packed):
            bins += 1
            groups = _least_loaded(lengths, bins)
    else:
        groups = _runs(lengths, budget)
        while len(groups) < at_least and any(len(g) > 1 for g in groups):
            widest = max((g for g in groups if len(g) > 1), key=lambda g: (cost([lengths[i] for i in g],
                                                                                packed=False), -g[0]))
            k = groups.index(widest)
            groups[k:k + 1] = [widest[:len(widest) // 2], widest[len(widest) // 2:]]
    groups = [sorted(g) for g in groups if g]
    groups.sort(key=lambda g: g[0])
    groups += [[] for _ in range(at_least - len(groups))]
    return Grouping(groups, over)


def balance(lengths: list[int], ranks: int) -> list[list[int]]:
    """The step's sequences (``lengths``: all ranks', in global order) over ``ranks`` ranks with near-equal
    tokens: each sequence, longest first, to the rank with the fewest tokens so far among those with room (at most
    ceil(n / ranks) sequences each, so that no rank is left with nothing while another takes many short ones).
    Each rank's indices, in global order."""
    room = -(-len(lengths) // ranks)
    share: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i in _order(lengths):
        r = min((j for j in range(ranks) if len(share[j]) < room), key=lambda j: (load[j], j))
        share[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in share]
