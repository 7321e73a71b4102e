"""`vopd bench`: measurements printed side by side in one run (docs/performance.md), never constants.

- ``cli``: the dispatcher; ``common``: fresh-process cases, ratios, resident memory;
- ``estimators``: the loss head alone, dense vs chunked; ``training``/``worker``: the training step and generation
  at real shapes; ``trl``/``trl_cases``/``trl_crosscheck``: vopd's trainer side by side with TRL's.
"""
