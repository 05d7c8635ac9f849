"""Summaries from a model: ``generate`` (batched, left-padded greedy generation, with or without an
adapter, and the prompts it encodes) and ``decoding`` (the lorasum decoder for Llama models on CPU).

Torch-free: (none)
"""
