"""Integrations with training frameworks, one module each, imported only when used.

- :mod:`remat.integrations.lightning`: ``Remat``, a Lightning callback that plans the model a
  ``LightningModule``'s ``training_step`` calls.

transformers' ``Trainer``, PEFT and accelerate need no module of their own: a model planned by
``remat.auto`` trains under them as it is (docs/integrations.md).
"""
