"""Adapters to training stacks: transformers (hidden states, lm_head, probes) and, with the optional
``trl`` extra, HyTuning in TRL's GRPOTrainer (``hykernels.integrations.trl``)."""
