"""The training a cell measures, built the way the libraries build it: the model (transformers), its adapter
(peft) and 4-bit base (bitsandbytes), the optimizer and schedule (transformers' factories), the data, sharding,
and the loop. Enters: a ``CellConfig`` and a device. Leaves: trained steps (``StepLog``s), observed through a
``Probe``."""
