"""Training: the Accelerator (``launch``), one ``Trainer`` (setup -> train -> finish), checkpoints and
exact resume (``checkpoint``), stopping early on signals or requests (``interrupts``)."""
