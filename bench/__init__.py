"""Benchmarks: the GPU's measured ceilings, each kernel and model component against its floor, training steps."""
