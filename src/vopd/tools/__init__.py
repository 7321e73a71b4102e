"""Tools built on the library: `vopd demo`, `vopd reproduce`, `vopd variance` and `vopd bench ...` (``tools.bench``).

They use the core, the loss, the teachers and the tiny world; nothing in the core imports them.
"""
