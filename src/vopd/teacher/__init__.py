"""The teacher family: one ``Teacher`` protocol (``vopd.teacher.base``) and its placements.

- ``base``: the protocol and the typed scores every teacher returns; ``open_teacher`` picks the placement.
- ``local``: a frozen Hugging Face model in this process (hidden states + output layer: every method).
- ``client``: the HTTP client of a teacher server (per-token numbers: the methods that need no full distribution).
- ``server``: `vopd serve-teacher`, the server side; ``wire``: what client and server share (protocol, codec, limits).
"""
