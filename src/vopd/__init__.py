"""vopd: on-policy distillation of language models with the vOPD control-variate baseline.

Public API (see docs/estimators.md):
    distillation_loss          dense (B, T, V) logits -> LossOutput (the reference)
    chunked_distillation_loss  hidden states + output-layer weights, chunked over positions -> LossOutput
"""

from vopd.loss.chunked import chunked_distillation_loss
from vopd.loss.estimators import LossOutput, distillation_loss
from vopd.loss.methods import METHODS, Method

__all__ = ["METHODS", "LossOutput", "Method", "chunked_distillation_loss", "distillation_loss"]
__version__ = "0.1.0"
