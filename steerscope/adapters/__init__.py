"""Adapters: a steering vector turned into weights (a LoRA adapter trained to reproduce the steered
model, `distill`), merged into a checkpoint (`merge_adapter`) or run in place (`adapter_in_place`).

A training method, not a job: it sits above `generation` (its targets are the steered model's own
completions) and below `judging`; `steerscope distill` and the bench's distill arm call it.
peft is needed only when these functions run (`pip install 'steerscope[distill]'`).
"""
