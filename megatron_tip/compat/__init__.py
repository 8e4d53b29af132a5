"""Compatibility shims for running megatron-core where it was not written to run."""
