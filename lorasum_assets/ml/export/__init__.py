"""Shipping an adapter: ``merged`` (base + adapter merged into a model plain transformers loads,
checked against base + adapter) and ``gguf`` (the merged model and the adapter as GGUF for llama.cpp
and Ollama, converted by llama.cpp's own converters and checked by llama.cpp itself).

Torch-free: (none)
"""
