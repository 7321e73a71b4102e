"""The tiny world: an offline arithmetic task, a BPE tokenizer, an SFT'd teacher and a weaker student, built on the
CPU in minutes and cached (docs/tiny_world.md). The demo, reproduce, variance and many tests run on it; the core
library never imports it.

- ``task``: the problems and their answers; ``tiny_models``: tokenizer and Qwen3-architecture model builders;
- ``sft``: supervised fine-tuning on solutions; ``build``: the world's recipe; ``cache``: the cached, atomic build;
  ``cli``: the `vopd sft` command;
- the tool world (`vopd sft --world tools`): ``calculator`` (the tool), ``tool_task`` (problems, traces, grading),
  ``tool_sft`` (multi-turn SFT examples, the build's own greedy episodes), ``tool_build`` (its recipe and cache).
"""
