"""The loss math: the eight OPD estimators as pure tensor functions, and nothing else.

- ``methods``: the method table, each method's properties declared once and read everywhere.
- ``estimators``: the dense (B, T, V) reference, autograd on the surrogates of docs/estimators.md (docs/estimators.md).
- ``chunked``: the fused chunked head the trainer uses (hidden states + output layers, closed-form gradients).
- ``enumeration``: exact moments by enumerating every token of a tiny vocabulary (the tests' ground truth).

Nothing here knows models, sampling, teachers, files or the training loop.
"""
