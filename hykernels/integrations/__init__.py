"""Adapters to training stacks (transformers today)."""
