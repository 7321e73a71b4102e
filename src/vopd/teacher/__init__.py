"""The teacher family: one ``Teacher`` protocol (``vopd.teacher.base``) and its placements.

- ``base``: the protocol (scores, the form they take, ``supports``: which methods a placement serves, with the
  reason and fix when it cannot); ``open_teacher`` picks the placement. ``answers``: what an answer may hold.
- ``local``: a frozen Hugging Face model in this process (hidden states + output layer: every method).
- ``http``: the HTTP transport every server placement shares (session, token, retries, request packing, bytes).
- ``client``: the vopd server's protocols over it (numbers at ids: protocols 1-2; hidden states: protocol 3).
- ``stock``: what the stock-server clients share (replicas of one teacher, both routes' scoring, tokenizer probes).
- ``stock_vllm``: a stock vLLM server (``vllm serve``) as the teacher: the pooling route (hidden states: every method)
  or the generate route (``prompt_logprobs``: opd, the teacher's own top-k), over replicas; ``stock_answers``: its
  request bodies and what its answers must hold.
- ``stock_sglang``: a stock SGLang server (``/generate``) as the teacher: hidden states (every method) or input
  log-probs (opd, the teacher's own top-k), over replicas.
- ``server``: `vopd serve-teacher`, the server side; ``wire``: what client and server share (protocol, codec, limits).
- ``reprompt``: a teacher prompt of its own, around any placement; ``routing``: several teachers by name.
"""
