"""The tiny world: an offline arithmetic task, a BPE tokenizer, an SFT'd teacher and a weaker student, built on the
CPU in minutes and cached (docs/tiny_world.md). The demo, reproduce, variance and many tests run on it; the core
library never imports it.

- ``task``: the problems and their answers; ``tiny_models``: tokenizer and Qwen3-architecture model builders;
- ``sft``: supervised fine-tuning on solutions; ``build``: the cached world; ``cli``: the `vopd sft` command.
"""
