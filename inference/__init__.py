"""Decoding: the KV cache and N-gram Cache driven step by step, and speculative decoding (paper section 4).

Sits between training and models: it runs models (their cache-aware forward) and nothing above them.
"""
