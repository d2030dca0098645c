"""Router-Tuning training: arguments, data, losses, the Trainer subclass and the run that ties them.

``arguments``  the flags (the seed's names + transformers' TrainingArguments), parsed and checked
``data``       examples -> encoded datasets and the collator
``losses``     LM loss, distillation, the capacity regulariser's bookkeeping
``trainer``    the Trainer subclass: router-only / LoRA / full, checkpoints, final artifacts
``run``        ``run(config)``: one training run from a config

The one entry point is :mod:`routertune.train` (``routertune train`` and ``python -m
routertune.train`` both call its ``main``); a recipe builds a config with
:func:`routertune.training.arguments.config_from_flags` and calls ``run``. Heavy imports
(torch, transformers) happen when a submodule is imported, not here.
"""
