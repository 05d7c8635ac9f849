"""Shipping an adapter: ``merged`` (base + adapter merged into a model plain transformers loads,
checked against base + adapter).

Torch-free: (none)
"""
