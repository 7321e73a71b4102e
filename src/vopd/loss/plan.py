"""The loss of a run, resolved once: which estimator (its row of the method table), top-k, the importance-ratio cap
and mode, the chunk memory budget and the student's logit transform, as one frozen value built before step 0 and
passed to the step and the fused head (docs/estimators.md).

What it knows: which options belong to the loss and what "off" means for each (a ratio cap <= 0 is no ratio).
What it does not know: the config file (``vopd.step.loss_plan`` builds a plan from ``cfg.loss``), models, teachers.
"""

from __future__ import annotations

from dataclasses import dataclass
from vopd.loss.estimators import RatioMode
from vopd.loss.head import IDENTITY, LogitTransform
from vopd.loss.methods import MethodSpec, method_spec


@dataclass(frozen=True)
class LossPlan:
    """spec: the method's row of ``vopd.loss.methods.TABLE``; top_k: ids per position for the top-k methods (a
    teacher answering with another width is an error); ratio_cap: None when the importance ratio is off;
    memory_budget_mb: the budget of one chunk's (rows x V) fp32 buffers; transform: the student's logit transform."""

    spec: MethodSpec
    top_k: int
    ratio_cap: float | None
    ratio_mode: RatioMode = "truncate"
    memory_budget_mb: float = 1024
    transform: LogitTransform = IDENTITY

    @classmethod
    def of(cls, method: str, *, top_k: int, ratio_cap: float, ratio_mode: RatioMode = "truncate",
           memory_budget_mb: float = 1024, transform: LogitTransform = IDENTITY) -> "LossPlan":
        """The plan of ``method`` (an unknown name is a one-line error listing the valid ones); ``ratio_cap`` <= 0
        turns the importance ratio off."""
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        if memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb={memory_budget_mb} must be > 0")
        return cls(method_spec(method), top_k, ratio_cap if ratio_cap > 0 else None, ratio_mode, memory_budget_mb,
                   transform)

    @property
    def uses_ratio(self) -> bool:
        return self.ratio_cap is not None
